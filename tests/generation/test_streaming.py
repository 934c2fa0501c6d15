"""The text stream: whole characters only, the same text as decoding the finished output."""

from __future__ import annotations

import torch

from lmlab.generation import GenerationConfig, generate, stream
from lmlab.models.gpt import GPT, GPTConfig
from lmlab.tokenizer import Tokenizer

CORPUS = ["héllo wörld ünïcödé", "日本語のテキスト", "emoji 🙂🚀 and more 🙂", "plain ascii text"] * 20


def tiny(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()


def test_stream_text_is_whole_characters_and_equals_the_decoded_output():
    tok = Tokenizer.train_bpe(iterator=iter(CORPUS), vocab_size=300)
    model = tiny(tok.vocab_size)
    ids = torch.tensor([tok.encode("日本")[:2], tok.encode("🙂🚀")[:2]])
    config = GenerationConfig(max_new_tokens=40, do_sample=True, seed=3, eos_token_id=[])
    steps = list(stream(model, ids, config, tokenizer=tok))
    out = generate(model, ids, max_new_tokens=40, do_sample=True, seed=3, eos_token_id=[])
    for row in range(2):
        text = "".join(step.texts[row] for step in steps)
        assert text == tok.decode(out[row, ids.shape[1]:].tolist())
        # a random model can emit byte sequences that are not UTF-8 at all; those decode to
        # U+FFFD in the final text too. A character split across tokens never does.
        assert sum(step.texts[row].count("\ufffd") for step in steps) == text.count("\ufffd")
    # random byte-level tokens do split characters: some steps must have held text back
    assert any(step.texts[0] == "" for step in steps if step.token_ids)


def test_rows_stop_at_eos_and_padding_never_reaches_the_text():
    tok = Tokenizer.train_bpe(iterator=iter(CORPUS), vocab_size=300)
    model = tiny(tok.vocab_size)
    ids = torch.tensor([tok.encode("plain")[:2], tok.encode("ascii")[:2]])
    new = generate(model, ids, max_new_tokens=12, eos_token_id=[])[0, ids.shape[1]:].tolist()
    # row 0 stops at the first new token that did not occur before in it
    stop_at = next(k for k in range(1, len(new)) if new[k] not in new[:k])
    config = GenerationConfig(max_new_tokens=12, eos_token_id=[new[stop_at]], pad_token_id=5)
    steps = list(stream(model, ids, config, tokenizer=tok))
    row0 = "".join(step.texts[0] for step in steps)
    assert row0 == tok.decode(new[: stop_at + 1])
