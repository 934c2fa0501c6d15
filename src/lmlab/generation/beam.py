"""Beam search (and beam sampling), token-identical to transformers' vectorised `_beam_search`.

transformers 5.x keeps, per prompt, `num_beams` running beams and the `num_beams` best finished
hypotheses, all in fixed-shape tensors; each step it
  1. adds each running beam's summed log-probability to the log_softmax of its next-token logits
     (after the logits processors), and takes the top K = max(2, 1 + #eos) · num_beams candidates
     over beams × vocabulary (with do_sample: draws K without replacement from their softmax);
  2. continues with the best `num_beams` candidates that hit no stopping criterion (EOS, length);
  3. offers the candidates that did hit one — only those ranked in the first `num_beams` — to the
     finished set, scored sum_logprobs / new_len ** length_penalty, where new_len counts the
     generated tokens including the EOS and *excludes the prompt* (padding included in it);
  4. stops when no prompt can still improve (the early-stopping heuristic below), when every
     prompt has `num_beams` finished hypotheses and early_stopping is True, or when every
     candidate hit a stopping criterion (the length budget).
We mirror it op for op — the same topk calls on the same shapes, the same -1e9 offsets added in
the same order — so that ties and float rounding break the same way. Where transformers tracks
per-step beam indices, we keep only what its output needs: each hypothesis's generated length.

The search runs on the decoding engine (lmlab.generation.engine) as one group of B · num_beams
rows: the prompts are prefilled on B rows and copied to their beams, and each step the engine
copies the cache rows of the surviving beams onto the rows that continue them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.generation.config import GenerationConfig
from lmlab.generation.sampling import TokenSampler, sample_from

# transformers' "impossible" score. It is added (not assigned), so scores stay ordered beneath it.
NEG = -1.0e9


class BeamState:
    """Running beams and finished hypotheses of B prompts, as transformers keeps them:
    running (B, nb, total) sequences with summed log-probs; the nb best finished ones with their
    length-normalised scores, sorted best first."""

    def __init__(self, input_ids: torch.Tensor, config: GenerationConfig, *, total: int):
        batch, prompt_len = input_ids.shape
        nb, device = config.num_beams, input_ids.device
        self.batch, self.num_beams, self.prompt_len, self.max_length = batch, nb, prompt_len, total
        self.length_penalty = config.length_penalty
        self.early_stopping = config.early_stopping
        self.eos = torch.tensor(config.eos_token_id, dtype=torch.long, device=device)
        # Enough candidates that num_beams survive even if every beam's best tokens are all EOS.
        self.k = max(2, 1 + len(config.eos_token_id)) * nb
        self.top_nb = torch.arange(self.k, device=device) < nb  # only these may finish
        self.batch_offset = torch.arange(batch, device=device)[:, None] * nb

        self.running = torch.full((batch, nb, total), config.beam_pad_id, dtype=torch.long,
                                  device=device)
        self.running[:, :, :prompt_len] = input_ids[:, None]
        # Only beam 0 is live at first, so the first step does not pick the same token nb times.
        self.running_scores = torch.zeros(batch, nb, device=device)
        self.running_scores[:, 1:] = NEG
        self.sequences = self.running.clone()
        self.scores = torch.full((batch, nb), NEG, device=device)
        self.lengths = torch.zeros(batch, nb, dtype=torch.long, device=device)  # generated tokens
        self.is_finished = torch.zeros(batch, nb, dtype=torch.bool, device=device)
        self.can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
        self.hits = torch.zeros(batch, self.k, dtype=torch.bool, device=device)

    def flat_running(self, cur_len: int) -> torch.Tensor:
        """Every running beam's sequence so far, (B · nb, cur_len) — a view, not a copy."""
        return self.running[:, :, :cur_len].reshape(self.batch * self.num_beams, cur_len)

    def last_tokens(self, cur_len: int) -> torch.Tensor:
        return self.running[:, :, cur_len - 1].reshape(-1, 1)

    def step(self, log_probs: torch.Tensor, cur_len: int, draw) -> torch.Tensor:
        """Advance by one token given processed log-probs (B · nb, V), which it overwrites;
        return, per new running beam, the flat row (batch · nb + beam) it continues — the
        KV-cache reorder index."""
        batch, nb, vocab = self.batch, self.num_beams, log_probs.shape[-1]
        # in place: log_probs is the caller's scratch (a fresh 5 MB tensor costs page faults)
        scores = log_probs.view(batch, nb, vocab).add_(self.running_scores[:, :, None])
        scores = scores.reshape(batch, nb * vocab)
        if draw is None:
            cand_scores, cand = torch.topk(scores, k=self.k)
        else:
            cand = draw(scores, self.k)
            cand_scores = torch.gather(scores, 1, cand)
            cand_scores, order = cand_scores.sort(dim=-1, descending=True)
            cand = cand.gather(-1, order)
        cand_beam, cand_token = cand // vocab, cand % vocab
        cand_seqs = _gather(self.running, cand_beam)
        cand_seqs[:, :, cur_len] = cand_token
        cand_source = cand_beam + self.batch_offset
        # The stopping criteria (EOS, length budget) on every candidate.
        self.hits = torch.isin(cand_token, self.eos) | (cur_len + 1 >= self.max_length)

        # Continue with the best candidates that did not stop.
        live_scores = cand_scores + self.hits.to(torch.float32) * NEG
        keep = torch.topk(live_scores, k=nb)[1]
        self.running = _gather(cand_seqs, keep)
        self.running_scores = _gather(live_scores, keep)
        self._add_finished(cand_seqs, cand_scores, cur_len)
        return _gather(cand_source, keep).reshape(-1)

    def _add_finished(self, cand_seqs, cand_scores, cur_len: int) -> None:
        just_finished = self.hits & self.top_nb[None, :]
        # Length normalisation counts generated tokens only (EOS included), not the prompt.
        offered = cand_scores / ((cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = torch.all(self.is_finished, dim=-1, keepdim=True) & (self.early_stopping is True)
        offered += full.to(torch.float32) * NEG
        offered += (~self.can_improve).to(torch.float32) * NEG
        offered += (~just_finished) * NEG
        new_lengths = torch.full_like(cand_scores, cur_len + 1 - self.prompt_len, dtype=torch.long)

        merged_scores = torch.cat((self.scores, offered), dim=1)
        best = torch.topk(merged_scores, k=self.num_beams)[1]
        self.sequences = _gather(torch.cat((self.sequences, cand_seqs), dim=1), best)
        self.scores = _gather(merged_scores, best)
        self.lengths = _gather(torch.cat((self.lengths, new_lengths), dim=1), best)
        self.is_finished = _gather(torch.cat((self.is_finished, just_finished), dim=1), best)

    def unfinished(self, cur_len: int) -> bool:
        """Update the early-stopping heuristic at the new length; False when search is over.

        A prompt can still improve while its best running beam, scored at a hypothetical length,
        beats its worst finished hypothesis (any empty slot counts as -1e9). That length is the
        current one, except with early_stopping="never" and a positive length_penalty, where a
        longer hypothesis scores higher and so the whole budget (max_length) is assumed.
        """
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_len
        else:
            best_length = cur_len - self.prompt_len
        best_running = self.running_scores[:, :1] / (best_length ** self.length_penalty)
        worst = torch.where(self.is_finished, self.scores.min(dim=1, keepdim=True)[0], NEG)
        self.can_improve &= (best_running > worst).any(dim=-1, keepdim=True)
        # Note transformers takes the "all full" and "all candidates stopped" tests over the
        # whole batch, so prompts that are done keep decoding (without effect) until all are.
        all_full = torch.all(self.is_finished) & (self.early_stopping is True)
        return bool(self.can_improve.any() & ~all_full & ~torch.all(self.hits))

    def prompts_done(self) -> list[bool]:
        """Per prompt, whether its search is over: no running beam can still beat its finished
        hypotheses. transformers decodes such prompts on (without effect) until all are done;
        nothing they are given changes the output any more."""
        return (~self.can_improve[:, 0]).tolist()

    def output(self, num_return_sequences: int) -> torch.Tensor:
        n = num_return_sequences
        sequences = self.sequences[:, :n].reshape(self.batch * n, self.max_length)
        return sequences[:, : self.prompt_len + int(self.lengths[:, :n].max())]


class CandidateSampler:
    """Beam sampling: draws k candidates without replacement from softmax(summed scores).

    Without a seed, one draw from torch's global RNG, as transformers does (so torch.manual_seed
    reproduces its output); with one, a generator per prompt seeded as TokenSampler seeds its
    rows, so that a prompt's output does not depend on the rest of the batch.
    """

    def __init__(self, config: GenerationConfig, *, batch: int, device):
        sampler = TokenSampler.seeded(do_sample=True, seed=config.seed, batch_size=batch,
                                      device=device)
        self.generators = sampler.generators

    def __call__(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return sample_from(F.softmax(scores, dim=-1), self.generators, num_samples=k)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select along the beam dimension (1) of a (B, beams, ...) tensor with a (B, n) index."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)
