"""The GPU benchmarks, run through on the CPU at a toy geometry (their ``--device cpu`` smoke path).

GPU time comes in short sessions: a benchmark that fails after minutes of set-up wastes one. These runs check
that each mode produces its row with the fields the results JSON promises; they say nothing of speed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def decode_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode") / "decode_e2e.json"
    modes = "graph,graph-compiled,engine,hf,hf-compile,hf-generate"
    _load("decode_e2e").main(["--device", "cpu", "--layers", "2", "--hidden", "64", "--inter", "128", "--heads", "4",
                              "--kv", "2", "--vocab", "256", "--experts-list", "0,2", "--batches", "2",
                              "--compile-batches", "2", "--modes", modes, "--prompt", "6", "--warmup", "1",
                              "--steps", "3", "--eager-steps", "2", "--max-len", "32", "--prefill-tokens", "0",
                              "--out", str(out)])  # fmt: skip
    return json.loads(out.read_text())


def test_the_decode_benchmark_gives_every_mode_its_row(decode_report):
    rows = {(r["mode"], r["experts"]) for r in decode_report["rows"]}
    expected = {(m, e) for m in ("graph", "graph-compiled", "engine") for e in (0, 2)}
    expected |= {("hf", 0), ("hf-compile", 0), ("hf-generate", 0)}
    assert rows == expected
    assert "errors" not in decode_report
    for r in decode_report["rows"]:
        assert r["ms"] > 0 and r["fraction_of_bytes_floor"] > 0 and r["tokens_per_s"] > 0
        assert {"gpu_ms", "host_ms", "bytes_floor_ms"} <= set(r)
    assert {"device", "versions", "command", "date"} <= set(decode_report)
    # the engine's delta against the reference (the reference itself on the CPU), held to bf16's bound
    assert decode_report["check_relative_error"] < decode_report["check_bound"] == 1e-2


def test_the_compiled_transformers_baselines_count_graphs_captured_while_timed(decode_report):
    compiled = [r for r in decode_report["rows"] if r["mode"] in ("hf-compile", "hf-generate")]
    assert len(compiled) == 2
    # no CUDA graph on the CPU: the count is there, and zero
    assert all(r["graphs_captured_timed"] == 0 and r["compile_and_run_s"] >= 0 for r in compiled)


def test_the_step_clock_times_generates_decode_steps():
    """hf-generate's timing: one put for the prompt, one after prefill, then one a decode step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = _load("decode_e2e")
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    r = bench.hf_generate(model, 2, 5, 2, 4, torch.Generator().manual_seed(0))
    assert r["ms"] > 0 and r["mean_context"] == 5 + 2 + 2.5


def test_the_fp8_activation_benchmark_measures_the_rounding_on_a_tiny_expert(tmp_path):
    """fp8_activation_kl.py on a tiny compressed expert: the per-row e4m3 rounding it applies is the kernel's (the
    row's largest value exact, every other within e4m3's half step), it moves the compressed expert's logits, and
    its KL figures are finite, with the rounding costing less than the compression itself."""
    import shutil

    import torch
    from serving_fixtures import compress
    from tiny_models import calib_file, make_base, make_expert

    bench = _load("fp8_activation_kl")
    x = torch.randn(5, 300, dtype=torch.float64) * torch.logspace(-2, 2, 300, dtype=torch.float64)  # outlier columns
    q = bench.e4m3_rows(x)
    r = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(q.abs().amax(-1), x.abs().amax(-1))
    normal = x.abs() / r >= 2**-6  # e4m3's normal range: 3 mantissa bits, a relative half step of 2^-4
    assert ((q - x).abs() <= x.abs() * 2**-4 + 1e-12)[normal].all() and not torch.equal(q, x)

    base = make_base(tmp_path / "base")
    expert = make_expert(base, tmp_path / "expert", seed=3)
    shutil.copy(calib_file(tmp_path / "calib.jsonl"), expert / "calib.jsonl")
    art = compress(base, expert, tmp_path / "art", "e3", None)
    out = tmp_path / "fp8.json"
    bench.main(["--base", str(base), "--expert", str(expert), "--artifact", str(art), "--data",
                str(expert / "calib.jsonl"), "--limit", "6", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    kl = report["kl_per_token"]
    assert report["tokens"] > 6 * 20 and all(v == v and v >= 0 for v in kl.values())
    assert kl["compressed_vs_e4m3"] > 0  # the rounding reached the logits
    assert abs(report["e4m3_adds_to_kl"]) < kl["expert_vs_compressed"]


def test_the_merged_rounding_benchmark_scores_every_case_on_a_micro_family(micro_family, tmp_path):
    """merged_rounding_kl.py on the micro family's math and code experts: a row a case with finite KLs for the fp32
    reconstruction and for both roundings of it, which move the KL, bf16's (7 mantissa bits) more than fp16's (10)."""
    out = tmp_path / "kl.json"
    _load("merged_rounding_kl").main(["--family", str(micro_family), "--out", str(out), "--work", str(tmp_path / "w"),
                                      "--texts", "3"])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["expert"], r["bits"]) for r in rows] == [("math", 2), ("code", 2), ("math", 1)]
    kinds = ("kl_fp32_reconstruction", "kl_linears_rounded_to_bf16", "kl_linears_rounded_to_fp16")
    assert all(0 <= r[k] < float("inf") for r in rows for k in kinds)
    moved = {k: sum(abs(r[k] - r["kl_fp32_reconstruction"]) for r in rows) for k in kinds[1:]}
    assert moved["kl_linears_rounded_to_bf16"] > moved["kl_linears_rounded_to_fp16"] > 0
