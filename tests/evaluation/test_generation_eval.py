"""`lmlab eval generation` (lmlab.evaluation.strategies): each quality signal on hand-made texts
with known values, the table's rows against direct `generate` calls, the files it writes,
reproducibility, and bad input as one line."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import run_cli
from lmlab.evaluation.strategies import (COLUMNS, compare_strategies, markdown_table,
                                         quality_signals, write_report)
from lmlab.evaluation.text_metrics import distinct_n, repeated_ngram_rate, self_bleu
from lmlab.generation import generate

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["what is the", "alpha beta", "first last follows"]
TWO = {"greedy": {}, "hot": {"do_sample": True, "temperature": 1.5, "top_k": 40}}


# -- the signals, on texts whose values are known ------------------------------------------------
def test_repeated_ngram_rate_is_one_minus_unique_over_all():
    words = "a b a b a b".split()  # bigrams ab ba ab ba ab: 2 unique of 5
    assert repeated_ngram_rate(words, 2) == pytest.approx(3 / 5)
    assert repeated_ngram_rate(words, 3) == pytest.approx(2 / 4)  # aba bab aba bab
    assert repeated_ngram_rate("a b c d".split(), 2) == 0.0


def test_distinct_n_pools_the_outputs():
    outputs = ["a b a".split(), "a c".split()]
    assert distinct_n(outputs, 1) == pytest.approx(3 / 5)  # a b a a c
    assert distinct_n(outputs, 2) == pytest.approx(3 / 3)  # ab ba ac
    assert distinct_n([["x", "y"], ["x", "y"]], 2) == pytest.approx(1 / 2)


def test_quality_signals_average_rep_over_outputs_long_enough():
    signals = quality_signals(["a b a b a b", "c d e"])
    assert signals["rep_2"] == pytest.approx((3 / 5 + 0) / 2)
    assert signals["rep_3"] == pytest.approx((2 / 4 + 0) / 2)
    assert signals["rep_4"] == pytest.approx(1 / 3)  # "c d e" has no 4-gram: left out
    assert signals["distinct_1"] == pytest.approx(5 / 9)
    assert math.isnan(quality_signals(["only one"])["self_bleu"])


def test_self_bleu_is_sacrebleus_corpus_bleu_against_the_others():
    import sacrebleu

    texts = ["the cat sat on the mat today", "the cat sat on a mat", "a dog ran in the park today",
             "the cat sat on the mat"]
    expected = [sacrebleu.corpus_bleu([t], [[o] for o in texts[:i] + texts[i + 1:]]).score
                for i, t in enumerate(texts)]
    assert self_bleu(texts) == pytest.approx(sum(expected) / len(expected))
    assert 0 < self_bleu(texts) < 100
    assert self_bleu(["same words here again"] * 3) == pytest.approx(100)
    assert self_bleu(["a b c d", "e f g h"]) == 0.0


# -- the table against direct calls -------------------------------------------------------------
def direct(model, tok, prompt: str, **knobs) -> tuple[list[int], bool]:
    """generate's new tokens for one prompt, cut after the first EOS, and whether it ended so."""
    ids = torch.tensor([tok.encode(prompt)])
    new = generate(model, ids, eos_token_id=[tok.eos_token_id], **knobs)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        return new[: new.index(tok.eos_token_id) + 1], True
    return new, False


def logprob_sum(model, tok, prompt: str, new: list[int]) -> float:
    ids = torch.tensor([tok.encode(prompt) + new])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).float()[0], dim=-1)
    start = len(ids[0]) - len(new)
    return float(sum(logprobs[start - 1 + j, t] for j, t in enumerate(new)))


def test_rows_equal_direct_generate_calls(tiny):
    model, tok = tiny
    results = compare_strategies(model, tok, PROMPTS, strategies=TWO, max_new_tokens=12, seed=5)
    assert [r.name for r in results] == ["greedy", "hot"]
    for result in results:
        knobs = dict(TWO[result.name])
        expected = [direct(model, tok, p, max_new_tokens=12,
                           **({**knobs, "seed": 5 + i} if knobs else {}))
                    for i, p in enumerate(PROMPTS)]
        assert result.new_ids == [new for new, _ in expected]
        texts = [tok.decode(new, skip_special_tokens=True) for new, _ in expected]
        assert result.texts == texts
        m = result.metrics
        tokens = sum(len(new) for new, _ in expected)
        assert m["mean_length"] == pytest.approx(tokens / 3)
        assert m["eos_rate"] == pytest.approx(sum(e for _, e in expected) / 3)
        total = sum(logprob_sum(model, tok, p, new) for p, (new, _) in zip(PROMPTS, expected))
        assert m["mean_logprob"] == pytest.approx(total / tokens, abs=1e-4)
        for key, value in quality_signals(texts).items():
            assert m[key] == pytest.approx(value, nan_ok=True)
        assert m["tokens_per_s"] > 0
    assert results[0].texts != results[1].texts  # the two strategies differ


def without_speed(table: str) -> list[list[str]]:
    """A Markdown table's cells, the tokens/s column (the third) left out."""
    return [line.split("|")[:3] + line.split("|")[4:] for line in table.splitlines()]


def test_same_seed_same_table_other_seed_other_samples(tiny):
    model, tok = tiny
    run = lambda seed: compare_strategies(model, tok, PROMPTS, strategies=TWO, max_new_tokens=10,
                                          seed=seed)
    a, b, c = run(1), run(1), run(2)
    assert [r.texts for r in a] == [r.texts for r in b]
    assert without_speed(markdown_table(a)) == without_speed(markdown_table(b))
    assert a[0].texts == c[0].texts and a[1].texts != c[1].texts  # only sampling moves


def test_speculative_strategy_gives_greedys_tokens(tiny):
    model, tok = tiny
    results = compare_strategies(model, tok, PROMPTS[:2], max_new_tokens=8, draft_model=model,
                                 strategies={"greedy": {}, "spec": {"speculative": True}})
    assert results[0].new_ids == results[1].new_ids


def test_report_files(tiny, tmp_path):
    model, tok = tiny
    results = compare_strategies(model, tok, PROMPTS, strategies=TWO, max_new_tokens=6)
    paths = write_report(results, tmp_path / "out", prompts=PROMPTS, title="tiny")
    assert [p.name for p in paths] == ["table.md", "table.csv", "quality_vs_speed.png",
                                       "samples.jsonl"]
    assert paths[0].read_text() == markdown_table(results)
    assert len(paths[0].read_text().splitlines()) == 2 + len(results)
    rows = list(csv.DictReader(paths[1].open()))
    assert [r["strategy"] for r in rows] == ["greedy", "hot"]
    for row, result in zip(rows, results):
        assert json.loads(row["knobs"]) == TWO[result.name]
        for key in COLUMNS:
            assert float(row[key]) == pytest.approx(result.metrics[key], nan_ok=True)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 5000
    samples = [json.loads(line) for line in paths[3].read_text().splitlines()]
    assert len(samples) == 2 * len(PROMPTS)
    assert samples[0] == {"strategy": "greedy", "prompt": PROMPTS[0],
                          "continuation": results[0].texts[0], "eos": results[0].ended[0]}


# -- the command line ---------------------------------------------------------------------------


def test_cli_writes_the_table_of_the_library(capsys, tiny, tiny_gpt_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"what is the"\n\n{"prompt": "alpha beta"}\n')
    code, out, err = run_cli(capsys, "eval", "generation", "--model", tiny_gpt_dir, "--prompts",
                             prompts, "--strategies", "greedy={}",
                             'hot={"do_sample": true, "temperature": 1.5, "top_k": 40}',
                             "--max-new-tokens", "7", "--seed", "3", "--out", tmp_path / "out")
    assert code == 0, err
    model, tok = tiny
    expected = compare_strategies(model, tok, ["what is the", "alpha beta"], strategies=TWO,
                                  max_new_tokens=7, seed=3)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table in out
    assert without_speed(table) == without_speed(markdown_table(expected))
    assert (tmp_path / "out" / "quality_vs_speed.png").is_file()


@pytest.mark.parametrize("argv, contents, names", [
    (["--strategies", 'odd={"top_z": 3}'], None, ["--strategies odd", "unknown knob 'top_z'"]),
    (["--strategies", 'odd={"temperature": 0.5}'], None, ["--strategies odd", "do_sample"]),
    (["--strategies", "odd=[1]"], None, ["--strategies odd", "JSON object"]),
    (["--strategies", 'odd={"speculative": true}'], None, ["--strategies odd", "draft model"]),
    ([], "\n  \n", ["--prompts", "no prompts"]),
    ([], '"fine"\nnot json\n', ["--prompts", "line 2", "JSON string"]),
    ([], '{"text": "x"}\n', ["--prompts", "line 1", '"prompt"']),
    (["--max-new-tokens", "0"], '"x"\n', ["--max-new-tokens"]),
    (["--max-new-tokens", "100"], '"x"\n', ["context window"]),
])
def test_bad_input_is_one_line(capsys, tiny_gpt_dir, tmp_path, argv, contents, names):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"what is the"\n' if contents is None else contents)
    code, _, err = run_cli(capsys, "eval", "generation", "--model", tiny_gpt_dir, "--prompts",
                           prompts, *argv)
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("lmlab eval: error: "), err
    for name in names:
        assert name in err, err
