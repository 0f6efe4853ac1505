"""One dataclass per config: the compress command's flags and the pipeline's YAML sections are DeltaConfig's
and CalibConfig's fields, every one of them reachable."""

import dataclasses

import pytest
import yaml

from meswitch.cli import CommandError, build_parser
from meswitch.cli.config_flags import config_from_flags
from meswitch.compression.config import CalibConfig, DeltaConfig, calibration_for
from meswitch.flows.config import load_config

# every field away from its default, so that each must travel through the flags and the YAML
DELTA = DeltaConfig("magnitude", bits=3, salient=8, group_size=16, symmetric=True, clip_search=False,
                    allocation="layer", rounding="gptq", refine=True, bit_budget=2.3)  # fmt: skip
CALIB = CalibConfig(samples=4, seq_len=32, batch_size=2, skip_first=1, hessian=True)
FLAGS = ["--method", "magnitude", "--bits", "3", "--salient", "8", "--group", "16", "--symmetric", "--no-clip-search",
         "--allocation", "layer", "--rounding", "gptq", "--refine", "--bit-budget", "2.3", "--samples", "4",
         "--seq-len", "32", "--batch-size", "2", "--skip-first", "1", "--hessian"]  # fmt: skip
COMPRESS = ["compress", "--base", "b", "--expert", "e", "--out", "o"]


@pytest.mark.parametrize(("cls", "changed"), [(DeltaConfig, DELTA), (CalibConfig, CALIB)])
def test_every_field_is_a_compress_flag(cls, changed):
    assert [f.name for f in dataclasses.fields(cls) if getattr(changed, f.name) == getattr(cls(), f.name)] == []
    assert config_from_flags(cls, build_parser().parse_args(COMPRESS + FLAGS)) == changed
    assert config_from_flags(cls, build_parser().parse_args(COMPRESS)) == cls()


def test_a_bad_value_is_refused_by_the_config_itself(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*COMPRESS, "--bits", "5"])
    assert "invalid choice: 5" in capsys.readouterr().err
    with pytest.raises(CommandError, match=r"^--salient >= 1 is a channel count"):  # named by its flag
        config_from_flags(DeltaConfig, build_parser().parse_args([*COMPRESS, "--salient", "2.5"]))


def test_the_pipeline_sections_are_the_same_dataclasses(tmp_path):
    f = tmp_path / "pipeline.yaml"
    f.write_text(yaml.safe_dump({"compression": dataclasses.asdict(DELTA), "calibration": dataclasses.asdict(CALIB)}))
    cfg = load_config(f)
    assert cfg.compression == DELTA and cfg.calibration == CALIB
    f.write_text(yaml.safe_dump({"compression": {"method": "nope"}}))
    with pytest.raises(ValueError, match=r"pipeline.yaml: compression: method must be one of"):
        load_config(f)


def test_gptq_rounding_calibrates_with_the_hessians():
    assert calibration_for(DeltaConfig(rounding="gptq"), CalibConfig()) == CalibConfig(hessian=True)
    assert calibration_for(DeltaConfig(), CalibConfig()) == CalibConfig()
