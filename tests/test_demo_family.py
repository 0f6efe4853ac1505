"""The demo family: layout, loadable models, expert cards, disjoint splits, determinism, idempotence.

The micro family is built once per session (about half a minute on 2 CPU cores, plus fetching three
small Debian packages into the corpora cache the first time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from meswitch.demo import CORE_DOMAINS, SIZES, CorpusUnavailable, build_family, corpora

pytestmark = pytest.mark.slow

CARD_FIELDS = {"name", "domain", "description", "examples", "calibration", "evaluation", "task"}
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def core(micro_core_family: Path) -> Path:
    """The session's micro family, four core domains (conftest), built once for every test that reads it."""
    return micro_core_family


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _family(root: Path) -> dict:
    return json.loads((root / "family.json").read_text(encoding="utf-8"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout(core: Path):
    for name in HF_FILES:
        assert (core / "base" / name).is_file(), name
    for d in CORE_DOMAINS:
        folder = core / "experts" / d
        for name in (*HF_FILES, "expert.yaml", "calib.jsonl", "eval.jsonl"):
            assert (folder / name).is_file(), folder / name
        for split in ("train", "calib", "eval"):
            assert _rows(core / "data" / d / f"{split}.jsonl"), (d, split)
    assert not (core / "extra").exists()
    # nothing left beside the family by the atomic build
    assert [p.name for p in core.parent.iterdir()] == ["family"]
    family = _family(core)
    assert (family["size"], family["seed"]) == ("micro", 0)
    assert set(family["experts"]) == set(CORE_DOMAINS)
    assert set(family["perplexity"]) == {"base", *CORE_DOMAINS}
    for d in CORE_DOMAINS:
        assert family["sources"][d]["licence"] and family["sources"][d]["version"]
        assert family["experts"][d]["train_loss"] > 0
    assert family["wall_seconds"]["total"] > 0


def test_models_load_offline_and_are_mistral_with_gqa(core: Path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = SIZES["micro"]
    base = AutoModelForCausalLM.from_pretrained(core / "base")
    assert type(base).__name__ == "MistralForCausalLM"
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    assert base.config.tie_word_embeddings is False
    assert base.config.hidden_size == spec.hidden_size and base.config.vocab_size == spec.vocab_size
    assert base.lm_head.weight.data_ptr() != base.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(core / "base")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(tok("床前明月光 x = 42")["input_ids"], skip_special_tokens=True) == "床前明月光 x = 42"
    for d in CORE_DOMAINS:
        expert = AutoModelForCausalLM.from_pretrained(core / "experts" / d)
        assert type(expert).__name__ == "MistralForCausalLM"
        assert _sha(core / "experts" / d / "tokenizer.json") == _sha(core / "base" / "tokenizer.json")


def test_experts_are_full_fine_tunes_of_the_base(core: Path):
    base = load_file(core / "base" / "model.safetensors")
    for d in CORE_DOMAINS:
        expert = load_file(core / "experts" / d / "model.safetensors")
        assert expert.keys() == base.keys()
        for name, w in base.items():
            assert expert[name].dtype == torch.float32
            assert not torch.equal(expert[name], w), f"{d}: {name} was not trained"
            if w.dim() == 2 and min(w.shape) >= 32:  # a full update, not a rank-8 adapter
                assert torch.linalg.matrix_rank(expert[name] - w) > 8, (d, name)


def test_expert_cards(core: Path):
    for d in CORE_DOMAINS:
        folder = core / "experts" / d
        card = yaml.safe_load((folder / "expert.yaml").read_text(encoding="utf-8"))
        assert set(card) == CARD_FIELDS
        assert card["name"] == d and card["domain"] == d
        assert isinstance(card["description"], str) and "\n" not in card["description"].strip()
        assert len(card["examples"]) >= 10 and all(isinstance(e, str) and e for e in card["examples"])
        assert (card["calibration"], card["evaluation"]) == ("calib.jsonl", "eval.jsonl")
        assert card["task"] == ("arithmetic-exact-match" if d == "math" else None)
        assert (folder / "calib.jsonl").read_bytes() == (core / "data" / d / "calib.jsonl").read_bytes()
        assert (folder / "eval.jsonl").read_bytes() == (core / "data" / d / "eval.jsonl").read_bytes()
    # the house's card reader accepts them
    from meswitch.expert_card import load_card

    assert load_card(core / "experts" / "math").task == "arithmetic-exact-match"


def test_math_eval_lines_carry_prompt_and_exact_answer(core: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(core / "base")
    rows = _rows(core / "data" / "math" / "eval.jsonl")
    for row in rows:
        assert row["text"] == row["prompt"] + row["answer"]
        assert row["prompt"].endswith("Answer: ") and row["answer"].isdigit()
    # digits are split, so the prompt's tokens are a prefix of the full text's: greedy decoding can match
    for row in rows[:10]:
        p, t = tok(row["prompt"])["input_ids"], tok(row["text"])["input_ids"]
        assert t[: len(p)] == p and len(t) > len(p)


def test_arithmetic_answers_are_right():
    docs = corpora.arithmetic_problems(300, seed=5)
    assert docs == corpora.arithmetic_problems(300, seed=5)
    assert docs != corpora.arithmetic_problems(300, seed=6)
    assert len({d["question"] for d in docs}) == 300
    checked = 0
    for d in docs:
        q, answer = d["question"], int(d["answer"])
        nums = [int(n) for n in re.findall(r"\d+", q)]
        assert answer >= 0
        if "more." in q or "years older" in q:
            assert answer == nums[0] + nums[1]
            checked += 1
        elif "gave" in q:
            assert answer == nums[0] - nums[1]
            checked += 1
        elif "equally among" in q:
            assert answer * nums[1] == nums[0]
            checked += 1
        elif "spends" in q:
            assert answer == nums[0] * nums[1] - nums[2]
            checked += 1
        elif "Each box holds" in q or "How many dollars do " in q:
            assert answer == nums[0] * nums[1]
            checked += 1
        elif "takes away" in q:
            assert answer == nums[0] + nums[1] - nums[2]
            checked += 1
    assert checked == 300


def test_splits_are_disjoint(core: Path):
    for d in CORE_DOMAINS:
        texts = {s: [r["text"] for r in _rows(core / "data" / d / f"{s}.jsonl")] for s in ("train", "calib", "eval")}
        for s, rows in texts.items():
            assert all(rows) and len(set(rows)) == len(rows), (d, s)
        assert not set(texts["train"]) & set(texts["eval"]), d
        assert not set(texts["train"]) & set(texts["calib"]), d
        assert not set(texts["calib"]) & set(texts["eval"]), d
    train, test = (_rows(core / "routing" / f"{s}.jsonl") for s in ("train", "test"))
    assert {r["domain"] for r in train} == {r["domain"] for r in test} == set(CORE_DOMAINS)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    for d in CORE_DOMAINS:
        assert sum(r["domain"] == d for r in test) >= SIZES["micro"].routing_test // 2, d


def test_experts_beat_the_base_on_their_own_domain(core: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meswitch.evaluation.metrics import perplexity

    family = _family(core)
    for d in CORE_DOMAINS:
        info = family["experts"][d]
        assert info["ppl_own_domain"] < 0.95 * info["base_ppl_own_domain"], (d, info)
    # the recorded figures are what the saved models give
    tok = AutoTokenizer.from_pretrained(core / "base")
    texts = [r["text"] for r in _rows(core / "data" / "chinese" / "eval.jsonl")][: SIZES["micro"].eval_texts]
    expert = AutoModelForCausalLM.from_pretrained(core / "experts" / "chinese")
    ppl = perplexity(expert, tok, texts, max_len=SIZES["micro"].seq_len)
    assert ppl == pytest.approx(family["perplexity"]["chinese"]["chinese"], rel=1e-3)


def test_second_build_is_a_no_op(core: Path, caplog):
    before = {p: p.stat().st_mtime_ns for p in core.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="meswitch.demo.family"):
        assert build_family(core, size="micro", seed=0) == core
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in core.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="seed 0"):
        build_family(core, size="micro", seed=1)


def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch):
    from meswitch.demo import family

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(family, "train_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_family(tmp_path / "fam", size="micro")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_folder_without_family_json(tmp_path: Path):
    (tmp_path / "stuff.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_family(tmp_path, size="micro")
    assert [p.name for p in tmp_path.iterdir()] == ["stuff.txt"]


def test_same_seed_gives_identical_tensors(core: Path, tmp_path: Path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".again.building-{dead.pid}"  # as a killed build leaves it
    (stale / "base").mkdir(parents=True)
    again = build_family(tmp_path / "again", size="micro", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    for rel in ["base", *(f"experts/{d}" for d in CORE_DOMAINS)]:
        a, b = load_file(core / rel / "model.safetensors"), load_file(again / rel / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (rel, name)
    for rel in [
        "base/tokenizer.json",
        "routing/train.jsonl",
        "routing/test.jsonl",
        *(f"data/{d}/{s}.jsonl" for d in CORE_DOMAINS for s in ("train", "calib", "eval")),
    ]:
        assert _sha(core / rel) == _sha(again / rel), rel
    assert _family(again)["perplexity"] == _family(core)["perplexity"]


def test_extra_domain_is_added_without_touching_the_family(core: Path, tmp_path: Path):
    root = tmp_path / "family"
    shutil.copytree(core, root)
    untouched = {
        rel: _sha(root / rel)
        for rel in ["base/model.safetensors", "experts/code/model.safetensors", "data/math/eval.jsonl"]
    }
    routing_before = _rows(root / "routing" / "train.jsonl")
    build_family(root, size="micro", seed=0, extra_domain=True)
    (extra,) = corpora.EXTRA_DOMAINS
    folder = root / "extra" / extra
    for name in (*HF_FILES, "expert.yaml", "calib.jsonl", "eval.jsonl"):
        assert (folder / name).is_file(), name
    for split in ("train", "calib", "eval"):
        assert _rows(root / "data" / extra / f"{split}.jsonl")
    card = yaml.safe_load((folder / "expert.yaml").read_text(encoding="utf-8"))
    assert set(card) == CARD_FIELDS and card["domain"] == extra and len(card["examples"]) >= 10
    assert {rel: _sha(root / rel) for rel in untouched} == untouched
    routing_after = _rows(root / "routing" / "train.jsonl")
    assert routing_after[: len(routing_before)] == routing_before
    assert {r["domain"] for r in routing_after[len(routing_before) :]} == {extra}
    assert {r["domain"] for r in _rows(root / "routing" / "test.jsonl")} == {*CORE_DOMAINS, extra}
    info = _family(root)["extra"][extra]
    assert info["ppl_own_domain"] < info["base_ppl_own_domain"]
    assert _family(root)["sources"][extra]["licence"].startswith("WordNet")
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    # and asking again does nothing
    mtime = (root / "family.json").stat().st_mtime_ns
    build_family(root, size="micro", seed=0, extra_domain=True)
    assert (root / "family.json").stat().st_mtime_ns == mtime


def test_unavailable_debian_source_fails_clearly(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(CorpusUnavailable, match="apt-get"):
        corpora.load_corpus("chinese", cache=tmp_path)


def test_corpora_are_cached(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MESWITCH_CACHE", str(tmp_path))
    assert corpora.cache_dir() == tmp_path
    first = corpora.load_corpus("code")
    meta = json.loads((tmp_path / "python-stdlib" / "source.json").read_text())
    assert meta["documents"] == len(first.docs) > 1000
    assert "Python" in (tmp_path / "python-stdlib" / "copyright").read_text()
    monkeypatch.setitem(corpora._CACHED, "code", ("python-stdlib", lambda cache: pytest.fail("not cached")))
    assert corpora.load_corpus("code").docs == first.docs


def test_cli_help_and_no_op(core: Path, capsys):
    from meswitch.cli import build_parser, main

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["demo-family", "--help"])
    help_text = capsys.readouterr().out
    for word in ("--out", "--size", "--seed", "--extra-domain", "micro", "tiny", "small"):
        assert word in help_text
    assert main(["demo-family", "--out", str(core), "--size", "micro"]) == 0
    assert "ready" in capsys.readouterr().out
    assert main(["demo-family", "--out", str(core), "--size", "tiny"]) == 2
    assert main(["demo-family", "--out", str(core), "--size", "micro", "--experts", "code"]) == 2
    assert "--experts applies to the real family" in capsys.readouterr().err
