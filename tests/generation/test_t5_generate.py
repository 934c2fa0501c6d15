"""Decoding an encoder–decoder through the one engine: T5's generate is token-identical to
transformers' for greedy decoding and beam search (every knob), with batched sources of
different lengths; sampling, streaming and forced first tokens work on the same path."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab.generation import GenerationConfig, stream
from lmlab.models import from_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")


def sources(seed: int = 0):
    """Three sources of 30, 20 and 5 real tokens, right-padded (T5's tokenizer pads right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (3, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def pair(request, tiny_t5):
    hf, directory = tiny_t5(request.param)
    return hf, from_pretrained(directory).eval()


KNOBS = [
    dict(),  # greedy
    dict(num_beams=4, length_penalty=0.6, early_stopping=True, num_return_sequences=2),
    dict(num_beams=4, length_penalty=1.5, early_stopping=False),
    dict(num_beams=3, early_stopping="never", num_return_sequences=2),
    dict(num_beams=2, no_repeat_ngram_size=2, repetition_penalty=1.3),
    dict(forced_bos_token_id=7),
    dict(num_beams=3, forced_bos_token_id=7),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items())
                         or "greedy")
def test_generate_matches_transformers(pair, knobs):
    hf, ours = pair
    ids, mask = sources()
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15,
                               do_sample=False, **knobs)
        got = lmlab.generate(ours, source_ids=ids, source_mask=mask, max_new_tokens=15, **knobs)
    assert torch.equal(got, expected)


def test_each_source_decodes_as_it_would_alone(pair):
    """Batching sources of different lengths changes nothing: each row equals its own batch
    of one (no padding)."""
    _, model = pair
    ids, mask = sources(seed=3)
    batch = lmlab.generate(model, source_ids=ids, source_mask=mask, max_new_tokens=10,
                           num_beams=3)
    for row in range(3):
        alone = lmlab.generate(model, source_ids=ids[row, :int(mask[row].sum())],
                               max_new_tokens=10, num_beams=3)
        width = alone.shape[1]
        assert torch.equal(batch[row, :width], alone[0])
        assert (batch[row, width:] == 1).all()  # beam search pads with EOS past its end


def test_stream_yields_the_greedy_tokens(pair):
    _, model = pair
    ids, mask = sources(seed=4)
    greedy = lmlab.generate(model, source_ids=ids, source_mask=mask, max_new_tokens=8,
                            eos_token_id=[])

    class Ids:  # the smallest tokenizer the stream needs: ids as text
        def stream_decoder(self, **_):
            class Decoder:
                def push(self, token):
                    return f"{token} "

                def flush(self):
                    return ""
            return Decoder()

    config = GenerationConfig(max_new_tokens=8)
    steps = list(stream(model, None, config, tokenizer=Ids(), source_ids=ids, source_mask=mask))
    assert torch.equal(torch.tensor([s.token_ids for s in steps]).T, greedy[:, 1:])


def test_sampling_is_seeded_and_returns_several_sequences(pair):
    _, model = pair
    ids, mask = sources(seed=5)
    knobs = dict(do_sample=True, top_k=20, temperature=0.9, num_return_sequences=2, seed=11,
                 max_new_tokens=8)
    first = lmlab.generate(model, source_ids=ids, source_mask=mask, **knobs)
    again = lmlab.generate(model, source_ids=ids, source_mask=mask, **knobs)
    assert first.shape[0] == 6 and torch.equal(first, again)
    assert (first[:, 0] == 0).all()  # every row starts from the decoder start token
    assert not torch.equal(first[0::2], first[1::2])  # the two samples of a source differ


def test_source_errors(pair):
    _, model = pair
    ids, mask = sources()
    with pytest.raises(ValueError, match="source_mask given without source_ids"):
        lmlab.generate(model, torch.zeros(3, 1, dtype=torch.long), source_mask=mask)
    with pytest.raises(ValueError, match="draft_model"):
        lmlab.generate(model, source_ids=ids, draft_model=model)


def test_beams_of_finished_sources_leave_the_batch(pair):
    """A source whose beam search is over stops costing decoder rows (transformers decodes it
    on until the whole batch is done); the output stays token-identical to transformers'."""
    hf, ours = pair
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(2, 99, (6, 12), generator=g)
    mask = torch.ones_like(ids)
    greedy = lmlab.generate(ours, source_ids=ids, source_mask=mask, max_new_tokens=12,
                            eos_token_id=[])
    eos = int(greedy[:, 1:].flatten().mode().values)  # a token this model often picks: the
    knobs = dict(num_beams=3, max_new_tokens=12, eos_token_id=eos)  # sources end at various steps
    rows = []
    forward = ours.forward

    def counting(input_ids, **kwargs):
        rows.append(len(input_ids))
        return forward(input_ids, **kwargs)

    ours.forward = counting
    try:
        got = lmlab.generate(ours, source_ids=ids, source_mask=mask, **knobs)
    finally:
        del ours.forward
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **knobs)
    assert torch.equal(got, expected)
    assert rows[0] == 6 and rows[1] == 18  # the prefill of one row per source, then its beams
    assert min(rows[1:]) < 18  # some sources finished before the last step
