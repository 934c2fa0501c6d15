"""One request's choices as they decode, and OpenAI's response bodies built from them.

`Generation` reads the tokens the engine's thread hands a request (lmlab.serving.scheduler),
keeps each choice's text — cut before its first stop string, a partial stop string held back
until it is known not to be one (lmlab.generation.stopping.StopText) — its tokens, log-probs
and finish reason, and yields what each step added: what a stream sends as a chunk, what a
plain response sums up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lmlab.generation.stopping import StopText
from lmlab.serving.scheduler import EngineLoop, Job, Token
from lmlab.serving.schemas import APIError


@dataclass
class Choice:
    """One choice of a response: its text so far and how it ended."""

    index: int
    stop_text: StopText
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return self.stop_text.shown


@dataclass
class Delta:
    """What one step added to one choice."""

    choice: Choice
    text: str
    tokens: list[Token]
    finish_reason: str | None = None


class Generation:
    """The choices of one request's jobs (choice i of job j is `first_choice + i`), filled
    from their shared queue. `finished` choices (max_tokens 0) need no job."""

    def __init__(self, loop: EngineLoop, jobs: list[Job], out: asyncio.Queue,
                 choices: list[Choice]):
        self.loop, self.jobs, self.out, self.choices = loop, jobs, out, choices

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """Each step's additions, until every choice has finished. Leaving early (the client
        went away, or the caller stopped reading) cancels what is still decoding."""
        try:
            while any(c.finish_reason is None for c in self.choices):
                item = await self.out.get()
                if isinstance(item, Exception):
                    status = 400 if isinstance(item, ValueError) else 500
                    raise APIError(status, f"decoding failed: {item}")
                deltas = [d for d in (self._apply(token) for token in item) if d is not None]
                if deltas:
                    yield deltas
        finally:
            # Rows still decoding (their client left, or their text hit a stop string the
            # engine's own check has not seen yet) leave the batch at the next step.
            if any(not job.cancelled for job in self.jobs):
                self.loop.cancel([job for job in self.jobs if not job.cancelled])

    def _apply(self, token: Token) -> Delta | None:
        choice = self.choices[token.choice]
        if choice.finish_reason is not None:
            return None
        choice.tokens.append(token.token)
        if token.logprob is not None:
            choice.logprobs.append((token.logprob, token.top_logprobs or []))
        text = choice.stop_text.push(token.text)
        finish = token.finish_reason
        if choice.stop_text.ended:
            finish = "stop"
        elif finish is not None:
            text += choice.stop_text.finish()
        if finish is not None:
            choice.finish_reason = "stop" if finish == "stop" else "length"
        return Delta(choice=choice, text=text, tokens=[token], finish_reason=choice.finish_reason)

    async def run(self) -> None:
        """Decode to the end (a response that is not streamed)."""
        async for _ in self.deltas():
            pass


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, tokens: list[int],
                        entries: list[tuple[float | None, list[tuple[int, float]] | None]],
                        *, offset: int = 0) -> dict:
    """The legacy completions' logprobs object: tokens, token_logprobs, top_logprobs (a
    {token: log-prob} mapping per position), text_offset (from `offset`)."""
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts,
            "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [None if top is None else
                             {token_text(tokenizer, t): v for t, v in top}
                             for _, top in entries],
            "text_offset": offsets}


def chat_logprobs(tokenizer, tokens: list[int],
                  entries: list[tuple[float, list[tuple[int, float]]]]) -> dict:
    """The chat completions' logprobs object: {"content": [{token, logprob, bytes,
    top_logprobs}], "refusal": None}."""
    def entry(token, logprob):
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**entry(t, lp), "top_logprobs": [entry(tt, tlp) for tt, tlp in top]}
               for t, (lp, top) in zip(tokens, entries)]
    return {"content": content, "refusal": None}
