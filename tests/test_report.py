"""The methods x bits report over a family folder, and expert.yaml parsing."""

import json

import pytest
import yaml
from tiny_models import calib_file, make_base, make_expert

from meswitch.cli import main
from meswitch.compression.calibration import CalibConfig
from meswitch.evaluation.report import ReportConfig, run_report
from meswitch.expert_card import CardError, load_card


def _card(folder, name, domain, **extra):
    data = {"name": name, "domain": domain, "description": f"{domain} expert", "examples": ["q1", "q2"]}
    data.update(extra)
    (folder / "expert.yaml").write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base = make_base(root / "base")
    for i, name in enumerate(("alpha", "beta")):
        folder = make_expert(base, root / "experts" / name, seed=10 + i)
        calib_file(folder / "calib.jsonl")
        calib_file(folder / "eval.jsonl", n=8)
        _card(folder, name, f"dom-{name}", calibration="calib.jsonl", evaluation="eval.jsonl")
    return root


def test_report_compares_methods_on_equal_footing(family, tmp_path):
    cfg = ReportConfig(
        methods=("meswitch", "fixed", "magnitude", "bitdelta"),
        bits=(2,),
        salient=2,
        limit=8,
        device="cpu",
        calib=CalibConfig(samples=8, seq_len=64),
    )
    paths = run_report(family, tmp_path / "report", cfg)
    assert [p.name for p in paths] == ["report.md", "report.json", "quality_vs_size.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    data = json.loads(paths[1].read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 4
    by = {(r["name"], r["method"]): r for r in rows}
    for name in ("alpha", "beta"):
        ours, fixed, mag = by[name, "meswitch"], by[name, "fixed"], by[name, "magnitude"]
        assert ours["delta_bytes"] == mag["delta_bytes"]  # same salient count, same bytes
        # 2 salient channels of 64 are 3% of K here (1% on real models), so up to 25% more bytes.
        assert fixed["delta_bytes"] < ours["delta_bytes"] < 1.25 * fixed["delta_bytes"]
        # The tiny experts carry outlier input channels: keeping them in fp16 must pay off clearly. (Here the
        # outliers are also the largest columns, so magnitude finds them too; tests/test_quantize.py has the case
        # where it does not.)
        assert ours["kl"] < 0.5 * fixed["kl"]
        assert ours["ppl_ratio"] < fixed["ppl_ratio"]
        assert by[name, "bitdelta"]["bits"] == 1
    assert "| alpha | meswitch | 2 |" in paths[0].read_text()


def test_card_errors_name_the_file(tmp_path):
    with pytest.raises(CardError, match=r"expert\.yaml: missing"):
        load_card(tmp_path)
    (tmp_path / "expert.yaml").write_text("name: Bad Name\ndomain: x\ndescription: d\n")
    with pytest.raises(CardError, match="lowercase"):
        load_card(tmp_path)
    (tmp_path / "expert.yaml").write_text("name: ok\ndomain: x\ndescription: d\ncalibration: ../../etc/passwd\n")
    with pytest.raises(CardError, match="inside the expert folder"):
        load_card(tmp_path)
    (tmp_path / "expert.yaml").write_text("name: ok\ndomain: x\n")
    with pytest.raises(CardError, match=r"missing fields \['description'\]"):
        load_card(tmp_path)


def test_report_cli_refuses_an_empty_family(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "base" in capsys.readouterr().err
