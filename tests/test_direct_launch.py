"""DirectLauncher (meswitch.kernels.direct_launch): a compiled kernel launched without the JIT's per-call work.

Needs Triton (the GPU machine, or Triton's interpreter here: ``PYTHONPATH=<triton> TRITON_INTERPRET=1``); CI's CPU
environment has none, so these skip there. The key must tell apart exactly what Triton's own specialization does, or a
kernel compiled for one alignment would run on another: checked against ``native_specialize_impl`` itself.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from meswitch.kernels.direct_launch import DirectLauncher, _spec, hooked  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or Triton's interpreter")


def _native(arg):
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(CUDABackend, arg, False, True, True)


def test_the_key_tells_apart_what_tritons_specialization_does():
    buf = torch.empty(64, dtype=torch.int16)
    values = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**32, 2**63 - 16, 2**63, True, False,
              1.0, 0.5, None, buf, buf[1:], buf[8:], buf.float(), buf[4:].view(torch.int32)]  # fmt: skip
    for a, b in itertools.combinations(values, 2):
        same_native = _native(a) == _native(b)
        assert (_spec(a) == _spec(b)) == same_native, (a, b, _native(a), _native(b))


def test_the_key_of_a_tma_descriptor_is_its_type():
    pytest.importorskip("triton.experimental.gluon")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    def desc(t, rows, dtype):
        return TensorDescriptor.from_tensor(t, [rows, 32], gl.NVMMASharedLayout.get_default_for([rows, 32], dtype))

    a, b = torch.empty(512, 64, dtype=torch.float16), torch.empty(256, 96, dtype=torch.float16)
    c = torch.empty(512, 64, dtype=torch.bfloat16)
    descs = [desc(a, 256, gl.float16), desc(b, 256, gl.float16), desc(a, 128, gl.float16), desc(c, 256, gl.bfloat16)]
    for x, y in itertools.combinations(descs, 2):
        assert (_spec(x) == _spec(y)) == (_native(x)[0] == _native(y)[0])
    assert _spec(descs[0]) == _spec(descs[1])  # the shape is a runtime argument: one kernel serves both


def test_an_argument_it_cannot_key_is_refused():
    with pytest.raises(TypeError, match="no direct launch"):
        _spec("a string")


@triton.jit
def _axpy(x_ptr, y_ptr, a, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(y_ptr + offs, mask=mask) + a * tl.load(x_ptr + offs, mask=mask), mask=mask)


def test_a_launch_hook_is_seen_only_when_one_is_set():
    """Triton 3.6 keeps an empty hook chain where no hook is set: read as none (else every call took the JIT)."""
    from triton import knobs

    assert not hooked()
    hook = lambda metadata: None
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert hooked()
        finally:
            chain.remove(hook)
    assert not hooked()


@needs_kernels
def test_launches_equal_the_jits_and_a_new_specialization_compiles_anew(monkeypatch):
    launch = DirectLauncher(_axpy)
    x = torch.arange(1000, dtype=torch.float32, device=DEVICE)
    y = torch.zeros(1001, dtype=torch.float32, device=DEVICE)
    jit_calls = []
    jit_run = type(_axpy).run
    monkeypatch.setattr(type(_axpy), "run", lambda self, *a, **k: jit_calls.append(1) or jit_run(self, *a, **k))
    for _ in range(3):  # the first call compiles through the JIT; the others launch the kept kernel
        launch(triton.cdiv(1000, 128), (x, y, 2.0, 1000), {"BLOCK": 128}, num_warps=4)
    assert torch.equal(y[:1000], 6 * x) and y[1000] == 0
    assert len(jit_calls) == (3 if INTERPRET else 1)
    assert len(launch.kernels) == 1
    kept = next(iter(launch.kernels.values()))
    assert (kept is False) == INTERPRET  # the interpreter compiles nothing: every call goes through it

    launch(triton.cdiv(999, 128), (x[1:], y[1:], 1.0, 999), {"BLOCK": 128}, num_warps=4)  # misaligned: a new key
    assert len(launch.kernels) == 2
    assert torch.equal(y[1:1000], 7 * x[1:]) and y[0] == 0 and y[1000] == 0


@needs_kernels
def test_constexprs_that_are_not_the_signatures_tail_are_refused():
    x = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="constexprs must be"):
        DirectLauncher(_axpy)(1, (x, x, 1.0), {"BLOCK": 8, "n": 8})
