"""tokenizer_config.json through transformers and back: special tokens (additional ones too),
chat templates, model_max_length and every key lmlab does not manage survive lmlab's load and
save, so that transformers' AutoTokenizer sees the same tokenizer before and after."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend

from lmlab.errors import ConfigError
from lmlab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = ["hello world, how are you? I am fine, thank you.\n",
          "user and assistant talk: a chat, a reply, a question.\n"] * 30
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOL_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
CONVERSATION = [{"role": "user", "content": "hello world, how are you?"},
                {"role": "assistant", "content": "I am fine, thank you."}]
CHAT_TEXT = ("<|im_start|>user\nhello world, how are you?<|im_end|>\n"
             "<|im_start|>assistant\nI am fine, thank you.<|im_end|>\n")


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train_bpe(iterator=CORPUS, vocab_size=300, special_tokens=SPECIALS)


def chat_tokenizer(trained: Tokenizer, **changes) -> Tokenizer:
    """A fresh Tokenizer over a copy of the trained backend, with chat roles and a template."""
    options = dict(bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   additional_special_tokens=SPECIALS[1:], chat_template=TEMPLATE,
                   model_max_length=64)
    return Tokenizer(Backend.from_str(trained.backend.to_str()), **{**options, **changes})


def test_transformers_sees_template_specials_and_max_length(trained, tmp_path):
    ours = chat_tokenizer(trained)
    ours.save_pretrained(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reference.chat_template == TEMPLATE
    assert (reference.bos_token, reference.eos_token, reference.pad_token) == (
        "<|endoftext|>", "<|im_end|>", "<|endoftext|>")
    assert set(SPECIALS) <= set(reference.all_special_tokens)
    assert reference.model_max_length == 64

    text = reference.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == CHAT_TEXT
    ids = reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids == ours.encode(CHAT_TEXT)
    assert ids.count(ours.token_to_id("<|im_start|>")) == 2  # matched whole, a special token

    again = Tokenizer.from_pretrained(tmp_path)
    assert (again.chat_template, again.additional_special_tokens, again.model_max_length) == (
        TEMPLATE, SPECIALS[1:], 64)
    assert (again.bos_token, again.eos_token, again.pad_token) == (
        ours.bos_token, ours.eos_token, ours.pad_token)
    assert again.fingerprint == ours.fingerprint


def test_named_templates_are_kept_as_given(trained, tmp_path):
    named = [{"name": "default", "template": TEMPLATE},
             {"name": "tool_use", "template": TOOL_TEMPLATE}]
    chat_tokenizer(trained, chat_template=named).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == named
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reference.chat_template == {"default": TEMPLATE, "tool_use": TOOL_TEMPLATE}
    assert Tokenizer.from_pretrained(tmp_path).chat_template == named


def test_chat_template_is_settable_and_checked(trained):
    tok = chat_tokenizer(trained, chat_template=None)
    assert tok.chat_template is None
    tok.chat_template = TOOL_TEMPLATE
    assert tok.chat_template == TOOL_TEMPLATE
    for bad in (3, [{"name": "default"}], []):
        with pytest.raises(ConfigError, match="chat_template must be"):
            tok.chat_template = bad
    assert tok.chat_template == TOOL_TEMPLATE


def transformers_tokenizer(trained: Tokenizer, chat_template):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Backend.from_str(trained.backend.to_str()), bos_token="<|endoftext|>",
        eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:],
        chat_template=chat_template, model_max_length=48, padding_side="left",
        truncation_side="left", clean_up_tokenization_spaces=True, my_custom_key={"x": [1, 2]})


@pytest.mark.parametrize("jinja_files", [True, False], ids=["chat_template.jinja", "in-config"])
@pytest.mark.parametrize("template", [TEMPLATE, {"default": TEMPLATE, "tool_use": TOOL_TEMPLATE}],
                         ids=["one", "named"])
def test_transformers_config_survives_lmlab(trained, tmp_path, jinja_files, template):
    transformers_tokenizer(trained, template).save_pretrained(tmp_path / "hf",
                                                              save_jinja_files=jinja_files)
    written = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    ours = Tokenizer.from_pretrained(tmp_path / "hf")
    expected = template if isinstance(template, str) else [
        {"name": name, "template": text} for name, text in template.items()]
    assert ours.chat_template == expected
    assert (ours.model_max_length, ours.additional_special_tokens) == (48, SPECIALS[1:])
    assert ours.extra_config["padding_side"] == "left"

    ours.save_pretrained(tmp_path / "ours")
    again = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    # Every key transformers wrote survives with its value, but the class lmlab names itself.
    assert {k: v for k, v in again.items() if k in written and k != "tokenizer_class"} == {
        k: v for k, v in written.items() if k != "tokenizer_class"}
    assert again["tokenizer_class"] == "PreTrainedTokenizerFast"

    before = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    after = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    for attribute in ("chat_template", "model_max_length", "padding_side", "truncation_side",
                      "clean_up_tokenization_spaces", "all_special_tokens", "bos_token",
                      "eos_token", "pad_token"):
        assert getattr(after, attribute) == getattr(before, attribute), attribute
    assert after.init_kwargs["my_custom_key"] == {"x": [1, 2]}
    assert after.apply_chat_template(CONVERSATION, tokenize=False) == \
        before.apply_chat_template(CONVERSATION, tokenize=False)


def test_saving_over_a_transformers_directory_replaces_its_template_files(trained, tmp_path):
    """transformers 5 reads chat_template.jinja before tokenizer_config.json: a stale one would
    hide the template lmlab writes."""
    transformers_tokenizer(trained, {"default": TEMPLATE, "tool_use": TEMPLATE}).save_pretrained(
        tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    ours = Tokenizer.from_pretrained(tmp_path)
    ours.chat_template = TOOL_TEMPLATE
    ours.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.jinja"))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == TOOL_TEMPLATE
    assert Tokenizer.from_pretrained(tmp_path).chat_template == TOOL_TEMPLATE


def test_plain_tokenizer_config_is_unchanged(trained, tmp_path):
    """Without a template or extra keys lmlab writes exactly what it always wrote."""
    trained.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_no_known_max_length_is_written_back_as_read(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length": int(1e30)}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length is None
    tok.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())[
        "model_max_length"] == int(1e30)
    tok.model_max_length = 32  # a value set since loading wins
    tok.save_pretrained(tmp_path / "third")
    assert Tokenizer.from_pretrained(tmp_path / "third").model_max_length == 32


def test_wordpiece_files_are_unchanged(tmp_path):
    tok = Tokenizer.train_wordpiece(iterator=CORPUS, vocab_size=120, min_frequency=1)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is True
    assert config["chat_template"] == TEMPLATE and (tmp_path / "vocab.txt").is_file()
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.fingerprint == tok.fingerprint and again.chat_template == TEMPLATE
    # Keys lmlab writes from its own state are not kept as extras (they would go stale).
    assert not {"tokenizer_class", "chat_template", "cls_token", "mask_token"} & set(
        again.extra_config)
