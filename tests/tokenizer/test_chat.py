"""Chat templates render exactly as transformers' apply_chat_template renders them (same string,
same tokens, with and without the generation prompt), and the assistant mask marks exactly the
replies' tokens — for lmlab's default template and for real templates of well-known models."""

from __future__ import annotations

import pytest

from lmlab.errors import DataError
from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.chat import (DEFAULT_CHAT_TEMPLATE, ChatTemplateError, check_messages,
                                  encode_chat, encode_prompt, render_chat)

# Real templates, as their tokenizer_config.json ships them (whitespace control included).
CHATML = (  # Qwen2-style ChatML with a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = (  # Llama-2-chat: system folded into the first user turn, strict alternation
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
ZEPHYR = (  # Zephyr: newline-separated blocks, whitespace from the trim/lstrip settings
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")
GENERATION_TAGS = (  # a template written for transformers' assistant mask
    "{% for message in messages %}{% if message['role'] == 'assistant' %}A: {% generation %}"
    "{{ message['content'] | tojson }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ message['role'] | upper }}: {{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}")
TEMPLATES = {"default": DEFAULT_CHAT_TEMPLATE, "chatml": CHATML, "llama2": LLAMA2,
             "zephyr": ZEPHYR, "generation_tags": GENERATION_TAGS}

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. <b>Really</b> é"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """(lmlab Tokenizer, transformers tokenizer) of one byte-level BPE with chat tokens."""
    from transformers import AutoTokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
    corpus = [m["content"] for m in CONVERSATION] * 5 + ["system user assistant INST SYS"] * 5
    trained = Tokenizer.train_bpe(iterator=corpus, vocab_size=300, special_tokens=specials)
    tok = Tokenizer(trained.backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    directory = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(directory)
    return tok, AutoTokenizer.from_pretrained(directory), directory


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_equals_transformers(tokenizers_pair, name, generation_prompt):
    tok, hf, _ = tokenizers_pair
    template = TEMPLATES[name]
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:4]):
        if generation_prompt and messages[-1]["role"] == "assistant":
            continue
        ours = render_chat(tok, messages, add_generation_prompt=generation_prompt,
                           template=template)
        theirs = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                        add_generation_prompt=generation_prompt)
        assert ours == theirs
        ids = hf.apply_chat_template(messages, chat_template=template, tokenize=True,
                                     add_generation_prompt=generation_prompt, return_dict=False)
        assert tok.encode(ours) == list(ids)
        if generation_prompt:
            assert encode_prompt(tok, messages, template=template) == list(ids)


def test_template_saved_with_the_tokenizer_is_used(tokenizers_pair, tmp_path):
    tok, _, directory = tokenizers_pair
    from transformers import AutoTokenizer

    copy = Tokenizer.from_pretrained(directory)
    copy.chat_template = CHATML
    copy.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    reread = Tokenizer.from_pretrained(tmp_path)
    assert render_chat(reread, CONVERSATION) == hf.apply_chat_template(CONVERSATION, tokenize=False)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_assistant_mask_marks_exactly_the_replies(tokenizers_pair, name):
    tok, hf, _ = tokenizers_pair
    encoded = encode_chat(tok, CONVERSATION, template=TEMPLATES[name])
    trained_text = tok.decode([i for i, t in zip(encoded.ids, encoded.trained) if t])
    untrained_text = tok.decode([i for i, t in zip(encoded.ids, encoded.trained) if not t])
    for message in CONVERSATION:
        content = message["content"].strip()
        if name == "generation_tags" and message["role"] == "assistant":
            content = content.split(" <b>")[0]  # tojson escapes nothing here but quotes it
        if message["role"] == "assistant":
            assert content in trained_text
        else:
            assert content not in trained_text and content in untrained_text
    # Each reply's end (the EOS or end-of-turn token that closes it) is trained: the model
    # learns to stop.
    closing = "<|im_end|>" if name == "chatml" else "</s>"
    closers = [i for i, tid in enumerate(encoded.ids) if tid == tok.token_to_id(closing)]
    reply_closers = [i for i in closers if encoded.trained[i]]
    assert len(reply_closers) == 2
    if name == "generation_tags":  # where the template has tags, transformers' mask agrees
        out = hf.apply_chat_template(CONVERSATION, chat_template=GENERATION_TAGS, tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == encoded.ids
        assert [bool(m) for m in out["assistant_masks"]] == encoded.trained


def test_bad_messages_and_templates_are_one_line_errors(tokenizers_pair):
    tok, _, _ = tokenizers_pair
    with pytest.raises(DataError, match="unknown role 'robot'"):
        check_messages([{"role": "robot", "content": "hi"}], "f.jsonl line 3")
    with pytest.raises(DataError, match="line 3: message 0 must be an object"):
        check_messages(["hi"], "f.jsonl line 3")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat(tok, CONVERSATION, template="{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat(tok, [CONVERSATION[1], CONVERSATION[1]], template=LLAMA2)
    never = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}" \
            "{% endfor %}"
    with pytest.raises(ChatTemplateError, match="never renders assistant message 2"):
        encode_chat(tok, CONVERSATION, template=never)
