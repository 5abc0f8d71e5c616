"""Generated tokens -> text a client may be sent now, cut at the first stop string; constant work per token.

Two parts, both linear in the output:

- ``tokenizers``' ``DecodeStream`` decodes one token at a time against a short window of the
  previous ones (re-decoding the whole output every token is quadratic in its length). A token
  that ends inside a multi-byte character yields nothing until the character completes.
- One KMP automaton per stop string reads each new character once. Its state is the longest prefix
  of the stop string that ends the text so far, so the text held back (it may yet become a stop
  string) is the largest state, and a stop string is found when a state reaches its length.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

log = logging.getLogger(__name__)

# tokenizers raises this when a window's text stops being a prefix of the longer window's text
# (non-monotonic decoders, e.g. byte fallback; vLLM issue 17448). The stream restarts from here.
INVALID_PREFIX = "Invalid prefix encountered"
MAX_PENDING = 16  # tokens without text (bytes that never form a character) before they are sent as they decode


def backend_of(tokenizer) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer; incremental decoding needs it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(
            f"{type(tokenizer).__name__} has no fast (tokenizers) backend: serving needs the model's tokenizer.json"
        )
    return backend


class StopMatcher:
    """KMP automaton of one stop string: ``feed(c)`` is True when the text read so far ends with it."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: longest proper prefix of stop[: i + 1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, c: str) -> bool:
        s, k = self.stop, self.state
        while k and c != s[k]:
            k = self.fail[k - 1]
        if c == s[k]:
            k += 1
        if k == len(s):
            self.state = self.fail[k - 1]
            return True
        self.state = k
        return False


class TextStream:
    """One request's output text: ``push(token)`` -> (new text safe to send, stopped); ``flush()`` at the end."""

    def __init__(self, backend: Tokenizer, stop: list[str]):
        self.backend = backend
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.pending: list[int] = []  # tokens pushed since the decoder last gave text
        self.matchers = [StopMatcher(s) for s in stop if s]
        self.held = ""  # decoded, not sent: the end of it may be the start of a stop string
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        return self._scan(self._decode(token))

    def flush(self) -> str:
        """Text still held back when the request ends (a partial stop string, an unfinished character)."""
        text = "" if self.stopped or not self.pending else self.backend.decode(self.pending, skip_special_tokens=True)
        self.pending = []
        delta, _ = self._scan(text)
        delta, self.held = delta + ("" if self.stopped else self.held), ""
        return delta

    def _decode(self, token: int) -> str:
        try:
            piece = self.decoder.step(self.backend, token)
        except Exception as e:
            if not str(e).startswith(INVALID_PREFIX):
                raise
            log.warning("incremental decoding lost its window (%s): restarting it", e)
            piece = self.backend.decode([*self.pending, token], skip_special_tokens=True)
            self.decoder, self.pending = DecodeStream(skip_special_tokens=True), []
            return piece
        if piece is not None:
            self.pending = []
            return piece
        self.pending.append(token)
        if len(self.pending) < MAX_PENDING:
            return ""
        # bounded work per token: a run of bytes that never forms a character is sent as it decodes
        piece = self.backend.decode(self.pending, skip_special_tokens=True)
        self.decoder, self.pending = DecodeStream(skip_special_tokens=True), []
        return piece

    def _scan(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.matchers:
            return text, False
        for i, c in enumerate(text):
            found = [m.stop for m in self.matchers if m.feed(c)]
            if found:
                buf = self.held + text[: i + 1]
                self.stopped, self.held = True, ""
                return buf[: len(buf) - max(map(len, found))], True  # the longest match starts first
        buf = self.held + text
        keep = max(m.state for m in self.matchers)  # the longest partial stop string ends the text
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False
