"""What the core commands refuse and print, on tiny real checkpoints: an --out whose replacement would lose work,
the expert's card, a base given as its own expert, a damaged or edited artifact, the router's defaults, numeric
flags, help texts and progress."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from tiny_models import calib_file, make_base, make_expert

from meswitch.artifacts import ArtifactError, Manifest, read_manifest, seal, staging_dir, verify
from meswitch.checkpoints import Checkpoint, CheckpointError, check_expert
from meswitch.cli import build_parser, main


def _compress(pair, out, *extra: str) -> list[str]:
    return [
        "compress", "--base", str(pair.base), "--expert", str(pair.expert), "--calib", str(pair.calib),
        "--out", str(out), "--samples", "8", "--seq-len", "64", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base, an expert without a card, calibration and evaluation text, and the expert's artifact."""
    root = tmp_path_factory.mktemp("pair")
    base = make_base(root / "base")
    pair = SimpleNamespace(root=root, base=base, expert=make_expert(base, root / "expert"))
    pair.calib = calib_file(root / "calib.jsonl")
    pair.data = calib_file(root / "eval.jsonl", n=6)
    pair.art = root / "art"
    assert main(_compress(pair, pair.art)) == 0
    return pair


def _with(pair: SimpleNamespace, **changes) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(pair), **changes})


def _user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("important\n")
    return path


def _sealed(folder: Path, kind: str, **fields) -> Path:
    with staging_dir(folder) as tmp:
        seal(tmp, Manifest(kind=kind, name="r", **fields))
    return folder


def _never(*_args, **_kwargs):
    raise AssertionError("work started although --out was refused")


# -- 1. --out never loses work ------------------------------------------------------------------------------------


def test_compress_refuses_an_out_it_would_destroy_before_any_work(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("meswitch.compression.api.run_compress", _never)
    user = _user_folder(tmp_path / "userdir")
    assert main(_compress(pair, user)) == 2
    err = capsys.readouterr().err
    assert str(user) in err and "notes.txt" in err and "choose another --out or remove it first" in err
    assert (user / "notes.txt").read_text() == "important\n"
    afile = tmp_path / "afile"
    afile.write_text("keep\n")
    assert main(_compress(pair, afile)) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "keep\n"
    for out, relation in ((pair.expert, "is"), (pair.expert / "sub", "is inside"), (pair.root, "holds")):
        assert main(_compress(pair, out)) == 2
        assert f"{relation} the input" in capsys.readouterr().err
    assert read_manifest(pair.art).kind == "expert-delta" and (pair.expert / "config.json").is_file()
    # "." is the folder it names, refused by its real path, not "PosixPath('.') has an empty name" after the work
    monkeypatch.chdir(user)
    assert main(_compress(pair, ".")) == 2
    err = capsys.readouterr().err
    assert os.getcwd() in err and "PosixPath" not in err and (user / "notes.txt").is_file()


def test_a_group_size_that_does_not_divide_the_inputs_is_refused_before_calibration(
    pair, tmp_path, capsys, monkeypatch
):  # fmt: skip
    monkeypatch.setattr("meswitch.compression.api.calibrate", _never)
    out = tmp_path / "art"
    assert main(_compress(pair, out, "--group", "7")) == 2
    err = capsys.readouterr().err.strip()
    expected = "error: --group 7 does not divide the inputs of every matrix (this model's have 64 or 128); try 32 or 64"
    assert err.endswith(expected), err
    assert not out.exists()


def test_compress_reruns_into_its_own_artifact_but_not_into_another_kind(pair, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(_compress(pair, out)) == 0
    assert main(_compress(pair, out, "--bits", "3")) == 0  # a re-run replaces its earlier artifact in place
    assert read_manifest(out).method["bits"] == 3 and verify(out)
    assert "checks and calibration included" in capsys.readouterr().out  # the time is the whole run's
    router = _sealed(tmp_path / "router", "router")
    assert main(_compress(pair, router)) == 2
    assert "holds a router artifact, not an expert-delta artifact" in capsys.readouterr().err
    assert read_manifest(router).kind == "router"


def test_every_writer_keeps_a_user_folder_and_replaces_its_own_kind(pair, tmp_path, capsys, monkeypatch):
    user = _user_folder(tmp_path / "userdir")
    with pytest.raises(ArtifactError, match="choose another --out or remove it first"):
        _sealed(user, "router")
    assert (user / "notes.txt").is_file() and not list(tmp_path.glob(".userdir.*"))  # nor a staging folder left
    assert read_manifest(_sealed(_sealed(tmp_path / "r", "router"), "router")).kind == "router"
    # reconstruct: a model folder of an earlier run is replaced; a user's folder or the artifact is not
    recon = tmp_path / "recon"
    args = ["reconstruct", "--base", str(pair.base), "--artifact", str(pair.art), "--out"]
    assert main([*args, str(recon)]) == 0 and main([*args, str(recon)]) == 0
    assert (recon / "model.safetensors").is_file()
    assert main([*args, str(user)]) == 2 and "remove it first" in capsys.readouterr().err
    assert main([*args, str(pair.art)]) == 2 and "is the input" in capsys.readouterr().err
    assert json.loads((recon / "reconstructed.json").read_text())["artifact"] == str(pair.art.resolve())
    model = tmp_path / "a-model"  # a model folder reconstruct did not write (a download, a fine-tune) is kept
    shutil.copytree(pair.base, model)
    assert main([*args, str(model)]) == 2
    assert "holds a model folder, not a reconstructed model folder" in capsys.readouterr().err
    assert (model / "model.safetensors").is_file()
    assert verify(pair.art)
    # router train and registry pull: refused before any training or download
    monkeypatch.setattr("meswitch.routing.train_router", _never)
    assert main(["router", "train", "--experts", str(pair.expert), "--out", str(user)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    pytest.importorskip("meswitch.registry.client")  # the registry extra
    monkeypatch.setattr("meswitch.cli.registry._registry", _never)
    assert main(["registry", "pull", "meswitch-expert-e/1", "--out", str(user)]) == 2
    assert "remove it first" in capsys.readouterr().err and (user / "notes.txt").is_file()


# -- 2. the expert's card --------------------------------------------------------------------------------------


def test_compress_records_the_expert_cards_name_and_domain_unless_flags_say_otherwise(pair, tmp_path):
    assert (read_manifest(pair.art).name, read_manifest(pair.art).domain) == ("expert", None)  # no card: folder
    pair = _with(pair, expert=shutil.copytree(pair.expert, tmp_path / "math-v2"))
    card = {"name": "math", "domain": "arithmetic", "description": "word problems"}
    (pair.expert / "expert.yaml").write_text(yaml.safe_dump(card))
    assert main(_compress(pair, tmp_path / "a")) == 0
    m = read_manifest(tmp_path / "a")
    assert (m.name, m.domain, m.description) == ("math", "arithmetic", "word problems")
    assert main(_compress(pair, tmp_path / "b", "--name", "m2", "--domain", "sums")) == 0
    assert (read_manifest(tmp_path / "b").name, read_manifest(tmp_path / "b").domain) == ("m2", "sums")


# -- 3. wrong pairs --------------------------------------------------------------------------------------------


def test_a_base_given_as_its_own_expert_is_refused(pair, tmp_path, capsys, caplog):
    same = _with(pair, expert=pair.base)
    assert main(_compress(same, tmp_path / "x")) == 2
    assert "the expert is the base folder itself" in capsys.readouterr().err
    copy = shutil.copytree(pair.base, tmp_path / "copy")
    with pytest.raises(CheckpointError, match="same weights and config as the base"):
        check_expert(Checkpoint(pair.base), Checkpoint(copy))
    assert main(_compress(_with(pair, expert=copy), tmp_path / "x")) == 2
    assert "no delta to compress" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # a swapped pair (the card on the base's side) is only warned of
    carded = shutil.copytree(pair.expert, tmp_path / "carded")
    (carded / "expert.yaml").write_text(yaml.safe_dump({"name": "e", "domain": "d", "description": "x"}))
    assert main(_compress(_with(pair, base=carded, expert=pair.base), tmp_path / "s")) == 0
    assert "swapped" in caplog.text


# -- 4. a damaged or edited artifact -----------------------------------------------------------------------------


def test_inspect_prints_a_failed_verdict_last_on_stderr(pair, tmp_path, capsys):
    art = shutil.copytree(pair.art, tmp_path / "art")
    shard = next(art.glob("delta-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 0xFF]))
    assert main(["inspect", str(art)]) == 1
    out, err = capsys.readouterr()
    assert "model.layers.1.self_attn.v_proj.weight" in out.splitlines()[-1]  # the table ends stdout
    assert err.splitlines()[-1].startswith("checksums: FAILED") and "sha256" in err
    assert main(["inspect", str(pair.art)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("checksums: ok")


def test_inspect_says_what_a_path_that_is_no_artifact_is(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, said in [("nowhere", "no such artifact folder"), ("file.txt", "a file, not an artifact folder"),
                       ("empty", "no manifest.json; not a meswitch artifact")]:  # fmt: skip
        assert main(["inspect", str(tmp_path / path)]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / path}: {said}" in err and len(err.strip().splitlines()) == 1


def test_an_edited_bit_width_is_one_error_naming_the_tensor_and_the_artifact(pair, tmp_path, capsys):
    art = shutil.copytree(pair.art, tmp_path / "art")
    text = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(text.replace('"bits": 2', '"bits": 3'))  # every record, as sed would
    assert main(["inspect", str(art)]) == 1
    err = capsys.readouterr().err
    assert f"{art}: tensor 'lm_head.weight'" in err and "calls for lm_head.weight.packed of shape [300, 7]" in err
    assert main(["reconstruct", "--base", str(pair.base), "--artifact", str(art), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{art}: tensor 'lm_head.weight'" in err
    args = ["--base", str(pair.base), "--artifact", str(art), "--expert", str(pair.expert), "--data", str(pair.data)]
    assert main(["evaluate", *args, "--device", "cpu"]) == 2
    assert f"{art}: tensor 'lm_head.weight'" in capsys.readouterr().err.splitlines()[-1]
    # the layer table and the tensor records disagreeing is refused too (inspect would show the wrong width)
    manifest = json.loads(text)
    next(r for r in manifest["layers"] if r["name"] == "lm_head.weight")["bits"] = 3
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"'lm_head\.weight': the manifest's layer table says 3 bits"):
        verify(art)


# -- 5. the router's defaults and flags ------------------------------------------------------------------------


def test_router_train_defaults_to_the_embedding_backend_and_refuses_mcq_flags_without_it(pair, tmp_path, capsys):
    args = build_parser().parse_args(["router", "train", "--experts", "e", "--out", "o"])
    assert (args.backend, args.device) == ("embedding", "auto")
    for flag in (["--init-from", str(tmp_path)], ["--steps", "10"]):
        assert main(["router", "train", "--experts", str(pair.expert), "--out", str(tmp_path / "r"), *flag]) == 2
        assert f"{flag[0]} apply only to --backend mcq" in capsys.readouterr().err


def test_route_checks_orders_against_the_router_before_loading_it(tmp_path, capsys):
    domains = [{"domain": d, "expert": d} for d in ("code", "math", "poems", "prose")]
    mcq = _sealed(tmp_path / "mcq", "router", method={"backend": "mcq"}, metadata={"domains": domains})
    with pytest.raises(SystemExit) as exit_:
        main(["route", str(mcq), "q", "--orders", "-1"])
    assert exit_.value.code == 2 and "--orders" in capsys.readouterr().err
    assert main(["route", str(mcq), "q", "--orders", "99"]) == 2
    assert "routes over 4 domains, so 0 (all) to 4" in capsys.readouterr().err
    embedding = _sealed(tmp_path / "emb", "router", method={"backend": "embedding"}, metadata={"domains": domains})
    assert main(["route", str(embedding), "q", "--orders", "2"]) == 2
    assert "--orders applies to MCQ routers" in capsys.readouterr().err


# -- 6. help ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["reconstruct"], ["Add the artifact's dequantized delta to BASE"]),
        (["evaluate"], ["Score the held-out texts", "--limit LIMIT evaluate at most this many lines (default 0: all)"]),
        (
            ["report"],
            ["(default 0.01)", "(default global)", "(default 2,3,4)", "(default auto)", "(default 200; 0: all)"],
        ),
        (["router", "train"], ["(default 0.5)", "(default 16)", "training (default 0)", "embedding (default)"]),
        (["route"], ["(default auto)"]),
    ],
)
def test_help_describes_the_command_and_shows_every_default(command, expected, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in expected:
        assert phrase in text


# -- 7. numeric flags ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["evaluate", "--base", "b", "--artifact", "a", "--expert", "e", "--data", "d", "--limit", "-1"],
            "0 (no limit)",
        ),
        (["router", "eval", "r", "--data", "d", "--limit", "-2"], "0 (no limit)"),
        (["report", "fam", "--out", "o", "--limit", "-1"], "0 (no limit)"),
        (["report", "fam", "--out", "o", "--bits", "2,5"], "[5] not among the widths 1, 2, 3, 4, 8"),
    ],
)
def test_numeric_flags_are_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_report_refuses_a_budget_method_without_budgets_before_any_work(tmp_path, capsys, monkeypatch):
    configs = []
    monkeypatch.setattr("meswitch.evaluation.report.run_report", lambda family, out, cfg: configs.append(cfg) or [])
    args = ["report", str(tmp_path), "--out", str(tmp_path / "r"), "--methods", "meswitch-budget", "--bits", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "needs a budget in [2, 3)" in err and "--bit-budgets" in err and not configs
    assert main([*args, "--bit-budgets", "2.3", "--limit", "0"]) == 0
    assert configs[0].bit_budgets == (2.3,) and configs[0].limit == 0 and configs[0].bits == (2,)


# -- 8. progress -----------------------------------------------------------------------------------------------


def test_evaluate_shows_progress_and_says_how_many_texts_it_scored(pair, capsys):
    args = ["--base", str(pair.base), "--artifact", str(pair.art), "--expert", str(pair.expert)]
    assert main(["evaluate", *args, "--data", str(pair.data), "--limit", "0"]) == 0  # --device auto: the CPU here
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"scored 6 texts of {pair.data}"
    for what in ("base", "expert", "compressed"):
        assert f"evaluate {what}: 100%" in err and "6/6" in err
