"""The fused GPT training step (one C call forward, one backward) against autograd on the module
path it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlab import kernels
from lmlab.kernels import training
from lmlab.kernels.gpt import block_tensors
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.tasks.losses import summed_cross_entropy
from lmlab.training.runtime import checkpoint_blocks

pytestmark = pytest.mark.skipif(
    not kernels.training_available(),
    reason=f"no CPU training kernel here: {kernels.unavailable_reason()} or no BLAS sgemm in torch")

CONFIGS = {
    "exact gelu, tied, biases": dict(n_embd=32, n_head=4, activation="gelu"),
    "tanh gelu, untied, no biases, odd widths": dict(
        n_embd=24, n_head=2, n_inner=40, activation="gelu_new", bias=False,
        tie_word_embeddings=False),
    "relu, narrow MLP": dict(n_embd=40, n_head=5, n_inner=24, activation="relu"),
}
VOCAB, T = 67, 13


def build(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=20, n_layer=3, **overrides)).train()
    with torch.no_grad():  # non-zero biases and LayerNorm affines, so every term is exercised
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def batch(rows: int = 5, length: int = T):
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (rows, length), generator=generator),
            torch.randint(0, VOCAB, (rows, length), generator=generator))


def fused_loss(model: GPT, ids, labels, shards: int, pool: dict | None = None):
    """The C step on `model`'s tensors; steps given one `pool` share its pooled buffers."""
    return training.gpt_causal_lm_loss(
        [block_tensors(b) for b in model.h], wte=model.wte.weight, wpe=model.wpe.weight,
        ln_f=(model.ln_f.weight, model.ln_f.bias), head=model.lm_head.weight,
        n_head=model.config.n_head, eps=model.config.layer_norm_epsilon,
        activation=model.config.activation, input_ids=ids, labels=labels, shards=shards,
        pool={} if pool is None else pool)


def gradients(model, loss, scale=0.37):
    loss.backward(torch.tensor(scale))
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("name", CONFIGS)
def test_loss_and_gradients_equal_autograd_on_the_module_path(name, shards):
    model = build(**CONFIGS[name])
    ids, labels = batch()
    reference = summed_cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1))
    expected = gradients(model, reference)
    loss = fused_loss(model, ids, labels, shards)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-4)
    got = gradients(model, loss)
    assert got.keys() == expected.keys()
    for key in expected:  # each gradient to ~1e-6 of its largest element
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-5 * scale + 1e-7,
                                   msg=key)


def test_numbers_depend_on_the_shards_only_never_on_threads_or_reused_buffers():
    model = build(**CONFIGS["exact gelu, tied, biases"])
    ids, labels = batch(rows=6)
    pool: dict = {}
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            loss = fused_loss(model, ids, labels, 2, pool)
            runs.append((loss.detach(), gradients(model, loss)))
    finally:
        torch.set_num_threads(threads)
    assert pool, "the step's buffers are kept for the next step"
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert all(torch.equal(grads[k], runs[0][1][k]) for k in grads)


def test_overlapping_steps_each_get_their_own_buffers():
    model = build(**CONFIGS["relu, narrow MLP"])
    (ids_a, labels_a), (ids_b, labels_b) = batch(rows=4), batch(rows=4, length=T - 3)
    expected = gradients(model, fused_loss(model, ids_a, labels_a, 2) * 0.5
                         + fused_loss(model, ids_b, labels_b, 2))
    pool: dict = {}
    losses = [fused_loss(model, i, y, 2, pool) for i, y in ((ids_a, labels_a), (ids_b, labels_b))]
    got = gradients(model, losses[0] * 0.5 + losses[1])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_a_second_backward_is_refused():
    model = build(**CONFIGS["exact gelu, tied, biases"])
    loss = fused_loss(model, *batch(), 1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def one_thread_per_sequence(monkeypatch, threads=2):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)


def count_fused_calls(monkeypatch) -> list[int]:
    """A list that gets an item for each call of the C step (which still runs)."""
    calls = []
    real = training.gpt_causal_lm_loss
    monkeypatch.setattr(training, "gpt_causal_lm_loss",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_gpt_takes_the_fused_step_only_where_it_applies(monkeypatch):
    one_thread_per_sequence(monkeypatch)
    model = build(**CONFIGS["exact gelu, tied, biases"])
    fused = kernels.training_loss_adapter(model)
    ids, labels = batch()
    assert fused(ids, labels) is not None
    assert fused(ids[:1], labels[:1]) is None  # fewer sequences than threads
    bad = labels.clone()
    bad[0, 0] = VOCAB
    assert fused(ids, bad) is None  # forward's path reports bad ids itself
    model.eval()  # dropout is off either way: the same step
    assert fused(ids, labels) is not None
    model.train()
    handle = model.h[0].register_forward_hook(lambda *args: None)
    assert fused(ids, labels) is None
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(ids, labels) is None
    dropout = build(**CONFIGS["exact gelu, tied, biases"], resid_dropout=0.1)
    fused_dropout = kernels.training_loss_adapter(dropout)
    assert fused_dropout(ids, labels) is None
    dropout.eval()  # inactive in evaluation
    assert fused_dropout(ids, labels) is not None
    checkpoint_blocks(model)
    assert fused(ids, labels) is None
    assert kernels.training_loss_adapter(torch.nn.Linear(2, 2)) is None  # not a GPT
    monkeypatch.setenv("LMLAB_CPU_KERNELS", "0")
    assert kernels.training_loss_adapter(model) is None  # switched off


def test_the_memoised_plan_notices_changes_to_the_model(monkeypatch):
    """The fused loss memoises what it reads from the module tree; every change that decides
    the path must still be seen after a first fused call."""
    one_thread_per_sequence(monkeypatch)
    ids, labels = batch()

    class Adapted(torch.nn.Linear):  # e.g. a LoRA layer: another computation
        pass

    def replace_layer(model, cls=Adapted):
        model.h[1].mlp.c_fc = cls(model.h[1].mlp.c_fc.in_features,
                                  model.h[1].mlp.c_fc.out_features)

    def replace_parameter(model):
        model.ln_f.weight = torch.nn.Parameter(model.ln_f.weight.detach().clone())

    changes = {
        "a replaced layer": (replace_layer, False),
        # the same computation on new weights: the plan is rebuilt and reads them
        "a fresh plain layer": (lambda m: replace_layer(m, torch.nn.Linear), True),
        # the plan is rebuilt; a module the block's forward does not call changes nothing
        "an added submodule": (lambda m: m.h[0].add_module("extra", torch.nn.Identity()), True),
        "a pre-hook": (lambda m: m.h[1].attn.register_forward_pre_hook(lambda *a: None), False),
        "float64 parameters": (lambda m: m.double(), False),
        # the config no longer matches the blocks' activation modules
        "another activation in the config": (lambda m: setattr(m.config, "activation", "relu"),
                                             False),
        "a replaced parameter (same shape)": (replace_parameter, True),
    }
    for name, (change, still_fused) in changes.items():
        model = build(**CONFIGS["exact gelu, tied, biases"])
        fused_loss_of = kernels.FusedCausalLMLoss(model)
        assert fused_loss_of(ids, labels) is not None, name
        change(model)
        assert (fused_loss_of(ids, labels) is not None) == still_fused, name
        if still_fused:  # and it reads the new tensor
            fused = fused_loss_of(ids, labels)
            reference = summed_cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1))
            torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-4)


def test_causal_lm_task_trains_a_plain_gpt_through_it(monkeypatch):
    one_thread_per_sequence(monkeypatch)
    model = build(**CONFIGS["tanh gelu, untied, no biases, odd widths"])
    task = CausalLMTask(train_tokens=None, val_tokens=None, block_size=T, batch_size=4, seed=0,
                        device=torch.device("cpu"), fast_loss=kernels.FusedCausalLMLoss(model))
    ids, labels = batch(rows=4)
    calls = count_fused_calls(monkeypatch)
    loss = task.loss(model, {"input_ids": ids, "labels": labels})
    assert calls == [1]
    reference = summed_cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_without_grad_mode_the_forward_pass_alone_gives_the_loss(monkeypatch, mode):
    one_thread_per_sequence(monkeypatch)
    model = build(**CONFIGS["relu, narrow MLP"])
    model.eval()
    ids, labels = batch()
    with torch.no_grad():
        reference = summed_cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1))
    fused = kernels.FusedCausalLMLoss(model)
    pool = fused._pool
    for _ in range(2):  # the second call reuses the pooled workspace
        with getattr(torch, mode)():
            loss = fused(ids, labels)
        assert loss is not None and loss.grad_fn is None
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
    assert list(pool) == ["workspace"]
    # a smaller batch takes the larger pooled buffer; training afterwards still matches
    model.train()
    small = fused(ids[:2], labels[:2])
    assert pool == {}  # taken while the step is in flight
    small.backward()
    assert set(pool) == {"workspace", "scratch"}


def test_causal_lm_task_evaluates_a_plain_gpt_through_it(monkeypatch):
    one_thread_per_sequence(monkeypatch)
    model = build(**CONFIGS["exact gelu, tied, biases"])
    tokens = np.random.default_rng(0).integers(0, VOCAB, 20 * T + 1).astype(np.uint16)
    task = CausalLMTask(train_tokens=tokens, val_tokens=tokens, block_size=T, batch_size=4,
                        seed=0, device=torch.device("cpu"), eval_batch_size=6,
                        fast_loss=kernels.FusedCausalLMLoss(model))
    calls = count_fused_calls(monkeypatch)
    model.eval()
    fused = task.evaluate(model, final=True)
    assert len(calls) == 4  # 20 windows in batches of 6, the last of 2
    with torch.no_grad():
        x = torch.from_numpy(tokens[:-1].astype(np.int64)).view(20, T)
        y = torch.from_numpy(tokens[1:].astype(np.int64)).view(20, T)
        summed = summed_cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        expected = float(summed) / y.numel()
    assert fused["val_loss"] == pytest.approx(expected, rel=1e-5)
