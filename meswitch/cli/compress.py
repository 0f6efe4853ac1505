"""`meswitch compress | inspect | reconstruct | evaluate | report`: the core library's commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from meswitch.cli import CommandError
from meswitch.cli.config_flags import add_config_flags, config_from_flags, flag_error
from meswitch.compression.config import SUPPORTED_BITS, CalibConfig, ConfigError, DeltaConfig
from meswitch.compression.methods import get_method, registered_methods
from meswitch.devices import DEVICE_HELP, device_arg

if TYPE_CHECKING:
    from meswitch.compression.expert import ExpertInfo

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a fine-tuned expert into a salient-aware low-bit delta of its base",
        description="Split EXPERT into BASE + delta, pick salient input channels by reconstruction error on "
        "calibration text, keep them in fp16 and quantize the rest; write a verified artifact folder.",
    )
    p.add_argument("--base", type=Path, required=True, help="base model folder (Hugging Face layout, safetensors)")
    p.add_argument("--expert", type=Path, required=True, help="fine-tuned expert folder of the same architecture")
    p.add_argument(
        "--calib",
        type=Path,
        help="calibration texts: a file (.jsonl/.json with a 'text' field, .txt one per line, .csv, .parquet), a "
        "dataset folder, or a dataset id in the local Hugging Face cache (meswitch[data]); required for --method "
        f"{_calibrated_methods()} and --rounding gptq",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="artifact folder to write: new, empty, or an earlier artifact of this command (replaced atomically)",
    )
    p.add_argument(
        "--name", help="expert name recorded in the manifest (default: expert.yaml's name, else the folder's name)"
    )
    p.add_argument("--domain", help="domain recorded in the manifest (default: expert.yaml's domain)")
    p.add_argument("--device", type=device_arg, default="auto", help=f"{DEVICE_HELP} (default auto)")
    p.add_argument("--json", action="store_true", help="print the manifest's metrics as JSON")
    add_config_flags(p.add_argument_group("compression"), DeltaConfig)
    add_config_flags(p.add_argument_group("calibration"), CalibConfig)
    p.set_defaults(func=_compress)

    p = sub.add_parser("inspect", help="show an artifact's manifest, per-layer figures and checksum status")
    p.add_argument("artifact", type=Path, help="artifact folder (manifest.json + safetensors)")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "reconstruct",
        help="write base + compressed delta as a full Hugging Face model folder",
        description="Add the artifact's dequantized delta to BASE, tensor by tensor, and write the compressed expert "
        "as an ordinary Hugging Face folder (safetensors in the expert's dtype, its config and tokenizer) that "
        "transformers loads; the artifact's checksums and its base's fingerprint are checked first.",
    )
    p.add_argument("--base", type=Path, required=True, help="the base model folder the artifact was made against")
    p.add_argument("--artifact", type=Path, required=True, help="compressed expert artifact folder")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="model folder to write: new, empty, or a model folder written before (replaced atomically)",
    )
    p.set_defaults(func=_reconstruct)

    p = sub.add_parser(
        "evaluate",
        help="KL, perplexity and task score of a compressed expert against the full one",
        description="Score the held-out texts under the base, the full expert and the compressed expert (base + "
        "the artifact's delta): KL(expert || compressed) per token, each model's perplexity, the share of the "
        "expert's perplexity gain over the base that the compressed expert keeps, and task scores where the data "
        "has prompt/answer rows. Three forward passes per text: a GPU helps.",
    )
    p.add_argument("--base", type=Path, required=True, help="the base model folder")
    p.add_argument("--artifact", type=Path, required=True, help="compressed expert artifact folder")
    p.add_argument("--expert", type=Path, required=True, help="the full expert the artifact was made from")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="held-out set ('text'; 'prompt'+'answer' for tasks): a file, dataset folder or cached dataset id",
    )
    p.add_argument("--limit", type=count_arg, default=0, help="evaluate at most this many lines (default 0: all)")
    p.add_argument("--device", type=device_arg, default="auto", help=f"{DEVICE_HELP} (default auto)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object, with each text's summed KL and token count (kl_text_sums, kl_text_tokens) "
        "and its summed negative log-likelihood under the base, the expert and the compressed expert "
        "(nll_text_sums_base/_expert/_compressed, over nll_text_units_base / nll_text_units tokens or characters)",
    )
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "report",
        help="compare methods x bits on a demo family: Markdown table, JSON and quality-vs-size plot",
        description="Compress every expert of FAMILY with each method and bit width, evaluate each, and write "
        "report.md, report.json and quality_vs_size.png to --out. Each expert's rows are kept under "
        "OUT/parts/ as they finish: a stopped report run again with the same settings redoes only the rest.",
    )
    p.add_argument("family", type=Path, help="a folder made by `meswitch demo-family`")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the plot")
    from meswitch.evaluation.variants import COMPARED, report_methods

    defaults = ",".join(COMPARED)
    known = "; ".join(f"{v.name} ({v.help})" for v in report_methods())
    p.add_argument("--methods", default=defaults, help=f"comma-separated, of {known}; default {defaults}")
    p.add_argument(
        "--bits",
        type=bit_widths_arg,
        default=(2, 3, 4),
        help=f"comma-separated bit widths for meswitch/fixed/magnitude, of {', '.join(map(str, SUPPORTED_BITS))} "
        "(default 2,3,4)",
    )
    p.add_argument("--experts", default="", help="comma-separated expert folder names (default: every expert)")
    p.add_argument(
        "--distill-steps",
        type=int,
        default=100,
        help="scale-distillation steps of the *-distilled methods (default 100)",
    )
    p.add_argument(
        "--salient", type=float, default=0.01, help="salient channels: a fraction if < 1, else a count (default 0.01)"
    )
    p.add_argument(
        "--salient-1bit",
        type=float,
        default=None,
        help="salient fraction at 1 bit (default: --salient); 0.0025 keeps a 1-bit delta of SmolLM2 under 1.1 bits",
    )
    p.add_argument(
        "--allocation", choices=["global", "layer"], default="global", help="as for compress (default global)"
    )
    p.add_argument(
        "--bit-budgets",
        default="",
        help="comma-separated bits per parameter of the *-budget methods, one per width of --bits (1.1 beside the "
        "1-bit rows, 2.3 beside the 2-bit ones)",
    )
    p.add_argument("--limit", type=count_arg, default=200, help="evaluation texts per expert (default 200; 0: all)")
    p.add_argument("--device", type=device_arg, default="auto", help=f"{DEVICE_HELP} (default auto)")
    p.set_defaults(func=_report)


def count_arg(text: str) -> int:
    """An argparse ``type`` for a count where 0 means no limit: a negative one is refused when the flags are read."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or a positive count, got {value}")
    return value


def bit_widths_arg(text: str) -> tuple[int, ...]:
    """An argparse ``type`` for comma-separated bit widths, each one of ``SUPPORTED_BITS`` (compress's --bits)."""
    try:
        widths = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if bad := [b for b in widths if b not in SUPPORTED_BITS]:
        raise argparse.ArgumentTypeError(f"{bad} not among the widths {', '.join(map(str, SUPPORTED_BITS))}")
    return widths


def _calibrated_methods() -> str:
    """The methods that cannot run without calibration text, as the --calib help names them."""
    needing = [m.name for m in registered_methods() if m.needs_calibration]
    return " or ".join(name + (" (the default)" if name == DeltaConfig.method else "") for name in needing)


def _compress(args) -> int:
    from meswitch.artifacts import check_out
    from meswitch.compression.api import CompressJob, run_compress
    from meswitch.compression.expert import size_against_fp16

    delta = config_from_flags(DeltaConfig, args)
    if get_method(args.method).needs_calibration and args.calib is None:
        raise CommandError(f"--calib is required for --method {args.method} (salience is measured on calibration text)")
    if args.rounding == "gptq" and args.calib is None:
        raise CommandError("--calib is required for --rounding gptq (it rounds against the calibration inputs)")
    out = check_out(args.out, "expert-delta", inputs=[args.base, args.expert, args.calib])
    job = CompressJob(
        base=args.base,
        expert=args.expert,
        calib=args.calib,
        out=out,
        info=_expert_info(args),
        delta=delta,
        calib_cfg=config_from_flags(CalibConfig, args),  # run_compress adds the Hessians gptq rounding needs
        device=args.device,
    )
    start = time.perf_counter()
    try:
        manifest = run_compress(job)
    except ConfigError as e:
        raise flag_error(DeltaConfig, e) from e
    except ValueError as e:
        raise CommandError(str(e)) from e
    m = manifest.metrics
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(
            f"{args.out}: {m['bits_per_param']:.3f} bits/param, {m['delta_bytes']:,} bytes "
            f"({size_against_fp16(m['delta_bytes'], m['fp16_delta_bytes'])} than the fp16 delta), "
            f"{time.perf_counter() - start:.1f} s on {m['device']} (checks and calibration included; "
            f"compressing the tensors took {m['compress_seconds']:.1f} s)"
        )
    return 0


def _expert_info(args) -> ExpertInfo:
    """What the manifest says of the expert: the flags, else its expert.yaml (as the pipeline records it), else the
    folder's name. A swapped pair, where the base has a card and the expert none, is only warned of."""
    from meswitch.compression.expert import ExpertInfo
    from meswitch.expert_card import CARD, CardError, load_card

    if (args.base / CARD).is_file() and not (args.expert / CARD).is_file():
        log.warning("%s has an %s and %s has none: are --base and --expert swapped?", args.base, CARD, args.expert)
    card = None
    if (args.expert / CARD).is_file():
        try:
            card = load_card(args.expert)
        except CardError as e:
            log.warning("%s; the manifest takes --name, --domain and the folder's name instead", e)
    return ExpertInfo(
        name=args.name or (card.name if card else args.expert.resolve().name),
        domain=args.domain or (card.domain if card else None),
        description=card.description if card else None,
    )


def _inspect(args) -> int:
    from meswitch.artifacts import ArtifactError, read_manifest, verify

    manifest = read_manifest(args.artifact)
    try:
        verify(args.artifact)
        status = "ok"
    except ArtifactError as e:
        status = f"FAILED: {e}"
    if args.json:
        print(json.dumps({**json.loads(manifest.to_json()), "checksums": status}, indent=2))
        return 0 if status == "ok" else 1
    print(
        f"{manifest.kind} {manifest.name!r} (domain {manifest.domain}), schema v{manifest.schema_version}, "
        f"layout v{manifest.layout_version}, created {manifest.created_at}"
    )
    print(f"base fingerprint   {manifest.base_fingerprint}")
    print(f"source fingerprint {manifest.source_fingerprint}")
    print(f"method  {json.dumps(manifest.method, sort_keys=True)}")
    print(f"metrics {json.dumps(manifest.metrics, sort_keys=True)}")
    added = {n: t["extra_rows"] for n, t in manifest.tensors.items() if t.get("extra_rows")}
    for name, rows in added.items():  # a vocabulary-extended expert: rows past the base's, kept whole
        print(
            f"added vocabulary rows: {name}: {rows} rows beyond the base's {manifest.metadata.get('base_vocab')} (fp16)"
        )
    if manifest.layers:
        print(f"\n{'layer':<44} {'shape':>12} {'bits':>4} {'k':>5} {'bits/p':>7} {'rel.err':>8} {'act.err':>8}")
        for r in manifest.layers:
            act = "-" if r.act_rel_error is None else f"{r.act_rel_error:.4f}"
            print(
                f"{r.name:<44} {'x'.join(map(str, r.shape)):>12} {r.bits:>4} {r.salient:>5} "
                f"{r.bits_per_param:>7.3f} {r.rel_error:>8.4f} {act:>8}"
            )
    # the verdict last, below a table that can run to hundreds of rows; a failure on stderr too, past a pager
    sys.stdout.flush()
    if status == "ok":
        print(f"checksums: ok ({len(manifest.files)} files)")
    else:
        print(f"checksums: {status}", file=sys.stderr)
    return 0 if status == "ok" else 1


def _reconstruct(args) -> int:
    from meswitch.artifacts import RECONSTRUCTED, check_out
    from meswitch.checkpoints import Checkpoint
    from meswitch.compression.reconstruct import reconstruct

    out = check_out(args.out, RECONSTRUCTED, inputs=[args.base, args.artifact])
    reconstruct(Checkpoint(args.base), args.artifact, out)
    print(f"wrote {out}")
    return 0


def _evaluate(args) -> int:
    from meswitch.artifacts import ArtifactError
    from meswitch.devices import resolve_device
    from meswitch.evaluation.evaluate import evaluate_artifact
    from meswitch.evaluation.metrics import EvalData

    try:
        device = resolve_device(args.device)
        data = EvalData.load(args.data, limit=args.limit)
    except ValueError as e:
        raise CommandError(str(e)) from e
    try:
        result = evaluate_artifact(args.base, args.artifact, args.expert, data, device=device)
    except (ArtifactError, ValueError) as e:
        raise CommandError(str(e)) from e
    full = result.to_dict(per_text=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(full, indent=2) + "\n")
    if args.json:
        print(json.dumps(full))
    else:
        tasks = f" and {len(data.tasks)} tasks" if data.tasks else ""
        print(f"scored {len(data.texts)} texts{tasks} of {args.data}")
        for k, v in result.to_dict().items():
            print(f"{k:<22} {v}")
    return 0


def _report(args) -> int:
    from meswitch.compression.distill import DistillConfig
    from meswitch.evaluation.report import ReportConfig, run_report

    try:
        cfg = ReportConfig(
            methods=tuple(args.methods.split(",")),
            bits=args.bits,
            salient=args.salient,
            salient_1bit=args.salient_1bit,
            allocation=args.allocation,
            bit_budgets=tuple(float(b) for b in args.bit_budgets.split(",") if b),
            limit=args.limit,
            device=args.device,
            distill=DistillConfig(steps=args.distill_steps),
            experts=tuple(e for e in args.experts.split(",") if e),
        )
    except ValueError as e:  # ReportConfig checks every method x width x budget before any work
        raise CommandError(str(e)) from e
    paths = run_report(args.family, args.out, cfg)
    for p in paths:
        print(f"wrote {p}")
    return 0
