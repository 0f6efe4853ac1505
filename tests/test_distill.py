"""Scale distillation: one multiplier per stored step size (per row for meswitch, per matrix for BitDelta)."""

import pytest
import torch
from tiny_models import calib_file, make_base, make_expert

from meswitch.checkpoints import Checkpoint, check_expert
from meswitch.compression.calibration import read_texts
from meswitch.compression.delta import DeltaConfig
from meswitch.compression.distill import DistillConfig, apply_multipliers, distill_artifact, fit_multipliers
from meswitch.compression.expert import ExpertInfo, compress_expert
from meswitch.compression.reconstruct import load_expert_model, open_artifact


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    base = make_base(root / "base")
    expert = make_expert(base, root / "expert", seed=3)
    texts = read_texts(calib_file(root / "calib.jsonl"))
    return Checkpoint(base), Checkpoint(expert), texts


def _compress(pair, cfg: DeltaConfig, out):
    base, expert, _ = pair
    compress_expert(base, expert, check_expert(base, expert), None, cfg, out, ExpertInfo("e"))
    return open_artifact(out, base)


def test_row_multipliers_scale_each_row_of_every_stored_part(pair, tmp_path):
    reader = _compress(pair, DeltaConfig(bits=1, salient=4), tmp_path / "art")
    names = [n for n, h in reader.manifest.tensors.items() if h["kind"] == "quantized"]
    mult = {n: torch.linspace(0.5, 1.5, reader.delta(n).shape[0]) for n in names}
    apply_multipliers(reader.folder, tmp_path / "scaled", mult, {"steps": 0})
    scaled = open_artifact(tmp_path / "scaled", pair[0])
    for n in names:
        want = mult[n].unsqueeze(1) * reader.delta(n)  # up to the fp16 rounding of the rescaled parts
        torch.testing.assert_close(scaled.delta(n), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def _kl_to_expert(pair, reader, texts) -> float:
    base, expert, _ = pair
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(expert.path)
    ids = tok(texts[:8], return_tensors="pt", padding=True, truncation=True, max_length=32).input_ids
    full = AutoModelForCausalLM.from_pretrained(expert.path, dtype=torch.float32).eval()
    ours = load_expert_model(base, reader)
    with torch.no_grad():
        p = torch.log_softmax(full(input_ids=ids).logits, -1)
        q = torch.log_softmax(ours(input_ids=ids).logits, -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


def test_distillation_fits_a_multiplier_per_row_and_lowers_the_error(pair, tmp_path):
    base, expert, texts = pair
    reader = _compress(pair, DeltaConfig(bits=1, salient=2), tmp_path / "art")
    cfg = DistillConfig(steps=30, lr=1e-2, batch_size=2, seq_len=32)
    mult = fit_multipliers(base, expert.path, reader.folder, texts, cfg)
    for n, m in mult.items():
        assert m.shape == (reader.delta(n).shape[0],), n  # per-row grid: one multiplier per row
    assert any(float((m - 1).abs().max()) > 1e-3 for m in mult.values())
    distill_artifact(base, expert.path, reader.folder, tmp_path / "dist", texts, cfg)
    distilled = open_artifact(tmp_path / "dist", base)
    assert distilled.manifest.method["distilled"]["per_row"] is True
    assert _kl_to_expert(pair, distilled, texts) < _kl_to_expert(pair, reader, texts)


def test_a_per_tensor_grid_gets_one_multiplier_per_matrix(pair, tmp_path):
    base, expert, texts = pair
    reader = _compress(pair, DeltaConfig(method="bitdelta", bits=1, salient=0), tmp_path / "bd")
    mult = fit_multipliers(base, expert.path, reader.folder, texts, DistillConfig(steps=2, batch_size=2, seq_len=32))
    assert mult and all(m.shape == (1,) for m in mult.values())
