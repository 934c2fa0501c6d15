"""Beam search against transformers' generate: token-identical outputs over a matrix of beam
widths, length penalties, early-stopping modes, EOS sets, processors, return counts, length
budgets and left-padded batches; beam sampling; batch invariance; validation."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import lmlab
from lmlab.generation import GenerationConfig
from lmlab.generation.generate import beam_search
from lmlab.models import from_pretrained

from conftest import build_hf_gpt2  # tests/ is on sys.path (rootdir conftest, no __init__)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT_LEN, NEW, PAD = 6, 14, 3
MODELS = {  # ≤ 2 layers, width ≤ 32, vocab ≤ 100
    "b": dict(seed=0, n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=100,
              activation_function="gelu", tie_word_embeddings=False),
    "s": dict(seed=1, n_layer=1, n_head=2, n_embd=16, n_positions=48, vocab_size=60,
              activation_function="gelu_new"),
}


class Tiny(NamedTuple):
    hf: object
    ours: object
    pool: list[int]  # tokens our free-running beam search returns early, most frequent first


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`models(name) -> Tiny`; EOS ids are picked from its `pool`, so that they do end hypotheses."""
    built = {}

    def get(name):
        if name not in built:
            hf = build_hf_gpt2(**MODELS[name])
            directory = tmp_path_factory.mktemp(f"beam_{name}")
            hf.save_pretrained(directory)
            ours = from_pretrained(directory)
            free = lmlab.generate(ours, prompts(name), max_new_tokens=NEW, num_beams=4,
                                 num_return_sequences=4, eos_token_id=[], pad_token_id=PAD)
            early = free[:, PROMPT_LEN: PROMPT_LEN + NEW // 2].flatten().tolist()
            pool = sorted(set(early) - {PAD}, key=lambda t: (-early.count(t), t))
            built[name] = Tiny(hf, ours, pool)
        return built[name]

    return get


def prompts(name: str, batch: int = 3) -> torch.Tensor:
    vocab = MODELS[name]["vocab_size"]
    g = torch.Generator().manual_seed(7)
    return torch.randint(PAD + 1, vocab, (batch, PROMPT_LEN), generator=g)


def left_padded(ids: torch.Tensor, pads=(0, 2, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of lengths PROMPT_LEN - pads, left-padded with PAD, and their attention mask."""
    ids, mask = ids.clone(), torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = PAD, 0
    return ids, mask


def hf_generate(hf, ids, mask, **kwargs):
    # Always pass the mask: given a pad_token_id, HF would otherwise infer padding from the ids.
    return hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)


# -- the parity matrix -------------------------------------------------------------------------
BAD_WORDS = "from the output without them"  # a token and a bigram that it contains


def matrix() -> list:
    cases = []
    # Every (num_beams, length_penalty, early_stopping) combination, with 1-3 EOS ids, some
    # prompts left-padded, and num_return_sequences from 1 to num_beams.
    for i, (nb, lp, es) in enumerate(
        (nb, lp, es) for nb in (2, 4, 5) for lp in (0.5, 1.0, 2.0) for es in (True, False, "never")
    ):
        knobs = dict(num_beams=nb, length_penalty=lp, early_stopping=es,
                     num_return_sequences=1 + i % nb if i % 3 else 1)
        cases.append(dict(model="b" if i % 2 else "s", n_eos=1 + i % 3, padded=i % 4 in (1, 2),
                          knobs=knobs))
    # Processors, under several strategies. Rarer EOS ids (further down the pool) give longer
    # hypotheses for the n-gram ban and bad words to act on; the min_new_tokens cases use the
    # most frequent ones and a length penalty that favours stopping early, so EOS is banned
    # where it would have won.
    for knobs, needs, eos_from in [
        (dict(num_beams=4, no_repeat_ngram_size=2), dict(no_repeat_ngram_size=2), 2),
        (dict(num_beams=5, no_repeat_ngram_size=3, early_stopping=True),
         dict(no_repeat_ngram_size=3), 2),
        (dict(num_beams=2, no_repeat_ngram_size=2, early_stopping="never", length_penalty=0.5),
         dict(no_repeat_ngram_size=2), 2),
        (dict(num_beams=4, repetition_penalty=1.5, num_return_sequences=3),
         dict(repetition_penalty=1.5), 1),
        (dict(num_beams=5, repetition_penalty=0.8, early_stopping=True),
         dict(repetition_penalty=0.8), 1),
        (dict(num_beams=4, min_new_tokens=6, num_return_sequences=4), dict(min_new_tokens=6), 0),
        (dict(num_beams=2, min_new_tokens=8, early_stopping="never", length_penalty=0.5),
         dict(min_new_tokens=8), 0),
        (dict(num_beams=4, bad_words_ids=BAD_WORDS), dict(bad_words_ids=[[8], [9, 10]]), 2),
        (dict(num_beams=5, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=3,
              num_return_sequences=2), dict(no_repeat_ngram_size=2), 2),
    ]:
        for model, padded in (("b", False), ("s", True)):
            cases.append(dict(model=model, n_eos=2, eos_from=eos_from, padded=padded, knobs=knobs,
                              needs=needs))
    # Length budget as max_length (prompt included); no EOS at all; a one-token budget.
    for model, knobs in [
        ("b", dict(num_beams=4, max_length=PROMPT_LEN + 9, num_return_sequences=2)),
        ("s", dict(num_beams=5, max_length=PROMPT_LEN + 12, early_stopping=True)),
        ("b", dict(num_beams=3, max_new_tokens=1, num_return_sequences=3)),
    ]:
        cases.append(dict(model=model, n_eos=1, padded=True, knobs=knobs))
    cases.append(dict(model="b", n_eos=0, padded=True, knobs=dict(num_beams=4, num_return_sequences=2)))
    return [pytest.param(c, id=case_id(c)) for c in cases]


def case_id(case) -> str:
    knobs = "-".join(f"{k}={v}" for k, v in case["knobs"].items())
    pad = "-padded" if case["padded"] else ""
    return f"{case['model']}-eos{case['n_eos']}{pad}-{knobs}".replace(" ", "")


@pytest.mark.parametrize("case", matrix())
def test_beam_search_matches_transformers(models, case):
    hf, ours, pool = models(case["model"])
    ids, mask = prompts(case["model"]), None
    if case["padded"]:
        ids, mask = left_padded(ids)
    eos = pool[case.get("eos_from", 0):][: case["n_eos"]]
    knobs = dict(case["knobs"])
    if "max_length" not in knobs:
        knobs.setdefault("max_new_tokens", NEW)
    run = lambda **k: lmlab.generate(ours, ids, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD, **k)
    if "needs" in case:
        without = run(**{k: v for k, v in knobs.items() if k not in case["needs"]})
        if knobs.get("bad_words_ids") == BAD_WORDS:
            rows = [[t for t in row if t not in eos + [PAD]] for row in without[:, PROMPT_LEN:].tolist()]
            longest = max(rows, key=len)
            knobs["bad_words_ids"] = [longest[:1], longest[1:3]]

    got = run(**knobs)
    expected = hf_generate(hf, ids, torch.ones_like(ids) if mask is None else mask,
                           eos_token_id=eos or None, pad_token_id=PAD, **knobs)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert got.shape[0] == ids.shape[0] * knobs.get("num_return_sequences", 1)
    if eos and knobs.get("max_new_tokens") != 1:  # EOS handling was exercised
        assert torch.isin(got[:, PROMPT_LEN:], torch.tensor(eos)).any()
    if "needs" in case:  # the processor under test did change the result
        assert not torch.equal(got, without)


def test_matrix_exercises_eos_padding_and_early_stop(models):
    """The EOS pool does what the matrix needs: with it, some returned hypotheses end in EOS
    before others (so padding shows), and search can stop before the budget."""
    _, ours, pool = models("b")
    got = lmlab.generate(ours, prompts("b"), max_new_tokens=NEW, num_beams=4, num_return_sequences=4,
                        eos_token_id=pool[:2], pad_token_id=PAD, early_stopping=True)
    new = got[:, PROMPT_LEN:]
    ended = torch.isin(new, torch.tensor(pool[:2])).any(dim=1)
    assert ended.any() and (new == PAD).any()
    assert got.shape[1] < PROMPT_LEN + NEW


# -- length normalisation and early stopping, directly -----------------------------------------
def test_length_penalty_and_early_stopping_change_the_result(models):
    """The matrix would pass vacuously if these knobs did nothing on the tiny model."""
    _, ours, pool = models("b")
    ids, eos = prompts("b"), pool[:2]
    run = lambda **k: lmlab.generate(ours, ids, max_new_tokens=NEW, num_beams=4, eos_token_id=eos,
                                    pad_token_id=PAD, **k)
    assert not torch.equal(run(length_penalty=0.5), run(length_penalty=2.0))
    assert run(early_stopping=True).shape[1] < run(early_stopping="never").shape[1]


def test_pad_token_zero_pads_like_transformers(models):
    """transformers' beam search fills finished hypotheses with `pad_token_id or eos_token_id[0]`,
    so pad id 0 (falsy) pads with the first EOS there, while its greedy search writes 0. The blog
    post's call on a batch left-padded with 0 whose hypotheses end at different lengths is
    token-identical to transformers, after EOS too; greedy decoding still pads with 0."""
    hf, ours, pool = models("b")
    ids, mask = left_padded(prompts("b"))
    ids = ids.masked_fill(mask == 0, 0)
    eos = pool[:2]
    knobs = dict(max_length=50, num_beams=5, no_repeat_ngram_size=2, early_stopping=True,
                 num_return_sequences=3, eos_token_id=eos, pad_token_id=0)
    got = lmlab.generate(ours, ids, attention_mask=mask, **knobs)
    assert torch.equal(got, hf_generate(hf, ids, mask, **knobs))
    new = got[:, PROMPT_LEN:].tolist()
    ends = [next(i for i, t in enumerate(row) if t in eos) for row in new if set(row) & set(eos)]
    assert ends and min(ends) < got.shape[1] - PROMPT_LEN - 1  # a hypothesis is padded
    for row in new:
        first = next((i for i, t in enumerate(row) if t in eos), len(row))
        assert all(t == eos[0] for t in row[first + 1:])
    greedy = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    got = lmlab.generate(ours, ids, attention_mask=mask, **greedy)
    assert torch.equal(got, hf_generate(hf, ids, mask, **greedy))
    assert (got[:, PROMPT_LEN:] == 0).any()


# -- batches -----------------------------------------------------------------------------------
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_each_row_of_a_padded_batch_matches_the_prompt_alone(models, early_stopping):
    _, ours, pool = models("b")
    ids, mask = left_padded(prompts("b"))
    knobs = dict(max_new_tokens=NEW, num_beams=4, num_return_sequences=2, eos_token_id=pool[:2],
                 pad_token_id=PAD, early_stopping=early_stopping)
    batched = lmlab.generate(ours, ids, attention_mask=mask, **knobs)
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()][None]
        alone = lmlab.generate(ours, prompt, **knobs)
        mine = batched[2 * row: 2 * row + 2, PROMPT_LEN:]
        new = alone[:, prompt.shape[1]:]
        assert torch.equal(mine[:, : new.shape[1]], new)
        assert torch.all(mine[:, new.shape[1]:] == PAD)


def test_tutorial_call(models):
    """The call from Hugging Face's "how to generate" blog post."""
    hf, ours, _ = models("b")
    ids = prompts("b", batch=1)
    got = lmlab.generate(ours, ids, max_length=50, num_beams=5, no_repeat_ngram_size=2, early_stopping=True)
    assert got.shape[0] == 1 and PROMPT_LEN < got.shape[1] <= 50
    assert torch.equal(got[:, :PROMPT_LEN], ids)
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_length=50, num_beams=5,
                           no_repeat_ngram_size=2, early_stopping=True)
    assert torch.equal(got, expected)
    bigrams = list(zip(got[0, :-1].tolist(), got[0, 1:].tolist()))
    assert len(bigrams) == len(set(bigrams))


# -- beam sampling -----------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [dict(), dict(temperature=0.7, top_k=20)], ids=["plain", "warped"])
def test_beam_sampling_matches_transformers_under_manual_seed(models, knobs):
    hf, ours, pool = models("b")
    ids, mask = left_padded(prompts("b"))
    common = dict(max_new_tokens=NEW, num_beams=4, num_return_sequences=2, do_sample=True,
                  eos_token_id=pool[:2], pad_token_id=PAD, **knobs)
    torch.manual_seed(5)
    got = lmlab.generate(ours, ids, attention_mask=mask, **common)
    torch.manual_seed(5)
    # transformers samples with top_k=50 unless told otherwise (0 turns it off); lmlab does not.
    expected = hf.generate(ids, attention_mask=mask, **{"top_k": 0, **common})
    assert torch.equal(got, expected)
    greedy = {k: v for k, v in common.items() if k not in ("do_sample", *knobs)}
    assert not torch.equal(got, lmlab.generate(ours, ids, attention_mask=mask, **greedy))


def test_seeded_beam_sampling_is_reproducible_and_batch_invariant(models):
    _, ours, pool = models("b")
    ids = prompts("b")
    knobs = dict(max_new_tokens=NEW, num_beams=4, do_sample=True, eos_token_id=pool[:2],
                 pad_token_id=PAD, early_stopping=True)
    a = lmlab.generate(ours, ids, seed=3, **knobs)
    assert torch.equal(a, lmlab.generate(ours, ids, seed=3, **knobs))
    assert not torch.equal(a, lmlab.generate(ours, ids, seed=4, **knobs))
    alone = lmlab.generate(ours, ids[:1], seed=3, **knobs)
    assert torch.equal(a[:1, : alone.shape[1]], alone)
    assert torch.all(a[:1, alone.shape[1]:] == PAD)


# -- validation and edge cases -----------------------------------------------------------------
def test_zero_new_tokens_returns_each_prompt_num_return_sequences_times(models):
    _, ours, _ = models("s")
    ids = prompts("s")
    got = lmlab.generate(ours, ids, max_new_tokens=0, num_beams=3, num_return_sequences=2)
    assert torch.equal(got, ids.repeat_interleave(2, dim=0))


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(num_beams=1), "num_beams"),
        (dict(num_beams=2, stop_strings=["x"]), "stop_strings"),
        (dict(num_beams=2, max_new_tokens=60), "context window"),
    ],
)
def test_invalid_beam_search_calls_are_errors(models, config, match):
    _, ours, _ = models("s")
    with pytest.raises(ValueError, match=match):
        beam_search(ours, prompts("s"), GenerationConfig(**config))


def test_mask_of_the_wrong_shape_is_an_error(models):
    _, ours, _ = models("s")
    ids = prompts("s")
    with pytest.raises(ValueError, match="attention_mask"):
        beam_search(ours, ids, GenerationConfig(num_beams=2), attention_mask=torch.ones(3, 2))
