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
