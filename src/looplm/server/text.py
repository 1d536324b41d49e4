"""Text of one choice as its tokens come: stop tokens dropped, split characters and possible starts of a
stop string held back, the text cut where a stop string begins (OpenAI leaves the stop string out)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], *, stop: Sequence[str] = (),
                 stop_ids: Sequence[int] = ()):
        self.decode, self.stop, self.stop_ids = decode, list(stop), set(stop_ids)
        self.tokens: list[int] = []  # text tokens so far (stop tokens dropped)
        self.text = ""  # the text sent so far
        self.stopped = False  # a stop string was found: the choice is over

    def add(self, tokens: Sequence[int]) -> str:
        """The text these new tokens make safe to send ("" while held back)."""
        if self.stopped:
            return ""
        self.tokens.extend(t for t in tokens if t not in self.stop_ids)
        full = self.decode(self.tokens)
        cut = min((k for s in self.stop if (k := full.find(s)) != -1), default=-1)
        if cut != -1:
            self.stopped = True
            return self._send(full[:cut])
        safe = len(full.rstrip("\ufffd"))  # a character whose bytes are not all here yet
        for s in self.stop:  # the longest tail of the text that could start a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._send(full[:safe])

    def finish(self) -> str:
        """What was held back, at the end of the choice."""
        return "" if self.stopped else self._send(self.decode(self.tokens))

    def _send(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        new, self.text = upto[len(self.text):], upto
        return new
