"""SpanCorruptionTask: every row is a window of the stream, corrupted as T5 does, of exactly the
fixed input and target lengths; batches are a pure function of (seed, step, row) and the same
however they are split into ranks and micro-batches; the loss is transformers' T5 loss × the
target count; the validation corruption is fixed; a tiny pretraining run learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fit_task
from torch.testing import assert_close

from lmlab.data.span_corruption import sentinel_decode
from lmlab.errors import ConfigError, DataError
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration
from lmlab.tasks.span_corruption import SpanCorruptionTask
from lmlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")

SUBJECTS = ["the cat", "a dog", "my friend", "the old farmer", "every child", "the teacher"]
VERBS = ["sees", "likes", "paints", "follows", "remembers", "carries"]
OBJECTS = ["the river", "a red apple", "the quiet village", "seven stones", "the morning sun"]


def make_documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(int(rng.integers(3, 13)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_unigram(iterator=make_documents(100, 0), vocab_size=120, extra_ids=20)


def stream(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """Documents packed into one stream, EOS after each (as `lmlab prepare` writes it)."""
    return np.array([t for row in tokenizer.encode_batch(docs) for t in [*row, tokenizer.eos_token_id]],
                    dtype=np.uint16)


@pytest.fixture(scope="module")
def data(tokenizer):
    return stream(tokenizer, make_documents(120, 1)), stream(tokenizer, make_documents(20, 2))


def make_task(tokenizer, data, **overrides) -> SpanCorruptionTask:
    train, val = data
    options = dict(train_tokens=train, val_tokens=val, inputs_length=32,
                   sentinel_ids=tokenizer.sentinel_ids, eos_token_id=tokenizer.eos_token_id,
                   batch_size=4, seed=3, device=CPU)
    return SpanCorruptionTask(**{**options, **overrides})


def tiny_t5(tokenizer, **extra) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        dropout_rate=0.0, n_positions=64, **extra))


def rows(batches: list[dict], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


def test_rows_are_t5_corruptions_of_stream_windows(tokenizer, data) -> None:
    task = make_task(tokenizer, data, batch_size=16)
    # 32 inputs at 15% noise, mean span 3: 34 raw tokens, 5 noise tokens in 2 spans.
    assert (task.raw_length, task.inputs_length, task.targets_length) == (34, 32, 8)
    (batch,) = task.train_batches(0)
    assert batch["input_ids"].shape == (16, 32) and batch["labels"].shape == (16, 8)
    assert batch["input_ids"].dtype == torch.int64
    text = data[0].astype(np.int64).tobytes()
    sentinels = tokenizer.sentinel_ids
    for inputs, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        assert [t for t in inputs if t in sentinels] == sentinels[:2]
        window = sentinel_decode(inputs, labels, sentinel_ids=sentinels,
                                 eos_token_id=tokenizer.eos_token_id)
        assert len(window) == 34 and window.tobytes() in text  # consecutive stream tokens
    assert task.num_targets(batch) == 16 * 8
    assert task.tokens_per_step == 16 * 32  # encoder tokens


def test_batches_are_a_pure_function_of_seed_step_and_row(tokenizer, data) -> None:
    one, two = make_task(tokenizer, data, grad_accum=2), make_task(tokenizer, data, grad_accum=2)
    for key in ("input_ids", "labels"):
        assert torch.equal(rows(one.train_batches(5), key), rows(two.train_batches(5), key))
    assert not torch.equal(rows(one.train_batches(5), "labels"),
                           rows(one.train_batches(6), "labels"))
    other_seed = make_task(tokenizer, data, seed=4, grad_accum=2)
    assert not torch.equal(rows(one.train_batches(5), "input_ids"),
                           rows(other_seed.train_batches(5), "input_ids"))
    # One batch of 8 = micro-batches of 2 × 4 = two ranks of 4 = row by row.
    single = make_task(tokenizer, data, batch_size=8).train_batches(7)
    accumulated = make_task(tokenizer, data, batch_size=2, grad_accum=4).train_batches(7)
    ranks = [b for r in range(2)
             for b in make_task(tokenizer, data, rank=r, world_size=2).train_batches(7)]
    assert len(accumulated) == 4 and len(ranks) == 2
    by_row = [make_task(tokenizer, data).train_row(7, g) for g in range(8)]
    for key, index in (("input_ids", 0), ("labels", 1)):
        expected = rows(single, key)
        assert torch.equal(rows(accumulated, key), expected)
        assert torch.equal(rows(ranks, key), expected)
        assert torch.equal(torch.from_numpy(np.stack([r[index] for r in by_row])), expected)


def test_loss_is_transformers_t5_loss_times_the_target_count(tokenizer, data, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny_t5(tokenizer).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    task = make_task(tokenizer, data)
    batch = task.train_batches(0)[0]
    with torch.no_grad():
        ours = task.loss(model, batch) / task.num_targets(batch)
        expected = hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_a_ddp_style_wrapper_gives_the_same_loss(tokenizer, data) -> None:
    """The loop may pass a wrapper whose forward is the model's and whose `.module` is the
    model (DDP): the encoder runs on `.module`, the decoder through the wrapper."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    model = tiny_t5(tokenizer, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    task = make_task(tokenizer, data)
    batch = task.train_batches(1)[0]
    wrapper = Wrapper(model)
    assert_close(task.loss(wrapper, batch), task.loss(model, batch))
    assert wrapper.calls == 1


def test_validation_corruption_is_fixed(tokenizer, data) -> None:
    model = tiny_t5(tokenizer).eval()
    first = make_task(tokenizer, data).evaluate(model)
    assert first == make_task(tokenizer, data, seed=99).evaluate(model)  # not the train seed
    assert set(first) == {"val_loss", "val_ppl", "val_acc"}
    assert first["val_ppl"] == pytest.approx(np.exp(first["val_loss"]))
    short = make_task(tokenizer, data, eval_tokens=64)
    assert short.evaluate(model) != short.evaluate(model, final=True)
    assert make_task(tokenizer, data, val_tokens=None).evaluate(model) == {}


def test_tiny_span_pretraining_lowers_validation_loss(tokenizer, data) -> None:
    model = tiny_t5(tokenizer)
    task = make_task(tokenizer, data, batch_size=16)
    before, after = fit_task(task, model, steps=40)
    assert after["val_loss"] < before["val_loss"] - 1.5
    assert after["val_acc"] > before["val_acc"] + 0.2


def test_errors_name_what_is_missing(tokenizer, data) -> None:
    with pytest.raises(ConfigError, match="makes 2 noise spans, but the tokenizer has 1 "
                                          "sentinel"):
        make_task(tokenizer, data, sentinel_ids=tokenizer.sentinel_ids[:1])
    with pytest.raises(DataError, match="the train split has 20 tokens, fewer than one example "
                                        "of 34"):
        make_task(tokenizer, (data[0][:20], data[1]))
    with pytest.raises(ConfigError, match="inputs_length must be >= 3"):
        make_task(tokenizer, data, inputs_length=2)
    with pytest.raises(ConfigError, match="noise_density must be in"):
        make_task(tokenizer, data, noise_density=1.5)
