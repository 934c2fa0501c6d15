"""lmlab.generation against transformers: EOS / padding / length semantics of greedy decoding,
the sampling warpers, seeded sampling, validation, and the token iterator."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.testing import assert_close

import lmlab
from lmlab.generation import GenerationConfig, generate, generate_tokens
from lmlab.generation.processors import TemperatureWarper, TopKWarper, TopPWarper
from lmlab.models import GPT, GPTConfig, from_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT_LEN, NEW = 5, 20


def prompts(vocab: int, batch: int = 4, *, seed: int = 11) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def hf_generate(hf, ids, **kwargs):
    # Always pass the mask: given a pad_token_id, HF would otherwise infer padding from the ids.
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)


def first_stop(new: torch.Tensor, eos: list[int]) -> list[int | None]:
    """Per row, the step of the first EOS token in `new` (B, N), or None."""
    hits = torch.isin(new, torch.tensor(eos))
    return [int(row.nonzero()[0]) if row.any() else None for row in hits]


def pick_eos(new: torch.Tensor, *, all_rows: bool) -> list[int]:
    """Two EOS ids from the greedy continuations `new` such that each id is the first stop of
    some row, and either some rows stop mid-sequence while another runs to the end, or every row
    stops before the budget is spent."""
    n = new.shape[1]
    for a, b in itertools.combinations(sorted(set(new.flatten().tolist())), 2):
        stops = first_stop(new, [a, b])
        stopped_by = {int(new[r, s]) for r, s in enumerate(stops) if s is not None}
        if stopped_by != {a, b}:
            continue
        if all_rows and all(s is not None for s in stops) and max(stops) < n - 2:
            return [a, b]
        if not all_rows and None in stops and any(s is not None and 0 < s < n - 2 for s in stops):
            return [a, b]
    raise AssertionError("test setup: no suitable EOS pair in the greedy continuations")


# -- EOS and padding ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["b", "c"])
@pytest.mark.parametrize("all_rows", [False, True], ids=["some_rows_stop", "all_rows_stop"])
def test_eos_ids_and_padding_match_transformers(tiny_gpt2, name, all_rows):
    hf, directory = tiny_gpt2(name)
    ours = from_pretrained(directory)
    ids = prompts(hf.config.vocab_size)
    free = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[])
    eos = pick_eos(free[:, PROMPT_LEN:], all_rows=all_rows)
    pad = next(t for t in range(hf.config.vocab_size - 1, 0, -1) if t not in eos)

    got = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    expected = hf_generate(hf, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)

    stops = first_stop(free[:, PROMPT_LEN:], eos)
    if all_rows:
        assert got.shape[1] == PROMPT_LEN + max(stops) + 1  # stops when the last row finishes
    else:
        assert got.shape[1] == PROMPT_LEN + NEW
    for row, stop in enumerate(stops):
        new = got[row, PROMPT_LEN:]
        if stop is None:
            assert torch.equal(new, free[row, PROMPT_LEN:])
        else:  # identical up to and including its EOS, then only padding
            assert torch.equal(new[: stop + 1], free[row, PROMPT_LEN : PROMPT_LEN + stop + 1])
            assert torch.all(new[stop + 1 :] == pad)


def test_single_eos_without_pad_pads_with_eos_like_transformers(tiny_gpt2):
    hf, directory = tiny_gpt2("b")
    ours = from_pretrained(directory)
    ids = prompts(hf.config.vocab_size)
    free = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[])
    eos = pick_eos(free[:, PROMPT_LEN:], all_rows=False)[0]
    got = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=eos)
    expected = hf_generate(hf, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=None)
    assert torch.equal(got, expected)


def test_default_eos_comes_from_config_json(tiny_gpt2, tmp_path):
    from transformers import GPT2LMHeadModel

    hf, directory = tiny_gpt2("b")
    ours = from_pretrained(directory)
    ids = prompts(hf.config.vocab_size)
    free = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[])
    eos = pick_eos(free[:, PROMPT_LEN:], all_rows=False)[0]
    config = json.loads((directory / "config.json").read_text())
    config.update(eos_token_id=eos, pad_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())

    got = lmlab.generate(from_pretrained(tmp_path), ids, max_new_tokens=NEW)
    hf2 = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    expected = hf_generate(hf2, ids, max_new_tokens=NEW)
    assert torch.equal(got, expected)
    assert not torch.equal(got, free)  # the default EOS did stop some row


# -- length budget -----------------------------------------------------------------------------
@pytest.mark.parametrize("max_length", [PROMPT_LEN + 1, PROMPT_LEN + 9])
def test_max_length_counts_the_prompt_like_transformers(tiny_gpt2, max_length):
    hf, directory = tiny_gpt2("c")
    ours = from_pretrained(directory)
    ids = prompts(hf.config.vocab_size)
    got = lmlab.generate(ours, ids, max_length=max_length, eos_token_id=[])
    expected = hf_generate(hf, ids, max_length=max_length, pad_token_id=0)
    assert got.shape == (4, max_length)
    assert torch.equal(got, expected)


def test_max_new_tokens_takes_precedence_over_max_length(tiny_gpt2):
    hf, directory = tiny_gpt2("c")
    ours = from_pretrained(directory)
    ids = prompts(hf.config.vocab_size)
    got = lmlab.generate(ours, ids, max_new_tokens=3, max_length=PROMPT_LEN + 9, eos_token_id=[])
    expected = hf_generate(hf, ids, max_new_tokens=3, max_length=PROMPT_LEN + 9, pad_token_id=0)
    assert got.shape == (4, PROMPT_LEN + 3)
    assert torch.equal(got, expected)


def test_max_length_shorter_than_prompt_is_an_error(tiny_gpt2):
    _, directory = tiny_gpt2("c")
    ours = from_pretrained(directory)
    with pytest.raises(ValueError, match="max_length"):
        lmlab.generate(ours, prompts(77), max_length=PROMPT_LEN - 2)


# -- sampling warpers --------------------------------------------------------------------------
def hf_warpers(spec):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ctor = {"temperature": TemperatureLogitsWarper, "top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper}
    return [ctor[kind](value, **kw) for kind, value, kw in spec]


def our_warpers(spec):
    ctor = {"temperature": TemperatureWarper, "top_k": TopKWarper, "top_p": TopPWarper}
    return [ctor[kind](value, **kw) for kind, value, kw in spec]


WARPER_SPECS = {
    "temperature": [("temperature", 0.7, {})],
    "top_k": [("top_k", 5, {})],
    "top_p": [("top_p", 0.8, {})],
    "top_p_min_keep": [("top_p", 0.3, {"min_tokens_to_keep": 3})],
    "chain": [("temperature", 0.7, {}), ("top_k", 5, {}), ("top_p", 0.8, {})],
}


@pytest.mark.parametrize("spec", WARPER_SPECS.values(), ids=WARPER_SPECS.keys())
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
def test_warpers_match_transformers(spec, ties):
    g = torch.Generator().manual_seed(12)
    scores = 3 * torch.randn(4, 50, generator=g)
    if ties:  # many equal scores: top-k keeps every token tied with the k-th
        scores = scores.round()
    ids = torch.zeros(4, 3, dtype=torch.long)
    original, theirs = scores.clone(), scores.clone()
    ours = scores
    for w in our_warpers(spec):
        ours = w(ids, ours)
    for w in hf_warpers(spec):
        theirs = w(ids, theirs)
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    assert_close(ours.softmax(-1), theirs.softmax(-1), atol=1e-6, rtol=0)
    assert torch.equal(scores, original)  # our warpers do not modify their input in place
    if spec[-1][0] != "temperature":
        assert torch.isneginf(ours).any()  # the filter did something


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    scores = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = ~torch.isneginf(TopPWarper(0.6)(None, scores))
    assert kept.tolist() == [[True, True, False]]  # 0.5 < 0.6, so 0.3 must be kept too
    kept = ~torch.isneginf(TopPWarper(0.5)(None, scores))
    assert kept.tolist() == [[True, False, False]]


def test_top_p_min_tokens_to_keep_zero_is_rejected():
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        TopPWarper(0.3, min_tokens_to_keep=0)


# -- sampling ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    with torch.no_grad():
        m.wte.weight.mul_(20)  # peakier next-token distributions than the 0.02 init gives
    return m.eval()


def sample(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    return lmlab.generate(model, ids, do_sample=True, eos_token_id=[], **kwargs)


def test_seeded_sampling_is_reproducible(model):
    ids = prompts(64, batch=3)
    a = sample(model, ids, seed=1)
    assert torch.equal(a, sample(model, ids, seed=1))
    assert not torch.equal(a, sample(model, ids, seed=2))
    assert not torch.equal(a, lmlab.generate(model, ids, max_new_tokens=12, eos_token_id=[]))
    assert torch.equal(sample(model, ids, seed=3, top_k=1), lmlab.generate(model, ids, max_new_tokens=12, eos_token_id=[]))


def test_sampling_follows_the_warped_distribution(model):
    # One step for 4000 copies of one prompt: the empirical distribution of the sampled token
    # must be softmax(top_k(logits / T)), not the raw or unwarped one.
    ids = prompts(64, batch=1).expand(4000, -1)
    with torch.no_grad():
        logits = model(ids[:1])[0, -1]
    expected = TopKWarper(4)(None, logits / 2.0).softmax(-1)  # ≈ (0.70, 0.13, 0.09, 0.08)
    tokens = sample(model, ids, seed=4, max_new_tokens=1, temperature=2.0, top_k=4)[:, -1]
    freq = torch.bincount(tokens, minlength=64).float() / len(tokens)
    assert set(tokens.tolist()) <= set(expected.nonzero().flatten().tolist())
    assert_close(freq, expected, atol=0.025, rtol=0)  # > 4 standard errors


def test_unseeded_sampling_respects_torch_manual_seed(model):
    ids = prompts(64, batch=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append((sample(model, ids), torch.rand(4)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(top_p=0.9), ValueError, "do_sample"),
        (dict(top_k=5), ValueError, "do_sample"),
        (dict(temperature=0.5), ValueError, "do_sample"),
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
        (dict(do_sample=True, top_p=-0.5), ValueError, "top_p"),
        (dict(do_sample=True, top_p=0.0), ValueError, "top_p"),
        (dict(do_sample=True, top_k=0), ValueError, "top_k"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=28), ValueError, "context window"),  # 5 + 28 > 32
        (dict(max_length=33), ValueError, "context window"),
        (dict(num_beam=3), TypeError, "num_beam"),
    ],
)
def test_invalid_arguments_are_errors(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        lmlab.generate(model, prompts(64, batch=2), **kwargs)


def test_full_context_window_is_allowed(model):
    out = lmlab.generate(model, prompts(64, batch=2), max_new_tokens=27, eos_token_id=[])
    assert out.shape == (2, 32)


# -- the token iterator ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [dict(), dict(do_sample=True, seed=5, top_p=0.9, temperature=0.8)],
    ids=["greedy", "sampled"],
)
def test_generate_tokens_streams_what_generate_returns(tiny_gpt2, settings):
    hf, directory = tiny_gpt2("b")
    ours = from_pretrained(directory)
    ids = prompts(hf.config.vocab_size)
    free = lmlab.generate(ours, ids, max_new_tokens=NEW, eos_token_id=[], **settings)
    eos = pick_eos(free[:, PROMPT_LEN:], all_rows=True)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # one left-padded row
    full = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                    pad_token_id=0, **settings)
    config = GenerationConfig(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, **settings)
    steps = list(generate_tokens(ours, ids, config, attention_mask=mask))
    assert all(step.shape == (4,) for step in steps)
    assert torch.equal(torch.stack(steps, dim=1), full[:, PROMPT_LEN:])
    assert len(steps) < NEW or settings  # greedy: the chosen EOS pair stops every row early
