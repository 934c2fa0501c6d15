"""SFT data: every format's loss mask token by token (only replies and EOS trained, padding
never, EOS learned although it is also the pad token), packing equal to no packing, and bad
input as one-line errors naming file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab.errors import DataError
from lmlab.models.hf import from_pretrained
from lmlab.tasks import sft
from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.chat import render_chat

IGNORE = sft.IGNORE


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tiny_gpt_dir):
    return Tokenizer.from_pretrained(tiny_gpt_dir)


def expected_labels(ids: list[int], trained: list[bool]) -> list[int]:
    """Position t's label is token t+1 where that token is trained."""
    return [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def test_prompt_completion_mask_token_by_token(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "the movie was", "completion": " good"}])
    [example] = sft.read_examples(path)
    encoded = sft.encode_example(tok, example, max_length=64)
    prompt, completion = tok.encode("the movie was"), tok.encode(" good")
    ids = prompt + completion + [tok.eos_token_id]
    assert encoded.ids.tolist() == ids
    trained = [False] * len(prompt) + [True] * (len(completion) + 1)
    assert encoded.labels.tolist() == expected_labels(ids, trained)
    assert encoded.labels[len(ids) - 2] == tok.eos_token_id  # EOS is a target
    # with train_on_prompt every next token counts
    everything = sft.encode_example(tok, example, max_length=64, train_on_prompt=True)
    assert everything.labels.tolist() == ids[1:] + [IGNORE]


@pytest.mark.parametrize("fmt", ["messages", "alpaca", "turns"])
def test_conversation_formats_train_replies_only(tok, tmp_path, fmt):
    rows = {
        "messages": {"messages": [{"role": "system", "content": "be nice"},
                                  {"role": "user", "content": "the movie"},
                                  {"role": "assistant", "content": "was good"},
                                  {"role": "user", "content": "and the plot"},
                                  {"role": "assistant", "content": "was bad"}]},
        "alpaca": {"instruction": "the movie", "input": "the plot", "output": "was good"},
        "turns": {"turns": [{"speaker": "USER", "utterance": "the movie"},
                            {"speaker": "SYSTEM", "utterance": "was good"},
                            {"speaker": "USER", "utterance": "and the plot"},
                            {"speaker": "SYSTEM", "utterance": "was bad"}]},
    }
    [example] = sft.read_examples(write_jsonl(tmp_path / "d.jsonl", [rows[fmt]]))
    encoded = sft.encode_example(tok, example, max_length=256)
    text = render_chat(tok, example.messages)
    assert encoded.ids.tolist() == tok.encode(text)  # the template's tokens, EOS already last
    assert encoded.ids[-1] == tok.eos_token_id
    # Rebuild the trained flags from the text: the tokens of "### Assistant:\n" + reply + EOS
    # minus the header, i.e. exactly each reply and its EOS.
    trained = np.r_[False, encoded.labels[:-1] != IGNORE]
    pieces = tok.decode(encoded.ids[trained].tolist())
    replies = [m["content"] for m in example.messages if m["role"] == "assistant"]
    assert pieces == "".join(r + tok.eos_token for r in replies)
    assert sum(encoded.ids[trained] == tok.eos_token_id) == len(replies)


def test_fields_format_and_system_prompt(tok, tmp_path):
    path = write_jsonl(tmp_path / "poems.jsonl", [{"title": "Rain", "author": "A", "text": "good"}])
    data = sft.DataFormat(prompt_template="{title}\nby {author}\n\n", completion_field="text")
    [example] = sft.read_examples(path, data)
    assert (example.prompt, example.completion) == ("Rain\nby A\n\n", "good")
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}])
    [example] = sft.read_examples(path, sft.DataFormat(system_prompt="be brief"))
    assert example.messages[0] == {"role": "system", "content": "be brief"}


def test_padding_never_counts_and_eos_does_although_pad_is_eos(tok, tmp_path):
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"prompt": "the", "completion": " good great fine happy"},
            {"prompt": "the movie was a", "completion": " bad"}]
    examples = sft.encode_examples(tok, sft.read_examples(write_jsonl(tmp_path / "p.jsonl", rows)),
                                   max_length=64)
    batch = sft.collate(examples, [[0], [1]], pad_id=tok.pad_token_id, device=torch.device("cpu"))
    ids, labels = batch["input_ids"], batch["labels"]
    for row, example in enumerate(examples):
        n = len(example.ids)
        assert labels[row, :n].tolist() == example.labels.tolist()
        assert (labels[row, n:] == IGNORE).all()  # the padding (EOS ids) is never a target
        assert (ids[row, n:] == tok.eos_token_id).all()
    eos_targets = int((labels == tok.eos_token_id).sum())
    assert eos_targets == 2  # each example's own EOS
    assert sft.SFTTask(train=examples, val=None, batch_size=2, seed=0,
                       device=torch.device("cpu"), pad_id=tok.pad_token_id,
                       max_length=64).num_targets(batch) == sum(e.trained for e in examples)


def test_packing_gives_each_example_its_unpacked_loss(tok, tiny_gpt_dir, tmp_path):
    model = from_pretrained(tiny_gpt_dir).eval()
    rows = [{"prompt": f"the movie {w}", "completion": f" was {w} and {v}"}
            for w, v in [("good", "fine"), ("bad", "sad"), ("nice", "lovely"), ("poor", "ugly"),
                         ("great", "happy")]]
    examples = sft.encode_examples(tok, sft.read_examples(write_jsonl(tmp_path / "p.jsonl", rows)),
                                   max_length=32)
    packed = sft.pack(examples, max_length=32)
    assert len(packed.sequences) < len(examples)  # some sequences hold several examples
    assert sorted(i for s in packed.sequences for i in s) == list(range(len(examples)))
    assert all(packed.lengths(examples) <= 32)
    device = torch.device("cpu")

    def per_example_losses(groups):
        batch = sft.collate(examples, groups, pad_id=tok.pad_token_id, device=device)
        with torch.no_grad():
            logits = model(batch["input_ids"], positions=batch.get("positions"),
                           document_ids=batch.get("document_ids"))
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"],
                                                   ignore_index=IGNORE, reduction="none")
        out = {}
        for row, group in enumerate(groups):
            start = 0
            for i in group:
                n = len(examples[i].ids)
                out[i] = float(losses[row, start:start + n].sum())
                start += n
        return out

    alone = per_example_losses([[i] for i in range(len(examples))])
    together = per_example_losses(packed.sequences)
    for i in alone:
        assert together[i] == pytest.approx(alone[i], abs=1e-5)
    # and the task's summed loss over a packed batch is the sum of the examples' losses
    batch = sft.collate(examples, packed.sequences, pad_id=tok.pad_token_id, device=device)
    with torch.no_grad():
        assert float(sft.summed_loss(model, batch)) == pytest.approx(sum(alone.values()), abs=1e-4)


def test_bad_input_names_file_and_line(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl line 2: cannot tell the format"):
        sft.read_examples(bad)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match=r"line 1: missing field 'completion'"):
        sft.read_examples(bad, sft.DataFormat(format="prompt_completion"))
    bad = write_jsonl(tmp_path / "bad3.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"line 1: message 0 has unknown role 'robot'"):
        sft.read_examples(bad)
    bad = write_jsonl(tmp_path / "bad4.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"line 1: no assistant message"):
        sft.read_examples(bad)
    bad = write_jsonl(tmp_path / "bad5.jsonl", [{"turns": [{"speaker": "BOT", "utterance": "x"}]}])
    with pytest.raises(DataError, match=r"turn 0 has speaker 'BOT'"):
        sft.read_examples(bad)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the movie " * 40, "completion": "x"}])
    [example] = sft.read_examples(long)
    with pytest.raises(DataError, match=r"long.jsonl line 1: the prompt is \d+ tokens and fills"):
        sft.encode_example(tok, example, max_length=16)


def test_long_conversations_split_at_user_turns_and_files_concatenate(tmp_path):
    turns = [{"role": "system", "content": "s"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": str(i)} for i in range(7)]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": turns}])
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "completion": "c"}])
    examples = sft.read_examples([path, other], sft.DataFormat(max_turns=3))
    # u0 a1 u2 a3 u4 a5 u6: pieces end with a reply, so windows of 3 give [u0 a1] [u2 a3]
    # [u4 a5]; the last user message has no reply; each piece keeps the system message
    pieces = [[m["content"] for m in e.messages] for e in examples[:-1]]
    assert pieces == [["s", "0", "1"], ["s", "2", "3"], ["s", "4", "5"]]
    assert "(messages 1-2)" in examples[0].where
    assert examples[-1].prompt == "p"  # the second file follows the first
    examples = sft.read_examples(path, sft.DataFormat(max_turns=4))
    assert [[m["content"] for m in e.messages] for e in examples] == [
        ["s", "0", "1", "2", "3"], ["s", "4", "5"]]
    with pytest.raises(Exception, match="max_turns must be at least 2"):
        sft.read_examples(path, sft.DataFormat(max_turns=1))


def test_long_prompts_can_be_dropped_instead_of_stopping_the_run(tok, tmp_path):
    rows = [{"prompt": "the movie " * 40, "completion": "x"}, {"prompt": "a", "completion": "b"}]
    examples = sft.read_examples(write_jsonl(tmp_path / "mixed.jsonl", rows))
    with pytest.raises(DataError, match="or set drop_long_prompts: true"):
        sft.encode_examples(tok, examples, max_length=16)
    kept = sft.encode_examples(tok, examples, max_length=16, drop_long_prompts=True)
    assert [e.where for e in kept] == [examples[1].where]
    with pytest.raises(DataError, match="every example's prompt fills max_length"):
        sft.encode_examples(tok, examples[:1], max_length=16, drop_long_prompts=True)
