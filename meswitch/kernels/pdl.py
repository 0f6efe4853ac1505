"""Programmatic dependent launch (Hopper): a kernel launched with it may start while its predecessor in the stream
is still running, and waits for it in its first instruction (``griddepcontrol.wait``), so the launch's latency
hides behind the predecessor's last wave instead of adding a gap between the two. Every program waits before it
reads or writes anything, and before it may exit: a dependent's wait covers only its direct predecessor, which
must therefore not end before its own predecessor did.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """The first statement of a kernel that may be launched with PDL; then lets the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """The launch keyword that asks for PDL (Triton's ``launch_pdl``); none without it."""
    return {"launch_pdl": True} if pdl else {}
