"""Token ids -> text, one token at a time, for streaming and stop strings.

`IncrementalDetokenizer` decodes a short window of recent tokens and hands
out only the new characters, holding back text that ends in U+FFFD (a UTF-8
character split across tokens) until the next token completes it.
`StopStringText` accumulates that text, finds the earliest stop string as soon
as it is complete, cuts the text before it, and while streaming holds back the
last (longest stop string - 1) characters, which might begin a stop string, so
stop text is never sent. `token_bytes`: the bytes of one token (chat logprobs)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

# prompt tokens decoded with the first generated ones, so that e.g. a leading
# space or a merged byte sequence decodes as it does in context
CONTEXT_TOKENS = 6
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = len(self.ids)  # window start: decoded text before `read_offset` is already out
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """The new text that `token_id` completes (may be "")."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back, even an incomplete character (end of output)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) <= len(before) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(before) :]


class StopStringText:
    """The text of one choice with stop strings applied."""

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters already released by `take`

    def add(self, piece: str) -> bool:
        """Append `piece`; True when a stop string is now complete (the text
        is then cut right before it)."""
        if not self.stop or not piece:
            self.text += piece
            return False
        start = max(0, len(self.text) - self.hold)  # a new match must end inside `piece`
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def take(self, final: bool) -> str:
        """Text not yet released; while not final, keep back what might begin a stop string."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The UTF-8 bytes a token stands for (OpenAI's `bytes` in chat logprobs):
    exact for byte-level BPE tokenizers, whose tokens may hold part of a
    character; otherwise the bytes of the token's decoded text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
        table = _byte_level_decoder()
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
    return list(tokenizer.decode([token_id]).encode("utf-8"))
