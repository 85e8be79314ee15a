"""Generated token ids to the text a client sees: incremental, whole characters, cut at stop strings."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Decodes generated ids incrementally into text deltas, and finds stop strings as the text grows.

    Text is released only once its bytes form whole characters (a multi-byte character may span
    tokens), and each new piece is decoded together with the token before it, so tokenizers that drop a
    leading space at the start of a decode still space correctly. Stop strings are looked for only in the
    new text and the `len(longest stop) - 1` characters before it (a stop found earlier would have ended
    the answer), and that many characters are held back until the end: no delta ever shows text the final
    answer does not contain. `stopped` turns True at the token that completes a stop string; the text is
    cut before it, and later tokens are ignored.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it releases (often "", never a partial character). Tokens
        after a stop string are ignored."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._grow(now[len(before) :])
            self._prefix, self._read = self._read, len(self._ids)
        if self.stopped:
            return self._release(len(self.text))
        return self._release(len(self.text) - self._hold)

    def finish(self) -> str:
        """The rest of the text, cut at the first stop string (an incomplete last character is kept
        as the tokenizer decodes it)."""
        if not self.stopped:
            before = self._decode(self._ids[self._prefix : self._read])
            self._grow(self._decode(self._ids[self._prefix :])[len(before) :])
            self._prefix = self._read = len(self._ids)
        return self._release(len(self.text))

    def _grow(self, piece: str) -> None:
        """Append ``piece``; cut the text at the earliest stop string that ends inside it."""
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        cut = min((i for i in (self.text.find(s, start) for s in self._stop) if i >= 0), default=None)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta, self._sent = self.text[self._sent : upto], upto
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
