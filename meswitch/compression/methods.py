"""The compression methods, registered by name: what the CLI offers, the flows accept and the report compares.

A method says which input channels it keeps in fp16 (its salience scores) and on which grid it quantizes
the rest; every method writes the same packed layout (delta.py), which the kernels read. Adding one is
one file and one call::

    TOY = register(Method("toy", "salient by peak delta", salience=peak_scores))

Importing this module is cheap (no torch), so the CLI builds its choices from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from meswitch.compression.config import DeltaConfig
    from meswitch.compression.quantize import QuantSpec

# (delta [N, K], input second moments s [K], grid, reconstruction scores when already computed) -> scores [K]
Salience = Callable[["torch.Tensor", "torch.Tensor", "QuantSpec", "torch.Tensor | None"], "torch.Tensor"]


@dataclass(frozen=True)
class Method:
    """One compression method: its name, how it picks salient channels, and the grid it imposes."""

    name: str
    help: str  # one line, for the CLI
    salience: Salience | None = None  # per-channel scores, the largest kept in fp16; None: no salient channels
    grid: dict[str, Any] = field(default_factory=dict, hash=False)  # QuantSpec fields fixed whatever the config says
    uses_calibration: bool = True  # weighs channels by calibration activations when there are some
    needs_calibration: bool = False  # cannot run without calibration text
    marker: str = "x-"  # its points in the report's plot (matplotlib format)

    @property
    def selects(self) -> bool:
        return self.salience is not None

    def quant_spec(self, config: DeltaConfig) -> QuantSpec:
        """The grid of the non-salient part: the config's, with the method's own settings on top."""
        from meswitch.compression.quantize import QuantSpec

        asked = {"bits": config.bits, "symmetric": config.symmetric, "group_size": config.group_size,
                 "clip_search": config.clip_search}  # fmt: skip
        return QuantSpec(**{**asked, **self.grid})

    def salient_count(self, config: DeltaConfig, k: int) -> int:
        """Salient channels of a matrix with ``k`` inputs: a fraction of ``k`` if ``salient`` < 1, else a count."""
        if not self.selects or config.salient == 0:
            return 0
        n = int(config.salient) if config.salient >= 1 else max(1, round(config.salient * k))
        return min(n, k)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` known by its name (to DeltaConfig, the CLI, the flows and the report); return it."""
    if method.name in _REGISTRY:
        raise ValueError(f"a compression method named {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_REGISTRY)


def registered_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def methods_help() -> str:
    """The registered methods, a clause each, as the CLI's ``--method`` help lists them."""
    return "; ".join(f"{m.name}: {m.help}" for m in registered_methods())


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _REGISTRY[name]


def applied_bits(method: str, bits: int) -> int:
    """The bit width a method's codes really have: its own where it fixes one (BitDelta: 1), else ``bits``."""
    known = _REGISTRY.get(method)
    return int(known.grid.get("bits", bits)) if known else bits


def _reconstruction_error(delta, s, spec, scores):
    """ME-Switch: each channel's activation-weighted quantization error (reused when global allocation has it)."""
    from meswitch.compression.salience import reconstruction_scores

    return reconstruction_scores(delta, s, spec) if scores is None else scores


def _column_norm(delta, s, spec, scores):
    """The magnitude baseline: the delta's column norms, which the paper shows is the wrong criterion."""
    return delta.norm(dim=0)


MESWITCH = register(
    Method("meswitch", "salience by reconstruction error", _reconstruction_error, needs_calibration=True, marker="o-")
)
FIXED = register(Method("fixed", "no salient channels", marker="s--"))
MAGNITUDE = register(Method("magnitude", "salient by delta column norm", _column_norm, marker="^:"))
# one step size per tensor (quantize.PER_TENSOR), no clipping: BitDelta's sign and scale
BITDELTA = register(
    Method("bitdelta", "1-bit sign with one scale per matrix", uses_calibration=False, marker="D",
           grid={"bits": 1, "symmetric": True, "group_size": -1, "clip_search": False})
)  # fmt: skip
