"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), batch > 1, exact in distribution.

Each round a small draft model proposes up to `num_draft_tokens` tokens per row, one at a time
with its own KV cache, and the target scores all of them in ONE forward pass. Greedy: a row keeps
the longest prefix of drafts equal to the target's argmax, then the target's own token. Sampling:
draft x is accepted with probability min(1, p(x)/q(x)); on the first rejection the row takes a
token from norm(max(0, p - q)), and if every draft is accepted it takes one more token from p.
p and q are the target's and the draft's *processed* distributions (the same processors and
warpers for both), so the output is distributed exactly as sampling from the target alone.

Batches: rows accept different numbers of drafts, so their sequences grow raggedly; each row
keeps its own length in both KV caches, and after a round each cache row is rolled back to what
that row kept (`cache.truncate` per row). Drafted tokens past a row's budget are fed as padding
(no position of their own, attended by nothing), so they can never be kept. With one row this
is gpt-fast's algorithm.

Invariant at the start of a round, for every row: all committed tokens but the last are in both
caches; the last one (the "pending" token; at first the prompt's last token) is fed this round.

The acceptance step is the pure function `accept_or_resample`, with `acceptance_probability` and
`residual_distribution` as its two halves, so its exactness can be checked by enumeration.
"""

from __future__ import annotations

import torch

from lmlab.generation.config import GenerationConfig
from lmlab.generation.engine import ModelRunner
from lmlab.generation.protocol import check_decoder, follow_model, model_device
from lmlab.generation.processors import apply_processors
from lmlab.generation.sampling import TokenSampler


def speculative_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    num_draft_tokens: int = 4,
    stats: dict | None = None,
    cpu_kernels: bool = True,
) -> torch.Tensor:
    """Prompt + new tokens (B, prompt_len + n), padded after EOS like greedy `generate`.

    `draft` must share the target's vocabulary. `stats`, when given, is filled with `proposed`
    (drafts that could have been kept), `accepted`, `acceptance_rate` and `target_calls` (the
    target's forward passes, prompt included).
    """
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    _validate(target, draft, input_ids, config, attention_mask, num_draft_tokens)
    input_ids, attention_mask = follow_model(target, input_ids, attention_mask)
    if config.num_return_sequences > 1:  # sampled: each prompt repeated, as generate() does
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    new_tokens = config.budget(input_ids.shape[1], model=target, name="target")
    config.budget(input_ids.shape[1], model=draft, name="draft")
    counts = {"proposed": 0, "accepted": 0, "target_calls": 0}
    if new_tokens == 0:
        out = input_ids
    else:
        with torch.inference_mode():
            decoder = _Decoder(target, draft, input_ids, attention_mask, config, new_tokens,
                               num_draft_tokens, counts, cpu_kernels)
            while decoder.round():
                pass
            out = decoder.output()
    if stats is not None:
        stats.clear()
        stats.update(counts)
        proposed = counts["proposed"]
        stats["acceptance_rate"] = counts["accepted"] / proposed if proposed else 0.0
    return out


def _validate(target, draft, input_ids, config, attention_mask, num_draft_tokens) -> None:
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) \
            or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
    check_decoder(target, role="target model")
    check_decoder(draft, role="draft model")
    vocab = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (target, draft)]
    if None not in vocab and vocab[0] != vocab[1]:
        raise ValueError(_vocab_message(*vocab))
    if model_device(target) != model_device(draft):
        raise ValueError(f"the draft model is on {model_device(draft)} and the target on "
                         f"{model_device(target)}: move both to one device")
    if config.num_beams > 1:
        raise ValueError("speculative decoding does not combine with num_beams > 1; "
                         "pass num_beams=1 or drop the draft model")
    if config.stop_strings:
        raise ValueError("stop_strings are not supported with speculative decoding; "
                         "use eos_token_id or drop the draft model")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: only left padding is supported; the last prompt "
                             "token of every row must be real (mask 1)")


def _vocab_message(target_vocab: int, draft_vocab: int) -> str:
    return (f"the draft model's vocab_size ({draft_vocab}) must equal the target's "
            f"({target_vocab}): their distributions are compared token by token; use a draft "
            "trained with the target's tokenizer")


# -- the acceptance step: pure functions of the two distributions -----------------------------
def acceptance_probability(
    p: torch.Tensor, q: torch.Tensor, draft_token: torch.Tensor
) -> torch.Tensor:
    """min(1, p(x) / q(x)) per row for the drafted x; p, q are (B, V) probabilities, x (B,).
    (1 where q(x) = 0: the draft never proposes such an x, so the value is never used.)"""
    p_x = p.gather(-1, draft_token[:, None]).squeeze(-1)
    q_x = q.gather(-1, draft_token[:, None]).squeeze(-1)
    return torch.where(q_x > 0, (p_x / q_x).clamp(max=1.0), torch.ones_like(p_x))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row: what a rejection samples from. Where p <= q everywhere
    (p == q up to rounding) rejection has probability ~0; p itself keeps the result a
    distribution."""
    residual = (p - q).clamp(min=0.0)
    total = residual.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(p.dtype).tiny), p)


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, draft_token: torch.Tensor, *, sampler: TokenSampler
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted (B,) bool, token (B,)): the draft token if accepted, else a draw from the
    residual. `sampler` (do_sample=True) supplies the randomness: its per-row generators when
    seeded, torch's global RNG otherwise.

    Exact: P(out = y) = q(y)·min(1, p(y)/q(y)) + (Σ_x q(x)·(1 - min(1, p(x)/q(x))))·residual(y)
    = min(q(y), p(y)) + (p(y) - min(q(y), p(y))) = p(y)."""
    accept_prob = acceptance_probability(p, q, draft_token)
    uniform = sampler.uniform(len(p), device=p.device, dtype=p.dtype)
    accepted = uniform < accept_prob  # uniform is in [0, 1): probability 1 always accepts
    resampled = sampler(residual_distribution(p, q).log())  # softmax(log r) = r
    return accepted, torch.where(accepted, draft_token, resampled)


# -- the decoding loop ------------------------------------------------------------------------
class _Decoder:
    """State of one speculative decode; `round()` runs draft → verify → commit once."""

    def __init__(self, target, draft, input_ids, attention_mask, config, new_tokens, k, counts,
                 cpu_kernels):
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        self.k, self.counts = k, counts
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        self.do_sample = config.do_sample
        self.processors = config.logits_processors(prompt_len=prompt_len,
                                                   attention_mask=attention_mask)
        self.sampler = TokenSampler.seeded(do_sample=config.do_sample, seed=config.seed,
                                           batch_size=batch, device=device)
        self.pad = config.pad_id
        self.eos = torch.tensor(config.eos_token_id, dtype=torch.long, device=device)
        # Room for drafts beyond a row's committed tokens, so processors can see them.
        total = prompt_len + new_tokens + k + 1
        self.sequence = torch.full((batch, total), self.pad, dtype=torch.long, device=device)
        self.sequence[:, :prompt_len] = input_ids
        self.lengths = torch.full((batch,), prompt_len, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        # Two caches even when draft is target (then the acceptance rate must be 100%).
        self.target = ModelRunner(target, rows=batch, max_len=total, cpu_kernels=cpu_kernels,
                                  role="target model")
        self.draft = ModelRunner(draft, rows=batch, max_len=total, cpu_kernels=cpu_kernels,
                                 role="draft model")
        if prompt_len > 1:
            mask = None if attention_mask is None else attention_mask[:, :-1]
            for runner in (self.target, self.draft):
                runner.forward(input_ids[:, :-1], attention_mask=mask, last_only=True)
            counts["target_calls"] += 1

    def _process(self, scores: torch.Tensor, offset: int, active: torch.Tensor) -> torch.Tensor:
        """Processed scores of the token `offset` places after each row's pending one: each row's
        processors see its own sequence so far. Rows of equal length share one call; each call
        gets the whole batch, so a processor with per-row state (B,) still lines up."""
        if not self.processors:
            return scores
        out = scores.clone()
        for length in self.lengths[active].unique().tolist():
            rows = active & (self.lengths == length)
            processed = apply_processors(self.processors, self.sequence[:, : length + offset],
                                         scores)
            out[rows] = processed[rows]
        return out

    def round(self) -> bool:
        """One draft → verify → commit round; False once every row is done."""
        active = ~self.finished
        if not bool(active.any()):
            return False
        remaining = self.prompt_len + self.new_tokens - self.lengths
        # With m tokens left, m - 1 drafts + the target's own token can finish the row.
        k = min(self.k, int(remaining[active].max()) - 1)
        batch, device = len(self.lengths), self.sequence.device
        block = torch.empty(batch, k + 1, dtype=torch.long, device=device)
        block[:, 0] = self.sequence.gather(1, (self.lengths - 1)[:, None]).squeeze(1)
        # Tokens past a row's budget (and every token of a finished row) go in as padding.
        real = (torch.arange(k + 1, device=device)[None] < remaining[:, None]) & active[:, None]
        real = real.long()
        draft_scores = []
        for i in range(k):
            logits = self.draft.forward(block[:, i:i + 1], attention_mask=real[:, i:i + 1])
            draft_scores.append(self._process(logits[:, -1].float(), i, active))
            block[:, i + 1] = self.sampler(draft_scores[-1])
            self.sequence.scatter_(1, (self.lengths + i)[:, None], block[:, i + 1 : i + 2])
        logits = self.target.forward(block, attention_mask=real).float()
        self.counts["target_calls"] += 1
        if draft_scores and draft_scores[0].shape[-1] != logits.shape[-1]:
            raise ValueError(_vocab_message(logits.shape[-1], draft_scores[0].shape[-1]))
        target_scores = [self._process(logits[:, i], i, active) for i in range(k + 1)]
        kept, commit = self._verify(block, draft_scores, target_scores)
        self._commit(block, real, kept, commit, remaining, active, k)
        return bool((~self.finished).any())

    def _verify(self, block, draft_scores, target_scores):
        """(kept drafts per row (B,), commit (B, k + 1)): the first kept + 1 tokens of commit are
        the row's new tokens — its kept drafts, then the correction or the bonus token."""
        k = len(draft_scores)
        accepted, corrections = [], []
        for i in range(k):
            if self.do_sample:
                p, q = target_scores[i].softmax(-1), draft_scores[i].softmax(-1)
                ok, token = accept_or_resample(p, q, block[:, i + 1], sampler=self.sampler)
            else:
                token = target_scores[i].argmax(-1)
                ok = block[:, i + 1] == token
            accepted.append(ok)
            corrections.append(token)
        bonus = self.sampler(target_scores[k])  # used only when every draft is accepted
        if k:
            kept = torch.stack(accepted, dim=1).long().cumprod(dim=1).sum(dim=1)
        else:
            kept = torch.zeros_like(bonus)
        commit = torch.cat([block[:, 1:], bonus[:, None]], dim=1)
        fix = torch.stack(corrections + [bonus], dim=1).gather(1, kept[:, None])
        commit.scatter_(1, kept[:, None], fix)
        return kept, commit

    def _commit(self, block, real, kept, commit, remaining, active, k) -> None:
        batch, device = len(kept), kept.device
        steps = torch.arange(k + 1, device=device)
        count = torch.minimum(kept + 1, remaining)  # never past the row's budget
        hits = torch.isin(commit, self.eos) & (steps[None] < count[:, None])
        stopped = hits.any(dim=1)
        count = torch.where(stopped, hits.long().argmax(dim=1) + 1, count)  # up to its first EOS
        count = torch.where(active, count, torch.zeros_like(count))
        # Drafts that could have been kept: up to the budget and up to a kept EOS.
        proposed = torch.minimum(torch.minimum(remaining, torch.full_like(kept, k)),
                                 torch.where(stopped, count, remaining))
        self.counts["proposed"] += int(proposed[active].sum())
        self.counts["accepted"] += int(torch.minimum(kept, proposed)[active].sum())

        write = steps[None] < count[:, None]
        rows = torch.arange(batch, device=device)[:, None].expand(-1, k + 1)
        cols = self.lengths[:, None] + steps[None]
        self.sequence[rows[write], cols[write]] = commit[write]
        before = self.lengths - 1  # each row's cache length at the start of the round
        self.lengths += count
        self.finished |= stopped | (self.lengths - self.prompt_len >= self.new_tokens)

        running = ~self.finished
        if not bool(running.any()):
            return
        # Each cache row keeps the round's pending token and the drafts its row kept; the new
        # pending token (the correction or bonus) is fed next round. Rows that are done keep
        # what they have: they are fed padding from now on.
        keep = torch.where(running, before + kept + 1, before + real.sum(-1)).tolist()
        self.target.cache.truncate(keep)
        if bool((running & (kept == k)).any()):  # the draft has not seen its last draft yet
            self.draft.forward(block[:, k:], attention_mask=real[:, k:])
        self.draft.cache.truncate([min(n, c) for n, c in zip(keep, self.draft.cache.lengths)])

    def output(self) -> torch.Tensor:
        width = int(self.lengths.max())
        out = self.sequence[:, :width].clone()
        beyond = torch.arange(width, device=out.device)[None] >= self.lengths[:, None]
        return out.masked_fill(beyond, self.pad)
