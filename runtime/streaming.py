"""Text streaming: turn the token ids a generation emits pass by pass into text pieces."""
from __future__ import annotations

from typing import Callable


class TextStreamer:
    """An ``on_tokens`` callback that decodes the reply so far and hands ``write`` only
    the new text (held back while it ends in an incomplete UTF-8 sequence), e.g.::

        pipe.generate(prompt, on_tokens=TextStreamer(pipe.target.processor.tokenizer,
                                                      lambda s: print(s, end="", flush=True)))
    """

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.write = write
        self.tokens: list[int] = []
        self.text = ""  # what was written so far

    def __call__(self, new_tokens: list[int]) -> None:
        self.tokens.extend(new_tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return  # a multi-byte character is incomplete, or the prefix re-tokenised
        if len(text) > len(self.text):
            self.write(text[len(self.text):])
            self.text = text

    def flush(self) -> None:
        """Write whatever was held back (call after the generation ends)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.text) and len(text) > len(self.text):
            self.write(text[len(self.text):])
            self.text = text
