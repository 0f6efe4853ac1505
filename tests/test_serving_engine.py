"""The mixed-expert engine against the reconstructed experts: logits, generation, tiers, refusals.

Tolerance: on CPU in float32 the served logits equal the reconstructed expert's within
``atol = rtol = 1e-4`` (measured differences are around 1e-6: the engine adds ``x·Δ̂ᵀ`` to
``x·W_bᵀ`` where the reference multiplies by ``W_b + Δ̂`` rounded once).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from serving_fixtures import (  # noqa: F401
    check_continuous_batching,
    compress,
    reconstructed,
    torch_threads,
)
from tiny_models import calib_file, make_base, make_expert, save_model
from transformers import AutoModelForCausalLM

from meswitch.artifacts import ArtifactError, read_manifest
from meswitch.checkpoints import Checkpoint
from meswitch.compression.reconstruct import DeltaReader, reconstruct
from meswitch.serving.batching import GenRequest, Scheduler, SchedulerConfig
from meswitch.serving.engine import EngineConfig, EngineError, MixedExpertEngine
from meswitch.serving.tiers import DEVICE, DISK, HOST, nbytes, one_buffer, stored_keys

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", params=["dense", "packed"])
def engine(served_family, request):
    """Dense: Δ̂ dequantized once per expert; packed: banked codes through mixed_delta (its reference on CPU)."""
    eng = MixedExpertEngine(served_family.base, EngineConfig(device="cpu", payload=request.param))
    slots = {name: eng.add_expert(art) for name, art in served_family.artifacts.items()}
    return eng, slots


def test_served_logits_equal_reconstructed_expert_alone_and_mixed(engine, reconstructed):  # noqa: F811
    eng, slots = engine
    names = sorted(slots)
    ids = torch.randint(3, eng.base_vocab, (2 * len(names) + 1, 24), generator=torch.Generator().manual_seed(0))
    # Each expert alone (the whole batch is one expert) ...
    for name in names:
        got = eng.forward(ids[:2], [slots[name]] * 2)
        with torch.inference_mode():
            want = reconstructed[name](input_ids=ids[:2]).logits
        torch.testing.assert_close(got, want, **TOL)
    # ... and every expert plus the base sharing one batch, interleaved so no group is contiguous.
    rows = [slots[n] for n in names] * 2 + [None]
    got = eng.forward(ids, rows)
    for i, slot in enumerate(rows):
        with torch.inference_mode():
            want = reconstructed[slot.name if slot else None](input_ids=ids[i : i + 1]).logits[0]
        torch.testing.assert_close(got[i], want, **TOL)
    # The experts really differ from each other and from the base (the comparison above has teeth).
    assert (got[0] - got[1]).abs().max() > 1e-2
    assert (got[0] - got[-1]).abs().max() > 1e-2


def test_continuous_batching_generates_what_each_expert_generates_alone(served_family, engine, reconstructed):  # noqa: F811
    eng, slots = engine
    check_continuous_batching(eng, slots, reconstructed, SchedulerConfig(max_batch=6, max_prefill_tokens=96,
                                                                         window_s=0.002, static=False))  # fmt: skip


def test_tiers_move_experts_by_lru_under_a_budget_and_stay_correct(served_family, reconstructed):  # noqa: F811
    switches = []

    class Obs:
        def expert_switch(self, expert, source, seconds, nbytes):
            switches.append((expert, source))

        def tiers_changed(self, experts, nbytes, overshoot):
            pass

    probe = MixedExpertEngine(served_family.base, EngineConfig(device="cpu"))
    one = probe.add_expert(next(iter(served_family.artifacts.values())))
    budget = int(one.device_bytes * 1.5)  # room for one expert on the "device", none in host memory
    eng = MixedExpertEngine(served_family.base, EngineConfig(device="cpu", device_budget_bytes=budget,
                                                             host_budget_bytes=0), observer=Obs())  # fmt: skip
    slots = [eng.add_expert(art) for art in served_family.artifacts.values()]
    assert [s.tier for s in slots] == [DEVICE] + [DISK] * (len(slots) - 1)
    ids = torch.randint(3, eng.base_vocab, (1, 10), generator=torch.Generator().manual_seed(3))
    for s in [*slots, slots[0]]:
        got = eng.forward(ids, [s])
        with torch.inference_mode():
            torch.testing.assert_close(got, reconstructed[s.name](input_ids=ids).logits, **TOL)
        assert s.tier == DEVICE
        assert sum(x.tier == DEVICE for x in slots) == 1
        assert eng.tiers.used(DEVICE) <= budget
    assert switches == [(s.name, DISK) for s in [*slots[1:], slots[0]]]
    # A batch needing two experts overshoots the budget rather than stalling, and says so.
    eng.forward(ids.expand(2, -1), slots[:2])
    assert eng.tiers.overshoot > 0
    # With host memory allowed, demoted experts wait there and come back from it.
    eng.tiers.host_budget = None
    eng.forward(ids, [slots[2]])
    eng.forward(ids, [slots[0]])
    assert slots[2].tier == HOST
    eng.forward(ids, [slots[2]])
    assert switches[-1] == (slots[2].name, HOST)


@pytest.mark.parametrize("payload", ["dense", "packed"])
def test_extended_vocabulary_and_base_rows_in_one_batch(tmp_path, payload):
    base = make_base(tmp_path / "base")
    calib = calib_file(tmp_path / "calib.jsonl")
    plain = make_expert(base, tmp_path / "plain", seed=3)
    model = AutoModelForCausalLM.from_pretrained(plain)
    model.resize_token_embeddings(model.config.vocab_size + 4)
    with torch.no_grad():
        model.get_input_embeddings().weight[-4:] = torch.randn(4, model.config.hidden_size)
        model.get_output_embeddings().weight[-4:] = 3 * torch.randn(4, model.config.hidden_size)
    wide = save_model(model, tmp_path / "wide")
    for name, folder in (("plain", plain), ("wide", wide)):
        shutil.copy(calib, folder / "calib.jsonl")
        compress(base, folder, tmp_path / f"art-{name}", name, None)
    eng = MixedExpertEngine(base, EngineConfig(device="cpu", payload=payload))
    p, w = eng.add_expert(tmp_path / "art-plain"), eng.add_expert(tmp_path / "art-wide")
    assert w.vocab == eng.base_vocab + 4
    ids = torch.randint(3, eng.base_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[1, 5] = eng.base_vocab + 2  # a token only the wide expert has
    got = eng.forward(ids, [p, w, None])
    assert got.shape[-1] == eng.base_vocab + 4
    refs = {}
    for n in ("plain", "wide"):
        folder = reconstruct(Checkpoint(base), tmp_path / f"art-{n}", tmp_path / f"rec-{n}")
        refs[n] = AutoModelForCausalLM.from_pretrained(folder).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.inference_mode():
        torch.testing.assert_close(got[0, :, : eng.base_vocab], refs["plain"](input_ids=ids[:1]).logits[0], **TOL)
        torch.testing.assert_close(got[1], refs["wide"](input_ids=ids[1:2]).logits[0], **TOL)
        torch.testing.assert_close(got[2, :, : eng.base_vocab], base_model(input_ids=ids[2:]).logits[0], **TOL)
    assert torch.isneginf(got[[0, 2], :, eng.base_vocab :]).all()  # rows without those tokens never sample them


def test_artifacts_for_another_base_or_tampered_are_refused(served_family, tmp_path):
    eng = MixedExpertEngine(served_family.base, EngineConfig(device="cpu"))
    other = make_base(tmp_path / "other-base")
    shutil.copy(next(iter(served_family.experts.values())) / "calib.jsonl", tmp_path / "calib.jsonl")
    expert = make_expert(other, tmp_path / "other-expert")
    shutil.copy(tmp_path / "calib.jsonl", expert / "calib.jsonl")
    foreign = compress(other, expert, tmp_path / "foreign", "foreign", None)
    with pytest.raises(ArtifactError, match="made for base"):
        eng.add_expert(foreign)
    art = shutil.copytree(next(iter(served_family.artifacts.values())), tmp_path / "tampered")
    shard = next(art.glob("delta-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        eng.add_expert(art)
    assert not eng.tiers.slots
    good = next(iter(served_family.artifacts.values()))
    eng.add_expert(good)
    with pytest.raises(EngineError, match="already loaded"):
        eng.add_expert(good)


def test_frequency_and_presence_penalties_change_only_the_rows_that_ask():
    def req(**kw) -> GenRequest:
        return GenRequest(prompt=[1], slot=None, max_new_tokens=4, on_event=lambda ev: None, **kw)

    plain, freq, pres = req(), req(frequency_penalty=0.5), req(presence_penalty=0.2)
    for r in (plain, freq, pres):
        r.counts = {0: 1}  # token 0 generated once already
    with torch.inference_mode():  # as the engine's outputs are
        logits = torch.tensor([[1.0, 0.9, 0.0]]).repeat(3, 1)
    out = Scheduler._sample(None, logits, [plain, freq, pres])
    # 1.0 - 0.5 < 0.9: the frequency penalty moves row 1 to token 1; 1.0 - 0.2 = 0.8 < 0.9 too; the plain row stays
    assert out.tolist() == [0, 1, 1]
    weak = req(presence_penalty=0.05)
    weak.counts = {0: 3}
    assert Scheduler._sample(None, logits[:1], [weak]).tolist() == [0]  # presence counts once, not 3 times


def test_host_copies_share_one_buffer_and_keep_every_tensor():
    """The host tier's copies (pinned on a GPU machine: one allocation an expert) are views of one
    buffer, each aligned, equal to what the artifact stores, whatever its dtype and shape."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.packed": torch.randint(-(2**31), 2**31 - 1, (7, 3), dtype=torch.int32, generator=g),
        "w.scale": torch.randn(7, 1, generator=g).half(),
        "w.salient_idx": torch.randint(0, 100, (5,), dtype=torch.int16, generator=g),
        "n.delta": torch.randn(3, generator=g),
        "x.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "x.flag": torch.tensor(True),
    }
    out = one_buffer(tensors, pin=False)
    assert list(out) == list(tensors)
    for k, t in tensors.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape and torch.equal(out[k], t), k
    (base,) = {v.untyped_storage().data_ptr() for v in out.values()}
    assert all((v.data_ptr() - base) % 256 == 0 for v in out.values() if v.numel())  # an empty one has no address
    assert nbytes(out) >= sum(t.numel() * t.element_size() for t in tensors.values())


def test_an_artifacts_tensors_read_at_once_and_their_bytes_from_the_headers(served_family):
    folder = next(iter(served_family.artifacts.values()))
    reader = DeltaReader(folder, read_manifest(folder))
    keys = stored_keys(reader)
    tensors = reader.get_many(keys)
    assert list(tensors) == keys and all(torch.equal(tensors[k], reader.get(k)) for k in keys[:20])
    assert reader.nbytes(keys) == sum(t.numel() * t.element_size() for t in tensors.values()) > 0
