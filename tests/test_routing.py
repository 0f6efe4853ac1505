"""Routing without the demo family: prompt, threshold and fallback, data from expert folders, artifacts, CLI.

Uses ``routing_fixtures.make_family`` (a tiny random base and templated queries), so every test
here runs in seconds; how well routers route on the real demo family is in test_routing_family.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from routing_fixtures import make_family

from meswitch.artifacts import ArtifactError
from meswitch.cli import main
from meswitch.expert_card import CardError
from meswitch.routing import (
    DomainSpec,
    Example,
    RouterJob,
    RoutingDataError,
    build_routing_data,
    evaluate_router,
    find_experts,
    load_router,
    read_labelled,
    train_router,
)
from meswitch.routing.embedding import EmbeddingConfig
from meswitch.routing.mcq import MCQBackend, MCQConfig, finetune, load_causal_lm
from meswitch.routing.prompt import LETTERS, Option, PromptEncoder, letter_token_ids, render_prompt
from meswitch.routing.router import EMPTY_QUERY, Router

FAST = MCQConfig(epochs=1, batch_size=16, train_query_tokens=32, max_length=512, threads=1)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU two threads per process fight other jobs and run far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    return make_family(tmp_path_factory.mktemp("routing") / "fam", per_domain=24)


class FixedBackend:
    """Returns the same probabilities for every text; counts calls."""

    kind = "fixed"

    def __init__(self, probs: list[float]):
        self.probs = torch.tensor(probs)
        self.calls = 0

    def predict(self, texts):
        self.calls += 1
        return self.probs.expand(len(texts), -1).clone(), [len(t) > 100 for t in texts]


DOMAINS = [DomainSpec("code", "coder", "code"), DomainSpec("math", "mathematician", "maths")]


# -- prompt ------------------------------------------------------------------------------------------


def test_prompt_lists_query_then_lettered_options(fam):
    opts = [Option("code", "Python source"), Option("math", "arithmetic")]
    text = render_prompt(opts, "What is 2+2?")
    assert text.index("What is 2+2?") < text.index("A. code: Python source") < text.index("B. math: arithmetic")
    assert text.endswith("Answer:")
    _, tok = load_causal_lm(fam / "base")
    ids = letter_token_ids(tok, 26)
    assert len(set(ids)) == 26
    assert tok.decode([ids[0]]).strip() == "A"


def test_prompt_truncates_long_queries_and_says_so(fam):
    _, tok = load_causal_lm(fam / "base")
    opts = [Option("code", "Python source"), Option("math", "arithmetic")]
    enc = PromptEncoder(tok, max_length=120)
    short, cut = enc.encode(opts, "2+2?")
    assert not cut and len(short) < 120
    long, cut = enc.encode(opts, "word " * 500)
    assert cut and len(long) == 120
    assert long[-len(enc.tail_ids(opts)) :] == enc.tail_ids(opts)  # the options and "Answer:" survive
    with pytest.raises(ValueError, match="more than its context"):
        PromptEncoder(tok, max_length=20).encode(opts, "2+2?")
    with pytest.raises(ValueError, match="at most 26"):
        enc.encode([Option(f"d{i}", "") for i in range(len(LETTERS) + 1)], "q")


# -- router: threshold, fallback, bad queries ----------------------------------------------------------


def test_router_picks_top_domain_and_falls_back_below_threshold():
    sure = Router(FixedBackend([0.1, 0.9]), DOMAINS, threshold=0.5)
    r = sure.route("What is 2+2?")
    assert (r.domain, r.expert, r.fallback, r.reason) == ("math", "mathematician", False, None)
    assert r.confidence == pytest.approx(0.9) and r.scores == {"code": 0.1, "math": 0.9}

    unsure = Router(FixedBackend([0.45, 0.55]), DOMAINS, threshold=0.6)
    r = unsure.route("hmm")
    assert r.domain == "math" and r.fallback and r.expert is None  # None: the base model answers
    assert "below threshold" in r.reason

    to_default = Router(FixedBackend([0.45, 0.55]), DOMAINS, threshold=0.6, default_expert="coder")
    assert to_default.route("hmm").expert == "coder"
    with pytest.raises(ValueError, match="not one of the router's experts"):
        Router(FixedBackend([0.5, 0.5]), DOMAINS, default_expert="nobody")
    with pytest.raises(ValueError, match="threshold"):
        Router(FixedBackend([0.5, 0.5]), DOMAINS, threshold=1.5)


def test_empty_query_falls_back_without_calling_the_model():
    backend = FixedBackend([0.1, 0.9])
    router = Router(backend, DOMAINS)
    for q in ("", "   \n\t"):
        r = router.route(q)
        assert (r.domain, r.expert, r.confidence, r.fallback, r.reason) == (None, None, 0.0, True, EMPTY_QUERY)
    assert backend.calls == 0
    mixed = router.route_batch(["", "2+2", ""])
    assert [r.fallback for r in mixed] == [True, False, True] and backend.calls == 1
    with pytest.raises(TypeError, match="string"):
        router.route(None)  # type: ignore[arg-type]


# -- data from expert folders --------------------------------------------------------------------------


def test_expert_folder_without_card_is_a_clear_error(tmp_path, fam):
    bare = tmp_path / "no-card"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(CardError, match=r"expert\.yaml: missing"):
        find_experts([bare])
    # a folder of expert folders expands to its experts
    cards = find_experts([fam / "experts"])
    assert sorted(c.domain for c in cards) == ["chinese", "code", "english", "math"]


def test_routing_data_comes_from_family_lines_and_never_from_held_out(fam):
    data = build_routing_data(find_experts([fam / "experts"]), max_per_domain=30)
    assert [d.domain for d in data.domains] == ["chinese", "code", "english", "math"]
    assert data.counts() == {"chinese": 30, "code": 30, "english": 30, "math": 30}
    assert all("routing/train.jsonl" in s for s in data.sources.values())
    assert {ex.domain for ex in data.test} == {"chinese", "code", "english", "math"}  # the extra domain's lines dropped
    assert not {ex.text for ex in data.train} & {ex.text for ex in data.test}
    card_examples = set(yaml.safe_load((fam / "experts" / "math-expert" / "expert.yaml").read_text())["examples"])
    assert card_examples <= {ex.text for ex in data.train if ex.domain == "math"} | {ex.text for ex in data.test}
    assert data.fingerprint() == build_routing_data(find_experts([fam / "experts"]), max_per_domain=30).fingerprint()
    # a domain with fewer queries than the cap is topped up with snippets of the family's data/<domain>/
    more = build_routing_data(find_experts([fam / "experts"]), max_per_domain=60, snippet_chars=40)
    assert more.counts()["math"] == 60 and "data/math/train.jsonl" in more.sources["math"]
    assert sum(len(ex.text) <= 40 for ex in more.train if ex.domain == "math") >= 60 - 12 - 24


def test_expert_outside_a_family_uses_calibration_snippets(tmp_path, fam):
    for name in ("math-expert", "code-expert"):
        shutil.copytree(fam / "experts" / name, tmp_path / "loose" / name)
    data = build_routing_data(find_experts([tmp_path / "loose"]), max_per_domain=20, snippet_chars=50)
    assert all("calib.jsonl" in s for s in data.sources.values())
    assert not data.test
    assert data.counts() == {"code": 20, "math": 20}
    assert max(len(ex.text) for ex in data.train if ex.text not in _examples(tmp_path / "loose")) <= 50


def _examples(folder: Path) -> set[str]:
    return {q for p in folder.glob("*/expert.yaml") for q in yaml.safe_load(p.read_text())["examples"]}


def test_bad_expert_sets_are_refused(tmp_path, fam):
    shutil.copytree(fam / "experts" / "math-expert", tmp_path / "a")
    shutil.copytree(fam / "experts" / "math-expert", tmp_path / "b")
    card = yaml.safe_load((tmp_path / "b" / "expert.yaml").read_text())
    card["name"] = "math-two"
    (tmp_path / "b" / "expert.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(RoutingDataError, match="already served by expert 'math-expert'"):
        build_routing_data(find_experts([tmp_path / "a", tmp_path / "b"]))
    with pytest.raises(RoutingDataError, match="at least two domains"):
        build_routing_data(find_experts([tmp_path / "a"]))


def test_read_labelled_names_the_bad_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"text": "a", "domain": "x"}\n{"text": "b"}\n')
    with pytest.raises(RoutingDataError, match=r"q\.jsonl:2"):
        read_labelled(path)
    with pytest.raises(FileNotFoundError):
        read_labelled(tmp_path / "missing.jsonl")


# -- MCQ: fine-tuning, artifacts --------------------------------------------------------------------------


def test_finetuning_shuffles_the_options_so_no_letter_is_memorised(fam, monkeypatch):
    """Every training query is of one domain: with the options shuffled no letter can be learnt (the loss
    stays near ln 2); with the shuffle switched off the same run learns "always A" at once."""
    opts = [Option("code", "code"), Option("math", "math")]
    train = [Example(f"{i} + {i} =", "math") for i in range(48)]
    cfg = MCQConfig(epochs=3, lr=3e-3, batch_size=16, train_query_tokens=24, threads=1)
    model, tok = load_causal_lm(fam / "base")
    shuffled = finetune(model, tok, opts, train, cfg)
    assert shuffled.final_loss > 0.6 and shuffled.steps == 9
    assert shuffled.trainable_params == sum(p.numel() for p in model.parameters())

    import meswitch.routing.mcq as mcq

    monkeypatch.setattr(mcq.random.Random, "shuffle", lambda self, x: None)
    model, tok = load_causal_lm(fam / "base")
    fixed = finetune(model, tok, opts, train, cfg)
    assert fixed.final_loss < 0.3
    model, tok = load_causal_lm(fam / "base")  # plain SFT over the whole vocabulary learns it too
    vocab = finetune(model, tok, opts, train, MCQConfig(**{**cfg.__dict__, "loss": "vocab", "epochs": 6}))
    assert vocab.final_loss < vocab.first_loss / 2


def test_mcq_artifact_round_trip_full_and_lora(fam, tmp_path):
    for mode in ("full", "lora"):
        out = tmp_path / f"r-{mode}"
        cfg = MCQConfig(**{**FAST.__dict__, "finetune": mode})
        m = train_router(RouterJob(experts=[fam / "experts"], out=out, mcq=cfg, max_per_domain=16))
        assert m.kind == "router" and m.method["backend"] == "mcq" and m.method["finetune"] == mode
        assert [d["domain"] for d in m.metadata["domains"]] == ["chinese", "code", "english", "math"]
        assert m.metadata["domains"][0]["expert"] == "chinese-expert"
        assert m.metrics["train_seconds"] > 0 and m.metrics["sft_steps"] == 4
        assert 0.0 <= m.metrics["heldout_accuracy"] <= 1.0 and m.metrics["heldout"]["n"] == 4 * 6
        assert m.source_fingerprint and m.base_fingerprint
        assert (out / ("model" if mode == "full" else "adapter")).is_dir()
        router = load_router(out)
        q = read_labelled(fam / "routing" / "test.jsonl")[:5]
        batch = router.route_batch([ex.text for ex in q])
        single = [router.route(ex.text) for ex in q]
        for a, b in zip(batch, single, strict=True):  # left padding changes nothing
            assert a.domain == b.domain and a.confidence == pytest.approx(b.confidence, abs=1e-5)
        ev = evaluate_router(router, q)
        assert ev.latency_ms["p50"] > 0 and ev.n == len([e for e in q if e.domain in router.domain_names])

    # LoRA stores only the adapter: loading checks the base it adapts
    moved = tmp_path / "other-base"
    shutil.copytree(fam / "base", moved)
    model, _ = load_causal_lm(moved)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(moved, safe_serialization=True)
    with pytest.raises(ArtifactError, match="made for base"):
        load_router(tmp_path / "r-lora", base_model=moved)


def test_long_query_is_truncated_and_reported(fam, tmp_path):
    model, tok = load_causal_lm(fam / "base")
    opts = [d.option for d in DOMAINS]
    router = Router(MCQBackend(model, tok, opts, max_length=96), DOMAINS, threshold=0.0)
    r = router.route("x = 1\n" * 200)
    assert r.truncated and r.domain in ("code", "math")
    assert not router.route("x = 1").truncated


def test_averaging_option_orders_maps_every_letter_back_to_its_domain(fam):
    """orders=0 equals routing under every cyclic shift of the options one by one, mapped back and averaged."""
    model, tok = load_causal_lm(fam / "base")
    opts = [Option(n, f"the {n} domain") for n in ("chinese", "code", "english", "math")]
    queries = ["What is 17 plus 3?", "def f(x): return x", "Tell me a saying about love."]
    both, cut = MCQBackend(model, tok, opts, max_length=512, orders=0).predict(queries)
    assert both.shape == (3, 4) and not any(cut)
    assert torch.allclose(both.sum(-1), torch.ones(3), atol=1e-5)
    expected = torch.zeros(3, 4)
    for s in range(4):
        shifted = opts[s:] + opts[:s]
        p, _ = MCQBackend(model, tok, shifted, max_length=512, orders=1).predict(queries)
        expected[:, [(j + s) % 4 for j in range(4)]] += p / 4  # letter j showed option (j + s) % 4
    assert torch.allclose(both, expected, atol=1e-5)
    # one order is the listed order, and two orders are shifts 0 and 2
    one, _ = MCQBackend(model, tok, opts, max_length=512, orders=1).predict(queries)
    assert not torch.allclose(one, both, atol=1e-4)
    assert MCQBackend(model, tok, opts, max_length=512, orders=2).shifts == [0, 2]


def test_tampered_router_artifact_is_refused(fam, tmp_path):
    out = tmp_path / "r"
    train_router(RouterJob(experts=[fam / "experts"], out=out, mcq=MCQConfig(**{**FAST.__dict__, "finetune": "none"})))
    assert not (out / "model").exists()  # un-fine-tuned: only the manifest, pointing at the base
    assert load_router(out).domain_names == ["chinese", "code", "english", "math"]
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not listed"):
        load_router(out)


def test_embedding_router_over_mean_pooled_states_of_a_local_model(fam, tmp_path):
    """The fallback encoder: a local HF model, mean-pooled; the artifact carries a copy of it."""
    out = tmp_path / "emb"
    m = train_router(RouterJob(experts=[fam / "experts"], out=out, backend="embedding", max_per_domain=20,
                               embedding=EmbeddingConfig(encoder=str(fam / "base"))))  # fmt: skip
    assert m.metadata["encoder"]["kind"] == "mean-pool" and (out / "encoder" / "config.json").is_file()
    assert m.metrics["train_accuracy"] > 0.5 and m.metrics["dim"] == 64
    router = load_router(out)
    assert router.kind == "embedding"
    r = router.route("What is 12 times 7?")
    assert r.domain in router.domain_names and sum(r.scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert router.route("x " * 1000).truncated


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_errors_are_one_line(fam, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["router", "train", "--experts", str(bare), "--out", str(tmp_path / "r")]) == 2
    assert "expert.yaml: missing" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["route", str(tmp_path / "nowhere"), "q"]) == 2
    assert "no such artifact folder" in capsys.readouterr().err
    assert main(["route", str(bare), "q"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_cli_train_eval_route(fam, tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(
        ["router", "train", "--experts", str(fam / "experts"), "--out", str(out), "--backend", "mcq", "--epochs", "1",
         "--max-per-domain", "16", "--threshold", "0.3", "--json"]
    )  # fmt: skip
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["train_examples"] == 64 and "heldout_accuracy" in metrics
    assert main(["router", "eval", str(out), "--data", str(fam / "routing" / "test.jsonl"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["n"] == 4 * 6 and ev["skipped_unknown_domain"] == 6
    assert set(ev["latency_ms"]) == {"p50", "p99", "mean"} and len(ev["confusion"]) == 4
    assert main(["route", str(out), "", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fallback"] and r["reason"] == EMPTY_QUERY and r["expert"] is None
    assert main(["route", str(out), "What is 3 times 4?"]) == 0
    assert "confidence" in capsys.readouterr().out
    assert main(["route", str(out), "word " * 2000, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"] is True
    # many queries, the router loaded once: plain lines and JSONL, one result (with its latency) per query
    (tmp_path / "q.txt").write_text("What is 3 times 4?\n\nWrite a function\n")
    (tmp_path / "q.jsonl").write_text('{"text": "What is 3 times 4?"}\n{"text": "Write a function"}\n')
    for name in ("q.txt", "q.jsonl"):
        assert main(["route", str(out), "--file", str(tmp_path / name), "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(rows) == 2 and all(r["latency_ms"] > 0 and "domain" in r for r in rows)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    assert main(["route", str(out), "--file", str(tmp_path / "bad.jsonl")]) != 0
    assert "bad.jsonl:2: expected a JSON object with a 'text' field" in capsys.readouterr().err
    assert main(["route", str(out)]) != 0  # neither a query nor a file


def test_calibration_error_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    from meswitch.routing.evaluate import calibration

    # 10 queries at confidence 0.8, 8 right: calibrated
    ece, bins = calibration([0.8] * 10, [True] * 8 + [False] * 2)
    assert ece == pytest.approx(0.0) and bins == [{"lo": 0.7, "hi": 0.8, "n": 10, "confidence": 0.8, "accuracy": 0.8}]
    # sure of every answer and right half the time: ECE 0.5
    ece, _ = calibration([0.99] * 10, [True, False] * 5)
    assert ece == pytest.approx(0.49)
