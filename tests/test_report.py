"""The methods x bits report over a family folder, and expert.yaml parsing."""

import json
import math

import pytest
import torch
import yaml
from tiny_models import calib_file, make_base, make_expert

from meswitch.cli import main
from meswitch.compression.calibration import CalibConfig
from meswitch.compression.distill import DistillConfig
from meswitch.evaluation.metrics import paired_ratio_ci
from meswitch.evaluation.report import (
    ReportConfig,
    claims,
    claims_markdown,
    equal_bytes_group,
    run_report,
    targets,
)
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
        bits=(2, 3),
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
    assert len(rows) == 2 * (3 * 2 + 1)
    by = {(r["name"], r["method"]): r for r in rows if r["bits"] in (1, 2)}
    for name in ("alpha", "beta"):
        ours, fixed, mag = by[name, "meswitch"], by[name, "fixed"], by[name, "magnitude"]
        assert ours["delta_bytes"] == mag["delta_bytes"]  # same salient count, same bytes
        # 2 salient channels of 64 are 3% of K here (1% on real models), so up to 25% more bytes.
        assert fixed["delta_bytes"] < ours["delta_bytes"] < 1.25 * fixed["delta_bytes"]
        # The tiny experts carry outlier input channels: keeping them in fp16 must pay off clearly. (Here the
        # outliers are also the largest columns, so magnitude finds them too; tests/test_quantize.py has the case
        # where it does not.)
        assert ours["kl"] < 0.5 * fixed["kl"]
        assert abs(ours["ppl_ratio"] - 1) < abs(fixed["ppl_ratio"] - 1)  # closer to the expert's perplexity
        assert by[name, "bitdelta"]["bits"] == 1
    assert "| alpha | meswitch | 2 |" in paths[0].read_text()
    checks = data["claims"]
    assert checks["bits"] == 2 and set(checks["experts"]) == {"alpha", "beta"}
    for name, e in checks["experts"].items():
        assert e["kl_below_fixed"] == (by[name, "meswitch"]["kl"] < by[name, "fixed"]["kl"]) is True
        assert e["fixed_bytes_ratio"] == pytest.approx(
            by[name, "fixed"]["delta_bytes"] / by[name, "meswitch"]["delta_bytes"], abs=1e-4
        )
        assert e["curve_points"]["kl"], "the 2- and 3-bit curves overlap in size"
        ours_sums, fixed_sums = by[name, "meswitch"]["kl_text_sums"], by[name, "fixed"]["kl_text_sums"]
        assert len(ours_sums) == len(fixed_sums) == 8  # one per evaluation text
        lo, hi = e["kl_vs_fixed"]["ci95"]
        assert e["kl_vs_fixed"]["ratio"] == pytest.approx(sum(ours_sums) / sum(fixed_sums), abs=1e-3)
        assert lo <= e["kl_vs_fixed"]["ratio"] <= hi < 1, "outlier channels in fp16: clearly better than fixed"
    assert "Claims at 2 bits" in paths[0].read_text()
    assert "| vs fixed | vs magnitude |" in paths[0].read_text()


def _row(name, method, bits, bpp, kl, gain):
    return {"name": name, "method": method, "bits": bits, "bits_per_param": bpp, "kl": kl, "gain_retained": gain,
            "delta_bytes": bpp * 100, "fp16_delta_bytes": 1600}  # fmt: skip


def test_claims_catch_a_curve_that_crosses_below_fixed():
    rows = [
        _row("e", "meswitch", 2, 2.2, 0.010, 0.80), _row("e", "meswitch", 3, 3.2, 0.004, 0.90),
        _row("e", "fixed", 2, 2.0, 0.020, 0.60), _row("e", "fixed", 3, 3.0, 0.002, 0.95),
        _row("e", "magnitude", 2, 2.2, 0.015, 0.70),
    ]  # fmt: skip
    checks = claims(rows, 2)
    e = checks["experts"]["e"]
    # at 2 bits meswitch wins, but at 3.0-3.2 bits fixed precision is better: the curve claim fails
    assert e["kl_below_fixed"] and e["kl_below_magnitude"] and e["at_most_one_sixth_of_fp16"]
    assert not e["kl_curve_below_fixed"] and not e["gain_curve_above_fixed"]
    assert not checks["all"]["kl_curve_below_fixed"] and checks["all"]["kl_below_fixed"]
    # compared only where both curves exist: 2.2 .. 3.0 bits per parameter
    assert [c["bits_per_param"] for c in e["curve_points"]["kl"]] == [2.2, 3.0]


def test_paired_interval_separates_a_method_from_the_sample():
    gen = torch.Generator().manual_seed(1)
    texts = torch.rand(64, generator=gen, dtype=torch.float64) * 10  # texts differ 10x from one another
    noise = 1 + 0.02 * torch.randn(64, generator=gen, dtype=torch.float64)
    better = (0.9 * texts * noise).tolist()
    ratio, lo, hi = paired_ratio_ci(better, texts.tolist())
    assert ratio == pytest.approx(0.9, abs=0.01) and lo < ratio < hi < 0.95  # 10% better: the pairing shows it
    same = (texts * noise).tolist()
    _, lo, hi = paired_ratio_ci(same, texts.tolist())
    assert lo < 1 < hi  # no difference but noise: the interval says the sample cannot tell them apart
    unpaired = torch.rand(64, generator=gen, dtype=torch.float64).mul(10).tolist()
    _, lo_u, hi_u = paired_ratio_ci(unpaired, texts.tolist())
    assert hi_u - lo_u > 5 * (hi - lo)  # unrelated samples: far wider than the paired one
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio_ci([1.0, 2.0], [1.0])


def test_claims_without_per_text_figures_have_no_interval():
    rows = [_row("e", m, 2, 2.2, kl, 0.9) for m, kl in (("meswitch", 0.01), ("fixed", 0.02), ("magnitude", 0.015))]
    e = claims(rows, 2)["experts"]["e"]
    assert e["kl_vs_fixed"] is None and e["kl_below_fixed"]
    assert "| e | 0.0100 / 0.0200 / 0.0150 | - | - |" in claims_markdown(claims(rows, 2))


def test_curve_points_carry_a_paired_interval_over_interpolated_texts():
    def row(method, bits, bpp, sums):
        return {**_row("e", method, bits, bpp, sum(sums) / 40, 0.9), "kl_text_sums": sums}

    gen = torch.Generator().manual_seed(2)
    texts = (torch.rand(40, generator=gen, dtype=torch.float64) + 0.5).tolist()
    f2, f3 = [2 * t for t in texts], [t / 2 for t in texts]  # fixed: 2 bits, then 3
    ours2, ours3 = [1.5 * t for t in texts], [0.45 * t for t in texts]
    rows = [row("fixed", 2, 2.0, f2), row("fixed", 3, 3.0, f3), row("magnitude", 2, 2.2, f2),
            row("meswitch", 2, 2.2, ours2), row("meswitch", 3, 3.2, ours3)]  # fmt: skip
    points = {c["bits_per_param"]: c for c in claims(rows, 2)["experts"]["e"]["curve_points"]["kl"]}
    # KL is interpolated linearly in its logarithm: fixed at 2.2 bits/param is 2^0.8 * 0.5^0.2 = 2^0.6 x each
    # text's; meswitch 1.5 x
    assert points[2.2]["ratio"] == pytest.approx(1.5 / 2**0.6, abs=1e-4)
    lo, hi = points[2.2]["ci95"]
    assert lo <= points[2.2]["ratio"] <= hi < 1 and points[2.2]["ok"]
    # at 3.0: meswitch between its 2.2 and 3.2 points, 1.5^0.2 * 0.45^0.8 = 0.57 > fixed's 0.5: worse
    assert points[3.0]["ratio"] == pytest.approx(1.5**0.2 * 0.45**0.8 / 0.5, abs=1e-4)
    assert points[3.0]["ci95"][0] > 1 and not points[3.0]["ok"]
    assert "2.20 bits/param -1.0%" in claims_markdown(claims(rows, 2))


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


def test_a_data_file_linked_out_of_the_expert_folder_is_refused_not_read(tmp_path, monkeypatch):
    import meswitch.expert_card as expert_card

    folder, outside = tmp_path / "expert", tmp_path / "secret.txt"
    folder.mkdir()
    outside.write_text("root:x:0:0\n")
    (folder / "expert.yaml").write_text("name: ok\ndomain: x\ndescription: d\n")
    (folder / "calib.jsonl").symlink_to(outside)
    with pytest.raises(CardError, match=r"calib\.jsonl: a link to .*secret\.txt, outside the expert folder"):
        load_card(folder)
    (folder / "calib.jsonl").unlink()
    (folder / "data").mkdir()
    (folder / "data" / "c.jsonl").write_text('{"text": "a"}\n')
    (folder / "calib.jsonl").symlink_to(folder / "data" / "c.jsonl")  # a link that stays inside is fine
    assert load_card(folder).calibration_path.read_text() == '{"text": "a"}\n'
    monkeypatch.setattr(expert_card, "MAX_DATA_BYTES", 4)
    with pytest.raises(CardError, match="over the 0 MiB a data file may hold"):
        load_card(folder)


def test_report_cli_refuses_an_empty_family(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "base" in capsys.readouterr().err


def test_equal_bytes_group_divides_every_matrix_and_matches_the_salient_bytes():
    # SmolLM2: K = 576 (attention, MLP up/gate, tied embedding) and 1536 (MLP down): 192 divides both, and
    # 32 bits per 192 parameters = 0.167 bits, the cost of 1% fp16 columns (0.16)
    assert equal_bytes_group([576, 576, 1536], 0.01) == 192
    assert equal_bytes_group([4096, 14336], 0.01) == 256  # Mistral-7B: 0.125 bits, the nearest power of two
    with pytest.raises(ValueError, match="salient fraction"):
        equal_bytes_group([64], 2)


def test_report_rows_carry_every_figure_and_resume_from_finished_experts(family, tmp_path, caplog):
    cfg = ReportConfig(
        methods=("meswitch", "fixed-eqbytes", "bitdelta", "bitdelta-distilled"),
        bits=(2,),
        salient=0.125,
        limit=6,
        device="cpu",
        calib=CalibConfig(samples=8, seq_len=64),
        distill=DistillConfig(steps=8, batch_size=2, seq_len=32),
    )
    out = tmp_path / "report"
    paths = run_report(family, out, cfg)
    data = json.loads(paths[1].read_text())
    rows = {(r["expert"], r["method"]): r for r in data["rows"]}
    assert len(rows) == 2 * 4 and data["equal_bytes_group"] == 16  # 0.125 * 16 bits = 2 bits = 32 bits / 16 params
    for r in data["rows"]:
        for key in ("expert", "method", "bits", "bits_per_param", "kl", "kl_ci", "gain_kept_ppl", "gain_kept_task",
                    "gain_kept_ppl_ci", "compress_seconds", "device", "peak_memory_mb"):  # fmt: skip
            assert key in r, key
        lo, hi = r["kl_ci"]
        assert lo <= r["kl"] <= hi and r["device"] == "cpu" and r["gain_kept_task"] is None
        if r["ppl_expert"] >= r["ppl_base"]:  # this toy expert gained nothing on its texts: no share of it to keep
            assert r["gain_kept_ppl"] is None and r["gain_kept_ppl_ci"] is None
        else:
            lo, hi = r["gain_kept_ppl_ci"]
            assert lo <= r["gain_kept_ppl"] <= hi and lo < hi
        # each text's summed NLL and its tokens give back the perplexities the row reports
        for model, units in (("base", "nll_text_units_base"), ("expert", "nll_text_units"),
                             ("compressed", "nll_text_units")):  # fmt: skip
            sums = r[f"nll_text_sums_{model}"]
            assert len(sums) == len(r[units]) == 6
            assert math.exp(sum(sums) / sum(r[units])) == pytest.approx(r[f"ppl_{model}"], abs=1e-4)
    gained = {r["expert"] for r in data["rows"] if r["gain_kept_ppl"] is not None}
    assert gained == {"alpha"}  # beta's toy fine-tune is worse than its base on its own texts
    for name, ref in data["references"].items():  # the bf16 copy's gain kept, with its interval, in the table
        assert f"| {name} | expert rounded to bf16 (reference) | 16 | - | - | - | " in paths[0].read_text()
        if name not in gained:
            assert ref["bf16_rounded_gain_kept_ppl"] is None and ref["bf16_rounded_gain_kept_ppl_ci"] is None
            continue
        lo, hi = ref["bf16_rounded_gain_kept_ppl_ci"]
        assert lo <= ref["bf16_rounded_gain_kept_ppl"] <= hi
        gain = f"{ref['bf16_rounded_gain_kept_ppl']:.3f} [{lo:.3f}, {hi:.3f}]"
        assert f" | {gain} | - |" in paths[0].read_text()
    for name in ("alpha", "beta"):
        ours, eq = rows[name, "meswitch"], rows[name, "fixed-eqbytes"]
        # about the bytes of the salient columns (the estimate is rough at K = 64; the real report shows both sizes)
        assert abs(eq["bits_per_param"] - ours["bits_per_param"]) < 0.15 * ours["bits_per_param"]
        plain, distilled = rows[name, "bitdelta"], rows[name, "bitdelta-distilled"]
        assert distilled["delta_bytes"] == plain["delta_bytes"] and distilled["kl"] != plain["kl"]
        assert distilled["compress_seconds"] > plain["compress_seconds"]  # distillation time counted in
        assert data["references"][name]["bf16_rounded_kl"] > 0  # fp32 experts: rounding them costs something
        # K = 64 here: 2-bit codes with 8 fp16 columns are 4.3 bits per parameter, over both budgets
        assert data["targets"][name]["2bit"] == {
            "meswitch_row": None,
            "met": False,
            "why": "no meswitch row at <= 2.3 bits",
        }
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["alpha.json", "beta.json"]
    # run again: both experts come from their parts, nothing is compressed
    caplog.set_level("INFO")
    again = json.loads(run_report(family, out, cfg)[1].read_text())
    assert [r["kl"] for r in again["rows"]] == [r["kl"] for r in data["rows"]]
    assert caplog.text.count("reported already") == 2


def test_distilled_multipliers_scale_every_stored_part_of_the_delta(family, tmp_path):
    from meswitch.checkpoints import Checkpoint, check_expert
    from meswitch.compression.delta import DeltaConfig
    from meswitch.compression.distill import apply_multipliers
    from meswitch.compression.expert import ExpertInfo, compress_expert
    from meswitch.compression.reconstruct import open_artifact

    base, expert = Checkpoint(family / "base"), Checkpoint(family / "experts" / "alpha")
    art = tmp_path / "art"
    compress_expert(base, expert, check_expert(base, expert), None, DeltaConfig(salient=4), art, ExpertInfo("a"))
    reader = open_artifact(art, base)
    names = [n for n, h in reader.manifest.tensors.items() if h["kind"] == "quantized"]
    mult = {n: 0.5 + i / 10 for i, n in enumerate(names)}
    apply_multipliers(art, tmp_path / "scaled", mult, {"steps": 0})
    scaled = open_artifact(tmp_path / "scaled", base)
    assert scaled.manifest.method["distilled"] == {"steps": 0}
    for n in names:
        want = mult[n] * reader.delta(n)  # up to the fp16 rounding of the rescaled step sizes and offsets
        torch.testing.assert_close(scaled.delta(n), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_targets_pick_the_best_row_in_each_budget_and_need_the_whole_interval_below_one():
    def row(method, bits, bpp, scale, gain, task=None):
        sums = [scale * (1 + i % 5) for i in range(30)]
        return {"name": "e", "method": method, "bits": bits, "bits_per_param": bpp, "kl": sum(sums) / 300,
                "kl_text_sums": sums, "gain_kept_ppl": gain, "gain_kept_task": task}  # fmt: skip

    rows = [
        row("meswitch", 2, 2.25, 1.0, 0.996, 1.0), row("meswitch", 3, 3.2, 0.2, 0.999, 1.0),
        row("fixed-eqbytes", 2, 2.27, 1.3, 0.99), row("magnitude", 2, 2.25, 1.0, 0.996),
        row("meswitch", 1, 1.08, 5.0, 0.95), row("bitdelta-distilled", 1, 1.0, 9.0, 0.8),
        row("bitdelta", 1, 1.0, 20, 0.7),
    ]  # fmt: skip
    t = targets(rows)["e"]
    assert t["2bit"]["bits"] == 2 and t["2bit"]["gain_met"]  # the 3-bit row is over the 2.3-bit budget
    assert t["2bit"]["vs_fixed-eqbytes"]["won"] and t["2bit"]["vs_fixed-eqbytes"]["ci95"][1] < 1
    assert not t["2bit"]["vs_magnitude"]["won"]  # identical per-text sums: a tie is not a win
    assert not t["2bit"]["met"]
    assert t["1bit"]["vs_bitdelta-distilled"]["won"] and "vs_bitdelta" not in t["1bit"]  # the distilled one counts
    assert not t["1bit"]["gain_met"] and not t["1bit"]["met"]  # 95% < 97%


def test_a_report_without_plain_meswitch_rows_still_checks_the_targets(family, tmp_path):
    cfg = ReportConfig(
        methods=("meswitch-gptq", "fixed-eqbytes"), bits=(2,), salient=0.125, limit=4, device="cpu",
        calib=CalibConfig(samples=8, seq_len=64), experts=("alpha",),
    )  # fmt: skip
    data = json.loads(run_report(family, tmp_path / "r", cfg)[1].read_text())
    assert data["targets"]["alpha"]["2bit"]["meswitch_row"] is None  # K = 64: 2-bit rows are over 2.3 bits
    assert "1bit" in data["targets"]["alpha"]
