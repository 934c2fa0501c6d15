"""models/hf's family records: a subset of the weights (what an adapter saves) is written
under the names and layouts transformers uses and loads back into a fresh model; a whole file
loads strictly; errors name the key at fault; a new family is one record, nothing else."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import hf
from lmlab.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from lmlab.models.gpt import GPT, GPTConfig, GPTForSequenceClassification

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

GPT_SHAPE = dict(vocab_size=61, n_positions=24, n_embd=16, n_layer=2, n_head=2, n_inner=24)
BERT_SHAPE = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                  intermediate_size=50, vocab_size=99, max_position_embeddings=40)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere, so that a swapped, untransposed or unsplit tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def gpt(seed: int, *, tie: bool = True) -> GPT:
    return randomise(GPT(GPTConfig(**GPT_SHAPE, tie_word_embeddings=tie)), seed)


def hf_gpt2(tie: bool = True):
    config = transformers.GPT2Config(**{k: v for k, v in GPT_SHAPE.items()},
                                     tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(config).eval()


def bert_classifier(seed: int) -> BertForSequenceClassification:
    return randomise(BertForSequenceClassification(BertConfig(**BERT_SHAPE, num_labels=3)), seed)


def hf_keys(model: nn.Module) -> set[str]:
    """transformers' state-dict keys, less the buffers it recomputes (never in a checkpoint)."""
    buffers = (".attn.bias", ".attn.masked_bias", "position_ids", "token_type_ids")
    return {k for k in model.state_dict() if not k.endswith(buffers)}


# -- a subset of the weights -------------------------------------------------------------------
GPT_SUBSET = ["h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.1.mlp.c_proj.weight",
              "ln_f.weight", "lm_head.weight"]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gpt_subset_has_transformers_names_and_layouts(tmp_path, tie):
    ours = gpt(0, tie=tie)
    path = tmp_path / "adapter.safetensors"
    hf.save_weights(ours, path, names=GPT_SUBSET)
    saved = load_file(path)
    head = "lm_head.weight" if not tie else "transformer.wte.weight"  # tied: written once, as wte
    assert set(saved) == {"transformer.h.0.attn.c_attn.weight", head,
                          "transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_proj.weight",
                          "transformer.ln_f.weight"}
    assert set(saved) <= hf_keys(hf_gpt2(tie)) | {"lm_head.weight"}
    # transformers' own model takes the file as it is: known names, its shapes (Conv1D is
    # stored transposed), the values ours had.
    reference = hf_gpt2(tie)
    missing, unexpected = reference.load_state_dict(saved, strict=False)
    assert unexpected == []
    blocks = reference.transformer.h
    assert torch.equal(blocks[0].attn.c_attn.weight, ours.h[0].attn.c_attn.weight.t())
    assert torch.equal(blocks[1].mlp.c_proj.weight, ours.h[1].mlp.c_proj.weight.t())
    assert torch.equal(reference.lm_head.weight, ours.lm_head.weight)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gpt_subset_round_trip(tmp_path, tie):
    ours, fresh = gpt(0, tie=tie), gpt(1, tie=tie)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    hf.save_weights(ours, tmp_path / "a.safetensors", names=GPT_SUBSET)
    loaded = hf.load_weights(fresh, tmp_path / "a.safetensors")
    expected_loaded = [n for n in GPT_SUBSET if not (tie and n == "lm_head.weight")]
    assert loaded == sorted(expected_loaded + (["wte.weight"] if tie else []))
    for name, tensor in fresh.state_dict().items():
        changed = name in GPT_SUBSET or (tie and name in ("wte.weight", "lm_head.weight"))
        assert torch.equal(tensor, ours.state_dict()[name] if changed else before[name]), name
    assert (fresh.lm_head.weight is fresh.wte.weight) is tie


def test_bert_qkv_subset_splits_into_query_key_value(tmp_path):
    ours, fresh = bert_classifier(0), bert_classifier(1)
    names = ["bert.encoder.layer.1.attention.self.qkv.weight",
             "bert.encoder.layer.1.attention.self.qkv.bias", "classifier.weight"]
    hf.save_weights(ours, tmp_path / "a.safetensors", names=names)
    saved = load_file(tmp_path / "a.safetensors")
    stem = "bert.encoder.layer.1.attention.self"
    assert set(saved) == {f"{stem}.{p}.{k}" for p in ("query", "key", "value")
                          for k in ("weight", "bias")} | {"classifier.weight"}
    reference = transformers.BertForSequenceClassification(
        transformers.BertConfig(**BERT_SHAPE, num_labels=3)).eval()
    assert set(saved) <= hf_keys(reference)
    missing, unexpected = reference.load_state_dict(saved, strict=False)
    assert unexpected == []
    qkv = ours.bert.encoder.layer[1].attention.self.qkv.weight
    attention = reference.bert.encoder.layer[1].attention.self
    assert torch.equal(torch.cat([attention.query.weight, attention.key.weight,
                                  attention.value.weight]), qkv)

    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert hf.load_weights(fresh, tmp_path / "a.safetensors") == sorted(names)
    for name, tensor in fresh.state_dict().items():
        expected = ours.state_dict()[name] if name in names else before[name]
        assert torch.equal(tensor, expected), name


@pytest.mark.parametrize("build", [
    lambda: GPT(GPTConfig(**GPT_SHAPE, tie_word_embeddings=False)),
    lambda: GPTForSequenceClassification(GPTConfig(**GPT_SHAPE, id2label=["a", "b"])),
    lambda: BertForSequenceClassification(BertConfig(**BERT_SHAPE, num_labels=3)),
    lambda: BertForMaskedLM(BertConfig(**BERT_SHAPE)),
], ids=["gpt", "gpt-classifier", "bert-classifier", "bert-mlm"])
def test_whole_checkpoint_loads_strictly(tmp_path, build):
    ours, fresh = randomise(build(), 0), randomise(build(), 1)
    ours.save_pretrained(tmp_path)  # model.safetensors: every weight, HF-named
    hf.load_weights(fresh, tmp_path / "model.safetensors", strict=True)
    a, b = ours.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_keys_are_what_save_weights_writes(tmp_path):
    """All weights, no names: exactly the keys of transformers' own model (less the tied copy)."""
    hf.save_weights(gpt(0, tie=False), tmp_path / "gpt.safetensors")
    assert set(load_file(tmp_path / "gpt.safetensors")) == hf_keys(hf_gpt2(False))
    hf.save_weights(bert_classifier(0), tmp_path / "bert.safetensors")
    reference = transformers.BertForSequenceClassification(
        transformers.BertConfig(**BERT_SHAPE, num_labels=3))
    assert set(load_file(tmp_path / "bert.safetensors")) == hf_keys(reference)


# -- errors name the key -----------------------------------------------------------------------
def test_unknown_key_is_named(tmp_path):
    state = {"transformer.h.7.attn.c_attn.weight": torch.zeros(16, 48)}
    save_file(state, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"\['transformer\.h\.7\.attn\.c_attn\.weight'\] are not weights of GPT"):
        hf.load_weights(gpt(0), tmp_path / "a.safetensors")


def test_shape_mismatch_is_named(tmp_path):
    save_file({"transformer.ln_f.weight": torch.zeros(8)}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"weight 'ln_f\.weight' has shape \(8,\), the model's is \(16,\)"):
        hf.load_weights(gpt(0), tmp_path / "a.safetensors")


def test_strict_names_missing_weights(tmp_path):
    hf.save_weights(gpt(0), tmp_path / "a.safetensors", names=["ln_f.weight"])
    with pytest.raises(CheckpointError, match=r"missing weights \['h\.0\.attn\.c_attn\.bias'"):
        hf.load_weights(gpt(1), tmp_path / "a.safetensors", strict=True)


def test_part_of_a_fused_tensor_is_an_error(tmp_path):
    stem = "bert.encoder.layer.0.attention.self"
    save_file({f"{stem}.query.weight": torch.zeros(32, 32)}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{stem}.key.weight is missing")):
        hf.load_weights(bert_classifier(0), tmp_path / "a.safetensors")


def test_save_weights_names_an_unknown_weight(tmp_path):
    with pytest.raises(ConfigError, match="'h.9.ln_1.weight'"):
        hf.save_weights(gpt(0), tmp_path / "a.safetensors", names=["h.9.ln_1.weight"])
    assert not (tmp_path / "a.safetensors").exists()


def test_benchmarks_gpt2_state_dict_from_hf(tmp_path):
    """benchmarks/*.py load transformers' GPT-2 weights into our GPT with this function."""
    reference = hf_gpt2(False)
    state = hf.gpt2_state_dict_from_hf(reference.state_dict(), "hf")
    assert set(state) == set(GPT(GPTConfig(**GPT_SHAPE, tie_word_embeddings=False)).state_dict())
    assert torch.equal(state["h.0.mlp.c_fc.weight"], reference.transformer.h[0].mlp.c_fc.weight.t())


# -- a third family is one record --------------------------------------------------------------
@dataclass
class ToyConfig:
    width: int = 4
    tie_word_embeddings: bool = True


class Toy(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(7, config.width)
        self.proj = nn.Linear(config.width, 2 * config.width)
        self.head = nn.Linear(config.width, 7, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight


def toy_config_from_hf(values, where, *, cls, overrides):
    return ToyConfig(width=values["width"], tie_word_embeddings=values["tie_word_embeddings"])


@pytest.fixture
def toy_family():
    record = hf.register_family(hf.FamilyRecord(
        model_type="toy",
        architectures={"ToyForCausalLM": Toy},
        default="ToyForCausalLM",
        key_maps={Toy: hf.KeyMap(prefixes=(("head.", "lm_head."), ("", "model.")),
                                 transposed=("proj.weight",))},
        config_from_hf=toy_config_from_hf,
        config_to_hf=lambda model: {"width": model.config.width,
                                    "tie_word_embeddings": model.config.tie_word_embeddings},
        tied=lambda config: {"head.weight": "embed.weight"} if config.tie_word_embeddings else {},
    ))
    yield record
    del hf.RECORDS["toy"]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_new_family_needs_only_its_record(tmp_path, toy_family, tie):
    ours = randomise(Toy(ToyConfig(width=4, tie_word_embeddings=tie)), 0)
    hf.save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("toy", ["ToyForCausalLM"])
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == {"model.embed.weight", "model.proj.weight", "model.proj.bias"} | (
        set() if tie else {"lm_head.weight"})
    assert saved["model.proj.weight"].shape == (4, 8)  # transposed, as the record says
    back = hf.from_pretrained(tmp_path)
    assert type(back) is Toy and (back.head.weight is back.embed.weight) is tie
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match="already registered"):
        hf.register_family(toy_family)
