"""The optimizer: decay groups, the flat parameter layout, and the one-call-per-group AdamW
(FlatAdamW) and clipping that it enables — each against torch's own implementation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lmlab
from lmlab import kernels
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.training.checkpoint import unique_state_dict
from lmlab.kernels.flat_adamw import FlatAdamW, contiguous_span, flatten_parameters
from lmlab.training.optim import build_optimizer, clip_grad_norm_

BETAS = (0.9, 0.99)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return GPT(GPTConfig(**{**config, **overrides}))


def torch_adamw(model: GPT) -> torch.optim.AdamW:
    """torch's fused AdamW with build_optimizer's groups, on separately allocated tensors."""
    reference = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=BETAS, speed_layer=False)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in reference.param_groups]
    return torch.optim.AdamW(groups, lr=1e-2, betas=BETAS, eps=1e-8, fused=True)


def flat_adamw(model: GPT) -> FlatAdamW:
    """A FlatAdamW with build_optimizer's groups, whatever the speed layer's rule says here
    (these tests are of FlatAdamW itself; the rule has its own test)."""
    groups = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=BETAS,
                             speed_layer=False).param_groups
    return FlatAdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                     lr=1e-2, betas=BETAS)


def flat_and_torch():
    """Two equal models: (ours, its FlatAdamW, reference, torch's AdamW)."""
    ours, reference = tiny_gpt(), tiny_gpt()
    return ours, flat_adamw(ours), reference, torch_adamw(reference)


def set_both_gradients(ours: GPT, reference: GPT, step: int) -> None:
    """The same gradients: laid out back to back for ours (as the C step leaves them)."""
    set_gradients(ours, step, flat=True)
    set_gradients(reference, step, flat=False)


def set_gradients(model: GPT, step: int, *, flat: bool) -> None:
    """The same pseudo-random gradients for every model built by tiny_gpt; laid out back to
    back in memory order (as the C step leaves them) when `flat`."""
    gen = torch.Generator().manual_seed(step)
    params = list(model.parameters())
    grads = [torch.randn(p.shape, generator=gen) * 0.1 for p in params]
    if flat:
        order = sorted(range(len(params)), key=lambda i: params[i].data_ptr())
        buffer = torch.cat([grads[i].reshape(-1) for i in order])
        offset = 0
        for i in order:
            grads[i] = buffer[offset:offset + grads[i].numel()].view(params[i].shape)
            offset += grads[i].numel()
    for p, g in zip(params, grads):
        p.grad = g


def count_kernel_calls(monkeypatch) -> list[int]:
    calls = [0]
    kernel = torch._fused_adamw_

    def counting(params, *args, **kwargs):
        calls[0] += len(params)
        return kernel(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting)
    return calls


def assert_same_parameters(a: GPT, b: GPT) -> None:
    """Bit for bit: the same kernel computes each element either way."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_flatten_parameters_moves_memory_not_values_or_identity():
    model = tiny_gpt()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = [id(p) for p in model.parameters()]
    x = torch.randint(0, 40, (2, 16))
    logits = model(x)
    params = list(model.parameters())
    buffer = flatten_parameters(params)
    assert buffer is not None and buffer.numel() == sum(p.numel() for p in params)
    assert [id(p) for p in model.parameters()] == objects
    assert model.lm_head.weight is model.wte.weight  # the tie survives
    assert all(p.is_leaf and p.requires_grad for p in params)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
    span = contiguous_span(params)
    assert span is not None and span.data_ptr() == buffer.data_ptr()
    span.zero_()  # the span is the parameters' memory
    assert all(not p.detach().any() for p in params)


def test_flatten_parameters_refuses_mixed_dtypes():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    pointers = (a.data_ptr(), b.data_ptr())
    assert flatten_parameters([a, b]) is None
    assert (a.data_ptr(), b.data_ptr()) == pointers


def test_contiguous_span_needs_order_one_storage_and_no_gaps():
    buffer = torch.arange(10.0)
    a, b, c = buffer[:3], buffer[3:7], buffer[7:]
    assert torch.equal(contiguous_span([a, b, c]), buffer)
    assert contiguous_span([b, a, c]) is None  # out of order
    assert contiguous_span([a, c]) is None  # a gap
    assert contiguous_span([a, b.clone(), c]) is None  # another storage
    assert contiguous_span([buffer[:6].view(2, 3)[:, :2]]) is None  # not contiguous
    assert contiguous_span([]) is None


def test_build_optimizer_groups_and_flattens_only_where_the_speed_layer_applies(monkeypatch):
    monkeypatch.delenv("LMLAB_CPU_KERNELS", raising=False)
    model = tiny_gpt()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=BETAS, speed_layer=False)
    assert type(optimizer) is torch.optim.AdamW
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert contiguous_span(decay["params"]) is None  # separately allocated
    assert type(build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=BETAS,
                                distributed=True)) is torch.optim.AdamW  # DDP/FSDP own the memory
    monkeypatch.setenv("LMLAB_CPU_KERNELS", "0")
    assert type(build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=BETAS)) is torch.optim.AdamW
    monkeypatch.delenv("LMLAB_CPU_KERNELS")
    assert contiguous_span(decay["params"]) is None  # nothing was re-laid so far
    flat = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=BETAS)  # one CPU process
    assert isinstance(flat, FlatAdamW)
    assert [len(g["params"]) for g in flat.param_groups] == [len(decay["params"]),
                                                             len(no_decay["params"])]
    assert all(contiguous_span(g["params"]) is not None for g in flat.param_groups)
    assert contiguous_span(flat.param_groups[0]["params"] + flat.param_groups[1]["params"]) is not None


def test_flat_adamw_equals_torch_adamw_with_one_kernel_call_per_group(monkeypatch):
    ours, optimizer, reference, torch_optimizer = flat_and_torch()
    calls = count_kernel_calls(monkeypatch)
    for step in range(5):
        set_both_gradients(ours, reference, step)
        calls[0] = 0
        optimizer.step()
        assert calls[0] == 2  # one tensor per group
        torch_optimizer.step()
        assert_same_parameters(ours, reference)
    state = optimizer.state[ours.wte.weight]
    assert float(state["step"]) == 5
    assert contiguous_span([optimizer.state[p]["exp_avg"]
                            for p in optimizer.param_groups[0]["params"]]) is not None


def test_flat_adamw_falls_back_per_tensor_when_a_gradient_is_missing(monkeypatch):
    ours, optimizer, reference, torch_optimizer = flat_and_torch()
    calls = count_kernel_calls(monkeypatch)
    for step in range(4):
        for model, flat in ((ours, True), (reference, False)):
            set_gradients(model, step, flat=flat)
            if step == 1:  # one parameter without a gradient: it takes no step
                model.h[0].ln_1.bias.grad = None
        calls[0] = 0
        optimizer.step()
        # the no-decay group goes per tensor from then on (its parameters have taken
        # different numbers of steps); the decay group stays one span
        per_tensor = len(optimizer.param_groups[1]["params"]) - (step == 1)
        assert calls[0] == (2 if step == 0 else 1 + per_tensor)
        torch_optimizer.step()
        assert_same_parameters(ours, reference)
    assert float(optimizer.state[ours.h[0].ln_1.bias]["step"]) == 3


def test_state_dicts_load_across_the_two_classes_and_the_flat_layout_returns(monkeypatch):
    ours, optimizer, reference, torch_optimizer = flat_and_torch()
    for step in range(3):
        set_both_gradients(ours, reference, step)
        optimizer.step()
        torch_optimizer.step()
    saved_ours = copy.deepcopy(optimizer.state_dict())
    saved_torch = copy.deepcopy(torch_optimizer.state_dict())
    # swap: each optimizer continues from the other's state
    optimizer.load_state_dict(saved_torch)
    torch_optimizer.load_state_dict(saved_ours)
    calls = count_kernel_calls(monkeypatch)
    for step in range(3, 6):
        set_both_gradients(ours, reference, step)
        calls[0] = 0
        optimizer.step()
        assert calls[0] == 2  # the loaded state was laid out flat again
        torch_optimizer.step()
        assert_same_parameters(ours, reference)


@pytest.mark.parametrize("max_norm", [0.5, 1e9, math.inf])  # clipping, and not
def test_clipping_left_to_the_step_equals_torch_clip_then_step(max_norm):
    ours, optimizer, reference, torch_optimizer = flat_and_torch()
    for step in range(3):
        set_both_gradients(ours, reference, step)
        norm = clip_grad_norm_(list(ours.parameters()), max_norm, optimizer)
        expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), max_norm)
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        assert (optimizer._grad_scale is not None) == (float(expected) > max_norm)
        optimizer.step()
        torch_optimizer.step()
        assert optimizer._grad_scale is None
        for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_a_clipping_does_not_outlive_its_gradients():
    model = tiny_gpt()
    optimizer = flat_adamw(model)
    set_gradients(model, 0, flat=True)
    clip_grad_norm_(list(model.parameters()), 1e-3, optimizer)
    assert optimizer._grad_scale is not None
    optimizer.zero_grad()  # e.g. a non-finite step that was skipped
    assert optimizer._grad_scale is None


def test_clip_grad_norm_is_torch_s_where_gradients_are_scattered():
    for optimizer in (None, "flat"):
        model, reference = tiny_gpt(), tiny_gpt()
        if optimizer:
            optimizer = flat_adamw(model)
        set_gradients(model, 0, flat=False)  # e.g. the module path's gradients
        set_gradients(reference, 0, flat=False)
        norm = clip_grad_norm_(list(model.parameters()), 0.5, optimizer)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(
            list(reference.parameters()), 0.5))
        for p, q in zip(model.parameters(), reference.parameters()):  # scaled in place
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.skipif(not kernels.training_available(), reason="the C training step is not built "
                    f"here: {kernels.unavailable_reason()}")
def test_c_step_gradients_mirror_the_flat_parameters():
    model = tiny_gpt(n_positions=8)
    model.train()
    flatten_parameters(list(model.parameters()))
    x = torch.randint(0, 40, (torch.get_num_threads() * 2, 8))
    loss = kernels.FusedCausalLMLoss(model)(x, torch.roll(x, -1, dims=1))
    assert loss is not None
    loss.backward()
    params = list(model.parameters())
    assert contiguous_span([p.grad for p in params]) is not None
    assert [p.grad.data_ptr() - params[0].grad.data_ptr() for p in params] == \
        [p.data_ptr() - params[0].data_ptr() for p in params]


def test_flattened_model_saves_and_loads(tmp_path):
    """Parameters sharing one buffer still save as separate tensors (safetensors refuses
    memory it thinks is shared) and load back exactly."""
    model = tiny_gpt()
    flatten_parameters(list(model.parameters()))
    model.save_pretrained(tmp_path)
    loaded = lmlab.from_pretrained(tmp_path)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    assert len(unique_state_dict(model)) == len(list(model.parameters()))


def test_adafactor_steps_relative_to_each_weights_rms():
    """`optimizer: adafactor` is torch's Adafactor over the same groups: a weight of RMS 1 and
    one of RMS 0.01 given the same gradient move by amounts in that ratio (AdamW would move both
    by about lr), which is what T5's unit-variance embeddings need."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False),
                                torch.nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        model[0].weight.normal_(0, 1.0)
        model[1].weight.normal_(0, 0.01)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=BETAS, name="adafactor")
    assert isinstance(optimizer, torch.optim.Adafactor)
    before = [p.detach().clone() for p in model.parameters()]
    gradient = torch.randn(64, 64)
    for p in model.parameters():
        p.grad = gradient.clone()
    optimizer.step()
    moves = [float((p - b).pow(2).mean().sqrt()) for p, b in zip(model.parameters(), before)]
    assert moves[0] / moves[1] == pytest.approx(100, rel=0.05)
