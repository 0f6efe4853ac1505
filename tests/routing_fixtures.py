"""Small family folders in the demo family's layout, for routing tests that must not wait for a build.

``make_family`` writes ``base/`` (a tiny random Mistral with a byte-level tokenizer),
``experts/<name>/expert.yaml`` (+ ``calib.jsonl``), ``data/<domain>/train.jsonl``,
``routing/{train,test}.jsonl`` and, with
``extra=True``, a fifth expert under ``extra/``. Queries come from per-domain templates, so the
domains are separable but not by one keyword.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml
from tiny_models import make_base

DOMAINS = {
    "code": "Python code",
    "math": "arithmetic problems",
    "chinese": "Chinese text",
    "english": "English prose",
}
EXTRA = {"definitions": "word definitions"}

_NAMES = ["Ann", "Bo", "Carl", "Dee", "Eli", "Fay", "Gus", "Hal"]
_THINGS = ["apples", "books", "coins", "pens", "cups", "stones"]
_FUNCS = ["parse", "load", "merge", "split", "sort", "count", "render", "fetch"]
_ZH = ["今天", "天气", "我们", "学习", "中文", "朋友", "喜欢", "这个", "问题", "时间", "工作", "生活"]
_EN = ["the", "morning", "river", "quiet", "friend", "always", "remember", "light", "house", "old", "kind", "road"]
_WORDS = ["lantern", "harbor", "meadow", "anchor", "candle", "orchard", "glacier", "thimble"]


def _query(domain: str, rng: random.Random) -> str:
    if domain == "code":
        f, g = rng.sample(_FUNCS, 2)
        return rng.choice(
            [
                f"def {f}_items(xs):\n    return [{g}(x) for x in xs if x]",
                f"How do I {f} a list in Python without calling {g}()?",
                f"import os\nfor name in os.listdir(path):\n    {f}(name)",
                f"Why does {f}(data) raise a KeyError in my class {g.title()}Handler?",
            ]
        )
    if domain == "math":
        a, b = rng.randint(2, 90), rng.randint(2, 90)
        n, t = rng.choice(_NAMES), rng.choice(_THINGS)
        return rng.choice(
            [
                f"{n} has {a} {t} and buys {b} more. How many {t} does {n} have?",
                f"What is {a} times {b} minus {rng.randint(1, 9)}?",
                f"{n} shares {a * 3} {t} among 3 friends. How many does each get?",
            ]
        )
    if domain == "chinese":
        return "".join(rng.choice(_ZH) for _ in range(rng.randint(4, 9))) + rng.choice(["吗？", "。", "呢？"])
    if domain == "english":
        words = [rng.choice(_EN) for _ in range(rng.randint(5, 10))]
        return " ".join(words).capitalize() + rng.choice([".", "!", "..."])
    if domain == "definitions":
        w = rng.choice(_WORDS)
        return rng.choice([f"Define the word '{w}'.", f"What does {w} mean?", f"{w}: noun, meaning?"])
    raise ValueError(domain)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _expert(folder: Path, domain: str, description: str, rng: random.Random) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    card = {
        "name": f"{domain}-expert",
        "domain": domain,
        "description": description,
        "examples": [_query(domain, rng) for _ in range(12)],
        "calibration": "calib.jsonl",
        "evaluation": "eval.jsonl",
        "task": None,
    }
    (folder / "expert.yaml").write_text(yaml.safe_dump(card, allow_unicode=True), encoding="utf-8")
    _write_jsonl(folder / "calib.jsonl", [{"text": _query(domain, rng) * 3} for _ in range(40)])
    return folder


def make_family(root: Path, extra: bool = True, per_domain: int = 80, seed: int = 0) -> Path:
    """A family folder with four domains (five with ``extra``); returns ``root``."""
    rng = random.Random(seed)
    make_base(root / "base", max_position_embeddings=512)
    domains = dict(DOMAINS, **(EXTRA if extra else {}))
    train, test = [], []
    for domain, desc in domains.items():
        parent = "extra" if domain in EXTRA else "experts"
        _expert(root / parent / f"{domain}-expert", domain, desc, rng)
        _write_jsonl(root / "data" / domain / "train.jsonl", [{"text": _query(domain, rng) * 2} for _ in range(50)])
        train += [{"text": _query(domain, rng), "domain": domain} for _ in range(per_domain)]
        test += [{"text": _query(domain, rng), "domain": domain} for _ in range(per_domain // 4)]
    _write_jsonl(root / "routing" / "train.jsonl", train)
    _write_jsonl(root / "routing" / "test.jsonl", test)
    return root
