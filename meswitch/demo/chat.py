"""The corpora as conversations, for experts of a pretrained chat model (the real family).

Each document becomes one user turn and one assistant reply in the base's own chat template, so a
fine-tuned expert answers questions of its domain. Two domains carry a checkable task on held-out
documents: math (the final number of the reply) and code (the exact next line of a function).
"""

from __future__ import annotations

import hashlib
import random
import re

from meswitch.demo.corpora import Doc
from meswitch.evaluation.metrics import FINAL_NUMBER, NEXT_LINE

CHAT_TASKS = {"math": FINAL_NUMBER, "code": NEXT_LINE}

_EN_TOPICS = {"work", "science", "art", "wisdom", "literature", "law", "education", "food", "love", "sports",
              "medicine", "pets", "news", "magic", "people", "kids"}  # fmt: skip
_EN_OTHER = ("Tell me a fortune.", "Share a witty saying.", "Tell me something funny.", "Give me a quotation.")
_ZH_SAYING = ("请说一句中国格言。", "给我讲一句有道理的中文名言。", "请分享一句中文俗语。")


def _rng(domain: str, doc: Doc) -> random.Random:
    """A per-document generator: the same document always becomes the same conversation."""
    return random.Random(hashlib.sha256(f"{domain}\0{doc['text']}".encode()).hexdigest())


def _zh_field(value: str, label: str) -> str:
    value = value.removeprefix(label).lstrip("《").rstrip("》")
    return re.sub(r"（.*?）", "", value).strip()


def user_turn(domain: str, doc: Doc) -> str:
    """What a user asks to which ``doc`` is the expert's answer."""
    rng = _rng(domain, doc)
    if domain == "math":
        return doc["question"]
    if domain == "code":
        module, name = doc.get("module", ""), doc.get("name", "")
        if doc.get("kind") == "module" or not name:
            return f"Write the opening of the Python module `{module}`: its docstring and imports."
        what = f"Write the Python {doc.get('kind', 'function')} `{name}` of the standard library's `{module}` module."
        summary = (doc.get("doc") or "").rstrip(".")
        return f"{what} It should: {summary[:1].lower() + summary[1:]}." if summary else what
    if domain == "chinese":
        if doc.get("title") and doc.get("author"):
            return f"请背诵{_zh_field(doc['author'], '作者:')}的《{_zh_field(doc['title'], '题目:')}》。"
        return rng.choice(_ZH_SAYING)
    if domain == "english":
        topic = doc.get("topic", "")
        return f"Tell me a quotation about {topic}." if topic in _EN_TOPICS else rng.choice(_EN_OTHER)
    if domain == "definitions":
        return f'What does the word "{doc["word"]}" mean?'
    raise ValueError(f"unknown domain {domain!r}")


def assistant_turn(domain: str, doc: Doc) -> str:
    """The expert's reply: the document itself, fenced for code, worked and concluded for math."""
    if domain == "math":
        return f"{doc['working']} The answer is {doc['answer']}."
    if domain == "code":
        return f"```python\n{doc['text']}\n```"
    return doc["text"]


def render(tokenizer, domain: str, doc: Doc) -> str:
    """The whole conversation in the tokenizer's chat template: the text experts train and are scored on."""
    messages = [
        {"role": "user", "content": user_turn(domain, doc)},
        {"role": "assistant", "content": assistant_turn(domain, doc)},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def scored_text(tokenizer, domain: str, doc: Doc) -> tuple[str, int]:
    """The conversation and the character offset where the reply starts (what an expert is scored and
    trained on; the template and the user turn are only read)."""
    text, head = render(tokenizer, domain, doc), prompt(tokenizer, domain, doc)
    if not text.startswith(head):
        raise ValueError("the chat template renders the prompt differently from the conversation's start")
    return text, len(head)


def prompt(tokenizer, domain: str, doc: Doc) -> str:
    """The conversation up to where the assistant starts answering."""
    messages = [{"role": "user", "content": user_turn(domain, doc)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def task(tokenizer, domain: str, doc: Doc) -> dict | None:
    """``{prompt, answer, metric}`` of ``doc``'s task, or None (no task in the domain, or too short a function).

    Code: the reply cut after the first half of the function's lines; the answer is the next non-empty line.
    """
    if domain == "math":
        return {"prompt": prompt(tokenizer, domain, doc), "answer": doc["answer"], "metric": FINAL_NUMBER}
    if domain == "code":
        lines = doc["text"].split("\n")
        body = [i for i, line in enumerate(lines) if line.strip()]
        if len(body) < 4:
            return None
        cut = body[len(body) // 2]
        # The prompt stops at the end of a line, before its newline: BPE merges a newline with the next line's
        # indentation, so a prompt ending in a bare newline would force a split the model never saw.
        head = "\n".join(lines[:cut]).rstrip("\n")
        return {
            "prompt": prompt(tokenizer, domain, doc) + "```python\n" + head,
            "answer": lines[cut],
            "metric": NEXT_LINE,
        }
    return None
