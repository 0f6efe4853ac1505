"""Task scores of meswitch.evaluation.metrics: the next-line token accuracy's alignment of predictions and answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meswitch.evaluation.metrics import FINAL_NUMBER, NEXT_LINE, Task, next_line_token_accuracy

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
