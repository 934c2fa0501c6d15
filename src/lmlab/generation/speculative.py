"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), batch > 1, exact in distribution.

Each round a small draft model proposes up to `num_draft_tokens` tokens per row, one at a time
with its own KV cache, and the target scores all of them in ONE forward pass. Greedy: a row keeps
the longest prefix of drafts equal to the target's argmax, then the target's own token. Sampling:
draft x is accepted with probability min(1, p(x)/q(x)); on the first rejection the row takes a
token from norm(max(0, p - q)), and if every draft is accepted it takes one more token from p.
p and q are the target's and the draft's *processed* distributions (the same processors and
warpers for both), so the output is distributed exactly as sampling from the target alone.

Batches: rows accept different numbers of drafts, so their sequences grow raggedly. We keep ONE
cache length ("slots") shared by all rows and mark the slots a row did not keep as holes, exactly
as left padding is marked: `slots` is a (B, max_len) 0/1 mask passed as the attention mask, and
each row's positions are counted over its real slots only (`n_real`). After a round the caches
are rolled back (`cache.truncate`) to the furthest slot any still-running row kept; a row that
kept fewer drafts gets holes for the rest of the round's slots. With one row there are never
holes, so this is gpt-fast's algorithm; with B rows the caches may hold up to min(B, k + 1) slots
per new token (memory and attention length traded for simplicity: nothing is recomputed and no
row waits for another). The prompt's left padding is the same mechanism, so it needs no extra code.

Invariant at the start of a round, for every row: all committed tokens but the last are in both
caches; the last one (the "pending" token; at first the prompt's last token) is fed this round.

The acceptance step is the pure function `accept_or_resample`, with `acceptance_probability` and
`residual_distribution` as its two halves, so its exactness can be checked by enumeration.
"""

from __future__ import annotations

import torch

from lmlab.generation.config import GenerationConfig
from lmlab.generation.decode import TokenSampler, prefill
from lmlab.generation.processors import apply_processors


def speculative_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    num_draft_tokens: int = 4,
    stats: dict | None = None,
) -> torch.Tensor:
    """Prompt + new tokens (B, prompt_len + n), padded after EOS like greedy `generate`.

    `draft` must share the target's vocabulary. `stats`, when given, is filled with `proposed`
    (drafts that could have been kept), `accepted`, `acceptance_rate` and `target_calls` (the
    target's forward passes, prompt included).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    _validate(target, draft, input_ids, config, attention_mask, num_draft_tokens)
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
                               num_draft_tokens, counts)
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
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(
            f"the draft model's vocab_size ({draft.config.vocab_size}) must equal the target's "
            f"({target.config.vocab_size}): their distributions are compared token by token; "
            "use a draft trained with the target's tokenizer"
        )
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
    if sampler.generators is None:
        uniform = torch.rand(len(p), device=p.device, dtype=p.dtype)
    else:
        uniform = torch.cat([torch.rand(1, generator=g, device=p.device, dtype=p.dtype)
                             for g in sampler.generators])
    accepted = uniform < accept_prob  # uniform is in [0, 1): probability 1 always accepts
    resampled = sampler(residual_distribution(p, q).log())  # softmax(log r) = r
    return accepted, torch.where(accepted, draft_token, resampled)


# -- the decoding loop ------------------------------------------------------------------------
class _Decoder:
    """State of one speculative decode; `round()` runs draft → verify → commit once."""

    def __init__(self, target, draft, input_ids, attention_mask, config, new_tokens, k, counts):
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        self.target, self.draft, self.k, self.counts = target, draft, k, counts
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        self.do_sample = config.do_sample
        self.processors = config.logits_processors(prompt_len=prompt_len,
                                                   attention_mask=attention_mask)
        self.sampler = TokenSampler(do_sample=config.do_sample, seed=config.seed,
                                    batch_size=batch, device=device)
        self.pad = config.pad_id
        self.eos = torch.tensor(config.eos_token_id, dtype=torch.long, device=device)
        # Room for drafts beyond a row's committed tokens, so processors can see them.
        self.sequence = torch.full((batch, prompt_len + new_tokens + k + 1), self.pad,
                                   dtype=torch.long, device=device)
        self.sequence[:, :prompt_len] = input_ids
        self.lengths = torch.full((batch,), prompt_len, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        # Each round adds at most k + 1 slots and at most the furthest row's progress (<= the
        # sum over rows), hence min(B, k + 1) slots per new token; + k + 1 for the last round.
        max_len = prompt_len + min(batch, k + 1) * new_tokens + k + 1
        self.slots = torch.ones(batch, max_len, dtype=torch.long, device=device)
        if attention_mask is not None:
            self.slots[:, :prompt_len] = attention_mask
        self.n_real = self.slots[:, : prompt_len - 1].sum(dim=-1)  # = the pending position
        self.length = prompt_len - 1  # slots in both caches
        # Two caches even when draft is target (then the acceptance rate must be 100%).
        self.target_cache = target.new_cache(batch, max_len)
        self.draft_cache = draft.new_cache(batch, max_len)
        if prompt_len > 1:
            for model, cache in ((target, self.target_cache), (draft, self.draft_cache)):
                prefill(model, input_ids[:, :-1], cache, self.slots[:, : prompt_len - 1])
            counts["target_calls"] += 1

    def _forward(self, model, cache, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        """Logits (B, T, V) of tokens fed at slot `self.length + offset` of the cache."""
        assert cache.length == self.length + offset
        T = tokens.shape[1]
        positions = self.n_real[:, None] + offset + torch.arange(T, device=tokens.device)
        # Positions past a row's budget only occur for drafts that row can never keep.
        positions = positions.clamp(max=model.config.n_positions - 1)
        mask = self.slots[:, : cache.length + T]
        return model(tokens, positions=positions, cache=cache, attention_mask=mask).float()

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
        start, batch = self.length, len(self.lengths)
        self.slots[:, start : start + k + 1] = 1
        block = torch.empty(batch, k + 1, dtype=torch.long, device=self.sequence.device)
        block[:, 0] = self.sequence.gather(1, (self.lengths - 1)[:, None]).squeeze(1)
        draft_scores = []
        for i in range(k):
            logits = self._forward(self.draft, self.draft_cache, block[:, i : i + 1], i)[:, -1]
            draft_scores.append(self._process(logits, i, active))
            block[:, i + 1] = self.sampler(draft_scores[-1])
            self.sequence.scatter_(1, (self.lengths + i)[:, None], block[:, i + 1 : i + 2])
        logits = self._forward(self.target, self.target_cache, block, 0)
        self.counts["target_calls"] += 1
        target_scores = [self._process(logits[:, i], i, active) for i in range(k + 1)]
        kept, commit = self._verify(block, draft_scores, target_scores)
        self._commit(block, kept, commit, remaining, active, k)
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

    def _commit(self, block, kept, commit, remaining, active, k) -> None:
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
        self.lengths += count
        self.finished |= stopped | (self.lengths - self.prompt_len >= self.new_tokens)

        running = ~self.finished
        if not bool(running.any()):
            return
        # Roll both caches back to the furthest slot a running row kept: its pending token,
        # then its kept drafts. Shorter rows get holes for the rest.
        grow = int(kept[running].max()) + 1
        start = self.length
        holes = (steps[None, :grow] > kept[:, None]) & running[:, None]
        self.slots[:, start : start + grow][holes] = 0
        self.target_cache.truncate(start + grow)
        if grow == k + 1:  # some row kept every draft: the draft has not seen the last one yet
            self._forward(self.draft, self.draft_cache, block[:, k:], k)
        else:
            self.draft_cache.truncate(start + grow)
        self.n_real += torch.where(running, kept + 1, torch.zeros_like(kept))
        self.length = start + grow

    def output(self) -> torch.Tensor:
        width = int(self.lengths.max())
        out = self.sequence[:, :width].clone()
        beyond = torch.arange(width, device=out.device)[None] >= self.lengths[:, None]
        return out.masked_fill(beyond, self.pad)
