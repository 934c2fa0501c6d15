"""Every logits processor and warper against its transformers twin (same inputs, same outputs),
the processor list that a GenerationConfig builds against `GenerationMixin._get_logits_processor`
(same classes, same order, same result), greedy decoding with processors against `hf.generate`,
the OpenAI-style penalties against hand-computed scores, and validation."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.testing import assert_close

import lmlab
from lmlab.generation import GenerationConfig
from lmlab.generation.processors import (
    EpsilonWarper, EtaWarper, FrequencyPresencePenalty, LogitBias, MinNewTokens, MinPWarper,
    NoBadWords, NoRepeatNGram, RepetitionPenalty, SequenceBias, TypicalWarper,
    apply_processors, build_logits_processors,
)
from lmlab.models import from_pretrained

tp = pytest.importorskip("transformers.generation.logits_process")

pytestmark = pytest.mark.usefixtures("single_thread")

B, S, V = 3, 10, 50
# Rows 0-1 are built so that n-grams repeat: row 0's last tokens (3, 9) and (9,) occurred
# before, followed by 5 and 4; row 1's (1, 2, 3) by 10. Row 2 is random over few ids.
ROW0 = [7, 3, 9, 5, 3, 9, 4, 8, 3, 9]
ROW1 = [0, 1, 2, 3, 10, 6, 12, 1, 2, 3]


def make_ids(*, out_of_vocab: bool = False) -> torch.Tensor:
    ids = torch.randint(0, 14, (B, S), generator=torch.Generator().manual_seed(1))
    ids[0], ids[1] = torch.tensor(ROW0), torch.tensor(ROW1)
    if out_of_vocab:  # an embedding larger than the output head: ids >= V cannot be generated
        ids[2, 3] = V + 7
    return ids


def make_scores(*, with_inf: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    scores = 3 * torch.randn(B, V, generator=g)
    scores[:, 0] = -25.0  # large negative and positive values
    scores[1, 1] = 30.0
    if with_inf:  # as left by an earlier processor
        scores[0, [11, 20]] = float("-inf")
        scores[2, 5] = float("-inf")
    return scores


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert ours.is_contiguous()  # callers may .view() the scores
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    assert torch.equal(torch.isposinf(ours), torch.isposinf(theirs))
    finite = torch.isfinite(theirs)
    assert_close(ours[finite], theirs[finite], atol=1e-6, rtol=0)


# -- each processor against its twin -----------------------------------------------------------
CASES = {
    "repetition_1.3": (lambda: RepetitionPenalty(1.3), lambda: tp.RepetitionPenaltyLogitsProcessor(1.3)),
    "repetition_0.7": (lambda: RepetitionPenalty(0.7), lambda: tp.RepetitionPenaltyLogitsProcessor(0.7)),
    "repetition_2.0": (lambda: RepetitionPenalty(2.0), lambda: tp.RepetitionPenaltyLogitsProcessor(2.0)),
    "repetition_ignore_4": (lambda: RepetitionPenalty(1.5, prompt_ignore_length=4),
                            lambda: tp.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=4)),
    "repetition_ignore_rows": (
        lambda: RepetitionPenalty(1.5, prompt_ignore_length=torch.tensor([0, 2, 5])),
        lambda: tp.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([0, 2, 5]))),
    **{f"no_repeat_{n}": (lambda n=n: NoRepeatNGram(n), lambda n=n: tp.NoRepeatNGramLogitsProcessor(n))
       for n in (1, 2, 3, 4)},
    "bad_words": (lambda: NoBadWords([[5], [9, 11], [3, 9, 12], [2], [8, 3, 9, 13]]),
                  lambda: tp.NoBadWordsLogitsProcessor([[5], [9, 11], [3, 9, 12], [2], [8, 3, 9, 13]])),
    "bad_words_eos": (lambda: NoBadWords([[5], [9, 11], [2], [7]], eos_token_id=[5, 7]),
                      lambda: tp.NoBadWordsLogitsProcessor([[5], [9, 11], [2], [7]], eos_token_id=[5, 7])),
    "sequence_bias": (
        lambda: SequenceBias(SEQUENCE_BIAS), lambda: tp.SequenceBiasLogitsProcessor(SEQUENCE_BIAS)),
    "min_new_tokens_bans": (lambda: MinNewTokens(8, prompt_len=4, eos_token_id=[5, 7]),
                            lambda: tp.MinNewTokensLengthLogitsProcessor(4, 8, [5, 7])),
    "min_new_tokens_done": (lambda: MinNewTokens(6, prompt_len=4, eos_token_id=[5, 7]),
                            lambda: tp.MinNewTokensLengthLogitsProcessor(4, 6, [5, 7])),
    "min_new_tokens_eos_outside_vocab": (
        lambda: MinNewTokens(8, prompt_len=4, eos_token_id=[3, V + 2]),
        lambda: tp.MinNewTokensLengthLogitsProcessor(4, 8, [3, V + 2])),
}
SEQUENCE_BIAS = {(3,): -5.0, (17,): 4.0, (9, 11): 2.5, (9, 4): -1.5, (3, 9, 12): -1.0,
                 (4, 9, 11): 3.0, (3, 9, 11): 0.5, tuple(range(1, 13)): 1.0}  # longer than S

WARPER_CASES = {
    **{f"min_p_{p}_{k}": (lambda p=p, k=k: MinPWarper(p, min_tokens_to_keep=k),
                          lambda p=p, k=k: tp.MinPLogitsWarper(p, min_tokens_to_keep=k))
       for p, k in [(0.05, 1), (0.3, 1), (1.0, 1), (0.3, 4), (0.0, 1)]},
    **{f"typical_{m}_{k}": (lambda m=m, k=k: TypicalWarper(m, min_tokens_to_keep=k),
                            lambda m=m, k=k: tp.TypicalLogitsWarper(m, min_tokens_to_keep=k))
       for m, k in [(0.2, 1), (0.5, 1), (0.95, 1), (0.2, 4)]},
    **{f"epsilon_{e}_{k}": (lambda e=e, k=k: EpsilonWarper(e, min_tokens_to_keep=k),
                            lambda e=e, k=k: tp.EpsilonLogitsWarper(e, min_tokens_to_keep=k))
       for e, k in [(0.001, 1), (0.05, 1), (0.3, 1), (0.3, 4)]},
    **{f"eta_{e}_{k}": (lambda e=e, k=k: EtaWarper(e, min_tokens_to_keep=k),
                        lambda e=e, k=k: tp.EtaLogitsWarper(e, min_tokens_to_keep=k))
       for e, k in [(0.001, 1), (0.01, 1), (0.2, 1), (0.2, 4)]},
}


@pytest.mark.parametrize("case", [*CASES, *WARPER_CASES])
@pytest.mark.parametrize("with_inf", [False, True], ids=["finite", "with_inf"])
@pytest.mark.parametrize("out_of_vocab", [False, True], ids=["ids_in_vocab", "id_past_head"])
def test_processor_matches_transformers(case, with_inf, out_of_vocab):
    ours_factory, theirs_factory = {**CASES, **WARPER_CASES}[case]
    ids, scores = make_ids(out_of_vocab=out_of_vocab), make_scores(with_inf=with_inf)
    original = scores.clone()
    ours = ours_factory()(ids, scores)
    theirs = theirs_factory()(ids.clone(), scores.clone())
    assert_same(ours, theirs)
    assert torch.equal(scores, original)  # no in-place change of the caller's scores
    if not case.endswith(("_done", "min_p_0.0_1")):
        assert not torch.equal(ours, scores)  # the case bites: it is not a vacuous comparison


def test_no_repeat_ngram_bans_exactly_the_completions():
    ids = torch.tensor([ROW0])

    def banned(n: int) -> list[int]:
        return torch.isneginf(NoRepeatNGram(n)(ids, torch.zeros(1, V)))[0].nonzero().flatten().tolist()

    assert banned(2) == [4, 5]  # 9 was followed by 5 and by 4
    assert banned(3) == [4, 5]  # (3, 9) was followed by 5 and by 4
    assert banned(4) == []  # (8, 3, 9) never occurred before
    assert banned(1) == sorted(set(ROW0))


def test_sequence_bias_adds_up_only_for_matching_prefixes():
    ids = torch.tensor([[1, 3, 9], [1, 4, 9]])
    out = SequenceBias({(9, 11): 2.0, (3, 9, 11): 0.5, (4, 9, 11): -3.0, (2,): 1.0})(ids, torch.zeros(2, 20))
    assert out[0, 11] == 2.5 and out[1, 11] == -1.0
    assert out[:, 2].tolist() == [1.0, 1.0]
    assert int((out != 0).sum()) == 4


# -- the list a GenerationConfig builds against _get_logits_processor --------------------------
TWIN = {"SequenceBias": "SequenceBiasLogitsProcessor", "RepetitionPenalty": "RepetitionPenaltyLogitsProcessor",
        "NoRepeatNGram": "NoRepeatNGramLogitsProcessor", "NoBadWords": "NoBadWordsLogitsProcessor",
        "MinNewTokens": "MinNewTokensLengthLogitsProcessor", "TemperatureWarper": "TemperatureLogitsWarper",
        "TopKWarper": "TopKLogitsWarper", "TopPWarper": "TopPLogitsWarper", "MinPWarper": "MinPLogitsWarper",
        "TypicalWarper": "TypicalLogitsWarper", "EpsilonWarper": "EpsilonLogitsWarper",
        "EtaWarper": "EtaLogitsWarper"}
OPENAI_ONLY = {"LogitBias", "FrequencyPresencePenalty"}
PROMPT_LEN = 6  # of the S = 10 positions in make_ids(); the last 4 count as generated

CHAINS = {
    "greedy_processors": dict(repetition_penalty=1.3, no_repeat_ngram_size=2,
                              bad_words_ids=[[5], [9, 11], [7, 8]], sequence_bias={(3,): -5.0, (9, 12): 2.0},
                              min_new_tokens=6, eos_token_id=[5, 13]),
    "sampling_chain": dict(do_sample=True, repetition_penalty=1.3, no_repeat_ngram_size=2,
                           bad_words_ids=[[5], [7, 8]], temperature=0.7, top_k=10, top_p=0.9, min_p=0.05),
    "sampling_truncation": dict(do_sample=True, temperature=1.5, typical_p=0.9, epsilon_cutoff=0.01,
                                eta_cutoff=0.02, eos_token_id=[2]),
    "beam_sampling_eos": dict(do_sample=True, num_beams=3, eos_token_id=[5, 7], top_k=2, top_p=0.2,
                              min_p=0.6, typical_p=0.2, epsilon_cutoff=0.3, eta_cutoff=0.3),
    "beam_sampling_no_eos": dict(do_sample=True, num_beams=2, top_p=0.1, min_p=0.9, eta_cutoff=0.3),
}


def hf_processors(hf, settings: dict, ids: torch.Tensor, attention_mask=None):
    from transformers import GenerationConfig as HFGenerationConfig

    settings = dict(settings)
    settings["eos_token_id"] = settings.get("eos_token_id") or None  # our [] is their None
    config = HFGenerationConfig(**settings)
    hf._prepare_special_tokens(config, True, device="cpu")
    model_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    return hf._get_logits_processor(generation_config=config, input_ids_seq_length=PROMPT_LEN,
                                    encoder_input_ids=ids[:, :PROMPT_LEN], prefix_allowed_tokens_fn=None,
                                    logits_processor=None, device="cpu", model_kwargs=model_kwargs)


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("with_inf", [False, True], ids=["finite", "with_inf"])
def test_built_chain_matches_get_logits_processor(tiny_gpt2, chain, with_inf):
    hf, _ = tiny_gpt2("a")  # vocab 50 = V
    ids, scores = make_ids(), make_scores(with_inf=with_inf)
    ours = build_logits_processors(GenerationConfig(**CHAINS[chain]), prompt_len=PROMPT_LEN)
    theirs = hf_processors(hf, CHAINS[chain], ids)
    assert [TWIN[type(p).__name__] for p in ours] == [type(p).__name__ for p in theirs]
    for mine, twin in zip(ours, theirs):  # beam sampling keeps len(eos) + 1 (or 2) tokens
        if hasattr(twin, "min_tokens_to_keep"):
            assert (getattr(mine, "top_k", None) or mine.min_tokens_to_keep) == \
                (getattr(twin, "top_k", None) or twin.min_tokens_to_keep)
    got = apply_processors(ours, ids, scores)
    expected = theirs(ids, scores.clone())
    assert_same(got, expected)
    assert torch.isneginf(got).sum() > torch.isneginf(scores).sum()


def test_beam_sampling_min_tokens_to_keep_follows_eos_count():
    def keep(**kw):
        warpers = build_logits_processors(GenerationConfig(do_sample=True, top_p=0.5, **kw), prompt_len=0)
        return warpers[-1].min_tokens_to_keep

    assert keep() == 1
    assert keep(num_beams=2) == 2
    assert keep(num_beams=4, eos_token_id=[1, 2, 3]) == 4


def test_every_knob_in_transformers_order(tiny_gpt2):
    hf, _ = tiny_gpt2("a")
    settings = dict(do_sample=True, sequence_bias={(3,): 1.0}, repetition_penalty=1.2,
                    no_repeat_ngram_size=3, bad_words_ids=[[4]], min_new_tokens=2, eos_token_id=[1],
                    temperature=0.5, top_k=4, top_p=0.5, min_p=0.1, typical_p=0.5,
                    epsilon_cutoff=0.1, eta_cutoff=0.1)
    ours = build_logits_processors(
        GenerationConfig(**settings, logit_bias={3: 1.0}, frequency_penalty=0.5), prompt_len=PROMPT_LEN)
    names = [type(p).__name__ for p in ours]
    assert names[:3] == ["SequenceBias", "LogitBias", "FrequencyPresencePenalty"]  # biases on raw logits
    theirs = hf_processors(hf, settings, make_ids())
    assert [TWIN[n] for n in names if n not in OPENAI_ONLY] == [type(p).__name__ for p in theirs]
    assert len(theirs) == 12


def test_repetition_penalty_ignores_left_padding_like_transformers(tiny_gpt2):
    hf, _ = tiny_gpt2("a")
    ids, scores = make_ids(), make_scores()
    mask = torch.ones(B, PROMPT_LEN, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    settings = dict(repetition_penalty=1.7)
    ours = build_logits_processors(GenerationConfig(**settings), prompt_len=PROMPT_LEN, attention_mask=mask)
    theirs = hf_processors(hf, settings, ids, attention_mask=mask)
    got = apply_processors(ours, ids, scores)
    assert_same(got, theirs(ids, scores.clone()))
    unpadded = apply_processors(build_logits_processors(GenerationConfig(**settings), prompt_len=PROMPT_LEN),
                                ids, scores)
    assert not torch.equal(got, unpadded)  # the padding did count otherwise


@pytest.mark.parametrize("settings", [
    dict(repetition_penalty=1.0), dict(no_repeat_ngram_size=0), dict(min_new_tokens=3),  # no EOS ids
    dict(do_sample=True, top_p=1.0, min_p=0.0, typical_p=1.0, temperature=1.0),
    dict(bad_words_ids=[[5]], eos_token_id=[5]), dict(frequency_penalty=0.0, presence_penalty=0.0),
    dict(logit_bias={}), dict(sequence_bias={}),
], ids=lambda s: ",".join(s))
def test_no_op_knobs_build_nothing(settings):
    assert build_logits_processors(GenerationConfig(**settings), prompt_len=4) == []


# -- greedy decoding with processors against hf.generate ---------------------------------------
NEW = 15


@pytest.fixture
def gpt2_b(tiny_gpt2):
    hf, directory = tiny_gpt2("b")
    ids = torch.randint(1, 8, (3, 8), generator=torch.Generator().manual_seed(5))  # repeats
    ours = from_pretrained(directory)
    free = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[])
    return hf, ours, ids, free


def hf_greedy(hf, ids, **kwargs):
    kwargs.setdefault("eos_token_id", None)
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                       pad_token_id=0, **kwargs)


def greedy_knobs(free: torch.Tensor, prompt_len: int) -> dict:
    """Knob settings that bite on these greedy continuations `free`."""
    new = free[:, prompt_len:]
    common = collections.Counter(new.flatten().tolist()).most_common(1)[0][0]
    return {
        "repetition_penalty": dict(repetition_penalty=1.5),
        "no_repeat_ngram": dict(no_repeat_ngram_size=2),
        "bad_words": dict(bad_words_ids=[[int(new[0, 0])], new[1, 2:4].tolist(), [99]]),
        "sequence_bias": dict(sequence_bias={(common,): -5.0}),
        "chain": dict(repetition_penalty=1.2, no_repeat_ngram_size=3, bad_words_ids=[[common]],
                      sequence_bias={(int(new[2, 1]),): -2.0, tuple(new[0, :2].tolist()): -4.0}),
    }


@pytest.mark.parametrize("knob", ["repetition_penalty", "no_repeat_ngram", "bad_words", "sequence_bias", "chain"])
def test_greedy_with_processor_matches_hf_generate(gpt2_b, knob):
    hf, ours, ids, free = gpt2_b
    settings = greedy_knobs(free, ids.shape[1])[knob]
    got = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[], **settings)
    assert torch.equal(got, hf_greedy(hf, ids, **settings))
    assert not torch.equal(got, free)  # the knob changed the continuation


def test_greedy_min_new_tokens_matches_hf_generate(gpt2_b):
    hf, ours, ids, free = gpt2_b
    eos = [int(free[0, ids.shape[1] + 1])]  # row 0 would stop after 2 new tokens
    stopped = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    got = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, min_new_tokens=5)
    assert torch.equal(got, hf_greedy(hf, ids, eos_token_id=eos, min_new_tokens=5))
    assert not torch.equal(got[:, : stopped.shape[1]], stopped)
    assert eos[0] not in got[:, ids.shape[1] : ids.shape[1] + 5].tolist()


class ReferenceOpenAI:
    """An independent, loop-based OpenAI penalty + logit bias, run as a custom HF processor."""

    def __init__(self, *, prompt_len, frequency=0.0, presence=0.0, bias=None):
        self.prompt_len, self.frequency, self.presence, self.bias = prompt_len, frequency, presence, bias or {}

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row, seq in enumerate(input_ids.tolist()):
            for token, count in collections.Counter(seq[self.prompt_len:]).items():
                scores[row, token] -= self.frequency * count + self.presence
            for token, bias in self.bias.items():
                scores[row, token] += bias
        return scores


@pytest.mark.parametrize("settings", [
    dict(frequency_penalty=1.5), dict(presence_penalty=2.0), dict(frequency_penalty=-0.5, presence_penalty=1.0),
    dict(logit_bias={3: 5.0, 17: -100.0}),
], ids=lambda s: ",".join(s))
def test_greedy_openai_penalties_match_a_reference_loop(gpt2_b, settings):
    from transformers import LogitsProcessorList

    hf, ours, ids, free = gpt2_b
    reference = ReferenceOpenAI(prompt_len=ids.shape[1], frequency=settings.get("frequency_penalty", 0.0),
                                presence=settings.get("presence_penalty", 0.0), bias=settings.get("logit_bias"))
    got = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[], **settings)
    assert torch.equal(got, hf_greedy(hf, ids, logits_processor=LogitsProcessorList([reference])))
    assert not torch.equal(got, free)


def test_logit_bias_forces_and_forbids_tokens(gpt2_b):
    _, ours, ids, free = gpt2_b
    common = collections.Counter(free[:, ids.shape[1]:].flatten().tolist()).most_common(1)[0][0]
    never = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[], logit_bias={common: -100})
    assert common not in never[:, ids.shape[1]:].tolist()
    always = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[], logit_bias={42: 100})
    assert torch.all(always[:, ids.shape[1]:] == 42)


# -- OpenAI penalties: hand-computed -----------------------------------------------------------
def test_frequency_presence_penalty_counts_generated_tokens_only():
    ids = torch.tensor([[1, 1, 2, 3, 3, 3, 4],    # prompt (1, 1, 2); generated 3, 3, 3, 4
                        [4, 4, 4, 1, 2, 1, 1]])   # prompt (4, 4, 4); generated 1, 2, 1, 1
    scores = torch.arange(12, dtype=torch.float).reshape(2, 6)
    out = FrequencyPresencePenalty(frequency_penalty=0.5, presence_penalty=1.0, prompt_len=3)(ids, scores)
    expected = scores.clone()
    expected[0, 3] -= 3 * 0.5 + 1.0
    expected[0, 4] -= 1 * 0.5 + 1.0
    expected[1, 1] -= 3 * 0.5 + 1.0
    expected[1, 2] -= 1 * 0.5 + 1.0
    assert torch.equal(out, expected)  # tokens 1, 2 of row 0 and 4 of row 1 are only in the prompt
    assert FrequencyPresencePenalty(frequency_penalty=1.0, prompt_len=7)(ids, scores) is scores


def test_logit_bias_adds_to_the_named_tokens():
    scores = torch.zeros(2, 6)
    out = LogitBias({1: 2.5, 4: -100.0})(torch.zeros(2, 3, dtype=torch.long), scores)
    assert out.tolist() == [[0.0, 2.5, 0.0, 0.0, -100.0, 0.0]] * 2
    with pytest.raises(ValueError, match=r"logit_bias.*\[9\].*vocabulary of 6"):
        LogitBias({9: 1.0})(torch.zeros(1, 1, dtype=torch.long), scores)


def test_sequence_bias_token_outside_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match=r"sequence_bias.*\[60\].*vocabulary of 50"):
        SequenceBias({(3, 60): 1.0})(make_ids(), make_scores())


# -- validation --------------------------------------------------------------------------------
INVALID = [
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size"),
    (dict(bad_words_ids=[5, 6]), "bad_words_ids"),
    (dict(bad_words_ids=[[5], []]), "bad_words_ids"),
    (dict(bad_words_ids=[[-1]]), "bad_words_ids"),
    (dict(bad_words_ids=[]), "bad_words_ids"),
    (dict(sequence_bias={(): 1.0}), "sequence_bias"),
    (dict(sequence_bias={(1,): "x"}), "sequence_bias"),
    (dict(sequence_bias={1: 1.0}), "sequence_bias"),
    (dict(do_sample=True, min_p=1.5), "min_p"),
    (dict(do_sample=True, min_p=-0.1), "min_p"),
    (dict(do_sample=True, typical_p=0.0), "typical_p"),
    (dict(do_sample=True, typical_p=1.5), "typical_p"),
    (dict(do_sample=True, epsilon_cutoff=0.0), "epsilon_cutoff"),
    (dict(do_sample=True, epsilon_cutoff=1.0), "epsilon_cutoff"),
    (dict(do_sample=True, eta_cutoff=0.0), "eta_cutoff"),
    (dict(do_sample=True, eta_cutoff=1.0), "eta_cutoff"),
    (dict(frequency_penalty=3), "frequency_penalty"),
    (dict(presence_penalty=-2.5), "presence_penalty"),
    (dict(logit_bias={1: 150.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
]


@pytest.mark.parametrize("settings, knob", INVALID, ids=[f"{k}={list(s.values())[-1]}" for s, k in INVALID])
def test_invalid_knob_is_a_value_error_naming_it(settings, knob):
    with pytest.raises(ValueError, match=knob):
        GenerationConfig(**settings)


@pytest.mark.parametrize("build, knob", [
    (lambda: RepetitionPenalty(0.0), "repetition_penalty"),
    (lambda: NoRepeatNGram(0), "no_repeat_ngram_size"),
    (lambda: NoBadWords([[1], 2]), "bad_words_ids"),
    (lambda: MinPWarper(2.0), "min_p"),
    (lambda: TypicalWarper(0.0), "typical_p"),
    (lambda: EpsilonWarper(1.5), "epsilon_cutoff"),
    (lambda: EtaWarper(-0.1), "eta_cutoff"),
    (lambda: FrequencyPresencePenalty(frequency_penalty=3, prompt_len=0), "frequency_penalty"),
    (lambda: MinPWarper(0.1, min_tokens_to_keep=0), "min_tokens_to_keep"),
])
def test_processor_classes_validate_in_init(build, knob):
    with pytest.raises(ValueError, match=knob):
        build()
