"""The decoding engine: rows with their own state that join and leave a running batch, the decoder
protocol (a model that is not a GPT decodes through it unchanged), and two threads at once."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import lmlab
from lmlab.generation import Engine, GenerationConfig
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.models.kv_cache import KVCache
from lmlab.models.layers import attention

VOCAB = 61


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        model.wte.weight.mul_(25)  # decisive next-token distributions (argmax gaps >> rounding)
    return model.eval()


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def alone(model, ids: torch.Tensor, **knobs) -> list[int]:
    """The new tokens of one prompt generated on its own."""
    out = lmlab.generate(model, ids[None], eos_token_id=[], **knobs)
    return out[0, len(ids):].tolist()


# -- rows joining and leaving ------------------------------------------------------------------
REQUESTS = [  # (prompt length, seed of the prompt, knobs); decoded alone and joined in a batch
    (5, 1, dict(max_new_tokens=12)),
    (9, 2, dict(max_new_tokens=7, do_sample=True, seed=11, top_k=8, temperature=0.9)),
    (3, 3, dict(max_new_tokens=10, repetition_penalty=1.4, no_repeat_ngram_size=2)),
    (12, 4, dict(max_new_tokens=9, do_sample=True, seed=5, top_p=0.8)),
    (7, 5, dict(max_new_tokens=6)),
]


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "module-path"])
def test_rows_that_join_and_leave_get_the_tokens_they_get_alone(gpt, cpu_kernels):
    """Requests join a running batch at different steps (one waits for a free row), each with
    its own knobs and seed, and leave when done: every row gets exactly the tokens it gets
    decoded alone — greedy and seeded sampling alike."""
    expected = [alone(gpt, prompt(n, s), cpu_kernels=cpu_kernels, **k) for n, s, k in REQUESTS]
    engine = Engine(gpt, max_rows=3, max_len=32, cpu_kernels=cpu_kernels)
    rows, joined_at = [], {0: 0, 1: 0, 2: 2, 3: 4, 4: 5}
    for step in range(40):
        for i, (n, s, knobs) in enumerate(REQUESTS):
            if joined_at[i] == step:
                rows.append(engine.add(prompt(n, s), GenerationConfig(eos_token_id=[], **knobs))[0])
        if not engine.busy and len(rows) == len(REQUESTS):
            break
        assert len(engine.running) <= 3
        engine.step()
    assert [row.tokens for row in rows] == expected
    assert all(row.finish_reason == "length" for row in rows)


def test_a_beam_search_among_other_rows_that_finish_keeps_its_beams_in_order(gpt):
    """Rows that finish leave gaps, which rows from the end close: a beam search's rows then sit
    in the cache out of their own order, and must still be handed to it in order."""
    beam = GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=2, eos_token_id=[])
    expected = lmlab.generate(gpt, prompt(6, 1)[None], max_new_tokens=8, num_beams=3,
                              num_return_sequences=2, eos_token_id=[])
    engine = Engine(gpt, max_rows=6, max_len=20)
    for new in (2, 6, 2):  # the first and third leave after two steps, the second stays
        engine.add(prompt(5, new), GenerationConfig(max_new_tokens=new, eos_token_id=[]))
    rows = engine.add(prompt(6, 1), beam)
    engine.step()
    engine.step()
    assert sorted(row.index for row in rows) == [0, 1, 2]
    assert [row.slot for row in rows] != sorted(row.slot for row in rows)  # moved out of order
    engine.run()
    assert torch.equal(rows[0].group.output(), expected)


def test_a_cancelled_row_leaves_and_the_others_do_not_notice(gpt):
    ids = [prompt(6, 7), prompt(4, 8), prompt(8, 9)]
    expected = [alone(gpt, p, max_new_tokens=10) for p in ids]
    engine = Engine(gpt, max_rows=3, max_len=20)
    rows = [engine.add(p, GenerationConfig(max_new_tokens=10, eos_token_id=[]))[0] for p in ids]
    for _ in range(3):
        engine.step()
    engine.cancel(rows[0])  # a client that went away
    engine.run()
    assert rows[0].finish_reason == "cancelled" and rows[0].tokens == expected[0][:3]
    assert [rows[1].tokens, rows[2].tokens] == expected[1:]
    assert engine.running == [] and not engine.busy


def test_rows_stop_on_their_own_eos_and_stream_their_own_text(gpt):
    tok = lmlab.Tokenizer.char_level("".join(chr(0x100 + i) for i in range(VOCAB - 1)))
    free = alone(gpt, prompt(5, 3), max_new_tokens=12)
    eos = free[4]  # this row's fifth token becomes its EOS
    engine = Engine(gpt, max_rows=2, max_len=24, tokenizer=tok)
    stopping = engine.add(prompt(5, 3), GenerationConfig(max_new_tokens=12, eos_token_id=[eos]),
                          stream_text=True)[0]
    running = engine.add(prompt(5, 4), GenerationConfig(max_new_tokens=12, eos_token_id=[]),
                         stream_text=True)[0]
    texts = {id(stopping): "", id(running): ""}
    while engine.busy:
        for event in engine.step():
            texts[id(event.row)] += event.text
    assert stopping.tokens == free[:free.index(eos) + 1] and stopping.finish_reason == "stop"
    assert running.tokens == alone(gpt, prompt(5, 4), max_new_tokens=12)
    assert texts[id(running)] == tok.decode(running.tokens, skip_special_tokens=True)


def test_add_refuses_clearly(gpt):
    engine = Engine(gpt, max_rows=2, max_len=16)
    with pytest.raises(ValueError, match="context window"):
        engine.add(prompt(60, 1), GenerationConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="max_len of 16"):
        engine.add(prompt(10, 1), GenerationConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="max_rows of 2"):
        engine.add(torch.stack([prompt(3, 1)] * 3), GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add(prompt(3, 1), GenerationConfig(max_new_tokens=2, stop_strings=["x"]))
    with pytest.raises(TypeError, match="cannot generate text"):
        Engine(nn.Linear(2, 2), max_rows=1, max_len=4)


# -- two threads at once ----------------------------------------------------------------------
def test_two_threads_can_share_an_engine_and_two_engines_can_share_a_model(gpt):
    """An engine serialises its own steps (each step advances every row, whoever asked); two
    generate() calls in two threads each build their own engine and cache: the model holds no
    decoding state. Either way every row gets the tokens it gets alone."""
    ids = [prompt(5 + i, 20 + i) for i in range(4)]
    expected = [alone(gpt, p, max_new_tokens=15) for p in ids]
    engine = Engine(gpt, max_rows=4, max_len=24)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def shared(i):
        try:
            row = engine.add(ids[i], GenerationConfig(max_new_tokens=15, eos_token_id=[]))[0]
            while not row.finished:
                engine.step()
            results[i] = row.tokens
        except BaseException as error:  # noqa: BLE001 — reported by the main thread
            errors.append(error)

    def own(i):
        try:
            results[10 + i] = alone(gpt, ids[i], max_new_tokens=15)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(4) for f in (shared, own)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert [results[i] for i in range(4)] == expected
    assert [results[10 + i] for i in range(4)] == expected


# -- the decoder protocol: a model that is not a GPT ---------------------------------------------
class ToyDecoder(nn.Module):
    """One attention layer over learned embeddings, written against the decoder protocol alone:
    `context_window`, `new_cache`, and a forward that continues each cache row."""

    def __init__(self, vocab: int = 29, width: int = 16, window: int = 40):
        super().__init__()
        torch.manual_seed(3)
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(window, width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, vocab)
        with torch.no_grad():
            self.out.weight.mul_(20)
        self.context_window = window

    def new_cache(self, batch_size: int, max_len: int | None = None):
        return KVCache(n_layer=1, batch_size=batch_size, n_head=1, head_dim=self.embed.embedding_dim,
                       max_len=max_len or self.context_window, dtype=torch.float32, device="cpu")

    def mix(self, x, positions, mask, is_causal, write=None):
        x = self.embed(x) + self.position(positions)
        q, k, v = (t[:, None] for t in self.qkv(x).chunk(3, dim=-1))  # (B, 1, T, W)
        if write is not None:
            k, v = write(k, v)
        return self.out(x + attention(q, k, v, mask=mask, is_causal=is_causal)[:, 0])

    def forward(self, input_ids, *, cache, attention_mask=None, last_only=False):
        step = cache.begin(input_ids.shape[1], attention_mask)
        logits = self.mix(input_ids, step.positions, step.mask, step.is_causal,
                          write=lambda k, v: cache.update(0, k, v, step))
        cache.commit(step)
        return logits[:, -1:] if last_only else logits


class TokenCache:
    """Another DecodeCache: each row's tokens and padding marks, recomputed in full each call."""

    def __init__(self, rows: int, tokens=None, masks=None, start=0):
        self.tokens = tokens if tokens is not None else [[] for _ in range(rows)]
        self.masks = masks if masks is not None else [[] for _ in range(rows)]
        self.start, self.stop = start, start + rows

    @property
    def lengths(self):
        return [len(t) for t in self.tokens[self.start:self.stop]]

    def rows(self, start, stop):
        return TokenCache(stop - start, self.tokens, self.masks, self.start + start)

    def copy_rows(self, source, target):
        source, target = list(map(int, source)), list(map(int, target))
        saved = [(list(self.tokens[self.start + s]), list(self.masks[self.start + s])) for s in source]
        for t, (tokens, mask) in zip(target, saved):
            self.tokens[self.start + t], self.masks[self.start + t] = tokens, mask

    def truncate(self, lengths):
        lengths = [lengths] * (self.stop - self.start) if isinstance(lengths, int) else lengths
        for row, n in enumerate(lengths):
            del self.tokens[self.start + row][n:], self.masks[self.start + row][n:]

    def reset(self, rows=None):
        self.truncate([0 if rows is None or r in rows else len(self.tokens[self.start + r])
                       for r in range(self.stop - self.start)])


class RecomputingDecoder(nn.Module):
    """The same toy model through TokenCache: no key/value cache at all."""

    def __init__(self, toy: ToyDecoder):
        super().__init__()
        self.toy, self.context_window = toy, toy.context_window

    def new_cache(self, batch_size, max_len=None):
        return TokenCache(batch_size)

    def forward(self, input_ids, *, cache, attention_mask=None, last_only=False):
        T = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        outputs = []
        for row in range(len(input_ids)):
            i = cache.start + row
            cache.tokens[i] += input_ids[row].tolist()
            cache.masks[i] += mask[row].tolist()
            ids, real = torch.tensor([cache.tokens[i]]), torch.tensor([cache.masks[i]])
            positions = (real.cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
            keep = (causal & real.bool()) | torch.eye(ids.shape[1], dtype=torch.bool)
            outputs.append(self.toy.mix(ids, positions, keep[None, None], False)[0, -T:])
        logits = torch.stack(outputs)
        return logits[:, -1:] if last_only else logits


@pytest.mark.parametrize("knobs", [
    dict(max_new_tokens=9),
    dict(max_new_tokens=9, do_sample=True, seed=4, top_k=5),
    dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, length_penalty=0.7),
    dict(max_new_tokens=8, repetition_penalty=1.5, no_repeat_ngram_size=2),
], ids=["greedy", "sampling", "beam", "processors"])
def test_a_model_that_is_not_a_gpt_decodes_through_the_protocol(knobs):
    """Two implementations of one toy model — with lmlab's KV cache, and with a cache of its
    own that recomputes everything — decode a left-padded batch to the same tokens under every
    strategy: generation reads nothing of a model but the protocol."""
    toy = ToyDecoder().eval()
    ids = torch.randint(1, 29, (3, 6), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cached = lmlab.generate(toy, ids, attention_mask=mask, eos_token_id=[], **knobs)
    recomputed = lmlab.generate(RecomputingDecoder(toy), ids, attention_mask=mask, eos_token_id=[],
                                **knobs)
    assert torch.equal(cached, recomputed)
    assert cached.shape[1] == ids.shape[1] + knobs["max_new_tokens"]


# -- an encoder–decoder: state carried beside the cache ---------------------------------------
class ToySeq2Seq(ToyDecoder):
    """ToyDecoder plus an encoder: each decoder token also attends to its row's source, whose
    encoding `encode` writes into the cache's per-row `extras` — the way an encoder–decoder's
    cross-attention keys and values ride along with the rows the engine moves."""

    SOURCE = 12  # the longest source a cache row holds

    def __init__(self):
        super().__init__()
        self.source_embed = nn.Embedding(29, self.embed.embedding_dim)

    def new_cache(self, batch_size: int, max_len: int | None = None):
        cache = super().new_cache(batch_size, max_len)
        width = self.embed.embedding_dim
        cache.extras["memory"] = torch.zeros(batch_size, self.SOURCE, width)
        cache.extras["memory_mask"] = torch.zeros(batch_size, self.SOURCE, dtype=torch.bool)
        return cache

    def encode(self, source_ids, *, attention_mask=None, cache):
        length = source_ids.shape[1]
        cache.extras["memory"][:, :length] = self.source_embed(source_ids)
        cache.extras["memory_mask"].fill_(False)
        cache.extras["memory_mask"][:, :length] = (
            True if attention_mask is None else attention_mask.bool())

    def forward(self, input_ids, *, cache, attention_mask=None, last_only=False):
        step = cache.begin(input_ids.shape[1], attention_mask)
        memory, mask = cache.extras["memory"], cache.extras["memory_mask"]

        def write(k, v):  # the cached self-attention's keys/values, then the source's
            k, v = cache.update(0, k, v, step)
            return torch.cat([k, memory[:, None]], dim=2), torch.cat([v, memory[:, None]], dim=2)

        T = input_ids.shape[1]
        own = step.mask if step.mask is not None else torch.ones(
            len(input_ids), 1, T, step.keys, dtype=torch.bool).tril(step.keys - T)
        full = torch.cat([own, mask[:, None, None, :].expand(-1, 1, T, -1)], dim=-1)
        logits = self.mix(input_ids, step.positions, full, False, write=write)
        cache.commit(step)
        return logits[:, -1:] if last_only else logits


@pytest.mark.parametrize("knobs", [dict(), dict(num_beams=3, num_return_sequences=2),
                                   dict(do_sample=True, seed=2, top_k=6)],
                         ids=["greedy", "beam", "sampling"])
def test_an_encoder_decoder_carries_its_source_beside_the_cache(knobs):
    """Two sources of different lengths, one decoder start token each: decoded as two groups,
    the second joining a running batch, and each alone — every row the same, so the encoder
    state followed its rows through prefill, beam expansion and the rows' moves."""
    model = ToySeq2Seq().eval()
    sources = [torch.randint(1, 29, (n,), generator=torch.Generator().manual_seed(n))
               for n in (9, 5)]
    start = torch.tensor([[1]])
    config = GenerationConfig(max_new_tokens=7, eos_token_id=[], **knobs)

    def decode(groups):
        engine = Engine(model, max_rows=6, max_len=12)
        rows = []
        for i, source in enumerate(groups):
            rows.append(engine.add(start, config, source_ids=source[None]))
            if i == 0:
                engine.step()  # the second group joins a running batch
        engine.run()
        return [(r[0].group.output() if knobs.get("num_beams") else [row.tokens for row in r])
                for r in rows]

    alone = [decode([source])[0] for source in sources]
    together = decode(sources)
    for a, b in zip(alone, together):
        assert torch.equal(a, b) if knobs.get("num_beams") else a == b
    assert (alone[0] != alone[1]) if not knobs.get("num_beams") else \
        not torch.equal(alone[0], alone[1])  # the source decides the output
    with pytest.raises(TypeError, match="encode"):
        Engine(ToyDecoder(), max_rows=1, max_len=8).add(start, config, source_ids=sources[0][None])
