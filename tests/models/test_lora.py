"""LoRA (models/lora.py) and PEFT's adapter format (models/hf/peft.py) against the real `peft`:
an adapter saved here loads in PEFT with the same outputs, one PEFT trained loads here with the
same outputs, with PEFT's own key names and config — for GPT-2 and BERT (whose fused qkv is
PEFT's query/key/value), LMs, encoders and classifiers; merging is exact, unmerging bit-exact,
removal gives a stock model; only adapters (and a classifier's head) train; bad adapters and
configs are errors that name the key."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

import lmlab
from lmlab import kernels
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import from_pretrained
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.models.hf.peft import load_adapter, save_adapter
from lmlab.models.lora import (
    LoraConfig,
    LoRALayer,
    adapter_state_dict,
    apply_lora,
    lora_modules,
    lora_parameters,
    merge_lora,
    remove_lora,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

TOL = dict(atol=1e-5, rtol=1e-5)
GPT2_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100,
                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
BERT_SHAPE = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                  intermediate_size=64, vocab_size=100, max_position_embeddings=32)
IDS = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9])  # right-padded rows


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere (HF's init leaves biases 0 and LayerNorms 1, hiding mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if re.search(r"(ln_\d|ln_f|LayerNorm)\.weight$", name) else noise)
    return model.eval()


# family case → (transformers class, config, its output, our output)
CASES = {
    "gpt2-lm": ("GPT2LMHeadModel", "GPT2Config", GPT2_SHAPE,
                lambda m: m(IDS).logits, lambda m: m(IDS)),
    "gpt2-cls": ("GPT2ForSequenceClassification", "GPT2Config", {**GPT2_SHAPE, "num_labels": 3},
                 lambda m: m(IDS).logits, lambda m: m(IDS)),
    "bert": ("BertModel", "BertConfig", BERT_SHAPE,
             lambda m: m(IDS, attention_mask=MASK).last_hidden_state, lambda m: m(IDS, MASK)),
    "bert-cls": ("BertForSequenceClassification", "BertConfig", {**BERT_SHAPE, "num_labels": 3},
                 lambda m: m(IDS, attention_mask=MASK).logits, lambda m: m(IDS, MASK)),
}
TASK_TYPES = {"gpt2-lm": "CAUSAL_LM", "gpt2-cls": "SEQ_CLS", "bert": "FEATURE_EXTRACTION",
              "bert-cls": "SEQ_CLS"}
# (case, targets): defaults, every part of BERT's fused qkv, a name that matches two modules
# (c_proj: attn.c_proj and mlp.c_proj, as in PEFT), a dotted suffix that selects one of them.
TARGETS = [("gpt2-lm", None), ("gpt2-lm", ["c_proj", "c_fc"]), ("gpt2-lm", ["attn.c_proj"]),
           ("gpt2-cls", ["c_attn"]), ("bert", None), ("bert", ["query", "key", "value", "dense"]),
           ("bert-cls", None), ("bert-cls", ["key", "output.dense"])]
TARGET_IDS = [f"{case}-{'+'.join(t) if t else 'default'}" for case, t in TARGETS]


def hf_base(case: str, tmp_path):
    """A random transformers model of `case`, saved to tmp_path/base; (model, directory)."""
    cls_name, config_name, shape, _, _ = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, config_name)(**shape))
    randomise(model, seed=0)
    directory = tmp_path / "base"
    model.save_pretrained(directory)
    return model, directory


def randomise_adapters(params: dict[str, torch.Tensor], seed: int) -> None:
    """Non-zero B (PEFT and lmlab start it at zero, which would hide a wrong name or slice)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def peft_config(case: str, targets: list[str] | None):
    # GPT-2's Conv1D layers need fan_in_fan_out (PEFT would set it, with a warning).
    return peft.LoraConfig(task_type=TASK_TYPES[case], r=4, lora_alpha=8, target_modules=targets,
                           fan_in_fan_out=case.startswith("gpt2"))


def peft_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_keys(directory) -> dict[str, tuple[int, ...]]:
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# -- ours → PEFT, PEFT → ours ------------------------------------------------------------------
@pytest.mark.parametrize("case, targets", TARGETS, ids=TARGET_IDS)
def test_our_adapter_loads_in_peft_with_the_same_outputs(tmp_path, case, targets):
    hf, base = hf_base(case, tmp_path)
    _, _, _, hf_out, our_out = CASES[case]
    ours = apply_lora(from_pretrained(base), LoraConfig(r=4, alpha=8, target_modules=targets))
    randomise_adapters(lora_parameters(ours), seed=1)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(base))

    # PEFT's own adapter for the same config has exactly our keys, shapes and config values.
    reference = peft.get_peft_model(
        getattr(transformers, type(hf).__name__)(hf.config),
        peft_config(case, targets))
    reference.save_pretrained(tmp_path / "peft")
    assert adapter_keys(tmp_path / "ours") == adapter_keys(tmp_path / "peft")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    expected = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                "bias", "use_dora", "use_rslora"):
        assert saved[key] == expected[key], key
    assert set(saved["modules_to_save"] or []) <= set(expected["modules_to_save"] or [])
    assert saved["base_model_name_or_path"] == str(base)

    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        got, base_out = our_out(ours), our_out(from_pretrained(base))
        assert_close(hf_out(loaded), got, **TOL)
    assert (got - base_out).abs().max() > 1e-2  # the adapter (and head) changed the outputs


@pytest.mark.parametrize("case, targets", TARGETS, ids=TARGET_IDS)
def test_peft_adapter_loads_here_with_the_same_outputs(tmp_path, case, targets):
    hf, base = hf_base(case, tmp_path)
    _, _, _, hf_out, our_out = CASES[case]
    trained = peft.get_peft_model(hf, peft_config(case, targets))
    randomise_adapters(peft_trainable(trained), seed=2)  # LoRA A and B, and a head's copy
    trained.save_pretrained(tmp_path / "peft")

    ours = load_adapter(from_pretrained(base), tmp_path / "peft")
    with torch.no_grad():
        assert_close(our_out(ours), hf_out(trained.eval()), **TOL)
    assert sum(p.numel() for p in lora_parameters(ours).values()) == \
        sum(p.numel() for p in peft_trainable(trained).values())


def test_bert_fused_qkv_has_one_adapter_per_targeted_part(tmp_path):
    _, base = hf_base("bert", tmp_path)
    ours = apply_lora(from_pretrained(base), LoraConfig(r=2, target_modules=["key", "value"]))
    qkv = ours.encoder.layer[0].attention.self.qkv
    assert sorted(qkv.lora_A) == ["key", "value"]
    assert qkv.lora_B["key"].weight.shape == (32, 2)  # a third of the fused (96, 32) output
    assert "encoder.layer.0.attention.self.qkv.weight" in ours.state_dict()  # base name kept
    randomise_adapters({"b": qkv.lora_B["value"].weight}, seed=3)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out, plain = qkv(x), nn.functional.linear(x, qkv.weight, qkv.bias)
    assert torch.equal(out[..., :64], plain[..., :64])  # query and key untouched
    assert (out[..., 64:] - plain[..., 64:]).abs().max() > 1e-3


# -- merge, unmerge, remove --------------------------------------------------------------------
@pytest.mark.parametrize("case, targets", [("gpt2-lm", ["c_attn", "c_fc"]),
                                           ("bert-cls", ["query", "value", "dense"])])
def test_merge_is_exact_unmerge_bit_exact_and_removal_gives_a_stock_model(tmp_path, case, targets):
    _, base = hf_base(case, tmp_path)
    _, _, _, hf_out, our_out = CASES[case]
    ours = apply_lora(from_pretrained(base), LoraConfig(r=4, target_modules=targets))
    randomise_adapters(lora_parameters(ours), seed=4)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        unmerged = our_out(ours)
        merge_lora(ours)
        assert all(m.merged for m in lora_modules(ours).values())
        assert_close(our_out(ours), unmerged, **TOL)
        assert not torch.equal(ours.state_dict()[next(iter(lora_modules(ours))) + ".weight"],
                               before[next(iter(lora_modules(ours))) + ".weight"])
        unmerge_lora(ours)
        assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
        assert_close(our_out(ours), unmerged, atol=0, rtol=0)

    stock = remove_lora(ours)
    assert not any(isinstance(m, LoRALayer) for m in stock.modules())
    assert set(stock.state_dict()) == set(from_pretrained(base).state_dict())
    assert all(p.requires_grad for p in stock.parameters())
    stock.save_pretrained(tmp_path / "merged")
    reloaded = getattr(transformers, CASES[case][0]).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close(our_out(stock.eval()), unmerged, **TOL)
        assert_close(hf_out(reloaded), unmerged, **TOL)


# -- what trains -------------------------------------------------------------------------------
def test_only_adapters_and_the_classifier_head_train(tmp_path):
    _, base = hf_base("bert-cls", tmp_path)
    model = apply_lora(from_pretrained(base), LoraConfig(r=4, dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) == set(adapter_state_dict(model))
    assert {"classifier.weight", "classifier.bias",
            "bert.encoder.layer.1.attention.self.qkv.lora_A.query.weight",
            "bert.encoder.layer.1.attention.self.qkv.lora_B.value.weight"} <= trainable
    assert not any(".key." in n for n in trainable)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    labels = torch.tensor([0, 1, 2])
    for _ in range(3):  # B starts at zero, so A gets no gradient before the second step
        loss = nn.functional.cross_entropy(model(IDS, MASK), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


# -- the CPU speed layer and decoding ----------------------------------------------------------
def test_decoding_a_lora_gpt_runs_on_the_module_path_with_the_merged_models_tokens():
    torch.manual_seed(0)
    model = randomise(GPT(GPTConfig(vocab_size=100, n_positions=32, n_embd=32, n_layer=2,
                                    n_head=2)), seed=5)
    apply_lora(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomise_adapters(lora_parameters(model), seed=6)
    assert kernels.decoding_adapter(model) is None  # a replaced layer: not the stock GPT
    prompt = IDS[:2, :6]
    with torch.no_grad():
        lora_tokens = lmlab.generate(model, prompt, max_new_tokens=5)
        merged_tokens = lmlab.generate(merge_lora(model), prompt, max_new_tokens=5)
        removed = remove_lora(model)
        if kernels.available():  # stock again: the C decoding applies
            assert kernels.decoding_adapter(removed) is not None
        removed_tokens = lmlab.generate(removed, prompt, max_new_tokens=5)
    assert lora_tokens.shape == (2, 11)
    assert torch.equal(lora_tokens, merged_tokens)
    assert torch.equal(lora_tokens, removed_tokens)


# -- the config --------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    (dict(r=0), "lora.r must be a positive integer, got 0"),
    (dict(r=2.5), "lora.r must be a positive integer, got 2.5"),
    (dict(alpha=0), "lora.alpha must be a positive number, got 0"),
    (dict(dropout=1.0), r"lora.dropout must be in \[0, 1\), got 1.0"),
    (dict(target_modules="c_attn"), "lora.target_modules must be a non-empty list"),
    (dict(target_modules=[]), "lora.target_modules must be a non-empty list"),
])
def test_lora_config_is_validated_with_the_key_named(values, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**values)


def test_lora_config_is_a_plain_dataclass():
    cfg = LoraConfig(r=4, target_modules=("c_attn",))
    assert asdict(cfg) == {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["c_attn"]}
    assert LoraConfig(**asdict(cfg)) == cfg


# -- errors ------------------------------------------------------------------------------------
def tiny_gpt(n_embd: int = 32, *, tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=100, n_positions=32, n_embd=n_embd, n_layer=2, n_head=2,
                         tie_word_embeddings=tie))


def test_a_target_that_matches_nothing_names_it_and_the_choices():
    model = tiny_gpt()
    with pytest.raises(ConfigError, match=r"'q_proj' matches no adaptable Linear module of GPT;"
                                          r" available: c_attn, c_fc, c_proj$"):
        apply_lora(model, LoraConfig(target_modules=["c_attn", "q_proj"]))
    with pytest.raises(ConfigError, match=r"'classifier' \(the task head, trained in full"):
        apply_lora(lmlab.models.BertForSequenceClassification(lmlab.models.BertConfig(
            **BERT_SHAPE)), LoraConfig(target_modules=["classifier"]))
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="'lm_head' .* tied"):
        apply_lora(model, LoraConfig(target_modules=["lm_head"]))
    apply_lora(tiny_gpt(tie=False), LoraConfig(target_modules=["lm_head"]))  # untied: fine
    apply_lora(model, LoraConfig())
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())


@pytest.fixture
def gpt_adapter(tmp_path):
    """An lmlab adapter directory for tiny_gpt() (c_attn, r=4)."""
    model = apply_lora(tiny_gpt(), LoraConfig(r=4))
    randomise_adapters(lora_parameters(model), seed=7)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=None)
    return tmp_path / "adapter"


def test_our_adapter_loads_back_here(gpt_adapter):
    saved = apply_lora(tiny_gpt(), LoraConfig(r=4))
    randomise_adapters(lora_parameters(saved), seed=7)
    loaded = load_adapter(tiny_gpt(), gpt_adapter)
    assert all(torch.equal(v, adapter_state_dict(saved)[k])
               for k, v in adapter_state_dict(loaded).items())


def test_an_adapter_for_another_base_shape_is_refused_and_leaves_the_model_as_it_was(gpt_adapter):
    model = tiny_gpt(n_embd=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(
            "adapter_model.safetensors: 'base_model.model.transformer.h.0.attn.c_attn.lora_A."
            "weight' has shape (4, 32), this model expects (4, 48)")):
        load_adapter(model, gpt_adapter)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_adapter_for_another_model_class_names_the_key(tmp_path, gpt_adapter):
    hf, base = hf_base("bert", tmp_path)
    trained = peft.get_peft_model(hf, peft.LoraConfig(r=2, task_type="FEATURE_EXTRACTION"))
    trained.save_pretrained(tmp_path / "encoder_adapter")
    classifier = lmlab.models.BertForSequenceClassification.from_encoder(base, num_labels=2)
    with pytest.raises(CheckpointError, match=r"'base_model\.model\.encoder\.layer\.0\..*' "
                                              r"\(and \d+ more\) is not a weight of this adapter "
                                              r"on a BertForSequenceClassification; expected "
                                              r"keys such as 'base_model\.model\.bert\.encoder"):
        load_adapter(classifier, tmp_path / "encoder_adapter")
    with pytest.raises(CheckpointError, match="adapter_config.json: lora.target_modules: 'query', "
                                              "'value' match no adaptable Linear module of GPT"):
        load_adapter(tiny_gpt(), tmp_path / "encoder_adapter")


def test_adapter_files_are_checked(tmp_path, gpt_adapter):
    config = gpt_adapter / "adapter_config.json"
    weights = gpt_adapter / "adapter_model.safetensors"
    saved = json.loads(config.read_text())

    config.write_text(json.dumps({**saved, "r": 0}))
    with pytest.raises(CheckpointError, match="adapter_config.json: lora.r must be a positive"):
        load_adapter(tiny_gpt(), gpt_adapter)
    config.write_text(json.dumps({**saved, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type 'IA3' is not supported"):
        load_adapter(tiny_gpt(), gpt_adapter)
    config.write_text(json.dumps({**saved, "use_dora": True}))
    with pytest.raises(CheckpointError, match="'use_dora': true is not supported"):
        load_adapter(tiny_gpt(), gpt_adapter)
    config.write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(CheckpointError, match="adapter_config.json: not valid JSON"):
        load_adapter(tiny_gpt(), gpt_adapter)
    config.unlink()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(tiny_gpt(), gpt_adapter)
    config.write_text(json.dumps(saved))

    weights.rename(gpt_adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors .*adapter_model.bin "
                                              "is there: lmlab reads only safetensors"):
        load_adapter(tiny_gpt(), gpt_adapter)
    (gpt_adapter / "adapter_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors$"):
        load_adapter(tiny_gpt(), gpt_adapter)
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 32)},
              weights)
    with pytest.raises(CheckpointError, match=r"missing adapter weights \['base_model"):
        load_adapter(tiny_gpt(), gpt_adapter)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_adapter(tiny_gpt(), tmp_path / "nowhere")


def test_saving_is_all_or_nothing_and_keeps_other_files(tmp_path, gpt_adapter):
    (gpt_adapter / "tokenizer.json").write_text("{}")
    model = apply_lora(tiny_gpt(), LoraConfig(r=2, target_modules=["c_fc"]))
    save_adapter(model, gpt_adapter, base_model_name_or_path="gpt2")
    assert (gpt_adapter / "tokenizer.json").read_text() == "{}"
    assert json.loads((gpt_adapter / "adapter_config.json").read_text())["r"] == 2
    load_adapter(tiny_gpt(), gpt_adapter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging left behind
    with pytest.raises(ConfigError, match="no LoRA adapters to save"):
        save_adapter(tiny_gpt(), tmp_path / "empty", base_model_name_or_path=None)
    assert not (tmp_path / "empty").exists()
