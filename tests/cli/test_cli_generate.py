"""`lmlab generate`: every knob reaches generate(), prompts from files, --compare's table
(lmlab eval generation's code, tested in tests/evaluation/test_generation_eval.py)."""

from __future__ import annotations


import pytest
import torch

from lmlab.cli.generate import KNOBS
from lmlab.generation import GenerationConfig, generate
from lmlab.models import GPT, GPTConfig, from_pretrained
from lmlab.tokenizer import Tokenizer

from test_cli_errors import assert_usage_error, run_cli  # noqa: E402  (same folder)

TEXT = "def add(a, b):\n    return a + b\n\nclass Stack:\n    pass\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tok = Tokenizer.char_level(TEXT)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                  eos_token_id=tok.eos_token_id)).save_pretrained(directory, tokenizer=tok)
    return directory


def test_every_cli_knob_is_a_generation_config_field():
    fields = set(GenerationConfig.__dataclass_fields__)
    assert set(KNOBS) <= fields
    # the knobs not in the table have their own flags, or are an encoder–decoder's (`lmlab
    # translate --to` sets forced_bos_token_id; lmlab generate decodes decoder-only models)
    assert fields - set(KNOBS) == {"do_sample", "stop_strings", "forced_bos_token_id"}


def test_cli_output_equals_the_library_call(capsys, model_dir):
    code, out, _ = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "def ",
                           "--max-new-tokens", "12", "--do-sample", "--top-k", "5",
                           "--repetition-penalty", "1.2", "--seed", "7")
    assert code == 0
    model, tok = from_pretrained(model_dir), Tokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("def ")])
    expected = generate(model, ids, max_new_tokens=12, do_sample=True, top_k=5,
                        repetition_penalty=1.2, seed=7)
    assert out == "def " + tok.decode(expected[0, 4:].tolist(), skip_special_tokens=True) + "\n"


def test_prompts_from_a_file_and_beam_search(capsys, model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \nclass \n")
    code, out, _ = run_cli(capsys, "generate", "--model", model_dir, "--prompt-file", prompts,
                           "--max-new-tokens", "6", "--num-beams", "3", "--num-return-sequences", "2")
    assert code == 0
    lines = [line for line in out.splitlines() if line]
    assert sum(line.startswith("def ") for line in lines) == 2
    assert sum(line.startswith("class ") for line in lines) == 2


def test_compare_prints_every_strategy_with_its_figures(capsys, model_dir):
    """--compare prints `lmlab eval generation`'s table, from the same code."""
    code, out, _ = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "def ",
                           "--max-new-tokens", "8", "--compare", "greedy={}",
                           'hot={"do_sample": true, "temperature": 1.5}')
    assert code == 0
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
    lines = out.splitlines()
    header = cells(next(line for line in lines if line.startswith("| strategy")))
    rows = {cells(line)[0]: dict(zip(header, cells(line)))
            for line in lines if line.startswith(("| greedy", "| hot"))}
    assert set(rows) == {"greedy", "hot"}
    model, tok = from_pretrained(model_dir), Tokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("def ")])
    greedy = generate(model, ids, max_new_tokens=8, eos_token_id=[tok.eos_token_id])
    text = tok.decode(greedy[0, 4:].tolist(), skip_special_tokens=True)
    assert f"--- greedy {{}}\ndef {text}" in out
    for row in rows.values():
        assert float(row["tokens/s"].replace(",", "")) > 0
        assert float(row["log-prob"]) < 0
        assert 0 <= float(row["distinct-2"]) <= 1 and float(row["length"]) <= 8


@pytest.mark.parametrize("argv, names", [
    (["--logit-bias", "{1: 2}"], ["--logit-bias", "JSON"]),
    (["--early-stopping", "maybe"], ["--early-stopping"]),
    (["--length-penalty", "2.0"], ["--length-penalty", "--num-beams"]),
    (["--compare", "x=[1]"], ["--compare x"]),
    (["--prompt-file", "/nonexistent/prompts.txt"], ["--prompt-file"]),
])
def test_bad_generate_flags(capsys, model_dir, argv, names):
    assert_usage_error(capsys, "generate", "--model", model_dir, "--prompt", "def ", *argv,
                       names=names)


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0.7"], "--temperature only applies to sampling; pass --do-sample"),
    (["--top-k", "5", "--top-p", "0.9"],
     "--top-k and --top-p only apply to sampling; pass --do-sample"),
    (["--do-sample", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--num-return-sequences", "2"], "--num-return-sequences=2 needs --num-beams >= 2 or "
                                      "--do-sample; greedy decoding returns one sequence per prompt"),
])
def test_generation_errors_speak_in_flags(capsys, model_dir, argv, message):
    """The library says `do_sample=True`; the command line says the flags its user types."""
    line = assert_usage_error(capsys, "generate", "--model", model_dir, "--prompt", "def ",
                              *argv, names=[])
    assert line == f"lmlab generate: error: {message}"


def test_a_model_that_cannot_generate_is_one_line(capsys, tiny_bert_dir):
    """A BERT encoder (or a classifier) has no decoder: one line naming --model, not an
    AttributeError from deep inside."""
    line = assert_usage_error(capsys, "generate", "--model", tiny_bert_dir, "--prompt", "hello",
                              names=["--model", "cannot generate text"])
    assert "Traceback" not in line


def test_default_length_adapts_to_a_small_context_window(capsys, model_dir):
    """No --max-new-tokens: a prompt that leaves less room than the default 20 tokens gets the
    room left, said once on stderr; the tokens equal the library's with that budget. An explicit
    length that does not fit stays an error."""
    model, tok = from_pretrained(model_dir), Tokenizer.from_pretrained(model_dir)
    prompt = TEXT[:50]  # 50 tokens in a 64-token window: room for 14, not 20
    code, out, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", prompt,
                             "--prompt", prompt[:48])
    assert code == 0, err
    notes = err.strip().splitlines()
    assert len(notes) == 1 and "14 new tokens" in notes[0] and "64" in notes[0], err
    ids = torch.tensor([tok.encode(prompt)])
    expected = generate(model, ids, max_new_tokens=14, eos_token_id=[tok.eos_token_id])
    first = out.split("\n" + prompt[:48], 1)[0]
    assert first == prompt + tok.decode(expected[0, 50:].tolist(), skip_special_tokens=True)
    assert_usage_error(capsys, "generate", "--model", model_dir, "--prompt", prompt,
                       "--max-new-tokens", "20", names=["--max-new-tokens 20", "64"])
