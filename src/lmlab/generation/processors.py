"""Logits processors: small callables with one signature, `(input_ids, scores) -> scores`.

`input_ids` is (B, S) — everything generated so far, prompt included — and `scores` the (B, V)
next-token logits (or log-probabilities, in beam search). Each is validated when built, with a
message that says how to fix it; none modifies its input in place, and none keeps per-row state,
so beam search may reorder rows between calls. The semantics are those of the transformers class
named in each docstring.

`build_logits_processors` returns them in transformers' (5.24) order, building only those that
change something:

    sequence_bias, logit_bias, frequency/presence penalty, repetition_penalty,
    no_repeat_ngram_size, bad_words_ids, min_new_tokens;
    then, when sampling: temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff.

The OpenAI-style `logit_bias` and frequency/presence penalties have no transformers twin; they are
additive biases on the raw logits, like `sequence_bias`, so they sit right after it.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_min_tokens_to_keep(value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"min_tokens_to_keep must be a positive integer, got {value!r}")


def _token_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row of `ids`. Ids >= vocab (an embedding larger
    than the output head) land in a spare column that is dropped, as transformers does."""
    mask = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids.clamp(max=vocab), True)[:, :vocab]


# -- processors (any strategy) -----------------------------------------------------------------
class SequenceBias:
    """Add a bias to the last token of each sequence whose prefix ends `input_ids`; a one-token
    sequence is always biased. Biases of sequences sharing a last token add up.
    [SequenceBiasLogitsProcessor]"""

    def __init__(self, sequence_bias: dict[tuple[int, ...], float], *, name: str = "sequence_bias"):
        if not isinstance(sequence_bias, dict) or not sequence_bias:
            raise ValueError(f"{name} must be a non-empty dict {{(token, ...): bias}}, "
                             f"got {sequence_bias!r}")
        for seq, bias in sequence_bias.items():
            if not isinstance(seq, tuple) or not seq or not all(_is_int(t) and t >= 0 for t in seq):
                raise ValueError(f"{name} keys must be non-empty tuples of token ids >= 0, "
                                 f"got {seq!r}")
            if not _is_real(bias):
                raise ValueError(f"{name}[{seq!r}] must be a number, got {bias!r}")
        self.sequence_bias = {seq: float(bias) for seq, bias in sequence_bias.items()}
        self.name = name
        self._prepared = None  # (vocab, device) -> tensors, built at the first call

    def _prepare(self, scores: torch.Tensor):
        vocab, device = scores.shape[-1], scores.device
        too_big = sorted({t for seq in self.sequence_bias for t in seq if t >= vocab})
        if too_big:
            raise ValueError(f"{self.name} uses token ids {too_big}, outside the model's "
                             f"vocabulary of {vocab} tokens")
        single = torch.zeros(vocab, dtype=torch.float, device=device)
        groups: dict[int, list] = {}  # prefix length -> [(sequence, bias)]
        for seq, bias in self.sequence_bias.items():
            if len(seq) == 1:
                single[seq[0]] = bias
            else:
                groups.setdefault(len(seq) - 1, []).append((seq, bias))
        # One comparison per prefix length matches every sequence of that length at once.
        multi = [(torch.tensor([s[:-1] for s, _ in group], device=device),
                  torch.tensor([s[-1] for s, _ in group], device=device),
                  torch.tensor([b for _, b in group], dtype=torch.float, device=device))
                 for group in groups.values()]
        self._prepared = (vocab, device, single, multi)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._prepared is None or self._prepared[:2] != (scores.shape[-1], scores.device):
            self._prepare(scores)
        _, _, single, multi = self._prepared
        if not multi:
            return scores + single.to(scores.dtype)
        bias = torch.zeros_like(scores)  # summed first, then added: transformers' rounding
        bias += single
        for prefixes, last_tokens, biases in multi:
            length = prefixes.shape[1]
            if length > input_ids.shape[1]:
                continue
            matches = (input_ids[:, None, -length:] == prefixes).all(dim=-1)  # (B, G)
            bias.index_add_(1, last_tokens, torch.where(matches, biases, 0.0).to(bias.dtype))
        return scores + bias


class NoBadWords:
    """Never produce a banned sequence: a one-token entry is always banned, a longer one when its
    prefix ends `input_ids`. Entries that are just an EOS id are dropped, as transformers does
    (banning EOS would make stopping impossible). Unlike transformers 5.24, which silently ignores
    an empty entry `[]`, we reject it: it bans nothing, so it is most likely a mistake.
    [NoBadWordsLogitsProcessor]"""

    def __init__(self, bad_words_ids: list[list[int]], *, eos_token_id: Sequence[int] = ()):
        if not isinstance(bad_words_ids, list) or not bad_words_ids:
            raise ValueError(f"bad_words_ids must be a non-empty list of lists of token ids, "
                             f"e.g. [[5], [7, 8]], got {bad_words_ids!r}")
        for word in bad_words_ids:
            if not isinstance(word, list) or not word:
                raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids, "
                                 f"e.g. [[5], [7, 8]], got element {word!r}")
            if not all(_is_int(t) and t >= 0 for t in word):
                raise ValueError(f"bad_words_ids entries must hold token ids >= 0, got {word!r}")
        eos = set(eos_token_id)
        kept = [w for w in bad_words_ids if not (len(w) == 1 and w[0] in eos)]
        # Only EOS entries: nothing to ban (transformers builds a processor that adds zeros).
        self.bias = None
        if kept:
            self.bias = SequenceBias({tuple(w): NEG_INF for w in kept}, name="bad_words_ids")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.bias is None else self.bias(input_ids, scores)


class LogitBias:
    """OpenAI's `logit_bias`: add bias[t] (in [-100, 100]) to token t's logit."""

    def __init__(self, logit_bias: dict[int, float]):
        if not isinstance(logit_bias, dict) or not logit_bias:
            raise ValueError(f"logit_bias must be a non-empty dict {{token_id: bias}}, "
                             f"got {logit_bias!r}")
        for token, bias in logit_bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not _is_real(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{token}] must be in [-100, 100], got {bias!r}")
        self.logit_bias = {token: float(bias) for token, bias in logit_bias.items()}
        self._dense = None  # (V,) bias, built at the first call when the vocabulary is known

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        dense = self._dense
        if dense is None or dense.shape[0] != vocab or dense.device != scores.device:
            too_big = sorted(t for t in self.logit_bias if t >= vocab)
            if too_big:
                raise ValueError(f"logit_bias uses token ids {too_big}, outside the model's "
                                 f"vocabulary of {vocab} tokens")
            dense = torch.zeros(vocab, dtype=torch.float, device=scores.device)
            dense[list(self.logit_bias)] = torch.tensor(list(self.logit_bias.values()),
                                                        device=scores.device)
            self._dense = dense
        return scores + self._dense.to(scores.dtype)


class FrequencyPresencePenalty:
    """OpenAI's penalties over the GENERATED tokens only (positions >= prompt_len):
    scores[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0)."""

    def __init__(self, *, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 prompt_len: int):
        for name, value in (("frequency_penalty", frequency_penalty),
                            ("presence_penalty", presence_penalty)):
            if not _is_real(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (as in OpenAI's API), got {value!r}")
        if not _is_int(prompt_len) or prompt_len < 0:
            raise ValueError(f"prompt_len must be an integer >= 0, got {prompt_len!r}")
        self.frequency_penalty = float(frequency_penalty)
        self.presence_penalty = float(presence_penalty)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        vocab = scores.shape[-1]
        generated = generated.clamp(max=vocab)  # ids past the output head: a spare column
        # Two scatters over the generated positions, not several passes over the vocabulary:
        # set the presence penalty once per distinct token, then add frequency per occurrence.
        penalty = torch.zeros(scores.shape[0], vocab + 1, dtype=scores.dtype, device=scores.device)
        penalty.scatter_(1, generated, self.presence_penalty)
        frequency = torch.full(generated.shape, self.frequency_penalty, dtype=scores.dtype,
                               device=scores.device)
        penalty.scatter_add_(1, generated, frequency)
        return scores - penalty[:, :vocab]


class RepetitionPenalty:
    """Tokens present in `input_ids` (prompt included): positive scores divided by the penalty,
    negative ones multiplied. `prompt_ignore_length` (int, or (B,) per row: the left padding)
    leading positions are not counted. [RepetitionPenaltyLogitsProcessor]"""

    def __init__(self, penalty: float, *, prompt_ignore_length: int | torch.Tensor | None = None):
        if not _is_real(penalty) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off, > 1 discourages "
                             f"repeats), got {penalty!r}")
        if _is_int(prompt_ignore_length) and prompt_ignore_length < 0:
            raise ValueError(f"prompt_ignore_length must be >= 0, got {prompt_ignore_length}")
        if isinstance(prompt_ignore_length, torch.Tensor) and prompt_ignore_length.dim() != 1:
            raise ValueError("prompt_ignore_length must be an int or a 1-D (batch,) tensor")
        self.penalty = float(penalty)
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        ignore = self.prompt_ignore_length
        if isinstance(ignore, int):
            input_ids = input_ids[:, ignore:]
        elif isinstance(ignore, torch.Tensor):
            if ignore.shape[0] != input_ids.shape[0]:
                raise ValueError(f"prompt_ignore_length has {ignore.shape[0]} rows but the batch "
                                 f"has {input_ids.shape[0]}")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            skipped = positions[None, :] < ignore.to(input_ids.device)[:, None]
            input_ids = input_ids.masked_fill(skipped, vocab)  # the spare column, dropped
        # Penalise only the (B, S) gathered scores, not the whole (B, V) vocabulary. The spare
        # column past the vocabulary absorbs ignored positions and ids past the output head.
        ids = input_ids.clamp(max=vocab)
        padded = torch.nn.functional.pad(scores, (0, 1))
        seen = padded.gather(1, ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        # contiguous: callers may .view() the scores (beam search does)
        return padded.scatter_(1, ids, seen)[:, :vocab].contiguous()


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already in `input_ids` (prompt included).
    [NoRepeatNGramLogitsProcessor]"""

    def __init__(self, ngram_size: int):
        if not _is_int(ngram_size) or ngram_size <= 0:
            raise ValueError(f"no_repeat_ngram_size must be a positive integer (0 turns it off), "
                             f"got {ngram_size!r}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, length = self.ngram_size, input_ids.shape[-1]
        if length < n:
            return scores
        # Vectorised over rows and positions (no Python loop per row): an n-gram can only be
        # completed next if its first n-1 tokens equal the current (n-1)-token suffix, so compare
        # that suffix with every window and ban the last token of each matching window.
        suffix = input_ids[:, length - n + 1:]  # (B, n-1)
        windows = input_ids.unfold(1, n, 1)  # (B, S-n+1, n)
        matches = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)  # (B, S-n+1)
        vocab = scores.shape[-1]
        banned = torch.where(matches, windows[..., -1], vocab)  # non-matches: the spare column
        return scores.masked_fill(_token_mask(banned, vocab), NEG_INF)


class MinNewTokens:
    """EOS ids get -inf while fewer than `min_new_tokens` tokens follow the prompt.
    [MinNewTokensLengthLogitsProcessor]"""

    def __init__(self, min_new_tokens: int, *, prompt_len: int, eos_token_id: Sequence[int]):
        for name, value in (("min_new_tokens", min_new_tokens), ("prompt_len", prompt_len)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.min_new_tokens = min_new_tokens
        self.prompt_len = prompt_len
        self.eos_token_id = list(eos_token_id)
        self._mask = None  # (V,) bool, built at the first call; EOS ids >= V are ignored

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_len >= self.min_new_tokens:
            return scores
        vocab, device = scores.shape[-1], scores.device
        if self._mask is None or self._mask.shape[0] != vocab or self._mask.device != device:
            eos = torch.tensor(self.eos_token_id, dtype=torch.long, device=device)
            self._mask = torch.isin(torch.arange(vocab, device=device), eos)
        return scores.masked_fill(self._mask, NEG_INF)


class ForcedBOSToken:
    """The first token after a one-token prompt is `token_id`: an encoder–decoder's target
    language (mBART, M2M-100) after its start token. [ForcedBOSTokenLogitsProcessor]"""

    def __init__(self, token_id: int):
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"forced_bos_token_id must be a token id >= 0, got {token_id!r}")
        self.token_id = token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != 1:
            return scores
        if self.token_id >= scores.shape[-1]:
            raise ValueError(f"forced_bos_token_id {self.token_id} is not below the model's "
                             f"vocabulary size {scores.shape[-1]}")
        forced = torch.full_like(scores, NEG_INF)
        forced[:, self.token_id] = 0
        return forced


# -- sampling warpers --------------------------------------------------------------------------
class TemperatureWarper:
    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {temperature}; use do_sample=False for greedy"
            )
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopKWarper:
    """Keep the k highest-scoring tokens (ties at the k-th score are all kept)."""

    def __init__(self, top_k: int, *, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, NEG_INF)


class TopPWarper:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    top_p — including the token that crosses the threshold — and at least min_tokens_to_keep."""

    def __init__(self, top_p: float, *, min_tokens_to_keep: int = 1):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.top_p = float(top_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Ascending order: drop the low tail whose total mass is at most 1 - top_p.
        remove = cumulative <= (1 - self.top_p)
        remove[..., -self.min_tokens_to_keep :] = False
        remove = remove.scatter(-1, sorted_idx, remove)
        return scores.masked_fill(remove, NEG_INF)


class MinPWarper:
    """Drop tokens whose probability is below min_p × the top token's. [MinPLogitsWarper]"""

    def __init__(self, min_p: float, *, min_tokens_to_keep: int = 1):
        if not _is_real(min_p) or not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.min_p = float(min_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        return scores.masked_fill(remove.scatter(-1, keep, False), NEG_INF)


class TypicalWarper:
    """Typical decoding: keep the tokens whose surprisal is closest to the entropy, up to mass
    typical_p (1.0 keeps everything). [TypicalLogitsWarper]"""

    def __init__(self, typical_p: float, *, min_tokens_to_keep: int = 1):
        if not _is_real(typical_p) or not 0.0 < typical_p <= 1.0:
            raise ValueError(f"typical_p must be in (0, 1], got {typical_p!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.mass = float(typical_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.mass == 1.0:  # transformers does not build it at 1.0
            return scores
        logp = scores.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)  # nansum: 0 * -inf at banned tokens
        shifted, order = torch.sort((-logp - entropy).abs(), dim=-1)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.mass).sum(dim=-1, keepdim=True).clamp_(max=shifted.shape[-1] - 1)
        remove = shifted > shifted.gather(-1, last)
        remove[..., : self.min_tokens_to_keep] = False
        return scores.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


class _CutoffWarper:
    """Drop tokens with probability below a cutoff, keeping the min_tokens_to_keep best."""

    name = "cutoff"

    def __init__(self, cutoff: float, *, min_tokens_to_keep: int = 1):
        if not _is_real(cutoff) or not 0.0 < cutoff < 1.0:
            raise ValueError(f"{self.name} must be in (0, 1), got {cutoff!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.cutoff = float(cutoff)
        self.min_tokens_to_keep = min_tokens_to_keep

    def threshold(self, scores: torch.Tensor):
        raise NotImplementedError

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        remove = scores.softmax(dim=-1) < self.threshold(scores)
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove &= scores < torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(remove, NEG_INF)


class EpsilonWarper(_CutoffWarper):
    """Epsilon sampling: cutoff = epsilon. [EpsilonLogitsWarper]"""

    name = "epsilon_cutoff"

    def threshold(self, scores: torch.Tensor):
        return self.cutoff


class EtaWarper(_CutoffWarper):
    """Eta sampling: cutoff = min(eta, sqrt(eta) * exp(-entropy)). [EtaLogitsWarper]"""

    name = "eta_cutoff"

    def threshold(self, scores: torch.Tensor):
        # torch.distributions.Categorical(logits=scores).entropy(), without its validation cost.
        logp = scores - scores.logsumexp(dim=-1, keepdim=True)
        logp_finite = logp.clamp(min=torch.finfo(logp.dtype).min)
        entropy = -(logp_finite * logp.softmax(dim=-1)).sum(-1)
        eta = torch.tensor(self.cutoff, device=scores.device)
        return torch.min(eta, torch.sqrt(eta) * torch.exp(-entropy))[..., None]


# -- composition -------------------------------------------------------------------------------
def leading_pads(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's count of leading (left) padding positions, (B,); None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return (attention_mask != 0).int().argmax(dim=1)


def apply_processors(
    processors: Sequence[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def build_logits_processors(config, *, prompt_len: int,
                            attention_mask: torch.Tensor | None = None,
                            padding: int = 0) -> list[LogitsProcessor]:
    """The processors a GenerationConfig asks for, in transformers' order; warpers last.

    Every knob is validated even when it turns out to be a no-op (repetition_penalty=1.0,
    top_p=1.0, min_p=0, …), but only processors that change something are built. Left padding
    of the prompt stays out of the repetition penalty, as in transformers: `padding` leading
    positions of every row, or per row from `attention_mask` (B, prompt_len).
    """
    out: list[LogitsProcessor] = []
    eos = list(config.eos_token_id or [])
    if config.sequence_bias:
        out.append(SequenceBias(config.sequence_bias))
    if config.logit_bias:
        out.append(LogitBias(config.logit_bias))
    penalties = FrequencyPresencePenalty(frequency_penalty=config.frequency_penalty,
                                         presence_penalty=config.presence_penalty,
                                         prompt_len=prompt_len)
    if penalties.frequency_penalty or penalties.presence_penalty:
        out.append(penalties)
    ignored = leading_pads(attention_mask)
    if ignored is None:
        ignored = padding or None
    repetition = RepetitionPenalty(config.repetition_penalty, prompt_ignore_length=ignored)
    if repetition.penalty != 1.0:
        out.append(repetition)
    ngram = config.no_repeat_ngram_size
    if not _is_int(ngram) or ngram < 0:
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0 turns it off), "
                         f"got {ngram!r}")
    if ngram > 0:
        out.append(NoRepeatNGram(ngram))
    if config.bad_words_ids is not None:
        bad_words = NoBadWords(config.bad_words_ids, eos_token_id=eos)
        if bad_words.bias is not None:
            out.append(bad_words)
    if config.min_new_tokens > 0 and eos:
        out.append(MinNewTokens(config.min_new_tokens, prompt_len=prompt_len, eos_token_id=eos))
    if config.forced_bos_token_id is not None:
        out.append(ForcedBOSToken(config.forced_bos_token_id))
    if not config.do_sample:
        return out

    # Beam sampling keeps one non-EOS candidate beyond the EOS ids, so a beam can continue
    # (transformers: len(eos) + 1, or 2 without EOS ids).
    keep = 1
    if config.num_beams > 1:
        keep = len(eos) + 1 if eos else 2
    if config.temperature != 1.0:
        out.append(TemperatureWarper(config.temperature))
    if config.top_k is not None:
        out.append(TopKWarper(config.top_k, min_tokens_to_keep=keep))
    optional = [
        (TopPWarper, config.top_p, lambda w: w.top_p < 1.0),
        (MinPWarper, config.min_p, lambda w: w.min_p > 0.0),
        (TypicalWarper, config.typical_p, lambda w: w.mass < 1.0),
        (EpsilonWarper, config.epsilon_cutoff, lambda w: True),
        (EtaWarper, config.eta_cutoff, lambda w: True),
    ]
    for cls, value, changes_scores in optional:
        if value is not None:
            warper = cls(value, min_tokens_to_keep=keep)  # validates even a no-op value
            if changes_scores(warper):
                out.append(warper)
    return out
