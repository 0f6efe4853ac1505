"""What a compression is told: the method and its settings (DeltaConfig), and the calibration's (CalibConfig).

These dataclasses are the one source of their settings: the CLI's flags (cli/config_flags.py) and the
pipeline's YAML sections (flows/config.py) are derived from their fields, each field's help text kept in
its metadata. No torch here, so building the CLI stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from meswitch.compression.methods import get_method, method_names, methods_help

if TYPE_CHECKING:
    from meswitch.compression.quantize import QuantSpec

SUPPORTED_BITS = (1, 2, 3, 4, 8)
BUDGET_BITS = (1, 2, 3, 4)  # the widths a bit budget gives matrices (compression/bit_budget.py)
ALLOCATIONS = ("layer", "global")
ROUNDINGS = ("nearest", "gptq")
PER_TENSOR = -1  # group_size of one step size per matrix, BitDelta's grid


class ConfigError(ValueError):
    """A setting out of its range, raised by the configs' own checks. It keeps the field's name apart, so that the
    CLI can name the flag (``--samples must be at least 1, got 0``) where the pipeline's YAML names the key."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name} {problem}")
        self.field_name, self.problem = field_name, problem


def setting(default: Any, help: str | Callable[[], str], **cli: Any) -> Any:
    """A config field with its CLI help (text, or a function for text built when the parser is; ``cli``: the
    ``flag`` when it is not the field's name, and ``choices``)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class DeltaConfig:
    """The method (a name in compression.methods) and its parameters."""

    method: str = setting("meswitch", methods_help, choices=method_names)
    bits: int = setting(2, "bits of the non-salient part", choices=SUPPORTED_BITS)
    salient: float = setting(0.01, "salient input channels per matrix: a fraction of them if < 1, else a count")
    group_size: int = setting(
        0, "group size along the input dim (0: per output channel; -1: one step size per matrix)", flag="--group"
    )
    symmetric: bool = setting(False, "symmetric grid (no zero point stored)")
    clip_search: bool = setting(True, "search a clipping ratio per row that minimises the (weighted) error")
    # layer: every matrix keeps its own count; global: the same total, spread over the matrices by their
    # share of their own activation-weighted error (see salience.allocate_salient)
    allocation: str = setting(
        "global",
        "global: the same number of salient channels in all, placed in the matrices where they hold the most of "
        "their matrix's error; layer: exactly --salient in every matrix",
        choices=ALLOCATIONS,
    )
    # nearest: each code rounded alone; gptq: error-compensating rounding through the calibration Hessian
    # (compression/gptq.py), which needs CalibConfig(hessian=True): see calibration_for
    rounding: str = setting(
        "nearest",
        "nearest: each code rounded alone; gptq: error-compensating rounding through the calibration inputs' "
        "Hessian (needs --calib; about K² floats per linear in memory)",
        choices=ROUNDINGS,
    )
    refine: bool = setting(False, "refit step sizes to the calibration-weighted error")
    # None: every matrix gets `bits`. Else an average over the whole expert, counted as the manifest's
    # bits_per_param counts it; each matrix gets a width near it by its calibration-weighted error
    # (compression/bit_budget.py), and `bits` is not used.
    bit_budget: float | None = setting(
        None,
        "average bits per delta parameter over the whole expert, every stored byte counted; each matrix gets a "
        "width near it (1-4 bits), more where its activation-weighted error falls most per extra byte "
        "(replaces --bits)",
    )

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ConfigError("method", f"must be one of {method_names()}, got {self.method!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError("bits", f"must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.salient < 0:
            raise ConfigError("salient", f"must be >= 0, got {self.salient}")
        if self.salient >= 1 and self.salient != int(self.salient):
            raise ConfigError("salient", f">= 1 is a channel count and must be whole, got {self.salient}")
        if self.group_size < PER_TENSOR:  # a size that does not divide a matrix's inputs is refused at that matrix
            raise ConfigError(
                "group_size",
                f"must be -1 (per matrix), 0 (per output channel) or a positive size, got {self.group_size}",
            )
        if self.allocation not in ALLOCATIONS:
            raise ConfigError("allocation", f"must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError("rounding", f"must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.bit_budget is not None:
            if "bits" in get_method(self.method).grid:
                raise ConfigError("bit_budget", f"is not taken by method {self.method!r}: it fixes its own bit width")
            if self.bit_budget < BUDGET_BITS[0]:
                raise ConfigError(
                    "bit_budget", f"{self.bit_budget} is below the smallest width, {BUDGET_BITS[0]} bit per parameter"
                )

    def quant_spec(self) -> QuantSpec:
        return get_method(self.method).quant_spec(self)

    @property
    def allocates_globally(self) -> bool:
        return self.allocation == "global" and get_method(self.method).selects and self.salient > 0

    @property
    def uses_calibration(self) -> bool:
        """Whether calibration statistics shape the result: the method weighs channels by them, or refinement."""
        return get_method(self.method).uses_calibration or self.refine

    def salient_count(self, k: int) -> int:
        return get_method(self.method).salient_count(self, k)


@dataclass(frozen=True)
class CalibConfig:
    samples: int = setting(64, "calibration sequences")
    seq_len: int = setting(256, "tokens per calibration sequence")
    batch_size: int = setting(8, "calibration sequences per forward pass")
    # Positions at the start of every sequence left out of the statistics. In pretrained LLMs the first
    # position is an attention sink whose activations can hold nearly all of a layer's input energy, so it
    # would decide the salience of every channel alone (benchmarks/attention_sink.py measures it).
    skip_first: int = setting(0, "positions at the start of every sequence left out of the statistics")
    # Also gather each linear's full input Hessian Σ x xᵀ [K, K] (what GPTQ rounding needs) in place of its diagonal.
    # Memory: K² floats per linear, kept on the CPU (about 0.5 GB for SmolLM2-135M).
    hessian: bool = setting(False, "gather each linear's full input Hessian (--rounding gptq turns it on)")

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.skip_first < self.seq_len:  # at least one position of every sequence must count
            raise ConfigError(
                "skip_first", f"must be in [0, {self.seq_len}), below the sequence length, got {self.skip_first}"
            )


def calibration_for(delta: DeltaConfig, calib: CalibConfig) -> CalibConfig:
    """The calibration ``delta`` needs: with each linear's input Hessian when it rounds through them (GPTQ)."""
    return replace(calib, hessian=True) if delta.rounding == "gptq" else calib
