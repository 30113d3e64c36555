"""A reply's text as its tokens arrive, cut before the first stop string."""
from __future__ import annotations

from vispec.runtime.streaming import TextStreamer


class ReplyText:
    """Decodes tokens (``streaming.TextStreamer``) and releases text that is safe to send:
    held back while its end could begin a stop string; ``stopped`` once one appeared (the
    text ends before it)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False
        self.streamer = TextStreamer(tokenizer, self._write)

    def _write(self, piece: str) -> None:
        self.text += piece

    def feed(self, tokens: list[int]) -> str:
        """The new text to send after ``tokens``."""
        if not self.stopped:
            self.streamer(tokens)
        return self._release(final=False)

    def finish(self) -> str:
        """What is left to send once generation ended."""
        if not self.stopped:
            self.streamer.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _held(self) -> int:
        """Characters at the end that begin some stop string."""
        return max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
