"""`make demo`'s own logic: which questions it asks, how it marks the answers, where the family lives."""

import json
from pathlib import Path

from meswitch.demo import main as demo


def _row(question: str, reply: str, **extra) -> dict:
    prompt = (
        "<|im_start|>system\nYou are helpful<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    return {
        "text": prompt + reply + "<|im_end|>\n",
        "score_from": len(prompt),
        **extra,
        **({"prompt": prompt} if extra else {}),
    }


def _family(root: Path) -> Path:
    rows = {
        "math": [
            _row(
                f"What is {a} plus 1?", f"The answer is {a + 1}.", answer=str(a + 1), metric="final-number-exact-match"
            )
            for a in range(5)
        ],
        "code": [_row("Write f.", "def f(): pass", answer="pass", metric="next-line-exact-match")],
        "english": [_row(f"Quote {i}.", "A quote.") for i in range(3)],
    }
    for name, lines in rows.items():
        (root / "experts" / name).mkdir(parents=True)
        (root / "experts" / name / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_questions_are_the_user_turns_with_checkable_answers(tmp_path):
    asked = demo.questions(_family(tmp_path))
    by = {}
    for q in asked:
        by.setdefault(q["domain"], []).append(q)
    assert sorted(by) == ["english", "math"]  # a cut-off function is a completion, not a question
    assert len(by["math"]) == len(by["english"]) == demo.QUERIES_PER_DOMAIN
    for q in by["math"]:
        a = int(q["question"].split()[2])
        assert q["expected"] == str(a + 1) and "<|im" not in q["question"]
    assert all(q["expected"] is None for q in by["english"])


def test_answers_table_marks_checkable_answers_and_counts_them():
    served = [
        {"domain": "math", "question": "What is 2 plus 1?", "expert": "math", "confidence": 0.97,
         "answer": "2 + 1 = 3. The answer is 3.", "base_answer": "It is 4.", "right": True, "base_right": False,
         "route_ms": 7.5},
        {"domain": "english", "question": "A quote | please", "expert": "english", "confidence": None,
         "answer": "To be | or not", "base_answer": "Hmm."},
    ]  # fmt: skip
    scores = {"math": {"task_metric": "final-number-exact-match", "task_prompts": 48, "task_score": 0.48,
                       "base_task_score": 0.17},
              "code": {"task_metric": "next-line-exact-match", "task_prompts": 48, "task_score": 0.04,
                       "base_task_score": 0.04,
                       "token_accuracy": {"prompts": 200, "base": 0.519, "expert": 0.554, "expert_over_base": 1.066,
                                          "ci95": [1.02, 1.11]}}}  # fmt: skip
    md = demo.answers_markdown({"served": served, "family_scores": scores})
    assert "| math | What is 2 plus 1? | math (0.97) | ✅ 2 + 1 = 3. The answer is 3. | ❌ It is 4. |" in md
    assert "To be \\| or not" in md and "english (-)" in md  # table cells stay cells
    assert (
        "experts 1/1, base 0/1" in md
        and "median 7.5 ms a question (1 asked)" in md
        and "math 0.480 against the base's 0.170" in md
        and "(200 functions, full expert): code 0.554 against the base's 0.519 (x1.066, 95% CI 1.020-1.110)" in md
    )


def test_family_scores_read_both_families_layouts(tmp_path):
    """The chat family keeps each expert's task scores in its entry; the tiny (and micro) family names the metric
    there and keeps the scores under ``task_scores`` (``make demo --size tiny`` failed on it at the summary)."""
    chat = {"experts": {"math": {"ppl_own_domain": 1.1, "base_ppl_own_domain": 3.1,
                                 "task": {"metric": "final-number-exact-match", "prompts": 48, "expert": 0.48,
                                          "base": 0.17}}}}  # fmt: skip
    tiny = {"experts": {"math": {"ppl_own_domain": 2.0, "base_ppl_own_domain": 4.0, "task": "arithmetic-exact-match"},
                        "code": {"ppl_own_domain": 5.0, "base_ppl_own_domain": 6.0, "task": None}},
            "task_scores": {"math": {"metric": "arithmetic-exact-match", "prompts": 8, "base": 0.0,
                                     "expert": 0.25}}}  # fmt: skip
    for name, doc in (("chat", chat), ("tiny", tiny)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "family.json").write_text(json.dumps(doc))
    assert demo.family_scores(tmp_path / "chat")["math"] == {
        "ppl": 1.1, "base_ppl": 3.1, "task_metric": "final-number-exact-match", "task_prompts": 48,
        "task_score": 0.48, "base_task_score": 0.17, "token_accuracy": None,
    }  # fmt: skip
    scores = demo.family_scores(tmp_path / "tiny")
    assert scores["math"]["task_metric"] == "arithmetic-exact-match" and scores["math"]["task_score"] == 0.25
    assert scores["code"]["task_metric"] is None and scores["code"]["ppl"] == 5.0


def test_real_families_are_cached_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("MESWITCH_CACHE", str(tmp_path / "cache" / "corpora"))
    assert demo.default_family(tmp_path / "out", "smol") == tmp_path / "cache" / "families" / "smol"
    assert demo.default_family(tmp_path / "out", "tiny") == tmp_path / "out" / "family"
