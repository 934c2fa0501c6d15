"""Stopping: when a row is done. Each row checks its own criteria after each of its tokens — its
EOS ids, its stop strings, its length budget — and leaves the batch when one is met.
"""

from __future__ import annotations

from typing import Sequence


def check_stop_strings(stop_strings) -> list[str]:
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not stop_strings or any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    return list(stop_strings)


class StopStrings:
    """One row's stop strings: done when its generated text contains one that ends inside the
    newest token.

    The text is decoded incrementally with the tokenizer's streaming decoder, so a stop string
    split across tokens — or ending in the middle of one — is found, as in transformers'
    StopStringCriteria. The stop string stays in the output, as there.
    """

    def __init__(self, stop_strings: Sequence[str], tokenizer):
        self.stop_strings = check_stop_strings(stop_strings)
        self.longest = max(len(s) for s in self.stop_strings)
        self.decoder = tokenizer.stream_decoder()
        self.text = ""

    def push(self, token: int) -> bool:
        before = len(self.text)
        self.text += self.decoder.push(token)
        # Only occurrences that end in the newly decoded text count.
        window = self.text[max(0, before - self.longest + 1):]
        return any(s in window for s in self.stop_strings)


class StopText:
    """A row's text as it streams in, cut where the first stop string begins: text that may
    still turn out to be the start of a stop string is held back until it is known not to be,
    so no part of a stop string is ever released (OpenAI's `stop`: the stop string is not part
    of the output). With `trim`, whitespace before a stop string is dropped too (and held back
    while it may precede one) — a chat reply cut at the template's end-of-turn text."""

    def __init__(self, stop_strings: Sequence[str], *, trim: bool = False):
        self.stop_strings = [s for s in stop_strings if s]
        self.trim = trim
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.text = ""  # all pushed so far
        self.shown = ""  # released: the output so far
        self.ended = False  # a stop string was found

    def push(self, chunk: str) -> str:
        """Add decoded text; return the part now safe to release."""
        if self.ended or not chunk:
            return ""
        self.text += chunk
        cuts = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            self.ended = True
            kept = self.text[:min(cuts)]
            return self._release(kept.rstrip() if self.trim else kept)
        # Hold back from the earliest place where (whitespace, with trim, and then) the start
        # of a stop string runs to the end of the text.
        hold = len(self.text)
        for start in range(len(self.text) - 1, len(self.shown) - 1, -1):
            tail = self.text[start:]
            rest = tail.lstrip() if self.trim else tail
            if (self.trim and not rest) or any(s.startswith(rest) for s in self.stop_strings):
                hold = start
            elif len(rest) > self.longest:
                break
        return self._release(self.text[:hold])

    def finish(self) -> str:
        """The row has ended without a stop string: release what was held back."""
        return "" if self.ended else self._release(self.text)

    def _release(self, upto: str) -> str:
        new, self.shown = upto[len(self.shown):], upto
        return new
