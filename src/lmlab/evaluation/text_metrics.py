"""Quality signals for generated text: diversity, repetition, and likelihood under a model."""

from __future__ import annotations

from typing import Sequence

import torch

from lmlab.generation.protocol import model_device


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[Sequence], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a set of outputs (Li et al., 2016); 1.0 = no reuse."""
    grams = [g for seq in sequences for g in ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(tokens: Sequence, n: int = 3) -> float:
    """Share of n-grams that already occurred earlier in the same output (degenerate loops → 1):
    1 − unique / all n-grams, Welleck et al. (2019)'s seq-rep-n."""
    seen: set[tuple] = set()
    grams = ngrams(tokens, n)
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str]) -> float:
    """Self-BLEU (Zhu et al., 2018): BLEU of each text with all the other texts as its references,
    averaged — high when the outputs resemble each other. sacreBLEU's corpus BLEU (0–100, its
    default 13a tokenisation and exp smoothing) per text; nan for fewer than two texts."""
    from sacrebleu.metrics import BLEU

    texts = list(texts)
    if len(texts) < 2:
        return float("nan")
    bleu = BLEU()
    scores = [bleu.corpus_score([text], [[other] for other in texts[:i] + texts[i + 1:]]).score
              for i, text in enumerate(texts)]
    return sum(scores) / len(scores)


@torch.inference_mode()
def mean_token_logprob(model, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> float:
    """Mean log-probability the model assigns to `new_ids` after `prompt_ids` (nats/token)."""
    if not new_ids:
        return float("nan")
    ids = torch.tensor([list(prompt_ids) + list(new_ids)], device=model_device(model))
    logits = model(ids[:, :-1]).float()
    logprobs = torch.log_softmax(logits[0, len(prompt_ids) - 1 :], dim=-1)
    targets = ids[0, len(prompt_ids) :]
    return float(logprobs.gather(-1, targets[:, None]).mean())
