"""The multiple-choice prompt of the MCQ router: the query, then the domains as lettered options.

The query comes first so that, reading causally, each option line already "sees" the query: a
small model can judge each option where it stands and the answer position only has to find the
matching line and copy its letter. (With the options first, the answer position has to do both,
and the family's small base models failed to learn it in a CPU budget.)

The prompt is tokenized in pieces (the head before the query, the query, the tail with the options
and "Answer:") and the ids are concatenated; training and routing build prompts the same way, so
the query can be cut to fit the router's context without re-tokenizing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEMPLATE_VERSION = 1

HEAD = "Query: "
TAIL = "\nWhich domain is the query from?\nOptions:\n{options}\nAnswer:"
# How an answer letter follows "Answer:" (a space, then the letter), and the bare letter as a
# fallback for tokenizers where " A" starts with a token shared by every letter.
ANSWER_FORMS = (" {letter}", "{letter}")


@dataclass(frozen=True)
class Option:
    """One domain as the router shows it: its name and a one-line description."""

    domain: str
    description: str

    def render(self, letter: str) -> str:
        desc = " ".join(self.description.split())
        return f"{letter}. {self.domain}: {desc}" if desc else f"{letter}. {self.domain}"


def render_tail(options: Sequence[Option], letters: str | None = None) -> str:
    """The options under their letters: ``A``, ``B``, ... unless ``letters`` gives others (training varies them)."""
    if len(options) > len(LETTERS):
        raise ValueError(f"the MCQ router lists at most {len(LETTERS)} domains, got {len(options)}")
    letters = letters or LETTERS[: len(options)]
    lines = "\n".join(opt.render(letters[i]) for i, opt in enumerate(options))
    return TAIL.format(options=lines)


def render_prompt(options: Sequence[Option], query: str) -> str:
    """The whole prompt as text (for logs and docs; the router works on the pieces' token ids)."""
    return HEAD + query + render_tail(options)


def letter_token_ids(tokenizer, n: int = len(LETTERS)) -> list[int]:
    """The token id whose next-token logit stands for each of the first ``n`` letters.

    The first token of the answer continuation must differ between letters; the first answer form
    that gives distinct ids for all 26 letters is used, whatever ``n``, so a router reads the same
    tokens it was trained on however many domains it has.
    """
    if n > len(LETTERS):
        raise ValueError(f"the MCQ router lists at most {len(LETTERS)} domains, got {n}")
    for form in ANSWER_FORMS:
        ids = [tokenizer.encode(form.format(letter=letter), add_special_tokens=False) for letter in LETTERS]
        first = [x[0] for x in ids if x]
        if len(first) == len(LETTERS) and len(set(first)) == len(LETTERS):
            return first[:n]
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} gives no distinct first token for the answer letters "
        f"{LETTERS!r}; this model cannot be used as an MCQ router"
    )


class PromptEncoder:
    """Token ids of router prompts with the query cut to fit ``max_length``."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        bos = tokenizer.bos_token_id
        self.head = ([bos] if bos is not None and _adds_bos(tokenizer) else []) + self._encode(HEAD)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def tail_ids(self, options: Sequence[Option], letters: str | None = None) -> list[int]:
        return self._encode(render_tail(options, letters))

    def query_budget(self, tail_len: int) -> int:
        """Tokens left for the query once the head and the tail are placed."""
        return self.max_length - len(self.head) - tail_len

    def encode(
        self, options: Sequence[Option], query: str, tail: list[int] | None = None, max_query: int | None = None
    ) -> tuple[list[int], bool]:
        """``(ids, truncated)``: head + query (cut to the budget, or to ``max_query`` tokens) + tail."""
        tail = self.tail_ids(options) if tail is None else tail
        budget = self.query_budget(len(tail))
        if budget < 1:
            raise ValueError(
                f"the router's prompt for {len(options)} domains takes {len(self.head) + len(tail)} tokens, "
                f"more than its context of {self.max_length}; shorten the descriptions or raise max_length"
            )
        q = self._encode(query)
        keep = budget if max_query is None else min(budget, max_query)
        return self.head + q[:keep] + tail, len(q) > budget


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (Llama/Mistral do, Qwen/GPT-2 do not)."""
    try:
        ids = tokenizer.encode("a", add_special_tokens=True)
    except Exception:
        return False
    return bool(ids) and ids[0] == tokenizer.bos_token_id
