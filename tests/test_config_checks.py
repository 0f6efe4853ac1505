"""A new user's rough edges: settings out of range refused in one line naming the flag, a report that cannot be
made refused before any work, a closed pipe ending the command quietly, sizes and gains read the right way."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import meswitch
from meswitch.artifacts import LayerRecord, Manifest, seal
from meswitch.cli import BROKEN_PIPE_STATUS, main
from meswitch.compression.config import CalibConfig, ConfigError, DeltaConfig
from meswitch.compression.expert import size_against_fp16
from meswitch.evaluation import report
from meswitch.evaluation.metrics import gain_kept
from meswitch.evaluation.report import ReportConfig, _gain_ci, claims, markdown_table
from meswitch.flows.config import load_config

# compress stops at its settings before it reads any of these paths
COMPRESS = ["compress", "--base", "b", "--expert", "e", "--out", "o", "--calib", "c"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples", "-3"], "--samples must be at least 1, got -3"),
        (["--samples", "0"], "--samples must be at least 1, got 0"),
        (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--skip-first", "-1"], "--skip-first must be in [0, 256), below the sequence length, got -1"),
        (
            ["--skip-first", "32", "--seq-len", "32"],
            "--skip-first must be in [0, 32), below the sequence length, got 32",
        ),
        (["--group", "-2"], "--group must be -1 (per matrix), 0 (per output channel) or a positive size, got -2"),
        (["--salient", "-1"], "--salient must be >= 0, got -1.0"),
    ],
)
def test_a_setting_out_of_range_is_one_line_naming_the_flag(flags, message, capsys):
    assert main([*COMPRESS, *flags]) == 2
    assert capsys.readouterr().err == f"meswitch compress: error: {message}\n"


def test_the_library_and_the_pipeline_get_the_same_checks(tmp_path):
    assert CalibConfig(samples=1, seq_len=1, batch_size=1).skip_first == 0  # the smallest calibration there is
    assert CalibConfig(seq_len=32, skip_first=31).skip_first == 31  # one position of each sequence still counts
    assert DeltaConfig(group_size=-1).quant_spec().group_size == -1  # one step size per matrix, as BitDelta's
    with pytest.raises(ConfigError, match=r"bits must be one of \(1, 2, 3, 4, 8\), got 5") as caught:
        DeltaConfig(bits=5)
    assert caught.value.field_name == "bits"
    f = tmp_path / "pipeline.yaml"
    f.write_text(yaml.safe_dump({"calibration": {"samples": 0}}))
    with pytest.raises(ValueError, match=r"pipeline\.yaml: calibration: samples must be at least 1, got 0"):
        load_config(f)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "meswitch-budget", "--bits", "2"],
         "a bit-budget method at 2 bits needs a budget in [2, 3) (--bit-budgets), got none"),
        (["--methods", "meswitch-budget", "--bits", "2,3", "--bit-budgets", "2.3"],
         "a bit-budget method at 3 bits needs a budget in [3, 4) (--bit-budgets), got 2.3"),
    ],
)  # fmt: skip
def test_a_report_that_cannot_be_made_is_refused_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(report, "run_report", lambda family, out, cfg: started.append(cfg) or [])
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r"), *flags]) == 2
    assert capsys.readouterr().err == f"meswitch report: error: {message}\n" and started == []


def test_the_report_settings_are_checked_when_they_are_made():
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 3, 4, 8\), got 5"):
        ReportConfig(bits=(2, 5))
    with pytest.raises(ValueError, match="budget in"):
        ReportConfig(methods=("meswitch-budget-gptq-distilled",), bits=(1,))
    assert ReportConfig(methods=("bitdelta",), bits=(2,)).bits == (2,)  # BitDelta fixes its own width, 1 bit


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    layers = [LayerRecord(f"model.layers.{i}.mlp.down_proj", [64, 64], 2, 1, 2.25, 0.1) for i in range(3000)]
    seal(art, Manifest(kind="expert-delta", name="x", layers=layers))  # some 250 kB of lines: more than a pipe holds
    root = Path(meswitch.__file__).parent.parent
    cmd = [sys.executable, "-m", "meswitch", "inspect", str(art)]
    with subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        first = p.stdout.readline()  # as `| head -1` does
        p.stdout.close()
        err = p.stderr.read().decode()
        status = p.wait(timeout=60)
    assert first.startswith(b"expert-delta 'x'")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert status == BROKEN_PIPE_STATUS


def test_a_size_reads_the_right_way_round():
    assert size_against_fp16(100, 590) == "5.9x smaller"
    assert size_against_fp16(110, 100) == "1.1x larger"  # not "0.9x smaller"
    row = {"name": "e", "method": "fixed", "bits": 8, "bits_per_param": 17.6, "delta_bytes": 1100,
           "fp16_delta_bytes": 1000, "kl": 0.0, "ppl_ratio": 1.0, "gain_retained": None,
           "task_score_compressed": None, "task_score_expert": None}  # fmt: skip
    assert "| 17.600 | 0.001 | 1.1x larger | 0.0000 | 1.0000 | - | - |" in markdown_table([row])


def test_the_gain_kept_is_undefined_where_the_expert_gained_nothing():
    assert gain_kept(10.0, 8.0, 8.5) == pytest.approx(0.75)  # perplexity: lower is better
    assert gain_kept(0.2, 0.6, 0.5, higher_is_better=True) == pytest.approx(0.75)  # a task score
    assert gain_kept(10.0, 11.0, 11.11) is None  # the expert worse than its base: not "1.11 of its gain kept"
    assert gain_kept(10.0, 10.0, 9.0) is None
    assert gain_kept(0.6, 0.2, 0.5, higher_is_better=True) is None


def test_the_report_reads_an_undefined_gain_kept():
    figures = {k: [1.0] for k in report._GAIN_FIGURES}
    assert _gain_ci({**figures, "gain_retained": None}) is None
    rows = [{"name": "e", "method": m, "bits": 2, "bits_per_param": bpp, "kl": kl, "gain_retained": None,
             "delta_bytes": bpp * 100, "fp16_delta_bytes": 1600}
            for m, bpp, kl in (("meswitch", 2.2, 0.01), ("fixed", 2.0, 0.02), ("magnitude", 2.2, 0.015))]  # fmt: skip
    e = claims(rows, 2)["experts"]["e"]
    assert e["kl_below_fixed"] and e["curve_points"]["gain_retained"] == [] and not e["gain_curve_above_fixed"]
