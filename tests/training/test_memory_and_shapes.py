"""Activation checkpointing changes memory, not gradients; micro-batches of different lengths
(dynamic padding) accumulate to exactly the update of one padded batch."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lmlab.models.gpt import GPT, GPTConfig
from lmlab.training.loop import train
from lmlab.training.runtime import checkpoint_blocks
from test_loop import loop_config  # same folder

VOCAB = 40


def test_activation_checkpointing_gives_the_same_gradients_with_dropout():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=3, n_head=2,
                          embd_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1)).train()
    checkpointed = copy.deepcopy(plain)
    assert checkpoint_blocks(checkpointed) == 3
    x = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)  # the same dropout masks, which recomputation must replay
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, VOCAB), x.roll(-1, 1).reshape(-1)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name
    with torch.no_grad():  # evaluation and decoding bypass the recomputation
        assert torch.equal(plain.eval()(x), checkpointed.eval()(x))


class Documents:
    """A task of right-padded documents: either one micro-batch per document length (different
    shapes), or all of them padded into one batch, labels -100 on the padding."""

    def __init__(self, lengths: list[int], *, split: bool):
        gen = torch.Generator().manual_seed(3)
        self.docs = [torch.randint(0, VOCAB, (n + 1,), generator=gen) for n in lengths]
        self.split = split

    def _batch(self, docs):
        width = max(len(d) - 1 for d in docs)
        ids = torch.zeros(len(docs), width, dtype=torch.long)
        labels = torch.full((len(docs), width), -100)
        for i, d in enumerate(docs):
            ids[i, :len(d) - 1], labels[i, :len(d) - 1] = d[:-1], d[1:]
        return {"input_ids": ids, "labels": labels}

    def train_batches(self, step):
        if self.split:
            return [self._batch([d]) for d in self.docs]
        return [self._batch(self.docs)]

    def num_targets(self, batch):
        return int((batch["labels"] != -100).sum())

    def loss(self, model, batch):
        logits = model(batch["input_ids"])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1),
                               ignore_index=-100, reduction="sum")

    def evaluate(self, model, *, final=False):
        return {}


def test_micro_batches_of_different_lengths_equal_one_padded_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(  # SGD: the update is proportional to the gradient (see test_loop)
        "lmlab.training.loop.build_optimizer",
        lambda model, lr, **_: torch.optim.SGD(model.parameters(), lr=lr),
    )
    cfg = loop_config(max_steps=3, eval_every=0, save_every=0, grad_clip=0.0, warmup_steps=0)
    models = []
    for split in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2))
        result = train(model, Documents([5, 15, 9], split=split), cfg,
                       run_dir=tmp_path / str(split), device=torch.device("cpu"))
        assert result.steps == 3
        models.append(model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    # tokens_per_step unknown: throughput is reported in targets (26 per step) per second
    rates = [line for line in (tmp_path / "True" / "metrics.jsonl").read_text().splitlines()
             if "targets_per_s" in line]
    assert len(rates) == 3 and "tokens_per_s" not in rates[0]
