"""The report's methods: every registered compression method as it is, and variants built on one.

A variant changes its method's settings (GPTQ rounding, the equal-bytes group size, a bit budget in place of
one width) or follows it with scale distillation. Its name is what the report's rows, table and plot call it.
:func:`check_variants` refuses, before any work, a report whose rows cannot all be made.
Cheap to import (no torch), so the CLI lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from meswitch.compression.config import DeltaConfig
from meswitch.compression.methods import BITDELTA, FIXED, MAGNITUDE, MESWITCH, get_method, registered_methods

if TYPE_CHECKING:
    from meswitch.evaluation.report import ReportConfig

# (the method's config at one bit width, the report's settings, every quantized matrix's K) -> the variant's config
Adjust = Callable[[DeltaConfig, "ReportConfig", list[int]], DeltaConfig]


@dataclass(frozen=True)
class ReportMethod:
    """What the report calls a method: a compression method, as it is or as a variant."""

    name: str
    method: str  # the registered compression method it runs
    help: str
    marker: str  # its points in the plot (matplotlib format)
    adjust: Adjust | None = None
    budgeted: bool = False  # a bit budget in place of one width: the one of ``bit_budgets`` at each width (budget_at)
    distilled: bool = False  # scale distillation after compression


def equal_bytes_group(in_features: list[int], salient: float) -> int:
    """The group size that gives fixed precision about the bytes of ``salient`` fp16 input channels.

    A salient channel costs 16 bits per output row, ``16 · salient`` bits per parameter; a group costs its
    fp16 step size and offset, 32 bits per ``g`` parameters. Of the group sizes that divide every
    matrix's input dimension, the one whose ``32 / g`` is nearest ``16 · salient``.
    """
    if not 0 < salient < 1:
        raise ValueError(f"equal-bytes groups need a salient fraction in (0, 1), got {salient}")
    common = math.gcd(*in_features)
    sizes = [g for g in range(8, common + 1) if common % g == 0]
    if not sizes:
        raise ValueError(f"the input dimensions {sorted(set(in_features))} share no group size of 8 or more")
    return min(sizes, key=lambda g: abs(32 / g - 16 * salient))


def budget_at(bits: int, budgets: tuple[float, ...]) -> float:
    """The report's bit budget at width ``bits``: the one of ``budgets`` (``--bit-budgets``) in [bits, bits + 1),
    so a budget row sits beside the uniform rows it is compared with."""
    fits = [b for b in budgets if math.floor(b) == bits]
    if not fits:
        given = ", ".join(map(str, budgets)) or "none"
        raise ValueError(
            f"a bit-budget method at {bits} bits needs a budget in [{bits}, {bits + 1}) (--bit-budgets), got {given}"
        )
    return fits[0]


def _gptq(c: DeltaConfig, _cfg: ReportConfig, _k: list[int]) -> DeltaConfig:
    return replace(c, rounding="gptq")


COMPARED = (MESWITCH.name, FIXED.name, MAGNITUDE.name, BITDELTA.name)  # what a report compares by default
_VARIANTS: list[ReportMethod] = []


def register_variant(variant: ReportMethod) -> ReportMethod:
    get_method(variant.method)
    if variant.name in report_method_names():
        raise ValueError(f"a report method named {variant.name!r} exists already")
    _VARIANTS.append(variant)
    return variant


def report_methods() -> list[ReportMethod]:
    """Each registered method as it is, followed by the variants built on it."""
    out = []
    for m in registered_methods():
        out.append(ReportMethod(m.name, m.name, m.help, m.marker))
        out += [v for v in _VARIANTS if v.method == m.name]
    return out


def report_method_names() -> tuple[str, ...]:
    return tuple(v.name for v in report_methods())


def report_method(name: str) -> ReportMethod:
    known = {v.name: v for v in report_methods()}
    if name not in known:
        raise ValueError(f"unknown report method {name!r}; known: {', '.join(known)}")
    return known[name]


def variants(cfg: ReportConfig, in_features: list[int] | None = None) -> list[tuple[str, DeltaConfig]]:
    """(report method, compression config) pairs, one per bit width (once for a method that fixes its own);
    ``in_features`` (every quantized matrix's K) sizes the equal-bytes groups."""
    return [
        (variant.name, variant.adjust(config, cfg, in_features or []) if variant.adjust else config)
        for variant, config in _configs(cfg)
    ]


def check_variants(cfg: ReportConfig) -> None:
    """Raise ValueError, before any work, where the report's methods x bits x budgets cannot all be made: an
    unknown method, a width the quantizer has not, a bit-budget method at a width without its budget, a salient
    setting out of range. (The equal-bytes group size needs the base's shapes: it is checked when they are read.)"""
    _configs(cfg)


def _configs(cfg: ReportConfig) -> list[tuple[ReportMethod, DeltaConfig]]:
    """Each report method's compression config at each of its widths, with its bit budget, before ``adjust``."""
    out = []
    for name in cfg.methods:
        variant = report_method(name)
        method = get_method(variant.method)
        for bits in (method.grid["bits"],) if "bits" in method.grid else cfg.bits:
            salient = cfg.salient_1bit if bits == 1 and cfg.salient_1bit is not None else cfg.salient
            budget = budget_at(bits, cfg.bit_budgets) if variant.budgeted else None
            config = DeltaConfig(
                method.name, bits, salient if method.selects else 0, allocation=cfg.allocation, bit_budget=budget
            )
            out.append((variant, config))
    return out


EQUAL_BYTES = register_variant(
    ReportMethod(
        "fixed-eqbytes", FIXED.name, "fixed precision given meswitch's bytes through smaller groups", "s-.",
        adjust=lambda c, cfg, k: replace(c, group_size=equal_bytes_group(k, cfg.salient)),
    )
)  # fmt: skip
BITDELTA_DISTILLED = register_variant(
    ReportMethod("bitdelta-distilled", BITDELTA.name, "with BitDelta's scale distillation", "P", distilled=True)
)
MESWITCH_DISTILLED = register_variant(
    ReportMethod("meswitch-distilled", MESWITCH.name, "then its step sizes fitted end to end", "o--", distilled=True)
)
MESWITCH_GPTQ = register_variant(
    ReportMethod(
        "meswitch-gptq", MESWITCH.name,
        "error-compensating rounding through the calibration Hessian, salient channels last", "*-", adjust=_gptq,
    )
)  # fmt: skip
MESWITCH_GPTQ_DISTILLED = register_variant(
    ReportMethod(
        "meswitch-gptq-distilled", MESWITCH.name, "meswitch-gptq, then its step sizes fitted end to end", "*--",
        adjust=_gptq, distilled=True,
    )
)  # fmt: skip
MESWITCH_BUDGET = register_variant(
    ReportMethod(
        "meswitch-budget", MESWITCH.name,
        "a width per matrix by its weighted error under the --bit-budgets value at each width", "v-", budgeted=True,
    )
)  # fmt: skip
MESWITCH_BUDGET_GPTQ = register_variant(
    ReportMethod(
        "meswitch-budget-gptq", MESWITCH.name, "meswitch-budget with GPTQ rounding", "v:", adjust=_gptq,
        budgeted=True,
    )
)  # fmt: skip
MESWITCH_BUDGET_DISTILLED = register_variant(
    ReportMethod(
        "meswitch-budget-distilled", MESWITCH.name, "meswitch-budget, then its step sizes fitted end to end", "v--",
        budgeted=True, distilled=True,
    )
)  # fmt: skip
MESWITCH_BUDGET_GPTQ_DISTILLED = register_variant(
    ReportMethod(
        "meswitch-budget-gptq-distilled", MESWITCH.name, "meswitch-budget-gptq, then its step sizes fitted end to end",
        "v-.", adjust=_gptq, budgeted=True, distilled=True,
    )
)  # fmt: skip
