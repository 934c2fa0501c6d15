"""lm-evaluation-harness through the `lmlab` model type: scores identical at batch size 1 and 32
(bit for bit, per sample), loglikelihoods equal to a brute-force log-softmax sum, rolling
loglikelihood over the harness's windows, generation cut at `until`, and `lmlab eval harness`."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install "
                    "'lmlab[eval]')")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from conftest import sentiment_rows, write_splits  # noqa: E402
from lmlab.errors import ConfigError  # noqa: E402
from lmlab.evaluation.harness import LmlabLM, bucket_length, task_manager  # noqa: E402

MC_TASK = """task: tiny_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/test.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{sentence}}}}\\nQuestion: positive or negative?\\nAnswer:"
doc_to_target: "{{{{0 if label == 'neg' else 1}}}}"
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

ROLLING_TASK = """task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/docs.jsonl
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task (36 sentences of 3 to 11 words) and a rolling-loglikelihood task
    (documents from a few tokens to several times the tiny model's 64-token window)."""
    root = tmp_path_factory.mktemp("harness_tasks")
    rows = sentiment_rows(36, 7)
    docs = [{"text": " ".join(r["sentence"] for r in sentiment_rows(n, n))} for n in (1, 3, 9, 25)]
    write_splits(root, {"test": rows, "docs": docs})
    (root / "tiny_sentiment.yaml").write_text(MC_TASK.format(data=root))
    (root / "tiny_rolling.yaml").write_text(ROLLING_TASK.format(data=root))
    return root


@pytest.fixture(scope="module")
def wide_gpt_dir(tiny_gpt_dir, tmp_path_factory):
    """tiny_gpt_dir's tokenizer with a 1-layer GPT of width 128: wide enough that the CPU's
    float32 products round differently for different padded lengths (at width 32 they happen
    not to, which would let a batch-dependent implementation pass)."""
    from lmlab.models.gpt import GPT, GPTConfig
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_gpt_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=128, n_layer=1,
                          n_head=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    directory = tmp_path_factory.mktemp("wide_gpt")
    model.save_pretrained(directory, tokenizer=tok)
    return directory


def load(directory):
    from lmlab.models import from_pretrained
    from lmlab.tokenizer import Tokenizer

    return from_pretrained(directory).eval(), Tokenizer.from_pretrained(directory)


def requests(kind, *args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def brute_force(model, ids: list[int], n_scored: int) -> tuple[float, bool]:
    """Log-probability of the last `n_scored` of `ids`, one unpadded forward pass in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].double()
    logprobs = logits.log_softmax(-1)[-n_scored:]
    target = torch.tensor(ids[-n_scored:])
    return (float(logprobs.gather(-1, target[:, None]).sum()),
            bool((logprobs.argmax(-1) == target).all()))


def test_scores_identical_at_batch_size_1_and_32(wide_gpt_dir, task_dir, single_thread):
    model, tokenizer = load(wide_gpt_dir)
    runs = {}
    for batch_size in (1, 32):
        lm = (LmlabLM(model=model, tokenizer=tokenizer, batch_size=1) if batch_size == 1 else
              "lmlab")  # batch 32 through the registered name and a model_args string
        runs[batch_size] = simple_evaluate(
            model=lm, model_args=f"pretrained={wide_gpt_dir},batch_size={batch_size},device=cpu",
            tasks=["tiny_sentiment", "tiny_rolling"],
            task_manager=task_manager(include_paths=[task_dir]), log_samples=True)
    one, many = runs[1], runs[32]
    assert one["results"] == many["results"]
    assert 0.0 <= one["results"]["tiny_sentiment"]["acc,none"] <= 1.0
    assert one["results"]["tiny_rolling"]["word_perplexity,none"] > 1.0
    for task, n_docs in (("tiny_sentiment", 36), ("tiny_rolling", 4)):
        a, b = one["samples"][task], many["samples"][task]
        assert len(a) == len(b) == n_docs
        for x, y in zip(a, b):  # the raw loglikelihoods, bit for bit
            assert x["resps"] == y["resps"]


def test_padding_never_reaches_a_rows_scores(wide_gpt_dir, single_thread):
    """One row scored alone and among 31 others of other lengths (same bucket and not): the
    same floats, so it is the bucket, not the batch, that fixes a row's arithmetic."""
    model, tokenizer = load(wide_gpt_dir)
    lm = LmlabLM(model=model, tokenizer=tokenizer, batch_size=32)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, 300, (int(n),), generator=g).tolist(), [5, 6, 7][: 1 + i % 3])
             for i, n in enumerate(torch.randint(1, 60, (32,), generator=g))]
    together = lm.score(pairs)
    alone = [LmlabLM(model=model, tokenizer=tokenizer, batch_size=1).score([p])[0] for p in pairs]
    assert together == alone
    assert len({bucket_length(len(c) + len(x) - 1, 64) for c, x in pairs}) > 1


def test_loglikelihood_is_the_log_softmax_sum(tiny, single_thread):
    model, tokenizer = tiny
    lm = LmlabLM(model=model, tokenizer=tokenizer, batch_size=4)
    cases = [("the movie was", " good"), ("it is very", " bad and sad"), ("", "the plot"),
             ("alpha beta ", "gamma delta")]
    for (context, continuation), (logprob, greedy) in zip(
            cases, lm.loglikelihood(requests("loglikelihood", *cases))):
        if not context:
            ids, n = [tokenizer.eos_token_id] + tokenizer.encode(continuation), None
        else:
            # the context's trailing space belongs to the continuation
            context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
            ids = tokenizer.encode(context + continuation)
            n = len(ids) - len(tokenizer.encode(context))
        expected, expected_greedy = brute_force(model, ids, n or len(ids) - 1)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_is_greedy(tiny, single_thread):
    model, tokenizer = tiny
    lm = LmlabLM(model=model, tokenizer=tokenizer)
    context = tokenizer.encode("the movie was a")
    greedy = []
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(model(torch.tensor([context + greedy]))[0, -1].argmax()))
    other = greedy[:-1] + [(greedy[-1] + 1) % 300]
    (_, yes), (_, no) = lm.score([(context, greedy), (context, other)])
    assert yes is True and no is False


def test_rolling_loglikelihood_scores_every_token_once(tiny, single_thread):
    model, tokenizer = tiny
    lm = LmlabLM(model=model, tokenizer=tokenizer, batch_size=8)
    short = "the movie was good"
    long = " ".join(r["sentence"] for r in sentiment_rows(20, 3))
    tokens = tokenizer.encode(long)
    assert len(tokens) > 2 * 64
    got_short, got_long = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (short,),
                                                            (long,)))
    ids = [tokenizer.eos_token_id] + tokenizer.encode(short)
    assert got_short == pytest.approx(brute_force(model, ids, len(ids) - 1)[0], abs=1e-4)
    # Windows of 64: the first conditions token 0 on EOS; each later one predicts the next 64
    # tokens from the 64 before each; the last keeps a full context and scores what is left.
    expected, start = brute_force(model, ([tokenizer.eos_token_id] + tokens)[:65], 64)[0], 64
    while start < len(tokens):
        end = min(start + 64, len(tokens))
        expected += brute_force(model, tokens[end - 65:end], end - start)[0]
        start = end
    assert got_long == pytest.approx(expected, abs=1e-3)


def test_generate_until_stops_at_the_stop_string(tiny, single_thread):
    model, tokenizer = tiny
    lm = LmlabLM(model=model, tokenizer=tokenizer)
    (free,) = lm.generate_until(requests("generate_until", ("the movie", {"max_gen_toks": 24})))
    assert len(free) > 6
    stop = free[3:6]
    (cut,) = lm.generate_until(requests("generate_until",
                                        ("the movie", {"until": [stop], "max_gen_toks": 24})))
    assert cut == free.split(stop)[0] and stop not in cut
    with pytest.raises(ConfigError, match="top_kk"):
        lm.generate_until(requests("generate_until", ("the movie", {"top_kk": 3})))


def test_construction_errors(tiny, tiny_gpt_dir, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match="either pretrained"):
        LmlabLM()
    with pytest.raises(ConfigError, match="tokenizer"):
        LmlabLM(model=model)
    with pytest.raises(ConfigError, match="not a model directory"):
        LmlabLM(pretrained=str(tmp_path))
    with pytest.raises(ConfigError, match="automatic batch size"):
        LmlabLM(pretrained=str(tiny_gpt_dir), batch_size="auto")


def test_cli_runs_the_shipped_tasks(tiny_gpt_dir, tmp_path, capsys, single_thread):
    """sst2_lmlab, ag_news_lmlab and wikitext2_lmlab on a small copy of the shared datasets."""
    from lmlab.cli import main

    data = tmp_path / "data"
    sst2 = [{"idx": i, "sentence": r["sentence"], "label": int(r["label"] == "pos")}
            for i, r in enumerate(sentiment_rows(8, 1))]
    write_splits((data / "sst2").mkdir(parents=True) or data / "sst2",
                 {"train": sst2, "validation": sst2, "test": sst2})
    news = [{"idx": i, "label": i % 4, "title": f"title {i}", "description": "the plot"}
            for i in range(8)]
    write_splits((data / "ag_news").mkdir() or data / "ag_news",
                 {"train": news, "validation": news, "test": news})
    (data / "wikitext2").mkdir()
    (data / "wikitext2" / "wiki.test.tokens").write_text(
        " \n = One = \n \n the movie was good . \n \n = Two = \n \n = = Part = = \n it is bad . \n")
    out = tmp_path / "results.json"
    assert main(["eval", "harness", "--model", str(tiny_gpt_dir), "--tasks",
                 "sst2_lmlab,ag_news_lmlab,wikitext2_lmlab", "--data-root", str(data),
                 "--limit", "4", "--batch-size", "3", "--device", "cpu",
                 "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "sst2_lmlab" in table and "word_perplexity" in table
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"sst2_lmlab", "ag_news_lmlab", "wikitext2_lmlab"}
    assert results["wikitext2_lmlab"]["word_perplexity,none"] > 1.0
    assert json.loads(out.read_text())["n-samples"]["wikitext2_lmlab"]["effective"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "no_such_task"], "unknown task(s) no_such_task"),
    (["--tasks", "sst2_lmlab", "--include-path", "missing_dir"], "--include-path missing_dir"),
])
def test_cli_bad_input_is_one_line(tiny_gpt_dir, tmp_path, monkeypatch, capsys, extra, message):
    from lmlab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["eval", "harness", "--model", str(tiny_gpt_dir), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmlab eval: error:") and message in err[-1]
