"""Token ids -> text, one token at a time, for streaming and stop strings.

`IncrementalDetokenizer` decodes a short window of recent tokens and hands
out only the new characters, holding back text that ends in U+FFFD (a UTF-8
character split across tokens) until the next token completes it.
`StopStringText` accumulates that text, finds the earliest stop string as soon
as it is complete, cuts the text before it, and while streaming holds back the
last (longest stop string - 1) characters, which might begin a stop string, so
stop text is never sent."""

from __future__ import annotations

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
