"""Whole-expert compression on tiny random-config checkpoints: validation, artifacts, reconstruction."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import calib_file, make_base, make_expert, save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from meswitch.artifacts import ArtifactError, read_manifest, seal_base, verify
from meswitch.checkpoints import Checkpoint, CheckpointError, check_expert, scan
from meswitch.cli import main
from meswitch.compression.api import CompressJob, run_compress
from meswitch.compression.calibration import CalibConfig, calibrate, read_texts, token_chunks
from meswitch.compression.delta import DeltaConfig
from meswitch.compression.expert import ExpertInfo
from meswitch.compression.reconstruct import load_expert_model, open_artifact, reconstruct

CALIB = CalibConfig(samples=8, seq_len=64, batch_size=4)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = make_base(root / "base")
    expert = make_expert(base, root / "expert")
    return root, base, expert, calib_file(root / "calib.jsonl")


def _job(base, expert, calib, out, **delta):
    return CompressJob(
        base=base,
        expert=expert,
        calib=calib,
        out=out,
        info=ExpertInfo("e", "demo"),
        delta=DeltaConfig(**delta),
        calib_cfg=CALIB,
        device="cpu",
    )


def test_streamed_calibration_equals_full_model_hooks(family):
    _, _, expert, calib = family
    stats = calibrate(Checkpoint(expert), read_texts(calib), CALIB, "cpu")
    model = AutoModelForCausalLM.from_pretrained(expert).eval()
    ids = token_chunks(AutoTokenizer.from_pretrained(expert), read_texts(calib), CALIB)
    ref: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda _m, a: ref.__setitem__(name, ref.get(name, 0) + (a[0].float() ** 2).sum((0, 1)))

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(input_ids=ids)
    assert sorted(ref) == sorted(stats)
    for name in ref:
        torch.testing.assert_close(stats[name], ref[name], rtol=1e-4, atol=1e-4)


def _logit_error(base, artifact, expert, ids):
    model = load_expert_model(Checkpoint(base), open_artifact(artifact, Checkpoint(base)))
    full = AutoModelForCausalLM.from_pretrained(expert).eval()
    with torch.no_grad():
        return float(
            (model(input_ids=ids).logits - full(input_ids=ids).logits).norm() / full(input_ids=ids).logits.norm()
        )


def test_compressed_logits_close_and_salient_channels_matter(family, tmp_path):
    _, base, expert, calib = family
    manifest = run_compress(_job(base, expert, calib, tmp_path / "art", bits=2, salient=4))
    assert manifest.metrics["delta_bytes"] * 4 < manifest.metrics["fp16_delta_bytes"]
    ids = token_chunks(AutoTokenizer.from_pretrained(expert), read_texts(calib), CALIB)[:2]
    err = _logit_error(base, tmp_path / "art", expert, ids)

    # The same artifact with the salient corrections dropped (zeroed, re-sealed).
    dropped = tmp_path / "dropped"
    shutil.copytree(tmp_path / "art", dropped)
    for f in dropped.glob("delta-*.safetensors"):
        t = load_file(f)
        save_file({k: torch.zeros_like(v) if k.endswith("salient_val") else v for k, v in t.items()}, f)
    m = read_manifest(dropped)
    from meswitch.artifacts import seal

    seal(dropped, m)
    err_dropped = _logit_error(base, dropped, expert, ids)
    base_err = _logit_error_base(base, expert, ids)
    assert err < 0.25 * base_err  # the compressed expert is far closer to the expert than the base is
    assert err < 0.6 * err_dropped  # and the salient channels carry a large share of that


def test_global_allocation_keeps_the_total_and_moves_channels_between_matrices(family, tmp_path):
    _, base, expert, calib = family
    per_layer = run_compress(_job(base, expert, calib, tmp_path / "layer", salient=4, allocation="layer"))
    spread = run_compress(_job(base, expert, calib, tmp_path / "global", salient=4, allocation="global"))
    assert {r.salient for r in per_layer.layers} == {4}
    counts = [r.salient for r in spread.layers]
    assert sum(counts) == 4 * len(spread.layers) and len(set(counts)) > 1
    assert spread.method["allocation"] == "global" and per_layer.method["allocation"] == "layer"


def _logit_error_base(base, expert, ids):
    b = AutoModelForCausalLM.from_pretrained(base).eval()
    e = AutoModelForCausalLM.from_pretrained(expert).eval()
    with torch.no_grad():
        return float((b(input_ids=ids).logits - e(input_ids=ids).logits).norm() / e(input_ids=ids).logits.norm())


def test_reconstruct_writes_a_loadable_model_equal_to_the_reference(family, tmp_path):
    _, base, expert, calib = family
    run_compress(_job(base, expert, calib, tmp_path / "art"))
    out = reconstruct(Checkpoint(base), tmp_path / "art", tmp_path / "recon")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = load_expert_model(Checkpoint(base), open_artifact(tmp_path / "art", Checkpoint(base)))
    ids = torch.randint(0, 250, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(out) is not None


def test_sharded_checkpoints_read_tensor_by_tensor(family, tmp_path):
    _, base, _, _ = family
    model = AutoModelForCausalLM.from_pretrained(base)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    sharded = Checkpoint(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len({sharded.file_of(k) for k in sharded.keys()}) > 1
    # The fingerprint is of the tensors, not of how they are sharded.
    assert scan(sharded).fingerprint == scan(Checkpoint(base)).fingerprint


def test_fingerprint_is_sha256_of_config_and_named_tensors_whatever_the_threads(family, tmp_path, monkeypatch):
    """The fingerprint's definition, spelled out: registries hold fingerprints, so it must never drift."""
    import hashlib

    import meswitch.checkpoints as checkpoints

    _, base, _, _ = family
    ckpt = Checkpoint(base)
    h = hashlib.sha256()
    config = {k: v for k, v in ckpt.config.items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(ckpt.keys()):
        t = ckpt.get(name)
        th = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        th.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        h.update(th.digest())
    monkeypatch.setattr(checkpoints, "SCAN_INFLIGHT_BYTES", 1)  # read ahead one tensor at a time
    assert {scan(ckpt, workers=w).fingerprint for w in (1, 3)} == {h.hexdigest()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite_catches_nan_and_both_infinities(dtype):
    from meswitch.checkpoints import all_finite

    t = torch.randn(64, 48).to(dtype)
    assert all_finite(t) and all_finite(t[:0]) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[17, 3] = bad
        assert not all_finite(u), bad


def test_pickle_only_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="never unpickles"):
        Checkpoint(folder)


def test_nan_expert_is_refused_and_nothing_is_written(family, tmp_path):
    _, base, expert, calib = family
    bad = tmp_path / "nan-expert"
    shutil.copytree(expert, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*non-finite.*up_proj"):
        run_compress(_job(base, bad, calib, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging leftovers


def test_other_architecture_or_shape_is_refused(family, tmp_path):
    _, base, _, _ = family
    wider = make_base(tmp_path / "wider", hidden_size=96)
    with pytest.raises(CheckpointError, match="hidden_size"):
        check_expert(Checkpoint(base), Checkpoint(wider))
    cfg = json.loads((Path(base) / "config.json").read_text())
    other = tmp_path / "other-arch"
    shutil.copytree(base, other)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="architecture"):
        check_expert(Checkpoint(base), Checkpoint(other))


def test_an_expert_of_another_base_is_refused_before_any_work(family, tmp_path):
    _, base, _, calib = family
    other = make_base(tmp_path / "other", seed=7)  # same shapes, trained from scratch on its own
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="another base"):
        run_compress(_job(base, other, calib, out))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_base_sealed_as_an_artifact_verifies_against_its_fingerprint(family, tmp_path):
    _, base, _, _ = family
    fp = scan(Checkpoint(base)).fingerprint
    m = seal_base(base, tmp_path / "base-artifact", "tiny", fp)
    assert m.kind == "base" and m.base_fingerprint == fp
    assert verify(tmp_path / "base-artifact", base_fingerprint=fp).name == "tiny"
    assert scan(Checkpoint(tmp_path / "base-artifact")).fingerprint == fp  # still a loadable HF folder
    with pytest.raises(ArtifactError):
        verify(tmp_path / "base-artifact", base_fingerprint="0" * 64)


def test_extended_vocabulary_rows_are_kept_whole(family, tmp_path):
    _, base, expert, calib = family
    model = AutoModelForCausalLM.from_pretrained(expert)
    model.resize_token_embeddings(model.config.vocab_size + 5)
    with torch.no_grad():
        model.get_input_embeddings().weight[-5:] = torch.randn(5, model.config.hidden_size)
        model.get_output_embeddings().weight[-5:] = torch.randn(5, model.config.hidden_size)
    extended = save_model(model, tmp_path / "extended")
    manifest = run_compress(_job(base, extended, calib, tmp_path / "art"))
    assert manifest.tensors["model.embed_tokens.weight"]["extra_rows"] == 5
    assert manifest.metadata["expert_vocab"] == manifest.metadata["base_vocab"] + 5
    recon = AutoModelForCausalLM.from_pretrained(reconstruct(Checkpoint(base), tmp_path / "art", tmp_path / "r"))
    for get in ("get_input_embeddings", "get_output_embeddings"):
        want = getattr(model, get)().weight[-5:]
        torch.testing.assert_close(getattr(recon, get)().weight[-5:], want.half().float())


def test_tampered_artifact_and_mismatched_base_are_refused(family, tmp_path):
    _, base, expert, calib = family
    run_compress(_job(base, expert, calib, tmp_path / "art"))
    verify(tmp_path / "art")
    other_base = make_base(tmp_path / "other-base", seed=7)
    with pytest.raises(ArtifactError, match="made for base"):
        open_artifact(tmp_path / "art", Checkpoint(other_base))
    shard = next((tmp_path / "art").glob("delta-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        open_artifact(tmp_path / "art", Checkpoint(base))
    (tmp_path / "art" / "stray.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not listed"):
        verify(tmp_path / "art")


def test_cli_compress_inspect_evaluate(family, tmp_path, capsys):
    _, base, expert, calib = family
    art = tmp_path / "art"
    assert (
        main(
            [
                "compress",
                "--base",
                str(base),
                "--expert",
                str(expert),
                "--calib",
                str(calib),
                "--out",
                str(art),
                "--samples",
                "8",
                "--seq-len",
                "64",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["delta_bytes"] < metrics["fp16_delta_bytes"]
    assert main(["inspect", str(art), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["checksums"] == "ok" and shown["layers"]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in read_texts(calib)[:6]))
    assert (
        main(
            [
                "evaluate",
                "--base",
                str(base),
                "--artifact",
                str(art),
                "--expert",
                str(expert),
                "--data",
                str(data),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    for key in (
        "kl",
        "ppl_base",
        "ppl_expert",
        "ppl_compressed",
        "ppl_ratio",
        "task_score_expert",
        "task_score_compressed",
        "bits_per_param",
        "delta_bytes",
        "fp16_delta_bytes",
    ):
        assert key in result
    assert result["kl"] > 0 and result["task_score_expert"] is None
    assert 0.5 < result["ppl_ratio"] < 2.0
    # what a paired interval needs: each text's summed KL and its token count, adding up to the mean
    sums, tokens = result["kl_text_sums"], result["kl_text_tokens"]
    assert len(sums) == len(tokens) == 6 and all(n > 0 for n in tokens)
    assert sum(sums) / sum(tokens) == pytest.approx(result["kl"], rel=1e-3)
    # and what the gain kept's interval needs: each text's summed NLL under the three models, adding up to each
    # perplexity
    for model, units in (
        ("base", "nll_text_units_base"),
        ("expert", "nll_text_units"),
        ("compressed", "nll_text_units"),
    ):
        nll = result[f"nll_text_sums_{model}"]
        assert len(nll) == len(result[units]) == 6
        assert math.exp(sum(nll) / sum(result[units])) == pytest.approx(result[f"ppl_{model}"], abs=1e-4)
    # an artifact evaluated against an expert it was not made from: refused, naming both fingerprints
    other = make_expert(base, tmp_path / "other", seed=7)
    args = ["evaluate", "--base", str(base), "--artifact", str(art), "--expert", str(other), "--data", str(data)]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "was made from the expert with fingerprint" in err and "would mean nothing" in err
    # and one made against another base
    other_base = make_base(tmp_path / "other-base", seed=3)
    args = ["evaluate", "--base", str(other_base), "--artifact", str(art), "--expert", str(expert), "--data", str(data)]
    assert main(args) != 0
    assert "Traceback" not in capsys.readouterr().err


def test_cli_refuses_bad_input_with_a_clear_message(family, tmp_path, capsys):
    _, base, expert, _ = family
    assert main(["compress", "--base", str(base), "--expert", str(expert), "--out", str(tmp_path / "x")]) == 2
    assert "--calib is required" in capsys.readouterr().err
    assert (
        main(
            [
                "compress",
                "--base",
                str(base),
                "--expert",
                str(tmp_path / "missing"),
                "--calib",
                "c",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synthetic_sharded_pair_compresses_at_small_geometry(tmp_path):
    """The generator behind the 7B-geometry benchmark, at a size CI can run."""
    from meswitch.synthetic import mistral_7b_config, write_synthetic_pair

    cfg = mistral_7b_config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base, expert = write_synthetic_pair(tmp_path, cfg)
    assert len(list(base.glob("*.safetensors"))) == 3  # embeddings + one shard per block
    calib = calib_file(tmp_path / "calib.jsonl")
    manifest = run_compress(_job(base, expert, calib, tmp_path / "art", salient=2))
    assert manifest.metadata["architecture"] == "MistralForCausalLM"
    assert len(manifest.layers) == 2 * 7 + 2  # every block linear, the embedding and lm_head
    assert all(r.rel_error < 0.6 for r in manifest.layers)


def test_calibrated_hessians_hold_the_second_moments_on_their_diagonal(family):
    _, _, expert, calib = family
    texts = read_texts(calib)
    stats = calibrate(Checkpoint(expert), texts, CALIB, "cpu")
    full = calibrate(Checkpoint(expert), texts, replace(CALIB, hessian=True), "cpu")
    assert sorted(full) == sorted(stats)
    for name, s in stats.items():
        k = s.shape[0]
        assert full[name].shape == (k, k)
        torch.testing.assert_close(torch.diagonal(full[name]), s, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(full[name], full[name].T)


def test_gptq_rounding_compresses_a_whole_expert_closer(family, tmp_path):
    _, base, expert, calib = family
    ids = token_chunks(AutoTokenizer.from_pretrained(expert), read_texts(calib), CALIB)[:2]
    errs = {}
    for rounding in ("nearest", "gptq"):
        run_compress(_job(base, expert, calib, tmp_path / rounding, bits=2, salient=4, rounding=rounding))
        assert read_manifest(tmp_path / rounding).method["rounding"] == rounding
        errs[rounding] = _logit_error(base, tmp_path / rounding, expert, ids)
    assert errs["gptq"] < errs["nearest"], errs


def test_manifest_records_the_method_as_it_was_applied(family, tmp_path):
    """BitDelta is 1 bit, symmetric, one step per tensor whatever bits were asked; fixed keeps no salient channels."""
    _, base, expert, calib = family
    bd = run_compress(_job(base, expert, None, tmp_path / "bd", method="bitdelta", bits=2, salient=0.01))
    assert (bd.method["bits"], bd.method["symmetric"], bd.method["group_size"], bd.method["salient"]) == (
        1,
        True,
        -1,
        0,
    )
    fx = run_compress(_job(base, expert, calib, tmp_path / "fx", method="fixed", bits=3, salient=0.01))
    assert (fx.method["bits"], fx.method["salient"]) == (3, 0)
    ms = run_compress(_job(base, expert, calib, tmp_path / "ms", bits=2, salient=4))
    assert ms.method["salient"] == 4


def test_compress_help_says_when_calibration_is_required(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "required for --method meswitch (the default) and --rounding gptq" in text
