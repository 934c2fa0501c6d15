"""lmlab's T5 against transformers' T5ForConditionalGeneration, v1.0 (ReLU, tied head) and
v1.1 (gated GELU, untied head): same weights → same encoder states, logits and loss with padding
in source and target; checkpoints round-trip both ways; unsupported configs name the option."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import T5Config, T5ForConditionalGeneration, from_pretrained
from lmlab.models.t5 import relative_position_bucket

pytestmark = pytest.mark.usefixtures("single_thread")

VERSIONS = ["v1_0", "v1_1"]
TOL = dict(atol=2e-5, rtol=2e-5)
# Logits reach ±50 with these widened weights: fp32 summation order (SDPA's against
# transformers' eager matmuls) moves them by up to ~1e-4.
LOGIT_TOL = dict(atol=2e-4, rtol=1e-4)


def padded_batch(seed: int = 0):
    """Sources (3, 30) whose rows hold 30, 20 and 5 real tokens; labels (3, 25) whose second
    row is padding (-100) after 10 tokens; the decoder mask of those labels."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(2, 99, (3, 30), generator=g)
    source_mask = torch.ones_like(source)
    source_mask[1, 20:] = 0
    source_mask[2, 5:] = 0
    source[source_mask == 0] = 0
    labels = torch.randint(2, 99, (3, 25), generator=g)
    labels[1, 10:] = -100
    return source, source_mask, labels


@pytest.mark.parametrize("name", VERSIONS)
def test_encoder_states_logits_and_loss_match_transformers(tiny_t5, name):
    hf, directory = tiny_t5(name)
    ours = from_pretrained(directory).eval()
    assert isinstance(ours, T5ForConditionalGeneration)
    assert ours.config.scales_decoder_outputs == (name == "v1_0")
    source, source_mask, labels = padded_batch()
    decoder_mask = (labels != -100).long()
    with torch.no_grad():
        expected = hf(input_ids=source, attention_mask=source_mask, labels=labels,
                      decoder_attention_mask=decoder_mask)
        encoded = ours.encode(source, attention_mask=source_mask)
        logits = ours(ours.shift_right(labels), encoder_hidden=encoded,
                      encoder_mask=source_mask, attention_mask=decoder_mask)
    assert_close(encoded, expected.encoder_last_hidden_state, **TOL)
    assert_close(logits, expected.logits, **LOGIT_TOL)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert_close(loss, expected.loss, **TOL)


@pytest.mark.parametrize("name", VERSIONS)
def test_decoding_with_the_cache_equals_teacher_forcing(tiny_t5, name):
    """One token at a time through the cache that `encode` filled gives the logits of the
    whole target at once — the decoder's relative bias, causal mask and cross-attention."""
    _, directory = tiny_t5(name)
    model = from_pretrained(directory).eval()
    source, source_mask, labels = padded_batch(seed=1)
    decoder_input = model.shift_right(labels.clamp(min=0))
    with torch.no_grad():
        full = model(decoder_input, encoder_hidden=model.encode(source, attention_mask=source_mask),
                     encoder_mask=source_mask)
        cache = model.new_cache(3, 32, source_len=30)
        model.encode(source, attention_mask=source_mask, cache=cache)
        prefix = model(decoder_input[:, :4], cache=cache)  # a 4-token prompt, then steps
        steps = [model(decoder_input[:, t:t + 1], cache=cache) for t in range(4, 25)]
    assert_close(torch.cat([prefix, *steps], dim=1), full, **LOGIT_TOL)


@pytest.mark.parametrize("name", VERSIONS)
def test_ours_to_transformers_round_trip(tiny_t5, name, tmp_path):
    """Load → save → transformers loads our directory and gives the same logits; saving again
    from that gives the same tensors (the round trip is the identity)."""
    from transformers import T5ForConditionalGeneration as HFT5

    hf, directory = tiny_t5(name)
    ours = from_pretrained(directory).eval()
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "t5"
    assert written["architectures"] == ["T5ForConditionalGeneration"]
    assert written["tie_word_embeddings"] is (name == "v1_0")
    back = HFT5.from_pretrained(tmp_path / "ours").eval()
    source, source_mask, labels = padded_batch(seed=2)
    with torch.no_grad():
        a = hf(input_ids=source, attention_mask=source_mask, labels=labels).logits
        b = back(input_ids=source, attention_mask=source_mask, labels=labels).logits
    assert_close(a, b, atol=0, rtol=0)
    again = from_pretrained(tmp_path / "ours")
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key


def test_a_fresh_model_saved_by_lmlab_loads_in_transformers(tmp_path):
    """A model lmlab builds (T5's initialisation, v1.1 head untied) is one transformers reads:
    same logits, both versions."""
    from transformers import T5ForConditionalGeneration as HFT5

    for name, extra in (("v1_0", {}), ("v1_1", dict(feed_forward_proj="gated-gelu",
                                                     tie_word_embeddings=False))):
        torch.manual_seed(0)
        ours = T5ForConditionalGeneration(T5Config(
            vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=1,
            num_heads=2, **extra)).eval()
        ours.save_pretrained(tmp_path / name)
        theirs = HFT5.from_pretrained(tmp_path / name).eval()
        source, labels = torch.randint(2, 64, (2, 9)), torch.randint(2, 64, (2, 7))
        with torch.no_grad():
            expected = theirs(input_ids=source, labels=labels).logits
            got = ours(ours.shift_right(labels), encoder_hidden=ours.encode(source))
        assert_close(got, expected, **LOGIT_TOL)


def test_initialisation_follows_t5():
    """Unit-variance embeddings; the query scaled by (d_model·d_kv)^-½ in place of the 1/√d_kv
    the attention leaves out; norms at one."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=128,
                                                num_layers=1, num_heads=4))
    attention = model.encoder.block[0].layer[0].SelfAttention
    assert abs(model.shared.weight.std().item() - 1.0) < 0.05
    assert abs(attention.q.weight.std().item() - (64 * 16) ** -0.5) < 0.003
    assert abs(attention.k.weight.std().item() - 64 ** -0.5) < 0.01
    assert torch.equal(model.encoder.final_layer_norm.weight, torch.ones(64))
    assert model.lm_head.weight is model.shared.weight


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-300, 301)[None]
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (8, 20)):
            expected = T5Attention._relative_position_bucket(
                distance, bidirectional=bidirectional, num_buckets=buckets,
                max_distance=max_distance)
            got = relative_position_bucket(distance, bidirectional=bidirectional,
                                           num_buckets=buckets, max_distance=max_distance)
            assert torch.equal(got, expected)


# -- what lmlab refuses -----------------------------------------------------------------------
def _config_dir(tmp_path, tiny_t5, **changes):
    _, directory = tiny_t5("v1_0")
    target = tmp_path / "t5"
    target.mkdir()
    (target / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("changes, message", [
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj must be one of"),
    (dict(relative_attention_bias_type="alibi"), "relative_attention_bias_type"),
    (dict(d_kv="8"), "'d_kv' must be an integer"),
])
def test_unsupported_configs_name_the_option(tmp_path, tiny_t5, changes, message):
    directory = _config_dir(tmp_path, tiny_t5, **changes)
    with pytest.raises(CheckpointError, match=message) as error:
        from_pretrained(directory)
    assert "config.json" in str(error.value)


def test_t5_model_without_a_head_is_refused(tmp_path, tiny_t5):
    directory = _config_dir(tmp_path, tiny_t5, architectures=["T5EncoderModel"])
    with pytest.raises(CheckpointError, match="T5EncoderModel.*not supported"):
        from_pretrained(directory)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swiglu")
    with pytest.raises(ConfigError, match="decoder_start_token_id"):
        T5Config(vocab_size=10, decoder_start_token_id=10)


def test_too_long_inputs_are_refused_before_any_work():
    model = T5ForConditionalGeneration(T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=8,
                                                num_layers=1, num_heads=2, n_positions=6))
    with pytest.raises(ValueError, match="source of 7 tokens exceeds the model's n_positions"):
        model.encode(torch.ones(1, 7, dtype=torch.long))


@pytest.mark.parametrize("name", VERSIONS)
def test_logits_of_only_some_positions(tiny_t5, name):
    """`only=` (what a loss needs: the real target positions) gives those rows of the full
    logits, and the loss over them is transformers' loss."""
    hf, directory = tiny_t5(name)
    ours = from_pretrained(directory).eval()
    source, source_mask, labels = padded_batch(seed=2)
    keep = labels != -100
    with torch.no_grad():
        encoded = ours.encode(source, attention_mask=source_mask)
        full = ours(ours.shift_right(labels), encoder_hidden=encoded, encoder_mask=source_mask)
        some = ours(ours.shift_right(labels), encoder_hidden=encoded, encoder_mask=source_mask,
                    only=keep)
        expected = hf(input_ids=source, attention_mask=source_mask, labels=labels).loss
    assert some.shape == (int(keep.sum()), ours.config.vocab_size)
    assert_close(some, full[keep], **LOGIT_TOL)
    assert_close(F.cross_entropy(some, labels[keep]), expected, **TOL)
