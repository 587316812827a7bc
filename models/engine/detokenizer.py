"""Text of a growing token sequence in O(new tokens) per step (decoding all of it every step is quadratic).

Each step decodes a short window: the tokens not yet turned into text plus the few before them,
and takes what the window adds beyond the text of those few. Decoding with a little context
keeps what joins tokens (spaces between word-level tokens, a byte-level BPE's bytes) right.
Text that ends in U+FFFD (an incomplete UTF-8 character: its last bytes are in tokens still to
come) is held back until the character is complete, or until ``flush`` at the end, when a full
decode would show U+FFFD too.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix = 0  # window start: tokens before ``_read`` kept as context
        self._read = 0  # tokens whose text has been returned

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def _delta(self, final: bool) -> str:
        before = self._decode(self.tokens[self._prefix : self._read])
        window = self._decode(self.tokens[self._prefix :])
        if len(window) <= len(before) or (window.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return window[len(before) :]

    def push(self, new_tokens: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self.tokens.extend(new_tokens)
        return self._delta(final=False) if new_tokens else ""

    def flush(self) -> str:
        """The text still held back (at the end of the sequence)."""
        return self._delta(final=True) if self._read < len(self.tokens) else ""
