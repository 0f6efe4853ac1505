"""Task scores of meswitch.evaluation.metrics: the next-line token accuracy's alignment of predictions and answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meswitch.evaluation.metrics import (
    FINAL_NUMBER,
    NEXT_LINE,
    TASK_EXACT_MATCH,
    Task,
    exact_match,
    next_line_token_accuracy,
    task_decided,
    task_gain_kept_ci,
    task_hit,
    task_hits,
    task_score_name,
    task_scores,
)

MERGED = 1000  # "a\n" as one token: a BPE merge across the prompt's end


class CharTokenizer:
    """One token a character, except "a\\n", merged into one token."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("a\n", i):
                ids.append(MERGED)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return type("Encoding", (), {"input_ids": ids})()


class Peeking(nn.Module):
    """Predicts each next token by reading it (every prediction right), or the current token again (``echo``)."""

    def __init__(self, echo: bool = False):
        super().__init__()
        self.echo = echo
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor):
        target = ids if self.echo else torch.roll(ids, -1, dims=1)
        logits = torch.zeros(*ids.shape, MERGED + 1)
        logits.scatter_(2, target[..., None], 1.0)
        return type("Output", (), {"logits": logits})()


@pytest.mark.parametrize("prompt", ["def f(x):\n    y = x", "def f(a):\n    return a"])  # the 2nd merges "a\n"
def test_a_model_that_knows_every_next_token_scores_one_and_an_echo_scores_its_repeats(prompt):
    tasks = [Task(prompt, "    return y + 1", NEXT_LINE)]
    tok = CharTokenizer()
    assert next_line_token_accuracy(Peeking(), tok, tasks) == [1.0]
    # Scored: the token that ends the prompt's line ("\n", or "a\n" merged), then the answer's 16. An echo of the
    # previous token is right on the answer's 2nd-4th spaces only: 3 of 17 (3 of 16 had the merge been missed).
    assert next_line_token_accuracy(Peeking(echo=True), tok, tasks) == [pytest.approx(3 / 17)]


def test_only_next_line_tasks_are_scored_by_tokens():
    with pytest.raises(ValueError, match="next-line"):
        next_line_token_accuracy(Peeking(), CharTokenizer(), [Task("What is 2 plus 2?", "4", FINAL_NUMBER)])


class ListTokenizer:
    """Characters as tokens, left padding with 0, for models that generate (the shape of a Hugging Face one)."""

    pad_token_id = eos_token_id = 0
    padding_side = "right"

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        width = max(len(t) for t in texts)
        ids = [[0] * (width - len(t)) + [ord(c) for c in t] for t in texts]
        batch = {"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) != 0).long()}
        return type("Batch", (dict,), {"to": lambda self, device: self})(batch)

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(i) for i in row.tolist() if i) for row in rows]


class Replying(nn.Module):
    """A stand-in for a generating model (the test is of the bookkeeping, not of a model): it replies to each
    prompt with a fixed text, a character a step, and stops a row as generate does, at the stopping criteria's
    word (the row padded from there) or at ``max_new_tokens``; ``steps`` counts the batches' steps."""

    def __init__(self, replies: dict[str, str]):
        super().__init__()
        self.replies, self.steps = replies, 0
        self.anchor = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, stopping_criteria):
        prompts = ["".join(chr(i) for i in row.tolist() if i) for row in input_ids]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for step in range(max_new_tokens):
            if done.all():
                break
            nxt = [ord(self.replies[p][step]) if step < len(self.replies[p]) else 0 for p in prompts]
            input_ids = torch.cat([input_ids, torch.tensor(nxt).masked_fill(done, 0)[:, None]], dim=1)
            done |= torch.tensor(nxt) == 0
            for criterion in stopping_criteria:
                done |= criterion(input_ids, None)
            self.steps += 1
        return input_ids


def test_task_hits_and_scores_keep_the_tasks_order_across_metrics_and_batches():
    tasks = [
        Task("q1", "7", FINAL_NUMBER),
        Task("q2", "7", TASK_EXACT_MATCH),
        Task("q3", "9", FINAL_NUMBER),
        Task("q4", "5", TASK_EXACT_MATCH),
        Task("q5", "11", FINAL_NUMBER),
    ]
    model = Replying({"q1": " so the answer is 7.", "q2": "7 apples", "q3": " 4 and 8", "q4": "55", "q5": " 11"})
    tok = ListTokenizer()
    assert task_hits(model, tok, tasks, batch_size=2) == [True, True, False, False, True]
    # each batch stops once its rows are decided: q1 with its last character (20), q3 ended before; q2 and q4 one
    # character past their answers (2); q5 needs its end of reply (3 characters and the end: 4)
    assert model.steps == 20 + 2 + 4
    assert exact_match(model, tok, tasks) == pytest.approx(3 / 5)
    assert tok.padding_side == "right"  # restored
    assert task_scores(model, tok, tasks) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert task_score_name(tasks) == ", ".join(sorted({TASK_EXACT_MATCH, FINAL_NUMBER}))


def test_next_line_tasks_are_scored_by_their_tokens_beside_generated_ones():
    prompt = "def f(x):\n    y = x"
    line = Task(prompt, "    return y + 1", NEXT_LINE)
    tok = CharTokenizer()
    assert task_scores(Peeking(echo=True), tok, [line, line]) == [pytest.approx(3 / 17)] * 2
    assert task_score_name([line]) == "next-line token accuracy"


def test_task_gain_interval_judges_three_problems_of_two_hundred():
    base = [1.0] * 24 + [0.0] * 176
    expert = [1.0] * 177 + [0.0] * 23  # solves every problem the base does, and 153 more
    compressed = [1.0] * 174 + [0.0] * 26  # loses three of the expert's
    assert task_gain_kept_ci(base, expert, expert) == (1.0, 1.0, 1.0)
    assert task_gain_kept_ci(base, expert, base) == (0.0, 0.0, 0.0)
    point, lo, hi = task_gain_kept_ci(base, expert, compressed)
    assert point == pytest.approx(150 / 153)
    assert lo < point < hi and hi >= 0.995  # 98.0% by the point; the interval still admits 99.5%
    assert lo > 0.95  # but not much less: the three are paired against the expert, not the whole sample


@pytest.mark.parametrize(
    ("metric", "reply", "answer", "decided_at"),
    [
        (NEXT_LINE, "\n    return y + 1\n    z = 2\n", "    return y + 1", "\n    return y + 1\n"),
        (NEXT_LINE, "  # tail\n\n  \nreturn 3\nmore", "return 3", "  # tail\n\n  \nreturn 3\n"),
        (NEXT_LINE, "\nreturn 3", "return 3", None),  # the line may go on
        (FINAL_NUMBER, "So 3 + 4 = 7. The answer is 12. Or 7.", "12", "So 3 + 4 = 7. The answer is 12."),
        (FINAL_NUMBER, "The answer is $-5, not 6", "-5", "The answer is $-5,"),
        (FINAL_NUMBER, "3 and 4 and 7", "7", None),  # no stated answer: the last number, which may change
        (TASK_EXACT_MATCH, "12 apples", "12", "12 "),
        (TASK_EXACT_MATCH, "123", "12", "123"),
        (TASK_EXACT_MATCH, "7 apples", "12", "7"),
    ],
)
def test_a_verdict_is_decided_only_where_no_longer_reply_can_change_it(metric, reply, answer, decided_at):
    """The first prefix of ``reply`` that :func:`task_decided` accepts is ``decided_at`` (None: none before the
    whole reply), and from there on every prefix has the whole reply's verdict: generation may stop there."""
    prefixes = [reply[:n] for n in range(len(reply) + 1)]
    first = next((p for p in prefixes if task_decided(metric, p, answer)), None)
    assert first == decided_at
    for p in prefixes:
        if task_decided(metric, p, answer):
            assert task_hit(metric, p, answer) == task_hit(metric, reply, answer), p


def test_generation_waits_for_a_character_whose_bytes_have_not_all_come():
    """A reply decoded mid-character ends in U+FFFD, which could still become a digit: "7" then an unfinished
    character is no verdict yet for an exact-match answer "7"; "7" then a finished letter is."""
    from meswitch.evaluation.metrics import _stop_when_decided

    tok = ListTokenizer()
    prompt = torch.tensor([[ord("q"), ord("1")]])
    (stop,) = _stop_when_decided(tok, TASK_EXACT_MATCH, ["7"], prompt_len=2)
    pending = torch.cat([prompt, torch.tensor([[ord("7"), 0xFFFD]])], dim=1)
    assert stop(pending, None).tolist() == [False]
    assert stop(torch.cat([prompt, torch.tensor([[ord("7"), ord("x")]])], dim=1), None).tolist() == [True]
