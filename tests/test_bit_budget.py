"""A bit budget for the whole expert: each matrix gets a width by its activation-weighted error, the expert's
bytes stay within the budget, and an expert whose matrices differ in width loads, reconstructs, evaluates and
distills like any other."""

import json

import pytest
import torch
from tiny_models import make_family, save_model

from meswitch.artifacts import read_manifest
from meswitch.checkpoints import Checkpoint, check_expert
from meswitch.cli import main
from meswitch.compression.bit_budget import allocate_bits, candidate_widths
from meswitch.compression.calibration import CalibConfig, calibrate, read_texts
from meswitch.compression.config import DeltaConfig
from meswitch.compression.delta import compress_delta, delta_nbytes
from meswitch.compression.distill import DistillConfig, apply_multipliers
from meswitch.compression.expert import ExpertInfo, compress_expert, plan_matrices
from meswitch.compression.reconstruct import expert_tensors, open_artifact, reconstruct
from meswitch.evaluation import report
from meswitch.evaluation.evaluate import evaluate_artifact
from meswitch.evaluation.metrics import EvalData
from meswitch.evaluation.report import ReportConfig, run_report
from meswitch.evaluation.variants import report_method, variants

CALIB = CalibConfig(samples=8, seq_len=64, batch_size=4)
BUDGET = 1.9  # the tiny expert costs 1.77 bits/param at 1 bit in every matrix (64-wide rows: costly step sizes)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = make_family(tmp_path_factory.mktemp("budget-family"))
    b, e = Checkpoint(root / "base"), Checkpoint(root / "experts" / "alpha")
    stats = calibrate(e, read_texts(e.path / "calib.jsonl"), CALIB, "cpu")
    return root, b, e, stats


def _compress(family, cfg: DeltaConfig, out):
    _, base, expert, stats = family
    return compress_expert(base, expert, check_expert(base, expert), stats, cfg, out, ExpertInfo("alpha"))


@pytest.fixture(scope="module")
def mixed(family, tmp_path_factory):
    """The expert compressed under the budget: its manifest and artifact folder."""
    out = tmp_path_factory.mktemp("mixed") / "art"
    return _compress(family, DeltaConfig(bit_budget=BUDGET, salient=0.02), out), out


@pytest.mark.parametrize(
    ("shape", "bits", "group", "symmetric", "salient"),
    [((48, 64), 1, 0, False, 3), ((48, 64), 3, 0, False, 0), ((16, 96), 2, 32, True, 5), ((8, 40), 4, -1, True, 1)],
)
def test_planned_bytes_are_the_bytes_stored(shape, bits, group, symmetric, salient):
    cfg = DeltaConfig(bits=bits, group_size=group, symmetric=symmetric, salient=salient, allocation="layer")
    cd = compress_delta(torch.randn(shape), torch.rand(shape[1]) + 0.1, cfg)
    assert delta_nbytes(shape, cfg.quant_spec(), salient) == cd.nbytes()


def test_the_upgrade_goes_where_it_removes_the_most_error_per_byte():
    errors = {"quiet": {1: 1.0, 2: 0.3}, "loud": {1: 9.0, 2: 2.0}, "big": {1: 20.0, 2: 6.0}}
    costs = {"quiet": {1: 10, 2: 20}, "loud": {1: 10, 2: 20}, "big": {1: 40, 2: 80}}
    # 10 bytes to spare: one small upgrade, the one that removes most (loud: 7 per 10 bytes)
    assert allocate_bits(errors, costs, 70) == {"quiet": 1, "loud": 2, "big": 1}
    # 50 to spare: loud, then big (14 per 40) before quiet (0.7 per 10)
    assert allocate_bits(errors, costs, 110) == {"quiet": 1, "loud": 2, "big": 2}
    assert allocate_bits(errors, costs, 1000) == {"quiet": 2, "loud": 2, "big": 2}
    with pytest.raises(ValueError, match="narrowest widths need 1 bytes more"):
        allocate_bits(errors, costs, 59)
    assert candidate_widths(1.1) == (1, 2) and candidate_widths(2.3) == (2, 3) and candidate_widths(4) == (4,)


def test_the_budget_holds_and_the_widths_follow_the_error(family, mixed):
    _, base, expert, stats = family
    manifest, _ = mixed
    assert BUDGET - 0.05 <= manifest.metrics["bits_per_param"] <= BUDGET + 1e-3
    widths = {layer.name: layer.bits for layer in manifest.layers}
    assert set(widths.values()) >= {1, 2} and manifest.method["bits"] == 1  # the budget's floor width
    assert manifest.method["widths"] == {str(b): list(widths.values()).count(b) for b in sorted(set(widths.values()))}
    assert all(manifest.tensors[n]["bits"] == b for n, b in widths.items())
    names = [n for n in base.keys() if n != base.spec.lm_head or not expert.tied_embeddings]
    plan = plan_matrices(base, expert, stats, DeltaConfig(bit_budget=BUDGET, salient=0.02), names, "cpu")
    assert plan.widths == widths  # deterministic


def test_more_bits_go_where_the_error_is_larger(family, tmp_path):
    """One projection's delta made 10x larger (100x its error), one 10x smaller: the budget upgrades the first."""
    from transformers import AutoModelForCausalLM

    _, base, expert, _ = family
    loud, quiet = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    model = AutoModelForCausalLM.from_pretrained(expert.path)
    with torch.no_grad():
        for name, factor in ((loud, 10.0), (quiet, 0.1)):
            w = model.get_parameter(name)
            w.copy_(base.get(name) + factor * (w - base.get(name)))
    skewed = Checkpoint(save_model(model, tmp_path / "skewed"))
    stats = calibrate(skewed, read_texts(expert.path / "calib.jsonl"), CALIB, "cpu")
    manifest = compress_expert(base, skewed, check_expert(base, skewed), stats, DeltaConfig(bit_budget=1.8),
                               tmp_path / "art", ExpertInfo("skewed"))  # fmt: skip
    widths = {layer.name: layer.bits for layer in manifest.layers}
    assert widths[loud] == 2 and widths[quiet] == 1 and manifest.metrics["bits_per_param"] <= 1.8


def test_a_mixed_expert_loads_reconstructs_evaluates_and_distills(family, mixed, tmp_path):
    root, base, expert, _ = family
    manifest, art = mixed
    reader = open_artifact(art, base)
    rebuilt = dict(expert_tensors(base, reader, dtype=torch.float32))
    for layer in manifest.layers:  # each matrix at its own width, within its quantization error of the expert
        assert reader.compressed(layer.name).spec.bits == layer.bits
        err = (rebuilt[layer.name] - expert.get(layer.name).float()).norm() / (
            expert.get(layer.name).float() - base.get(layer.name).float()
        ).norm()
        assert err == pytest.approx(layer.rel_error, rel=1e-2, abs=1e-3)
    folder = reconstruct(base, art, tmp_path / "hf")
    assert torch.equal(Checkpoint(folder).get(manifest.layers[0].name).float(), rebuilt[manifest.layers[0].name])
    data = EvalData.load(expert.path / "eval.jsonl", 4)
    result = evaluate_artifact(root / "base", art, expert.path, data)
    assert result.bits == 1 and result.kl > 0
    assert result.bits_per_param == manifest.metrics["bits_per_param"]
    names = [n for n, h in manifest.tensors.items() if h["kind"] == "quantized"]
    apply_multipliers(art, tmp_path / "scaled", dict.fromkeys(names, 0.5), {"steps": 0})
    scaled = open_artifact(tmp_path / "scaled", base)
    for n in names:
        torch.testing.assert_close(scaled.delta(n), 0.5 * reader.delta(n), rtol=2e-3, atol=1e-4)


def test_a_budget_below_the_smallest_width_is_refused(family, tmp_path, capsys):
    with pytest.raises(ValueError, match="below the smallest width, 1 bit per parameter"):
        DeltaConfig(bit_budget=0.9)
    with pytest.raises(ValueError, match=r"bitdelta.*fixes its own bit width"):
        DeltaConfig("bitdelta", bit_budget=1.1)
    # above 1 bit but below what this expert's step sizes, salient channels and fp16 tensors cost at 1 bit
    costly = r"bit budget 1.5 is below what alpha costs at 1 bit\(s\) in every matrix: 1.7"
    with pytest.raises(ValueError, match=costly):
        _compress(family, DeltaConfig(bit_budget=1.5, salient=0.02), tmp_path / "art")
    root, *_ = family
    alpha = root / "experts" / "alpha"
    args = ["compress", "--base", str(root / "base"), "--expert", str(alpha), "--out", str(tmp_path / "cli"),
            "--calib", str(alpha / "calib.jsonl"), "--device", "cpu"]  # fmt: skip
    assert main([*args, "--bit-budget", "0.5"]) != 0
    assert "below the smallest width" in capsys.readouterr().err
    assert main([*args, "--bit-budget", "1.85", "--samples", "8", "--seq-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_param"] <= 1.85


def test_the_report_puts_budget_rows_beside_the_uniform_ones(family, tmp_path):
    cfg = ReportConfig(methods=("meswitch", "meswitch-budget"), bits=(1, 2), salient=0.02, bit_budgets=(2.1, 1.9))
    assert [(m, c.bits, c.bit_budget) for m, c in variants(cfg)] == [
        ("meswitch", 1, None), ("meswitch", 2, None), ("meswitch-budget", 1, 1.9), ("meswitch-budget", 2, 2.1)
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"at 2 bits needs a budget in \[2, 3\)"):
        variants(ReportConfig(methods=("meswitch-budget",), bits=(2,), bit_budgets=(1.1,)))
    root, *_ = family
    cfg = ReportConfig(methods=("meswitch", "meswitch-budget"), bits=(1,), salient=0.02, bit_budgets=(1.9,), limit=4,
                       device="cpu", calib=CALIB)  # fmt: skip
    data = json.loads(run_report(root, tmp_path / "report", cfg)[1].read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["meswitch"]["bits_per_param"] < rows["meswitch-budget"]["bits_per_param"] <= 1.9
    assert "widths" not in rows["meswitch"] and set(rows["meswitch-budget"]["widths"]) == {"1", "2"}
    assert "| alpha | meswitch-budget | 1:" in (tmp_path / "report" / "report.md").read_text()


def test_the_gptq_distilled_variants_distil_gptq_codes(family, tmp_path, monkeypatch):
    names = ("meswitch-gptq-distilled", "meswitch-budget-gptq-distilled")
    cfg = ReportConfig(methods=names, bits=(1,), salient=0.02, bit_budgets=(1.9,))
    made = [(m, c.rounding, c.bit_budget) for m, c in variants(cfg)]
    assert made == [(names[0], "gptq", None), (names[1], "gptq", 1.9)]
    assert all(report_method(m).distilled for m in names) and not report_method("meswitch-budget-gptq").distilled
    # the report distils the artifact GPTQ wrote: the spy sees its rounding and widths before the multipliers
    seen, distill = [], report.distill_artifact

    def spy(base, expert_dir, art, out, texts, dcfg, device):
        made = read_manifest(art).method
        seen.append((made["rounding"], "widths" in made, dcfg))
        return distill(base, expert_dir, art, out, texts, dcfg, device)

    monkeypatch.setattr(report, "distill_artifact", spy)
    root, *_ = family
    steps = DistillConfig(steps=4, batch_size=2, seq_len=32)
    cfg = ReportConfig(methods=("meswitch-gptq", *names), bits=(1,), salient=0.02, bit_budgets=(1.9,), limit=4,
                       device="cpu", calib=CALIB, distill=steps, experts=("alpha",))  # fmt: skip
    data = json.loads(run_report(root, tmp_path / "report", cfg)[1].read_text())
    assert seen == [("gptq", False, steps), ("gptq", True, steps)]
    rows = {r["method"]: r for r in data["rows"]}
    plain, distilled = rows["meswitch-gptq"], rows["meswitch-gptq-distilled"]
    assert distilled["delta_bytes"] == plain["delta_bytes"] and distilled["kl"] != plain["kl"]
    assert set(rows["meswitch-budget-gptq-distilled"]["widths"]) == {"1", "2"}
    assert data["distillation"]["steps"] == 4


def test_the_report_cli_takes_the_gptq_distilled_variants_and_the_steps(monkeypatch, tmp_path):
    configs = []
    monkeypatch.setattr(report, "run_report", lambda family, out, cfg: configs.append(cfg) or [])
    args = ["report", str(tmp_path), "--out", str(tmp_path / "r"), "--bits", "2", "--bit-budgets", "2.3",
            "--methods", "meswitch-gptq-distilled,meswitch-budget-gptq-distilled"]  # fmt: skip
    assert main([*args, "--distill-steps", "300"]) == 0 and main(args) == 0
    assert [(c.methods, c.distill) for c in configs] == [
        (("meswitch-gptq-distilled", "meswitch-budget-gptq-distilled"), DistillConfig(steps=300)),
        (("meswitch-gptq-distilled", "meswitch-budget-gptq-distilled"), DistillConfig()),
    ]


def test_a_mixed_expert_is_served_dense_and_the_packed_payload_refuses_it(family, mixed, tmp_path):
    from transformers import AutoModelForCausalLM

    from meswitch.serving.engine import EngineConfig, MixedExpertEngine

    root, base, *_ = family
    _, art = mixed
    eng = MixedExpertEngine(root / "base", EngineConfig(device="cpu", payload="dense"))
    ids = torch.randint(3, eng.base_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    got = eng.forward(ids, [eng.add_expert(art), None])
    ref = AutoModelForCausalLM.from_pretrained(reconstruct(base, art, tmp_path / "hf")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(got[0], ref(input_ids=ids[:1]).logits[0], atol=1e-4, rtol=1e-4)
    # the packed payload banks each expert on one grid (serving/banked.py BankSet): not yet per matrix
    packed = MixedExpertEngine(root / "base", EngineConfig(device="cpu", payload="packed"))
    with pytest.raises(ValueError, match="mixes quantization grids"):
        packed.add_expert(art)
