"""GPTForSequenceClassification against transformers' GPT2ForSequenceClassification: the same
logits on right-padded batches, and checkpoints that each side loads from the other."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.models import from_pretrained
from lmlab.models.gpt import GPTConfig, GPTForSequenceClassification

transformers = pytest.importorskip("transformers")

LABELS = ["neg", "neu", "pos"]
SHAPE = dict(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=40)
PAD = 39


def batch():
    """Three right-padded rows of lengths 7, 4 and 1 (no pad id inside the text)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, PAD, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6])
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    hf = GPT2ForSequenceClassification(GPT2Config(
        **SHAPE, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
        id2label=dict(enumerate(LABELS)), label2id={k: i for i, k in enumerate(LABELS)})).eval()
    with torch.no_grad():  # randomise LayerNorms and biases too, so a dropped one would show
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if ".ln_" in name and name.endswith("weight")
                    else 0.2 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("gpt2_cls")
    hf.save_pretrained(directory)
    return directory


def test_loads_transformers_checkpoint_and_matches_logits(hf_dir):
    from transformers import GPT2ForSequenceClassification

    hf = GPT2ForSequenceClassification.from_pretrained(hf_dir).eval()
    ours = from_pretrained(hf_dir)
    assert isinstance(ours, GPTForSequenceClassification)
    assert ours.config.id2label == LABELS
    ids, mask = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        # with the mask, and without it (then the last non-pad token, as transformers finds it)
        torch.testing.assert_close(ours(ids, attention_mask=mask), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids), expected, rtol=1e-5, atol=1e-5)
    # padding does not change a row's logits: row 1 alone, unpadded
    with torch.no_grad():
        alone = ours(ids[1:2, :4])
    torch.testing.assert_close(alone, expected[1:2], rtol=1e-5, atol=1e-5)


def test_round_trip_ours_to_transformers_to_ours(tmp_path):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(1)
    model = GPTForSequenceClassification(GPTConfig(**SHAPE, pad_token_id=PAD, id2label=LABELS)).eval()
    model.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask), rtol=1e-5, atol=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_from_backbone_keeps_the_language_model_weights(tmp_path):
    from lmlab.models.gpt import GPT

    torch.manual_seed(2)
    lm = GPT(GPTConfig(**SHAPE))
    lm.save_pretrained(tmp_path)
    clf = GPTForSequenceClassification.from_backbone(tmp_path, id2label=["a", "b"])
    assert clf.score.weight.shape == (2, SHAPE["n_embd"])
    ids = torch.randint(0, PAD, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(clf.transformer.hidden_states(ids), lm.hidden_states(ids))
    with pytest.raises(ValueError, match="token-type"):
        clf(ids, token_type_ids=torch.zeros_like(ids))
