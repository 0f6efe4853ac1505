"""A compression method is one registered object: registering a toy one reaches the CLI, the report and
a whole compressed expert, with nothing else changed."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import make_family
from toy_method import TOY

from meswitch.artifacts import read_manifest, verify
from meswitch.checkpoints import Checkpoint
from meswitch.cli import main
from meswitch.compression import methods
from meswitch.compression.config import DeltaConfig
from meswitch.evaluation.report import ReportConfig, run_report
from meswitch.evaluation.variants import report_method_names, variants


@pytest.fixture
def toy(monkeypatch):
    """TOY registered for one test (the registry is restored after it)."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods.register(TOY)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("toy-family"))


def test_the_builtin_methods_are_registered_in_order():
    assert methods.method_names() == ("meswitch", "fixed", "magnitude", "bitdelta")
    assert report_method_names() == ("meswitch", "meswitch-distilled", "meswitch-gptq", "meswitch-gptq-distilled",
                                     "meswitch-budget", "meswitch-budget-gptq", "meswitch-budget-distilled",
                                     "meswitch-budget-gptq-distilled", "fixed", "fixed-eqbytes", "magnitude",
                                     "bitdelta", "bitdelta-distilled")  # fmt: skip
    with pytest.raises(ValueError, match="registered already"):
        methods.register(methods.FIXED)
    with pytest.raises(ValueError, match="method must be one of"):
        DeltaConfig("toy")


def test_a_registered_method_reaches_the_cli_and_the_report(toy, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{meswitch,fixed,magnitude,bitdelta,toy}" in text and "toy: salient by peak delta" in text
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "toy (salient by peak delta, on a symmetric grid)" in " ".join(capsys.readouterr().out.split())
    cfg = ReportConfig(methods=("toy", "fixed"), bits=(2, 3), salient=4)
    assert variants(cfg) == [
        ("toy", DeltaConfig("toy", 2, 4)), ("toy", DeltaConfig("toy", 3, 4)),
        ("fixed", DeltaConfig("fixed", 2, 0)), ("fixed", DeltaConfig("fixed", 3, 0)),
    ]  # fmt: skip
    assert DeltaConfig("toy", bits=3).quant_spec().symmetric  # its own grid, whatever the config says


def test_a_registered_method_compresses_an_expert_end_to_end(toy, family, tmp_path, capsys):
    base, expert, art = family / "base", family / "experts" / "alpha", tmp_path / "art"
    args = ["compress", "--base", str(base), "--expert", str(expert), "--out", str(art), "--method", "toy",
            "--salient", "4", "--allocation", "layer", "--device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0  # no --calib: the toy method weighs no channels by activations
    assert json.loads(capsys.readouterr().out)["delta_bytes"] > 0
    verify(art)
    manifest = read_manifest(art)
    assert (manifest.method["method"], manifest.method["symmetric"], manifest.method["salient"]) == ("toy", True, 4)
    assert all(layer.salient == 4 for layer in manifest.layers)
    # the salient channels are the toy's: the largest single entries of each matrix's delta
    name = manifest.layers[0].name
    tensors = {k: v for f in art.glob("*.safetensors") for k, v in load_file(f).items()}
    delta = Checkpoint(expert).get(name).float() - Checkpoint(base).get(name).float()
    assert tensors[f"{name}.salient_idx"].tolist() == sorted(delta.abs().amax(0).topk(4).indices.tolist())
    assert torch.all(tensors[f"{name}.salient_val"].isfinite())


def test_the_report_measures_a_registered_method(toy, family, tmp_path):
    cfg = ReportConfig(methods=("toy",), bits=(2,), salient=4, limit=4, device="cpu")
    data = json.loads(run_report(family, tmp_path / "report", cfg)[1].read_text())
    assert [(r["method"], r["bits"], r["salient"]) for r in data["rows"]] == [("toy", 2, 4)]
    assert "| alpha | toy | 2 |" in (tmp_path / "report" / "report.md").read_text()


def test_the_pipeline_accepts_a_registered_method(toy, tmp_path):
    from meswitch.flows.config import load_config

    f = tmp_path / "pipeline.yaml"
    f.write_text(yaml.safe_dump({"compression": {"method": "toy", "salient": 4}}))
    cfg = load_config(f)
    assert cfg.compression == DeltaConfig("toy", salient=4) and not cfg.compression.uses_calibration
