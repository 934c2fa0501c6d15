"""lmlab's GPT against transformers' GPT2LMHeadModel: same weights → same logits, same greedy
tokens; checkpoints round-trip; unsupported checkpoints fail with errors that name the key."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from torch.testing import assert_close

import lmlab
from lmlab.errors import CheckpointError
from lmlab.models import GPT, GPTConfig, from_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = ["a", "b", "c"]  # see TINY_GPT2 in tests/conftest.py
TOL = dict(atol=1e-5, rtol=1e-5)


def left_padded(batch: int, length: int, vocab: int, pads: list[int], *, seed: int):
    """Random ids and a 0/1 mask with pads[i] left-padding positions in row i (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


# -- logits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers(tiny_gpt2, name):
    hf, directory = tiny_gpt2(name)
    ours = from_pretrained(directory)
    assert not ours.training
    n_pos, vocab = hf.config.n_positions, hf.config.vocab_size
    ids = torch.randint(0, vocab, (3, n_pos), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (3, n_pos, vocab)
    assert_close(got, expected, **TOL)


@pytest.mark.parametrize("name", SHAPES)
def test_left_padded_logits_match_transformers(tiny_gpt2, name):
    hf, directory = tiny_gpt2(name)
    ours = from_pretrained(directory)
    ids, mask = left_padded(3, 10, hf.config.vocab_size, [0, 3, 6], seed=2)
    # lmlab counts positions over real tokens only (pads clamp to 0); give HF the same positions.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask)
        got_explicit = ours(ids, attention_mask=mask, positions=position_ids)
    real = mask.bool()
    assert_close(got[real], expected[real], **TOL)
    assert_close(got_explicit[real], expected[real], **TOL)
    # A padded row's real tokens see exactly what the same row without padding sees.
    with torch.no_grad():
        unpadded = ours(ids[2:, 6:])
    assert_close(got[2, 6:], unpadded[0], **TOL)


# -- greedy generation -------------------------------------------------------------------------
def hf_greedy(hf, ids, mask, new_tokens):
    return hf.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )


@pytest.mark.parametrize("name", SHAPES)
def test_greedy_tokens_match_transformers(tiny_gpt2, name):
    hf, directory = tiny_gpt2(name)
    ours = from_pretrained(directory)
    prompt_len = 4
    new_tokens = min(20, hf.config.n_positions - prompt_len)
    ids = torch.randint(0, hf.config.vocab_size, (3, prompt_len),
                        generator=torch.Generator().manual_seed(3))
    # Always hand HF the mask: with pad_token_id=0 it would otherwise infer padding from id 0.
    expected = hf_greedy(hf, ids, torch.ones_like(ids), new_tokens)
    got = lmlab.generate(ours, ids, max_new_tokens=new_tokens, eos_token_id=[])
    assert expected.shape == (3, prompt_len + new_tokens)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", SHAPES)
def test_left_padded_greedy_matches_transformers(tiny_gpt2, name):
    hf, directory = tiny_gpt2(name)
    ours = from_pretrained(directory)
    ids, mask = left_padded(3, 6, hf.config.vocab_size, [0, 2, 4], seed=4)
    new_tokens = min(20, hf.config.n_positions - 6)
    expected = hf_greedy(hf, ids, mask, new_tokens)
    got = lmlab.generate(ours, ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
    assert torch.equal(got, expected)
    # The padded row continues exactly as its unpadded prompt would on its own.
    alone = lmlab.generate(ours, ids[2:, 4:], max_new_tokens=new_tokens, eos_token_id=[])
    assert torch.equal(got[2, 6:], alone[0, 2:])


# -- checkpoint formats and round trips --------------------------------------------------------
@pytest.mark.parametrize("old_style", [False, True], ids=["hf_keys", "original_gpt2_keys"])
def test_pytorch_model_bin_loads_and_matches(tiny_gpt2, tmp_path, old_style):
    hf, directory = tiny_gpt2("c")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if old_style:
        # OpenAI's original gpt2 pytorch_model.bin: no "transformer." prefix, no lm_head, plus
        # the causal-mask buffers of old transformers versions.
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        n = hf.config.n_positions
        for i in range(hf.config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, **TOL)
    assert ours.lm_head.weight is ours.wte.weight


def random_gpt(*, tie: bool, seed: int = 0, bias: bool = True) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=61, n_positions=24, n_embd=16, n_layer=2, n_head=2,
                          n_inner=24, activation="gelu_new", tie_word_embeddings=tie, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial LayerNorms and biases
    return model.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_ours_hf_ours_is_identity(tmp_path, tie):
    from transformers import GPT2LMHeadModel

    ours = random_gpt(tie=tie)
    ours.save_pretrained(tmp_path / "ours")
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    hf.eval()
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert hf.config.tie_word_embeddings is tie
    ids = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close(hf(ids).logits, ours(ids), **TOL)

    # Back via lmlab directly, and via an HF re-save (HF writes its own config.json keys).
    hf.save_pretrained(tmp_path / "hf")
    for directory in (tmp_path / "ours", tmp_path / "hf"):
        back = from_pretrained(directory)
        assert back.config == ours.config
        a, b = ours.state_dict(), back.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        assert (back.lm_head.weight is back.wte.weight) is tie


def test_bias_free_gpt_saves_as_gpt2_with_zero_biases(tmp_path):
    """nanoGPT's bias=False: no bias parameters at all; the GPT-2 layout gets zeros, so
    transformers (and lmlab, as a biased GPT) computes the same logits."""
    from transformers import GPT2LMHeadModel

    ours = random_gpt(tie=True, bias=False)
    assert not any(name.endswith(".bias") for name, _ in ours.named_parameters())
    ours.save_pretrained(tmp_path)
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert all(not p.any() for name, p in hf.named_parameters() if name.endswith(".bias"))
    back = from_pretrained(tmp_path)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close(hf.eval()(ids).logits, ours(ids), **TOL)
        assert_close(back(ids), ours(ids), atol=0, rtol=0)
        assert torch.equal(lmlab.generate(back, ids[:, :8], max_new_tokens=8, eos_token_id=[]),
                           lmlab.generate(ours, ids[:, :8], max_new_tokens=8, eos_token_id=[]))


# -- unsupported checkpoints -------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    random_gpt(tie=True).save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"rotary_dim": 4}, "rotary_dim"),
        ({"activation_function": "gelu_fast"}, "gelu_fast"),
        ({"model_type": "llama"}, "model_type"),
        ({"n_head": 3}, "n_head"),  # 16 is not divisible by 3
    ],
)
def test_unsupported_config_is_a_clear_error(checkpoint, changes, key):
    edit_config(checkpoint, **changes)
    with pytest.raises(CheckpointError, match=key):
        from_pretrained(checkpoint)


def test_directory_without_config_json(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(checkpoint)


def test_config_without_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(checkpoint)


def test_weight_shape_mismatch_names_the_weight(checkpoint):
    edit_config(checkpoint, n_embd=8)  # the weights were saved with n_embd=16
    with pytest.raises(CheckpointError, match=r"weight '([\w.]+)' has shape (\(.*?\))") as err:
        from_pretrained(checkpoint)
    name, shape = re.search(r"weight '([\w.]+)' has shape (\(.*?\))", str(err.value)).groups()
    saved = random_gpt(tie=True).state_dict()
    assert shape == str(tuple(saved[name].shape))  # the named weight really is the odd one


# -- KV cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["b", "c"])
def test_kv_cache_matches_full_forward(tiny_gpt2, name):
    _, directory = tiny_gpt2(name)
    model = from_pretrained(directory)
    T, prefix = 14, 5
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids)

        cache = model.new_cache(2, T)
        steps = [model(ids[:, :prefix], cache=cache)]
        for t in range(prefix, T):
            steps.append(model(ids[:, t : t + 1], cache=cache))
        assert cache.length == T
        assert_close(torch.cat(steps, dim=1), full, **TOL)

        # Multi-token steps on a filled cache (need a bottom-right-aligned causal mask).
        cache = model.new_cache(2, T)
        chunks = [model(ids[:, a:b], cache=cache) for a, b in [(0, prefix), (prefix, 9), (9, T)]]
        assert_close(torch.cat(chunks, dim=1), full, **TOL)


def test_kv_cache_with_left_padding_matches_full_forward(tiny_gpt2):
    _, directory = tiny_gpt2("c")
    model = from_pretrained(directory)
    ids, mask = left_padded(3, 12, model.config.vocab_size, [0, 2, 7], seed=8)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(3, 12)
        out = []
        for a, b in [(0, 8), (8, 9), (9, 12)]:  # the mask always covers cached + new positions
            out.append(model(ids[:, a:b], cache=cache, attention_mask=mask[:, :b]))
    real = mask.bool()
    assert_close(torch.cat(out, dim=1)[real], full[real], **TOL)


def test_cache_rows_of_different_lengths_continue_like_the_full_forward(tiny_gpt2):
    """Each row of a cache has its own length: rows filled to 5, 3 and 8 tokens (one of them
    left-padded) and then continued together, by one and by two tokens, see what the full
    forward pass of each row sees."""
    _, directory = tiny_gpt2("c")
    model = from_pretrained(directory)
    ids, mask = left_padded(3, 12, model.config.vocab_size, [0, 0, 2], seed=9)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(3, 16)
        for row, n in enumerate([5, 3, 8]):
            model(ids[row:row + 1, :n], cache=cache.rows(row, row + 1),
                  attention_mask=mask[row:row + 1, :n])
        assert cache.lengths == [5, 3, 8]
        starts = torch.tensor([5, 3, 8])
        one = model(ids[torch.arange(3), starts][:, None], cache=cache)
        two = model(torch.stack([ids[r, s + 1:s + 3] for r, s in enumerate(starts.tolist())]),
                    cache=cache)
    assert cache.lengths == [8, 6, 11]
    for row, s in enumerate(starts.tolist()):
        assert_close(one[row, 0], full[row, s], **TOL)
        assert_close(two[row], full[row, s + 1:s + 3], **TOL)


# -- initialisation and limits -----------------------------------------------------------------
def test_gpt2_style_init():
    torch.manual_seed(0)
    n_layer = 4
    model = GPT(GPTConfig(vocab_size=512, n_positions=64, n_embd=256, n_layer=n_layer, n_head=4))
    scaled = 0.02 / math.sqrt(2 * n_layer)
    for block in model.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
            assert proj.weight.mean().abs().item() < 0.1 * scaled
        for lin in (block.attn.c_attn, block.mlp.c_fc):
            assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05)
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert torch.count_nonzero(lin.bias) == 0
        for ln in (block.ln_1, block.ln_2):
            assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert len(list(model.parameters())) == len(model.state_dict()) - 1  # lm_head is not extra

    untied = GPT(GPTConfig(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=1,
                           tie_word_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.wte.weight)


def test_position_beyond_context_window_is_a_value_error():
    model = random_gpt(tie=True)  # n_positions=24
    n = model.config.n_positions
    with torch.no_grad():
        assert model(torch.zeros(1, n, dtype=torch.long)).shape == (1, n, 61)
        with pytest.raises(ValueError, match="n_positions"):
            model(torch.zeros(1, n + 1, dtype=torch.long))
        with pytest.raises(ValueError, match="n_positions"):
            model(torch.zeros(1, 1, dtype=torch.long), positions=torch.tensor([[n]]))
        cache = model.new_cache(1, n + 1)
        model(torch.zeros(1, n, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="n_positions"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
