"""Speculative decoding: greedy output identical to the target's greedy decoding (batch 1 and
ragged left-padded batches, EOS, budgets), the acceptance step exact by enumeration, and the full
sampled decode following the target's distribution (Monte Carlo)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmlab.generation import GenerationConfig, generate, generate_tokens
from lmlab.generation.sampling import TokenSampler
from lmlab.generation.processors import TemperatureWarper, TopKWarper
from lmlab.generation.speculative import (
    accept_or_resample,
    acceptance_probability,
    residual_distribution,
    speculative_generate,
)
from lmlab.models import GPT, GPTConfig, from_pretrained

from conftest import build_hf_gpt2  # tests/ is on sys.path (rootdir conftest, no __init__)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT_LEN, NEW, VOCAB, N_POSITIONS = 6, 20, 100, 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`hf` and lmlab `target` (2 layers), and three drafts over the same vocabulary:
    `early_exit` — the target's own first layer (1 layer), which agrees with it often but not
    always, so rows of a batch accept different numbers of drafts; `random` — an unrelated
    1-layer model that almost never agrees; `target` itself, which must always agree."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = build_hf_gpt2(seed=0, n_layer=2, n_head=4, n_embd=32, n_positions=N_POSITIONS,
                       vocab_size=VOCAB)
    with torch.no_grad():  # a weak second layer makes the first layer a useful draft
        for name, p in hf.named_parameters():
            if name.startswith("transformer.h.1.") and "c_proj" in name:
                p.mul_(0.3)
    early = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=4, n_embd=32, n_positions=N_POSITIONS,
                                       vocab_size=VOCAB, bos_token_id=None, eos_token_id=None))
    missing, _ = early.load_state_dict(hf.state_dict(), strict=False)
    assert not missing
    rand = build_hf_gpt2(seed=1, n_layer=1, n_head=2, n_embd=16, n_positions=N_POSITIONS,
                         vocab_size=VOCAB)
    loaded = {}
    for name, model in (("target", hf), ("early_exit", early), ("random", rand)):
        directory = tmp_path_factory.mktemp(f"spec_{name}")
        model.save_pretrained(directory)
        loaded[name] = from_pretrained(directory)
    loaded["hf"] = hf.eval()
    return loaded


def batch_of(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask): one row, or three rows of which two are left-padded."""
    g = torch.Generator().manual_seed(3)
    if kind == "one":
        ids = torch.randint(1, VOCAB, (1, PROMPT_LEN), generator=g)
        return ids, torch.ones_like(ids)
    ids = torch.randint(1, VOCAB, (3, PROMPT_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 0  # pad id; the mask, not the id, marks padding
    return ids, mask


def speculative(target, draft, ids, mask, *, k, stats=None, **knobs):
    knobs.setdefault("max_new_tokens", NEW)
    knobs.setdefault("eos_token_id", [])
    return speculative_generate(target, draft, ids, GenerationConfig(**knobs),
                                attention_mask=mask, num_draft_tokens=k, stats=stats)


def rounds_when_all_accepted(new: int, k: int) -> int:
    rounds = 0
    while new > 0:
        new -= min(k + 1, new)
        rounds += 1
    return rounds


# -- greedy: identical to the target's own greedy decoding ------------------------------------
@pytest.mark.parametrize("batch", ["one", "three_left_padded"])
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("draft", ["early_exit", "random", "target"])
def test_greedy_is_identical_to_target_greedy(models, draft, k, batch):
    target = models["target"]
    ids, mask = batch_of(batch)
    expected = generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    stats = {}
    got = speculative(target, models[draft], ids, mask, k=k, stats=stats)
    assert torch.equal(got, expected)
    assert set(stats) == {"proposed", "accepted", "acceptance_rate", "target_calls"}
    assert stats["acceptance_rate"] == stats["accepted"] / stats["proposed"]
    if draft == "target":  # every draft is the target's argmax: k + 1 tokens per target call
        assert stats["acceptance_rate"] == 1.0
        assert stats["target_calls"] == 1 + rounds_when_all_accepted(NEW, k)  # 1: the prompt
    elif draft == "early_exit":
        assert 0.2 < stats["acceptance_rate"] < 1.0
        assert stats["target_calls"] < 1 + NEW
    else:
        assert stats["acceptance_rate"] < 0.2


def test_greedy_with_left_padding_matches_transformers(models):
    ids, mask = batch_of("three_left_padded")
    got = speculative(models["target"], models["early_exit"], ids, mask, k=4)
    expected = models["hf"].generate(ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(got, expected)


def test_ragged_rows_keep_their_own_cache_lengths_and_stay_identical(models):
    # The early-exit draft makes rows keep different numbers of drafts per round; each cache
    # row must then be rolled back to what its own row kept (rows of different lengths), and the
    # output must still be greedy's exactly.
    target = models["target"]
    ids, mask = batch_of("three_left_padded")
    ids, mask = ids[[0, 0, 1]], mask[[0, 0, 1]]  # rows 0 and 1 are identical: never ragged
    lengths = []
    hook = target.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["cache"].lengths), with_kwargs=True)
    try:
        got = speculative(target, models["early_exit"], ids, mask, k=4)  # hooked: module path
    finally:
        hook.remove()
    expected = generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(got, expected)
    assert any(row[2] != row[0] for row in lengths[1:])  # the third row runs ahead or behind …
    assert all(row[0] == row[1] for row in lengths)  # … and equal rows stay equal


@pytest.mark.parametrize("batch", ["one", "three_left_padded"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("all_rows", [False, True], ids=["some_rows_stop", "all_rows_stop"])
def test_greedy_eos_and_padding_are_identical(models, batch, k, all_rows):
    target = models["target"]
    ids, mask = batch_of(batch)
    free = generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    new = free[:, PROMPT_LEN:]
    # Row r's token at step 5 + 3r: each chosen row stops there or earlier.
    rows = range(len(ids)) if all_rows else [0]
    eos = sorted({int(new[r, 5 + 3 * r]) for r in rows})
    pad = next(t for t in range(VOCAB - 1, 0, -1) if t not in eos)
    expected = generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                        pad_token_id=pad)
    got = speculative(target, models["early_exit"], ids, mask, k=k, eos_token_id=eos,
                      pad_token_id=pad)
    assert torch.equal(got, expected)
    if all_rows:
        assert got.shape[1] < PROMPT_LEN + NEW  # stops once the last row has stopped
    row0 = got[0, PROMPT_LEN:]
    stop = int(torch.isin(row0, torch.tensor(eos)).nonzero()[0])
    assert stop <= 5 and torch.all(row0[stop + 1:] == pad)


@pytest.mark.parametrize("k", [1, 6])
def test_budget_up_to_the_full_context_window(models, k):
    # Drafts near the end would run past the last position; they must never be kept.
    target = models["target"]
    ids, mask = batch_of("three_left_padded")
    new = N_POSITIONS - PROMPT_LEN
    expected = generate(target, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    got = speculative(target, models["early_exit"], ids, mask, k=k, max_new_tokens=new)
    assert got.shape == (3, N_POSITIONS)
    assert torch.equal(got, expected)
    got = speculative(target, models["early_exit"], ids, mask, k=k, max_new_tokens=None,
                      max_length=PROMPT_LEN + 7)
    assert torch.equal(got, expected[:, : PROMPT_LEN + 7])


def test_processors_see_each_rows_own_sequence(models):
    # Rows run ahead of each other, so a processor that depends on the sequence and on its
    # length must be given each row's own tokens: ban every token generated so far and favour a
    # token chosen by the length. Equality with the step-by-step decode proves it.
    def ban_repeats(input_ids, scores):
        seen = torch.zeros_like(scores, dtype=torch.bool)
        seen.scatter_(1, input_ids[:, PROMPT_LEN:], True)
        scores = scores.masked_fill(seen, float("-inf"))
        favour = (7 * input_ids.shape[1]) % scores.shape[1]
        return scores + 4.0 * (torch.arange(scores.shape[1]) == favour)

    target = models["target"]
    ids, mask = batch_of("three_left_padded")
    config = GenerationConfig(max_new_tokens=NEW, eos_token_id=[])
    config.logits_processors = lambda *, prompt_len, attention_mask=None, padding=0: [ban_repeats]
    expected = torch.cat([ids, torch.stack(list(
        generate_tokens(target, ids, config, attention_mask=mask)), dim=1)], dim=1)
    plain = generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    assert not torch.equal(expected, plain)  # the processor does change the output
    stats = {}
    got = speculative_generate(target, models["early_exit"], ids, config, attention_mask=mask,
                               num_draft_tokens=3, stats=stats)
    assert torch.equal(got, expected)
    assert stats["accepted"] > 0


@pytest.mark.parametrize("knobs", [
    dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    dict(min_new_tokens=12, frequency_penalty=0.7, presence_penalty=0.3),
], ids=["repetition_ngram", "min_new_tokens_penalties"])
def test_sequence_dependent_processors_are_identical(models, knobs):
    # GenerationConfig's own processors through ragged rounds, with an EOS that min_new_tokens
    # must hold back for each row by its own length.
    target = models["target"]
    ids, mask = batch_of("three_left_padded")
    free = generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[],
                    **knobs)
    eos = [int(free[0, PROMPT_LEN + 3]), int(free[2, PROMPT_LEN + 14])]
    expected = generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                        pad_token_id=0, **knobs)
    stats = {}
    got = speculative(target, models["early_exit"], ids, mask, k=3, eos_token_id=eos,
                      pad_token_id=0, stats=stats, **knobs)
    assert torch.equal(got, expected)
    assert stats["accepted"] > 0


def test_generate_dispatches_to_speculative_decoding(models):
    target = models["target"]
    ids, mask = batch_of("three_left_padded")
    got = generate(target, ids, attention_mask=mask, draft_model=models["early_exit"],
                   max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(got, speculative(target, models["early_exit"], ids, mask, k=4))


# -- the acceptance step, exact by enumeration -------------------------------------------------
def distributions(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    p = torch.rand(6, generator=g, dtype=torch.float64).pow(3)
    q = torch.rand(6, generator=g, dtype=torch.float64).pow(3)
    if kind == "equal":
        q = p.clone()
    elif kind == "disjoint":
        p[:3], q[3:] = 0, 0
    elif kind == "p_zero_where_q_not":
        p[[0, 4]] = 0
    elif kind == "q_zero_where_p_not":
        q[[1, 2]] = 0
    return p / p.sum(), q / q.sum()


KINDS = ["dense", "equal", "disjoint", "p_zero_where_q_not", "q_zero_where_p_not"]


@pytest.mark.parametrize("kind", KINDS)
def test_accept_or_resample_is_exact_by_enumeration(kind):
    p, q = distributions(kind)
    vocab = len(p)
    x = torch.arange(vocab)  # every draft token, one row each
    accept = acceptance_probability(p.expand(vocab, -1), q.expand(vocab, -1), x)
    residual = residual_distribution(p[None], q[None])[0]
    assert torch.all((0 <= accept) & (accept <= 1))
    assert_close(residual.sum(), torch.tensor(1.0, dtype=torch.float64))
    # P(out = y) = Σ_x q(x) · [accept(x) · δ(x, y) + (1 - accept(x)) · residual(y)]
    out = q * accept + (q * (1 - accept)).sum() * residual
    assert_close(out, p, atol=1e-6, rtol=0)
    if kind == "equal":
        assert torch.all(accept == 1)
    if kind == "disjoint":  # q never proposes what p wants: always rejected, resampled from p
        assert torch.all(accept[q > 0] == 0)
        assert_close(residual, p)


@pytest.mark.parametrize("kind", ["dense", "disjoint", "q_zero_where_p_not"])
def test_accept_or_resample_samples_what_it_enumerates(kind):
    # The sampling code itself: draws x ~ q for many rows, then the output must be ~ p, a draft
    # is accepted with frequency accept(x), and an accepted row returns x.
    p, q = (d.float() for d in distributions(kind))
    n = 200_000
    torch.manual_seed(0)
    x = torch.multinomial(q, n, replacement=True)
    sampler = TokenSampler.seeded(do_sample=True, seed=None, batch_size=n, device="cpu")
    accepted, token = accept_or_resample(p.expand(n, -1), q.expand(n, -1), x, sampler=sampler)
    assert torch.all(token[accepted] == x[accepted])
    freq = torch.bincount(token, minlength=len(p)).float() / n
    tolerance = 5 * (p * (1 - p) / n).sqrt() + 1e-4
    assert torch.all((freq - p).abs() <= tolerance), (freq, p)
    for token_id in range(len(p)):
        drafted = x == token_id
        if drafted.sum() > 1000:
            want = float(acceptance_probability(p[None], q[None], torch.tensor([token_id])))
            rate = accepted[drafted].float().mean().item()
            assert abs(rate - want) < 5 * (want * (1 - want) / int(drafted.sum())) ** 0.5 + 1e-3


def test_accept_or_resample_with_seeded_rows_is_reproducible():
    p, q = (d.float().expand(4, -1) for d in distributions("dense"))
    x = torch.tensor([0, 1, 2, 3])
    runs = []
    for _ in range(2):
        sampler = TokenSampler.seeded(do_sample=True, seed=7, batch_size=4, device="cpu")
        runs.append(torch.stack([torch.stack(accept_or_resample(p, q, x, sampler=sampler))
                                 for _ in range(20)]))
    assert torch.equal(runs[0], runs[1])


# -- the full sampled decode follows the target's distribution ---------------------------------
def warped_probs(model, ids: torch.Tensor, *, temperature: float, top_k: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids)[:, -1].float()
    return TopKWarper(top_k)(ids, TemperatureWarper(temperature)(ids, logits)).softmax(-1)


def exact_joint(model, prompt: torch.Tensor, steps: int, **warp) -> dict[tuple, float]:
    """P(first `steps` new tokens) under the target alone, by enumerating the warped support."""
    joint = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for prefix, mass in joint.items():
            ids = torch.cat([prompt, torch.tensor(prefix, dtype=torch.long)])[None]
            probs = warped_probs(model, ids, **warp)[0]
            for token in probs.nonzero().flatten().tolist():
                grown[prefix + (token,)] = mass * float(probs[token])
        joint = grown
    return joint


@pytest.mark.parametrize("new, k", [(2, 1), (3, 2), (3, 1)],
                         ids=["one_round_bonus", "one_round_two_drafts", "two_ragged_rounds"])
def test_sampled_decode_follows_the_target_distribution(models, new, k):
    # Many copies of one prompt; the joint distribution of the new tokens must be the target's
    # warped one, although the draft's (warped the same way) is different.
    warp = dict(temperature=1.5, top_k=3)
    target, draft = models["target"], models["early_exit"]
    prompt = batch_of("one")[0][0, -3:]  # short: the cost is 12 000 rows × sequence length
    n = 12_000
    ids = prompt.expand(n, -1)
    torch.manual_seed(1)
    stats = {}
    out = speculative(target, draft, ids, None, k=k, stats=stats, max_new_tokens=new,
                      do_sample=True, **warp)
    assert 0.3 < stats["acceptance_rate"] < 0.9  # both acceptance and rejection are exercised
    want = exact_joint(target, prompt, new, **warp)
    got: dict[tuple, int] = {}
    for row in out[:, len(prompt):].tolist():
        got[tuple(row)] = got.get(tuple(row), 0) + 1
    assert set(got) <= set(want)  # nothing outside the target's warped support
    for cell, p in want.items():
        freq = got.get(cell, 0) / n
        assert abs(freq - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-3, (cell, freq, p)
    q_first = warped_probs(draft, prompt[None], **warp)[0]
    p_first = warped_probs(target, prompt[None], **warp)[0]
    assert (q_first - p_first).abs().max() > 0.1  # the draft really is a different distribution


def test_sampled_top_k_1_is_greedy(models):
    # With top_k=1, p and q are one-hot: acceptance is exact agreement, and the output must be
    # the target's greedy output, row by row, through every ragged round.
    target = models["target"]
    ids, mask = batch_of("three_left_padded")
    expected = generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    got = speculative(target, models["early_exit"], ids, mask, k=3, do_sample=True, top_k=1,
                      seed=0)
    assert torch.equal(got, expected)


def test_sampled_batch_respects_budget_eos_and_seed(models):
    target, draft = models["target"], models["early_exit"]
    ids, mask = batch_of("three_left_padded")
    knobs = dict(do_sample=True, temperature=0.8, top_p=0.9)
    free = speculative(target, draft, ids, mask, k=3, seed=2, **knobs)
    assert free.shape == (3, PROMPT_LEN + NEW)
    eos = [int(free[1, PROMPT_LEN + 4])]  # row 1 stops at step 4 or earlier
    stats = {}
    got = speculative(target, draft, ids, mask, k=3, seed=2, eos_token_id=eos, pad_token_id=0,
                      stats=stats, **knobs)
    assert got.shape[1] <= PROMPT_LEN + NEW
    assert torch.equal(got[:, :PROMPT_LEN], ids)
    for row in got[:, PROMPT_LEN:]:
        hits = torch.isin(row, torch.tensor(eos)).nonzero().flatten()
        if len(hits):
            assert torch.all(row[int(hits[0]) + 1:] == 0)  # padding after the first EOS only
    assert torch.isin(got[1, PROMPT_LEN:PROMPT_LEN + 5], torch.tensor(eos)).any()
    assert stats["proposed"] > 0 and 0 < stats["acceptance_rate"] < 1
    assert 1 < stats["target_calls"] <= 1 + NEW
    again = speculative(target, draft, ids, mask, k=3, seed=2, eos_token_id=eos, pad_token_id=0,
                        **knobs)
    assert torch.equal(got, again)
    other = speculative(target, draft, ids, mask, k=3, seed=3, **knobs)
    assert not torch.equal(free, other)


def test_num_return_sequences_repeats_each_prompt(models):
    ids, mask = batch_of("three_left_padded")
    out = speculative(models["target"], models["early_exit"], ids, mask, k=2, do_sample=True,
                      seed=0, num_return_sequences=2, max_new_tokens=5)
    assert out.shape == (6, PROMPT_LEN + 5)
    assert torch.equal(out[:, :PROMPT_LEN], ids.repeat_interleave(2, dim=0))


# -- validation --------------------------------------------------------------------------------
def test_invalid_inputs_are_errors_that_say_how_to_fix_them(models):
    target = models["target"]
    ids, mask = batch_of("one")
    config = GenerationConfig(max_new_tokens=5)
    other_vocab = GPT(GPTConfig(vocab_size=50, n_positions=64, n_embd=8, n_layer=1, n_head=1))
    with pytest.raises(ValueError, match=r"vocab_size \(50\) must equal the target's \(100\)"):
        speculative_generate(target, other_vocab, ids, config)
    short = GPT(GPTConfig(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    with pytest.raises(ValueError, match="draft model's context window of 8"):
        speculative_generate(target, short, ids, config)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_draft_tokens must be an integer >= 1"):
            speculative_generate(target, models["random"], ids, config, num_draft_tokens=bad)
    with pytest.raises(ValueError, match="stop_strings"):
        speculative_generate(target, models["random"], ids,
                             GenerationConfig(stop_strings=["x"]))
    with pytest.raises(ValueError, match="num_beams"):
        speculative_generate(target, models["random"], ids, GenerationConfig(num_beams=2))
    right_padded = torch.ones_like(ids)
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        speculative_generate(target, models["random"], ids, config, attention_mask=right_padded)


def test_zero_new_tokens_returns_the_prompt(models):
    ids, mask = batch_of("three_left_padded")
    stats = {}
    out = speculative(models["target"], models["early_exit"], ids, mask, k=2, max_new_tokens=0,
                      stats=stats)
    assert torch.equal(out, ids)
    assert stats == {"proposed": 0, "accepted": 0, "acceptance_rate": 0.0, "target_calls": 0}


def test_one_token_prompts(models):
    # No prompt to prefill: the first round feeds the only prompt token to both models.
    target = models["target"]
    ids = torch.tensor([[5], [17]])
    expected = generate(target, ids, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(speculative(target, models["early_exit"], ids, None, k=3), expected)

