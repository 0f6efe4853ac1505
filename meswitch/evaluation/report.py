"""Methods x bits x experts on a demo family: Markdown table, JSON, and quality-against-size plot.

Each expert is calibrated once; every method and bit width reuses those statistics, so the
comparison differs only in the method. This is the paper's Figure 4 for our family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meswitch.artifacts import read_manifest
from meswitch.checkpoints import Checkpoint, check_expert, config_dtype
from meswitch.compression.calibration import CalibConfig, calibrate, read_texts
from meswitch.compression.distill import DistillConfig, distill_artifact
from meswitch.compression.expert import ExpertInfo, compress_expert, size_against_fp16
from meswitch.compression.methods import BITDELTA, FIXED, MAGNITUDE, MESWITCH, get_method
from meswitch.devices import resolve_device
from meswitch.evaluation.evaluate import EvalResult, Evaluator
from meswitch.evaluation.metrics import EvalData, gain_kept_ci, paired_ratio_ci, task_gain_kept_ci
from meswitch.evaluation.variants import (
    BITDELTA_DISTILLED,
    COMPARED,
    EQUAL_BYTES,
    check_variants,
    equal_bytes_group,
    report_method,
    report_methods,
    variants,
)
from meswitch.expert_card import load_card

log = logging.getLogger(__name__)


# The methods the claims compare (every report method gets its rows, table lines and plot points)
CLAIMED = (MESWITCH.name, FIXED.name, MAGNITUDE.name)


@dataclass(frozen=True)
class ReportConfig:
    methods: tuple[str, ...] = COMPARED
    bits: tuple[int, ...] = (2, 3, 4)
    salient: float = 0.01
    # salient fraction at 1 bit (None: ``salient``): 1% fp16 columns add 0.16 bits, 16% of a 1-bit delta
    salient_1bit: float | None = None
    allocation: str = "global"
    # the bit-budget methods' budgets (bits per parameter), one per width of ``bits``: 1.1 runs at the 1-bit row
    bit_budgets: tuple[float, ...] = ()
    limit: int = 200  # evaluation texts per expert: enough for the paired intervals to separate 1-2% differences
    device: str = "auto"
    calib: CalibConfig = field(default_factory=CalibConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    experts: tuple[str, ...] = ()  # expert folder names to report on; empty: every expert of the family

    def __post_init__(self) -> None:
        check_variants(self)  # before any work: a missing bit budget, a width the quantizer lacks, ...


def run_report(family: Path, out: Path, cfg: ReportConfig | None = None) -> list[Path]:
    """Compress and evaluate every expert of ``family`` under every variant; write report files to ``out``."""
    family, out, cfg = Path(family), Path(out), cfg or ReportConfig()
    device = resolve_device(cfg.device)
    base_dir = family / "base"
    base = Checkpoint(base_dir)
    # the family's experts, then the extra ones (a fifth domain, the vocabulary-extended expert)
    expert_dirs = [
        p for sub in ("experts", "extra") if (family / sub).is_dir() for p in sorted((family / sub).iterdir())
    ]
    expert_dirs = [p for p in expert_dirs if p.is_dir()]
    if cfg.experts:
        unknown = set(cfg.experts) - {p.name for p in expert_dirs}
        if unknown:
            raise FileNotFoundError(f"{family / 'experts'}: no expert folders named {sorted(unknown)}")
        expert_dirs = [p for p in expert_dirs if p.name in cfg.experts]
    if not expert_dirs:
        raise FileNotFoundError(f"{family / 'experts'}: no expert folders")
    rows: list[dict] = []
    references: dict[str, dict] = {}
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    in_features = [int(k) for k in _in_features(base)]
    settings = json.dumps(dataclasses.asdict(cfg) | {"experts": None}, sort_keys=True)
    runs = variants(cfg, in_features)
    distills = any(report_method(m).distilled for m in cfg.methods)
    hessian = any(v.rounding == "gptq" for _, v in runs)  # one calibration serves every variant: Hessians for GPTQ
    for expert_dir in expert_dirs:
        card = load_card(expert_dir)
        part = out / "parts" / f"{expert_dir.name}.json"
        if part.is_file() and (done := json.loads(part.read_text()))["settings"] == settings:
            log.info("%s: reported already (%s); kept", card.name, part)
            rows += done["rows"]
            references[card.name] = done["reference"]
            continue
        expert = Checkpoint(expert_dir)
        pairing = check_expert(base, expert)
        texts = read_texts(card.calibration_data)
        t = time.perf_counter()
        stats = calibrate(expert, texts, dataclasses.replace(cfg.calib, hessian=hessian), device)
        calib_seconds = time.perf_counter() - t
        evaluator = Evaluator(base_dir, expert_dir, EvalData.load(card.evaluation_data, cfg.limit), device)
        ref = evaluator.rounded_to_bf16()
        references[card.name] = {
            "expert_dtype": str(config_dtype(expert.config)).removeprefix("torch."),
            "bf16_rounded_kl": ref["kl"],
            "bf16_rounded_kl_ci": _mean_ci(ref["kl_text_sums"], ref["kl_text_tokens"]),
            "bf16_rounded_gain_kept_ppl": ref["gain_retained"],
            "bf16_rounded_gain_kept_ppl_ci": _gain_ci(ref),
            "calibration_seconds": round(calib_seconds, 2),
        }
        mine: list[dict] = []
        for method, variant in runs:
            with tempfile.TemporaryDirectory() as tmp:
                art = Path(tmp) / "artifact"
                use_stats = stats if get_method(variant.method).uses_calibration else None
                info = ExpertInfo(card.name, card.domain, card.description)
                with _peak_memory(device) as peak:
                    compress_expert(base, expert, pairing, use_stats, variant, art, info, device)
                    if report_method(method).distilled:
                        distill_artifact(base, expert_dir, art, art, texts, cfg.distill, device)
                result: EvalResult = evaluator.evaluate(art)
                widths = read_manifest(art).method.get("widths")  # under a bit budget: matrices per width
            mine.append(_row(result, method, peak["mb"]) | ({"widths": widths} if widths else {}))
            log.info(
                "%s %s %d-bit: %.3f bpp, KL %.4f", card.name, method, result.bits, result.bits_per_param, result.kl
            )
        # each expert's rows are kept as they are finished: a stopped report run again redoes only the rest
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps({"settings": settings, "rows": mine, "reference": references[card.name]}))
        rows += mine
    meta = {
        "family": str(family),
        **_base_record(family, base_dir),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "command": " ".join(["meswitch", *sys.argv[1:]]) if sys.argv and "meswitch" in sys.argv[0] else None,
        "salient": cfg.salient,
        "salient_1bit": cfg.salient_1bit,
        "allocation": cfg.allocation,
        "bit_budgets": list(cfg.bit_budgets) or None,
        "equal_bytes_group": equal_bytes_group(in_features, cfg.salient) if EQUAL_BYTES.name in cfg.methods else None,
        "calibration": {"samples": cfg.calib.samples, "seq_len": cfg.calib.seq_len},
        "distillation": dataclasses.asdict(cfg.distill) if distills else None,
        "eval_texts_per_expert": cfg.limit,
        "references": references,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    return write_report(out, meta, rows)


def write_report(out: Path, meta: dict, rows: list[dict]) -> list[Path]:
    """report.md, report.json and the plot from finished rows (also rows gathered from the parts of runs made
    elsewhere: benchmarks/assemble_report.py). Claims are checked at 2 bits where measured."""
    methods = {r["method"] for r in rows}
    bits = sorted({r["bits"] for r in rows if r["method"] == MESWITCH.name})
    claim_bits = 2 if 2 in bits else (bits or [0])[0]
    checks = claims(rows, claim_bits) if set(CLAIMED) <= methods else {}
    goals = targets(rows) if methods & _ours() else {}
    out.mkdir(parents=True, exist_ok=True)
    report_json = out / "report.json"
    report_json.write_text(json.dumps({**meta, "claims": checks, "targets": goals, "rows": rows}, indent=2) + "\n")
    report_md = out / "report.md"
    report_md.write_text(
        markdown_table(rows, meta.get("references"))
        + (claims_markdown(checks) if checks else "")
        + targets_markdown(goals)
    )
    plot = out / "quality_vs_size.png"
    plot_quality_vs_size(rows, plot)
    return [report_md, report_json, plot]


def _in_features(base: Checkpoint) -> list[int]:
    """Every quantized matrix's input dimension (the base's shapes; the tied embedding counts once)."""
    from meswitch.compression.expert import is_quantized

    return [base.shape(n)[-1] for n in base.keys() if is_quantized(base, n)]


def _base_record(family: Path, base_dir: Path) -> dict:
    """The base's name and where it came from (family.json or the base's source.json)."""
    record = {}
    family_json = family / "family.json"
    if family_json.is_file():
        info = json.loads(family_json.read_text(encoding="utf-8")).get("base", {})
        record = {"base": info.get("name", "base"), "base_source": info.get("source")}
    source = base_dir / "source.json"
    if not record.get("base_source") and source.is_file():
        data = json.loads(source.read_text(encoding="utf-8"))
        record = {"base": data.get("name", "base"), "base_source": data}
    return record or {"base": base_dir.name, "base_source": None}


@contextlib.contextmanager
def _peak_memory(device: torch.device):
    """``{"mb": ...}`` filled on exit: the GPU's peak allocation inside the block, or on the CPU the process's
    peak resident set so far (the OS keeps no per-block peak)."""
    peak: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peak
    finally:
        if device.type == "cuda":
            peak["mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        else:
            peak["mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _mean_ci(sums: list[float], tokens: list[int]) -> list[float] | None:
    """95% bootstrap interval of the mean KL per token, resampling the texts."""
    if not sums or len(sums) != len(tokens):
        return None
    _, lo, hi = paired_ratio_ci(sums, tokens)
    return [float(f"{lo:.6g}"), float(f"{hi:.6g}")]


# The per-text figures a gain-kept interval resamples (EvalResult's), base, expert and compressed in turn
_GAIN_FIGURES = ("nll_text_sums_base", "nll_text_units_base", "nll_text_sums_expert", "nll_text_units",
                 "nll_text_sums_compressed", "nll_text_units")  # fmt: skip


def _gain_ci(figures: dict) -> list[float] | None:
    """95% paired-bootstrap interval of the gain kept in perplexity from a row's per-text figures; None without
    them (rows of an older report) or without a gain to keep (the expert no better than its base: None, or NaN in
    an older report)."""
    columns = [figures.get(k) for k in _GAIN_FIGURES]
    if not all(columns) or not _is_gain(figures.get("gain_retained")):
        return None
    nb, ub, ne, ue, nc, uc = columns
    _, lo, hi = gain_kept_ci((nb, ub), (ne, ue), (nc, uc))
    return [round(lo, 4), round(hi, 4)]


def _is_gain(kept: float | None) -> bool:
    """Whether a gain kept is a number: not None (the expert gained nothing) nor NaN (how older reports wrote it)."""
    return kept is not None and math.isfinite(kept)


def _task_gain_ci(figures: dict) -> list[float] | None:
    """95% paired-bootstrap interval of the gain kept in task score from a row's per-task scores; None without
    them or without a task gain to keep."""
    columns = [figures.get(f"task_item_scores_{k}") for k in ("base", "expert", "compressed")]
    if not all(columns) or figures.get("task_gain_retained") is None:
        return None
    _, lo, hi = task_gain_kept_ci(*columns)
    return [round(lo, 4), round(hi, 4)] if math.isfinite(lo) and math.isfinite(hi) else None


def _row(result: EvalResult, method: str, peak_mb: float) -> dict:
    """A report row: the evaluation's figures under the names the report's readers use, per-text sums kept."""
    row = result.to_dict(per_text=True)
    return {
        "expert": result.name,
        **row,
        "method": method,
        "kl_ci": _mean_ci(result.kl_text_sums, result.kl_text_tokens),
        "gain_kept_ppl": result.gain_retained,
        "gain_kept_ppl_ci": _gain_ci(row),
        "gain_kept_task": result.task_gain_retained,
        "gain_kept_task_ci": _task_gain_ci(row),
        "peak_memory_mb": peak_mb,
    }


# A point of a quality-against-size curve: bits per parameter, the figure, and for KL the per-text sums
# behind it (None for other figures, or rows from an older report).
Point = tuple[float, float, list[float] | None]


def _interp(points: list[Point], x: float, log: bool = False) -> tuple[float, list[float] | None] | None:
    """The piecewise-linear curve through ``points`` (sorted by x) at ``x``, its per-text sums interpolated
    alike; None outside its range. ``log``: linear in the logarithm of the figure (and of each text's sum), for
    KL, which falls about tenfold per bit: a straight line between the 1- and 2-bit points would put the curve
    far above both."""

    def mix(a: float, b: float, w: float) -> float:
        if log and a > 0 and b > 0:
            return math.exp((1 - w) * math.log(a) + w * math.log(b))
        return a + w * (b - a)

    for (x0, y0, s0), (x1, y1, s1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            w = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            sums = [mix(a, b, w) for a, b in zip(s0, s1, strict=True)] if s0 and s1 else None
            return mix(y0, y1, w), sums
    if len(points) == 1 and points[0][0] == x:
        return points[0][1], points[0][2]
    return None


def _above(ours: list[Point], theirs: list[Point], higher_is_better: bool, log: bool = False) -> list[dict]:
    """Where the two curves share sizes, compare them at every measured size of either one (for KL with our
    value over theirs and its 95% paired interval over the texts)."""
    out = []
    for x in sorted({p[0] for p in ours} | {p[0] for p in theirs}):
        a, b = _interp(ours, x, log), _interp(theirs, x, log)
        if a is None or b is None:
            continue
        (ya, sa), (yb, sb) = a, b
        point = {
            "bits_per_param": round(x, 4),
            MESWITCH.name: ya,
            FIXED.name: yb,
            "ok": ya > yb if higher_is_better else ya < yb,
        }
        out.append(point | (_ratio_ci(sa, sb) or {}))
    return out


def _ratio_ci(ours: list[float] | None, theirs: list[float] | None) -> dict | None:
    """Our summed per-text KL over theirs on the same texts, with a 95% paired-bootstrap interval; None
    without per-text figures (rows from an older report)."""
    if not ours or not theirs or len(ours) != len(theirs):
        return None
    ratio, lo, hi = paired_ratio_ci(ours, theirs)
    return {"ratio": round(ratio, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def claims(rows: list[dict], bits: int) -> dict:
    """The method's claims on this family, checked per expert (issue 2's acceptance, in numbers).

    At ``bits``: meswitch's KL below fixed precision's (which stores fewer bytes) and below magnitude
    selection's (the same bytes), each also as a ratio with its 95% paired-bootstrap interval over the
    evaluation texts (an interval containing 1 means the sample cannot tell the two apart), and the
    delta at most 1/6 of the fp16 delta's bytes. Over all bit
    widths: meswitch's quality-against-size curve above fixed precision's wherever their sizes overlap,
    for KL (lower) and for the share of the fine-tuning gain kept (higher).
    """
    per_expert = {}
    for name in sorted({r["name"] for r in rows}):
        mine = {(r["method"], r["bits"]): r for r in rows if r["name"] == name}
        ms, fx, mg = found = [mine.get((m, bits)) for m in CLAIMED]
        if not (ms and fx and mg):
            continue

        def curve(method: str, key: str, name: str = name) -> list[Point]:
            """The method's points; none for the gain kept where the expert gained nothing to keep."""
            points = [
                (r["bits_per_param"], r[key], r.get("kl_text_sums") if key == "kl" else None)
                for r in rows
                if r["name"] == name and r["method"] == method and (key == "kl" or _is_gain(r[key]))
            ]
            return sorted(points, key=lambda p: p[0])

        ours, fixed = MESWITCH.name, FIXED.name
        kl_curve = _above(curve(ours, "kl"), curve(fixed, "kl"), higher_is_better=False, log=True)
        gain_curve = _above(curve(ours, "gain_retained"), curve(fixed, "gain_retained"), higher_is_better=True)
        per_expert[name] = {
            "kl": {m: r["kl"] for m, r in zip(CLAIMED, found, strict=True)},
            "bytes": {m: r["delta_bytes"] for m, r in zip(CLAIMED, found, strict=True)},
            "kl_below_fixed": ms["kl"] < fx["kl"],
            "kl_below_magnitude": ms["kl"] < mg["kl"],
            "kl_vs_fixed": _ratio_ci(ms.get("kl_text_sums"), fx.get("kl_text_sums")),
            "kl_vs_magnitude": _ratio_ci(ms.get("kl_text_sums"), mg.get("kl_text_sums")),
            "fixed_bytes_ratio": round(fx["delta_bytes"] / ms["delta_bytes"], 4),
            "fraction_of_fp16_bytes": round(ms["delta_bytes"] / ms["fp16_delta_bytes"], 4),
            "at_most_one_sixth_of_fp16": ms["delta_bytes"] * 6 <= ms["fp16_delta_bytes"],
            "kl_curve_below_fixed": all(c["ok"] for c in kl_curve) and bool(kl_curve),
            "gain_curve_above_fixed": all(c["ok"] for c in gain_curve) and bool(gain_curve),
            "curve_points": {"kl": kl_curve, "gain_retained": gain_curve},
        }
    keys = ("kl_below_fixed", "kl_below_magnitude", "at_most_one_sixth_of_fp16", "kl_curve_below_fixed",
            "gain_curve_above_fixed")  # fmt: skip
    return {"bits": bits, "experts": per_expert, "all": {k: all(e[k] for e in per_expert.values()) for k in keys}}


# Issue 11's targets on a real family: quality kept near 2 and near 1 bit per parameter.
TARGET_2BIT = {"max_bits": 2.3, "min_gain_kept": 0.995}
TARGET_1BIT = {"max_bits": 1.1, "min_gain_kept": 0.97}


def _ours() -> set[str]:
    """Report methods that are meswitch (plain, distilled, GPTQ-rounded): any of them answers the targets."""
    return {v.name for v in report_methods() if v.method == MESWITCH.name}


def targets(rows: list[dict]) -> dict:
    """Per expert: the best meswitch row within each size budget and whether it keeps the gain it must (in
    perplexity, and in task score where there is one), against fixed precision at equal bytes and magnitude
    selection (KL ratio with its paired interval: a win needs the whole interval below 1), and at the 1-bit
    budget against BitDelta (distilled when measured). ``gain_met`` is the point estimates' verdict; beside
    it, the perplexity gain's interval says whether it holds for the whole interval or the interval still
    admits it (None without per-text figures)."""
    out = {}
    ours = _ours()
    for name in sorted({r["name"] for r in rows}):
        mine = [r for r in rows if r["name"] == name]
        by = {(r["method"], r["bits"]): r for r in mine}
        e = {}
        for label, goal in (("2bit", TARGET_2BIT), ("1bit", TARGET_1BIT)):
            fits = [r for r in mine if r["method"] in ours and r["bits_per_param"] <= goal["max_bits"]]
            if not fits:
                e[label] = {"meswitch_row": None, "met": False, "why": f"no meswitch row at <= {goal['max_bits']} bits"}
                continue
            best = min(fits, key=lambda r: r["kl"])
            kept = [best.get("gain_kept_ppl")] + (
                [best["gain_kept_task"]] if best.get("gain_kept_task") is not None else []
            )
            t = {
                "method": best["method"],
                "bits": best["bits"],
                "bits_per_param": best["bits_per_param"],
                "kl": best["kl"],
                "gain_kept_ppl": best.get("gain_kept_ppl"),
                "gain_kept_ppl_lo": ci[0] if (ci := best.get("gain_kept_ppl_ci")) else None,
                "gain_kept_ppl_ci": ci,
                "gain_kept_task": best.get("gain_kept_task"),
                "gain_kept_task_ci": (task_ci := best.get("gain_kept_task_ci")),
                "gain_met": all(k is not None and k >= goal["min_gain_kept"] for k in kept),
                "gain_ppl_met_with_interval": ci[0] >= goal["min_gain_kept"] if ci else None,
                "gain_ppl_admitted_by_interval": ci[1] >= goal["min_gain_kept"] if ci else None,
                "gain_task_met_with_interval": task_ci[0] >= goal["min_gain_kept"] if task_ci else None,
                "gain_task_admitted_by_interval": task_ci[1] >= goal["min_gain_kept"] if task_ci else None,
            }
            rivals = (EQUAL_BYTES, MAGNITUDE) if label == "2bit" else (BITDELTA_DISTILLED, BITDELTA)
            rivals = tuple(r.name for r in rivals)
            for rival in rivals:
                other = by.get((rival, best["bits"])) or by.get((rival, 1))
                if other is None:
                    continue
                ci = _ratio_ci(best.get("kl_text_sums"), other.get("kl_text_sums"))
                t[f"vs_{rival}"] = {"bits_per_param": other["bits_per_param"], "kl": other["kl"], **(ci or {}),
                                    "won": bool(ci) and ci["ci95"][1] < 1}  # fmt: skip
                if label == "1bit":
                    break  # the distilled BitDelta when measured, else the plain one
            t["met"] = t["gain_met"] and all(v["won"] for k, v in t.items() if k.startswith("vs_"))
            e[label] = t
        out[name] = e
    return out


def targets_markdown(goals: dict) -> str:
    if not goals:
        return ""
    lines = [
        "\n**Targets** (best meswitch row within the budget; gain kept in perplexity [95% paired interval over the "
        "texts] / in task score [over the tasks]; KL against each rival with its 95% paired interval; met: by the "
        "point estimates):\n",
        "| expert | budget | meswitch bits/param | KL | gain kept ppl / task | gain target, with the interval "
        "| against | met |",
        "|---|---|---:|---:|---|---|---|---|",
    ]
    for name, e in goals.items():
        for label, goal in (("2bit", TARGET_2BIT), ("1bit", TARGET_1BIT)):
            t = e[label]
            if t.get("bits_per_param") is None:
                lines.append(f"| {name} | <= {goal['max_bits']} | - | - | - | - | {t.get('why', '')} | NO |")
                continue
            task = _gain_cell(t["gain_kept_task"], t.get("gain_kept_task_ci"))
            rivals = "; ".join(
                f"{k[3:]} {_change(v) if 'ratio' in v else '-'}" for k, v in t.items() if k.startswith("vs_")
            )
            budget = f"<= {goal['max_bits']} bits, >= {100 * goal['min_gain_kept']:.1f}%"
            ppl = _gain_cell(t["gain_kept_ppl"], t.get("gain_kept_ppl_ci"), 4)
            lines.append(
                f"| {name} | {budget} | {t['bits_per_param']:.3f} | {t['kl']:.5f} | {ppl} / {task} "
                f"| {_verdicts(t, goal['min_gain_kept'])} | {rivals} | {'yes' if t['met'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def _gain_cell(gain: float | None, ci: list[float] | None, digits: int = 3) -> str:
    """A gain kept with its interval: 0.992 [0.985, 0.999]; ``-`` where there is no gain to keep."""
    if not _is_gain(gain):
        return "-"
    return f"{gain:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _verdicts(t: dict, goal: float) -> str:
    """The perplexity gain's verdict (:func:`_gain_verdict`), and the task score's where there is one."""
    ppl = _gain_verdict(t["gain_kept_ppl"], t.get("gain_kept_ppl_ci"), goal)
    if t.get("gain_kept_task") is None:
        return ppl
    return f"ppl: {ppl}; task: {_gain_verdict(t['gain_kept_task'], t.get('gain_kept_task_ci'), goal)}"


def _gain_verdict(point: float, ci: list[float] | None, goal: float) -> str:
    """Whether a gain target holds by the point estimate, and what its interval says of it."""
    if ci is None:
        return "-"
    if ci[0] >= goal:
        return "met, whole interval"
    if point >= goal:
        return "met by the point; interval reaches below"
    if ci[1] >= goal:
        return "missed by the point; interval admits it"
    return "missed, whole interval below"


def _change(r: dict | None) -> str:
    """A KL ratio as a signed percentage with its interval: -7.0% [-9.1, -4.8]."""
    if r is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{100 * (r['ratio'] - 1):+.1f}% [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]"


def claims_markdown(checks: dict) -> str:
    bits = checks["bits"]
    lines = [
        f"\n**Claims at {bits} bits, per expert** (KL: meswitch / fixed / magnitude, and meswitch's change against "
        "each with its 95% paired-bootstrap interval over the evaluation texts; fixed stores the bytes ratio shown; "
        "curves compared wherever the methods' sizes overlap):\n",
        "| expert | KL meswitch / fixed / magnitude | vs fixed | vs magnitude | fixed bytes ratio | of fp16 bytes | "
        "KL curve below fixed | gain curve above fixed |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for name, e in checks["experts"].items():
        kl = e["kl"]
        lines.append(
            f"| {name} | {kl['meswitch']:.4f} / {kl['fixed']:.4f} / {kl['magnitude']:.4f} | "
            f"{_change(e.get('kl_vs_fixed'))} | {_change(e.get('kl_vs_magnitude'))} | "
            f"{e['fixed_bytes_ratio']:.3f} | 1/{1 / e['fraction_of_fp16_bytes']:.1f} | "
            f"{'yes' if e['kl_curve_below_fixed'] else 'NO'} | {'yes' if e['gain_curve_above_fixed'] else 'NO'} |"
        )
    verdict = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks["all"].items())
    curves = [
        f"- {name}: "
        + "; ".join(f"{c['bits_per_param']:.2f} bits/param {_change(c) if 'ratio' in c else '-'}" for c in points)
        for name, e in checks["experts"].items()
        if (points := e["curve_points"]["kl"])
    ]
    curve_text = (
        "\n\nKL curve against fixed precision's (interpolated linearly in log KL between measured sizes), meswitch's "
        "change at "
        "each measured size of either curve:\n\n" + "\n".join(curves)
        if curves
        else ""
    )
    return "\n".join(lines) + f"\n\nAll experts: {verdict}" + curve_text + "\n"


def markdown_table(rows: list[dict], references: dict | None = None) -> str:
    head = (
        "| expert | method | bits | bits/param | delta MB | vs the fp16 delta | KL | ppl ratio | gain kept [95% CI] "
        "| task |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {name} | expert rounded to bf16 (reference) | 16 | - | - | - | {ref['bf16_rounded_kl']:.5f} | - | "
        f"{_gain_cell(ref.get('bf16_rounded_gain_kept_ppl'), ref.get('bf16_rounded_gain_kept_ppl_ci'))} | - |"
        for name, ref in (references or {}).items()
    ]
    for r in rows:
        task = "-" if r["task_score_compressed"] is None else f"{r['task_score_compressed']:.2f}"
        if r["task_score_expert"] is not None:
            task += f" / {r['task_score_expert']:.2f}"
        gain = _gain_cell(r["gain_retained"], r.get("gain_kept_ppl_ci"))
        size = size_against_fp16(r["delta_bytes"], r["fp16_delta_bytes"])
        lines.append(
            f"| {r['name']} | {r['method']} | {_bits_cell(r)} | {r['bits_per_param']:.3f} | "
            f"{r['delta_bytes'] / 1e6:.3f} | {size} | {r['kl']:.4f} | "
            f"{r['ppl_ratio']:.4f} | {gain} | {task} |"
        )
    return head + "\n".join(lines) + "\n"


def _bits_cell(row: dict) -> str:
    """The row's width, or under a bit budget how many matrices got each width: ``1:190 2:18 3:3``."""
    widths = row.get("widths")
    return " ".join(f"{b}:{n}" for b, n in widths.items()) if widths else str(row["bits"])


def plot_quality_vs_size(rows: list[dict], path: Path) -> None:
    """One panel per expert: KL(expert || compressed) against delta bits per parameter, log scale.

    KL rather than the share of the fine-tuning gain kept: it separates the methods at every size
    (the gain saturates near 1 from 3 bits on) and a 1-bit point far below does not flatten the rest.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({r["name"] for r in rows})
    cols = min(len(experts), 4)
    nrows = math.ceil(len(experts) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    styles = {v.name: v.marker for v in report_methods()}
    colors = {m: f"C{i % 10}" for i, m in enumerate(styles)}  # one colour per method in every panel
    for ax, name in zip(axes.flat, experts, strict=False):
        for method in styles:
            pts = sorted(
                (r["bits_per_param"], max(r["kl"], 1e-7)) for r in rows if r["name"] == name and r["method"] == method
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), styles[method], color=colors[method], label=method)
        domain = next(r["domain"] for r in rows if r["name"] == name)
        ax.set_yscale("log")
        ax.set_title(f"{name} ({domain})")
        ax.set_xlabel("delta bits per parameter")
        ax.set_ylabel("KL(expert || compressed)")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(experts) :]:
        ax.axis("off")
    handles = {}  # every method measured, not only the first panel's
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    spare = list(axes.flat)[len(experts) :]
    if spare:  # an empty panel holds it
        spare[0].legend(handles.values(), handles.keys(), loc="center", fontsize=9)
    else:
        axes.flat[0].legend(handles.values(), handles.keys(), fontsize=8)
    fig.suptitle("Quality against delta size (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
