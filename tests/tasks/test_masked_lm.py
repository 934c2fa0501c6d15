"""MaskedLMTask: the loss equals transformers' BertForPreTraining / BertForMaskedLM loss on the
same weights and masked batch; batches are a pure function of (seed, step) and split across ranks
like one process; gradient accumulation gives exactly the one-batch update; the validation
masking is fixed; a tiny pretraining run lowers the validation MLM loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fit_task
from torch.testing import assert_close

from lmlab.data.masking import IGNORE_INDEX
from lmlab.errors import ConfigError, DataError
from lmlab.models import from_pretrained
from lmlab.models.bert import BertConfig, BertForMaskedLM, BertForPreTraining
from lmlab.tasks.masked_lm import MaskedLMTask
from lmlab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")

SUBJECTS = ["the cat", "a dog", "my friend", "the old farmer", "every child", "the teacher"]
VERBS = ["sees", "likes", "paints", "follows", "remembers", "carries"]
OBJECTS = ["the river", "a red apple", "the quiet village", "seven stones", "the morning sun"]


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Documents of 3-12 simple sentences: enough structure for a tiny model to learn fast."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(int(rng.integers(3, 13)))]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_wordpiece(iterator=make_documents(50), vocab_size=150)


def stream(tokenizer: Tokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer.encode_batch(docs)
    return (np.array([t for row in ids for t in row], dtype=np.uint16),
            np.cumsum([len(row) for row in ids]))


@pytest.fixture(scope="module")
def data(tokenizer):
    return stream(tokenizer, make_documents(120, seed=1)), stream(tokenizer,
                                                                  make_documents(20, seed=2))


def make_task(tokenizer, data, **overrides) -> MaskedLMTask:
    (train, train_ends), (val, val_ends) = data
    options = dict(tokenizer=tokenizer, train_tokens=train, train_doc_ends=train_ends,
                   val_tokens=val, val_doc_ends=val_ends, block_size=32, batch_size=4, seed=3,
                   device=CPU, nsp=True)
    return MaskedLMTask(**{**options, **overrides})


def tiny_config(tokenizer, **extra) -> dict:
    return dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, **extra)


def randomised(cls_name: str, tokenizer, tmp_path):
    """A seeded random transformers model, and ours loaded from its checkpoint."""
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(transformers.BertConfig(**tiny_config(tokenizer)))
    with torch.no_grad():  # non-trivial LayerNorms and biases too
        for name, p in hf.named_parameters():
            p.copy_((1 if "LayerNorm.weight" in name else 0) + 0.1 * torch.randn_like(p))
    hf.eval().save_pretrained(tmp_path)
    return hf, from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("cls_name, nsp", [("BertForPreTraining", True),
                                           ("BertForMaskedLM", False)])
def test_loss_equals_transformers(tokenizer, data, tmp_path, cls_name, nsp) -> None:
    hf, ours = randomised(cls_name, tokenizer, tmp_path)
    task = make_task(tokenizer, data, nsp=nsp, batch_size=6)
    (batch,) = task.train_batches(0)
    assert (batch["labels"] != IGNORE_INDEX).sum() == batch["num_masked"] > 0
    kwargs = {"next_sentence_label": batch["next_sentence_label"]} if nsp else {}
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"], labels=batch["labels"],
                      **kwargs).loss
        got = task.loss(ours, batch) / task.num_targets(batch)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_wrapped_model_gives_the_same_loss(tokenizer, data) -> None:
    """DDP / FSDP / compile: the loss must go through the wrapper's forward (full logits)."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**tiny_config(tokenizer))).eval()
    task = make_task(tokenizer, data)
    (batch,) = task.train_batches(1)
    assert_close(task.loss(Wrapper(model), batch), task.loss(model, batch), atol=1e-5, rtol=1e-6)


def rows(batches: list[dict], key: str) -> torch.Tensor:
    width = max(b[key].shape[-1] for b in batches)
    return torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[-1]),
                                              value=IGNORE_INDEX if key == "labels" else 0)
                      for b in batches])


def test_batches_are_a_pure_function_of_seed_and_step(tokenizer, data) -> None:
    one, two = make_task(tokenizer, data, grad_accum=2), make_task(tokenizer, data, grad_accum=2)
    for key in ("input_ids", "labels", "token_type_ids", "attention_mask"):
        assert torch.equal(rows(one.train_batches(5), key), rows(two.train_batches(5), key))
    assert not torch.equal(rows(one.train_batches(5), "labels"),
                           rows(one.train_batches(6), "labels"))  # masking is dynamic
    assert not torch.equal(rows(one.train_batches(5), "input_ids"),
                           rows(make_task(tokenizer, data, seed=4, grad_accum=2)
                                .train_batches(5), "input_ids"))
    # Two ranks of 4 rows see exactly the 8 rows one process of 8 would.
    single = make_task(tokenizer, data, batch_size=8).train_batches(7)
    ranks = [make_task(tokenizer, data, rank=r, world_size=2).train_batches(7)[0]
             for r in range(2)]
    for key in ("input_ids", "labels", "next_sentence_label"):
        assert torch.equal(rows(single, key) if key != "next_sentence_label" else
                           single[0][key], rows(ranks, key) if key != "next_sentence_label"
                           else torch.cat([r[key] for r in ranks]))


@pytest.mark.parametrize("nsp", [True, False])
def test_grad_accumulation_equals_one_batch(tokenizer, data, nsp) -> None:
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**tiny_config(tokenizer), hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0))

    def gradients() -> list[torch.Tensor]:  # without NSP the pooler and NSP head get none
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for p in model.parameters()]

    def grads(task: MaskedLMTask) -> list[torch.Tensor]:
        """The loop's contract: sum over micro-batches of loss / total num_targets."""
        model.zero_grad()
        batches = task.train_batches(2)
        total = sum(task.num_targets(b) for b in batches)
        for b in batches:
            (task.loss(model, b) / total).backward()
        return gradients()

    whole = make_task(tokenizer, data, batch_size=8, nsp=nsp)
    split = make_task(tokenizer, data, batch_size=2, grad_accum=4, nsp=nsp)
    assert len(split.train_batches(2)) == 4
    # The definition: mean MLM loss over every masked token + mean NSP loss over the 8 pairs.
    (batch,) = whole.train_batches(2)
    model.zero_grad()
    mlm, nsp_logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"])
    reference = torch.nn.functional.cross_entropy(mlm.flatten(0, 1), batch["labels"].flatten())
    if nsp:
        reference = reference + torch.nn.functional.cross_entropy(
            nsp_logits, batch["next_sentence_label"])
    reference.backward()
    expected = gradients()
    for got in (grads(whole), grads(split)):
        for g, e in zip(got, expected):
            assert_close(g, e, atol=1e-6, rtol=1e-4)


def test_validation_masking_is_fixed(tokenizer, data) -> None:
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**tiny_config(tokenizer))).eval()
    first = make_task(tokenizer, data).evaluate(model)
    assert first == make_task(tokenizer, data, seed=99).evaluate(model)  # not the train seed
    assert set(first) == {"val_loss", "val_mlm_loss", "val_ppl", "val_mlm_acc", "val_nsp_loss",
                          "val_nsp_acc"}
    assert first["val_loss"] == pytest.approx(first["val_mlm_loss"] + first["val_nsp_loss"])
    short = make_task(tokenizer, data, eval_tokens=64)
    assert short.evaluate(model) != short.evaluate(model, final=True)


def test_tiny_pretraining_lowers_validation_loss(tokenizer, data) -> None:
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**tiny_config(tokenizer), hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0))
    task = make_task(tokenizer, data, batch_size=16, whole_word=True)
    before, after = fit_task(task, model, steps=60)
    # From uniform over 136 tokens (4.9) to below 3.4: the word distribution is learnt.
    assert after["val_mlm_loss"] < before["val_mlm_loss"] - 1.5
    assert after["val_mlm_acc"] > before["val_mlm_acc"] + 0.1


def test_errors_name_what_is_missing(tokenizer, data) -> None:
    (train, ends), _ = data
    with pytest.raises(DataError, match="document index"):
        make_task(tokenizer, data, train_doc_ends=None)
    with pytest.raises(DataError, match="at least 2 documents"):
        make_task(tokenizer, data, train_doc_ends=np.array([len(train)]))
    make_task(tokenizer, data, train_doc_ends=None, nsp=False)  # plain MLM needs no documents
    bpe = Tokenizer.train_bpe(iterator=["some text here"] * 5, vocab_size=300)
    with pytest.raises(ConfigError, match=r"\[CLS\], \[SEP\]"):
        make_task(bpe, data)
    task = make_task(tokenizer, data)
    (batch,) = task.train_batches(0)
    with pytest.raises(ConfigError, match="next-sentence head"):
        task.loss(BertForMaskedLM(BertConfig(**tiny_config(tokenizer))), batch)
