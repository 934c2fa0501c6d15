"""Perplexity: sliding windows against a one-position-at-a-time brute force, the per-word and
per-byte conversions, pseudo-perplexity of a masked LM, the transformers guide's recipe, and the
CLI's bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from lmlab.data.sources import iter_documents
from lmlab.evaluation.perplexity import (Window, causal_token_nll, evaluate_perplexity,
                                         hf_recipe_perplexity, masked_lm_windows,
                                         pseudo_token_nll, sliding_windows)
from lmlab.models.bert import BertConfig, BertForMaskedLM
from lmlab.models.gpt import GPT, GPTConfig

CONTEXT = 16


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_positions=CONTEXT, n_embd=16, n_layer=2, n_head=2))
    with torch.no_grad():  # larger weights: per-token NLLs far apart, a wrong context shows
        for p in model.parameters():
            p.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 40, (53,), generator=torch.Generator().manual_seed(1)).tolist()


def context_start(t: int, *, context: int, stride: int) -> int:
    """Where token t's context begins, from the definition: the first window [0, context) scores
    tokens 1 … context-1; window k ≥ 1 starts at k·stride and scores [(k-1)·stride + context,
    k·stride + context)."""
    if t < context:
        return 0
    return ((t - context) // stride + 1) * stride


@torch.inference_mode()
def brute_force_nll(model, stream, *, context: int, stride: int) -> torch.Tensor:
    out = torch.full((len(stream),), float("nan"), dtype=torch.float64)
    for t in range(1, len(stream)):
        start = context_start(t, context=context, stride=stride)
        if start == t:  # no context in its window
            continue
        logits = model(torch.tensor([stream[start:t]]))[0, -1]
        out[t] = -torch.log_softmax(logits.double(), -1)[stream[t]]
    return out


@pytest.mark.parametrize("stride", [1, 3, 8, 11, CONTEXT])
def test_sliding_windows_equal_brute_force(gpt, stream, stride):
    nll, windows = causal_token_nll(gpt, stream, context=CONTEXT, stride=stride, batch_size=4)
    expected = brute_force_nll(gpt, stream, context=CONTEXT, stride=stride)
    assert torch.equal(nll.isnan(), expected.isnan())
    torch.testing.assert_close(nll, expected, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert windows[0] == Window(0, CONTEXT, 1) and windows[-1].end == len(stream)
    if stride < CONTEXT:  # every token but the first scored exactly once
        assert int((~nll.isnan()).sum()) == len(stream) - 1


def test_context_lengths_follow_the_stride():
    """Past the first window, each token sees at least context - stride tokens."""
    windows = sliding_windows(100, context=10, stride=4)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(1, 100))
    assert all(t - w.begin >= 10 - 4 for w in windows[1:] for t in range(w.score_from, w.end))


def test_stride_equal_to_window_is_non_overlapping_chunks(gpt, stream):
    nll, windows = causal_token_nll(gpt, stream, context=CONTEXT, stride=CONTEXT, batch_size=3)
    expected = torch.full((len(stream),), float("nan"), dtype=torch.float64)
    with torch.inference_mode():
        for begin in range(0, len(stream), CONTEXT):
            chunk = torch.tensor([stream[begin:begin + CONTEXT]])
            logp = torch.log_softmax(gpt(chunk)[0, :-1].double(), -1)
            expected[begin + 1:begin + chunk.shape[1]] = -logp.gather(1, chunk[0, 1:, None])[:, 0]
    torch.testing.assert_close(nll, expected, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert len(windows) == math.ceil(len(stream) / CONTEXT)


def test_batched_equals_unbatched(gpt, stream):
    one, _ = causal_token_nll(gpt, stream, context=CONTEXT, stride=5, batch_size=1)
    many, _ = causal_token_nll(gpt, stream, context=CONTEXT, stride=5, batch_size=7)
    torch.testing.assert_close(one, many, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_per_word_and_per_byte_are_exact(tiny_gpt_dir, tmp_path):
    from lmlab.models import from_pretrained
    from lmlab.tokenizer import Tokenizer

    model, tok = from_pretrained(tiny_gpt_dir).eval(), Tokenizer.from_pretrained(tiny_gpt_dir)
    texts = ["héllo wörld  the cat\n", "日本 sat\ton the mat."]
    (tmp_path / "a.txt").write_text(texts[0], encoding="utf-8")
    (tmp_path / "b.txt").write_text(texts[1], encoding="utf-8")
    documents = [d.text for d in iter_documents(tmp_path)]
    r = evaluate_perplexity(model, tok, documents, context=12, stride=5, batch_size=2)
    assert (r.words, r.bytes, r.documents) == (4 + 5, 23 + 22, 2)
    stream = tok.encode(texts[0]) + [tok.eos_token_id] + tok.encode(texts[1]) + [tok.eos_token_id]
    nll, _ = causal_token_nll(model, stream, context=12, stride=5)
    assert r.tokens == len(stream) and r.scored == len(stream) - 1
    # batch 2 against the default batch: fp32 matmuls of other shapes round differently
    assert r.nll == pytest.approx(float(nll[1:].sum()), rel=1e-6)
    assert r.token_perplexity == pytest.approx(math.exp(r.nll / (len(stream) - 1)), rel=1e-12)
    assert r.word_perplexity == pytest.approx(math.exp(r.nll / 9), rel=1e-12)
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / 45, rel=1e-12)
    assert r.byte_perplexity == pytest.approx(math.exp(r.nll / 45), rel=1e-12)


# -- masked LMs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=32,
                                       max_position_embeddings=12))
    return model.eval()


def test_pseudo_perplexity_equals_brute_force(bert):
    documents = [torch.randint(5, 30, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                 for n in (3, 14)]
    pieces = masked_lm_windows(documents, context=12)
    assert [len(p) for p in pieces] == [3, 10, 4]
    cls_id, sep_id, mask_id = 1, 2, 3
    expected = []
    with torch.inference_mode():
        for piece in pieces:
            x = [cls_id, *piece, sep_id]
            for i in range(1, len(x) - 1):
                masked = torch.tensor([x[:i] + [mask_id] + x[i + 1:]])
                logp = torch.log_softmax(bert(masked)[0, i].double(), -1)
                expected.append(-float(logp[x[i]]))
    for batch_size in (1, 4, 16):
        nll = pseudo_token_nll(bert, pieces, cls_id=cls_id, sep_id=sep_id, mask_id=mask_id,
                               batch_size=batch_size)
        torch.testing.assert_close(nll, torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)


# -- the transformers guide's recipe ---------------------------------------------------------
def test_hf_recipe_underweights_windows_after_the_first(gpt, stream, tmp_path):
    """The guide's loop counts num_valid_tokens - 1 for every window, but only the first loses
    a label to the shift: each later window's mean is weighted by one token too few. With
    stride = context (no overlap) it is exact."""
    from transformers import GPT2LMHeadModel

    gpt.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([stream])

    def hf_loss(input_ids, labels):
        return hf(input_ids, labels=labels).loss

    stride = 5
    nll, windows = causal_token_nll(gpt, stream, context=CONTEXT, stride=stride)
    exact = math.exp(float(nll[1:].mean()))
    ppl, nll_sum, n_tokens = hf_recipe_perplexity(hf_loss, ids, max_length=CONTEXT, stride=stride)
    assert n_tokens == len(stream) - 1 - (len(windows) - 1)
    means = [float(nll[w.score_from:w.end].mean()) for w in windows]
    weights = [w.end - w.score_from - (i > 0) for i, w in enumerate(windows)]
    documented = math.exp(sum(m * k for m, k in zip(means, weights)) / sum(weights))
    assert ppl == pytest.approx(documented, rel=1e-5)
    assert abs(ppl - exact) / exact > 1e-4

    ppl_chunks, _, n_chunks = hf_recipe_perplexity(hf_loss, ids, max_length=CONTEXT,
                                                   stride=CONTEXT)
    chunk_nll, _ = causal_token_nll(gpt, stream, context=CONTEXT, stride=CONTEXT)
    assert n_chunks == int((~chunk_nll.isnan()).sum())
    assert ppl_chunks == pytest.approx(math.exp(float(chunk_nll.nanmean())), rel=1e-5)


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_prints_settings_and_json(capsys, tiny_gpt_dir, tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text(json.dumps({"body": "the cat sat on the mat"}) + "\n"
                    + json.dumps({"body": "a dog ran"}) + "\n")
    code, out, err = run_cli(capsys, "eval", "perplexity", "--model", tiny_gpt_dir,
                                  "--data", data, "--text-field", "body", "--context", "8",
                                  "--stride", "3", "--device", "cpu")
    assert code == 0, err
    assert "context 8 · stride 3" in out and "9 words" in out and "per word" in out
    code, out, _ = run_cli(capsys, "eval", "perplexity", "--model", tiny_gpt_dir,
                                "--data", data, "--text-field", "body", "--context", "8",
                                "--stride", "3", "--json", "--device", "cpu")
    record = json.loads(out)
    assert (record["context"], record["stride"], record["words"]) == (8, 3, 9)
    assert record["word_perplexity"] == pytest.approx(math.exp(record["nll"] / 9))


@pytest.mark.parametrize("case, flags, message", [
    ("empty", [], "the corpus is empty"),
    ("text", ["--stride", "20", "--context", "10"], "--stride 20 is larger than the window"),
    ("text", ["--stride", "0"], "--stride must be positive"),
    ("text", ["--context", "65"], "larger than the model's context window (64)"),
    ("missing", [], "no such file or directory"),
    ("latin1", [], "not valid UTF-8"),
])
def test_cli_bad_inputs(capsys, tiny_gpt_dir, tmp_path, case, flags, message):
    files = {"empty": b" \n\n", "text": b"the cat sat", "latin1": "caf\xe9 ok".encode("latin-1")}
    data = tmp_path / f"{case}.txt"
    if case in files:
        data.write_bytes(files[case])
    code, out, err = run_cli(capsys, "eval", "perplexity", "--model", tiny_gpt_dir,
                                  "--data", data, "--device", "cpu", *flags)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_cli_refuses_an_encoder_without_lm_head(capsys, tiny_bert_dir, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("the cat sat")
    code, _, err = run_cli(capsys, "eval", "perplexity", "--model", tiny_bert_dir,
                                "--data", data, "--device", "cpu")
    assert code == 2 and "has no language-model head" in err


def test_cli_pseudo_perplexity_of_a_masked_lm(capsys, tmp_path):
    from lmlab.tokenizer import Tokenizer

    texts = ["the cat sat on the mat", "a dog ran to the park and sat down"]
    tok = Tokenizer.train_wordpiece(iterator=texts * 3, vocab_size=60, min_frequency=1)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=16,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=8)).eval()
    model.save_pretrained(tmp_path / "bert", tokenizer=tok)
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    code, out, err = run_cli(capsys, "eval", "perplexity", "--model", tmp_path / "bert",
                                  "--data", data, "--json", "--device", "cpu")
    assert code == 0, err
    record = json.loads(out)
    pieces = masked_lm_windows([tok.encode(t) for t in texts], context=8)
    nll = pseudo_token_nll(model, pieces, cls_id=tok.cls_token_id, sep_id=tok.sep_token_id,
                           mask_id=tok.mask_token_id)
    assert record["method"] == "pseudo-perplexity" and record["stride"] is None
    assert record["scored"] == record["tokens"] == len(nll) and record["windows"] == len(pieces)
    assert record["nll"] == pytest.approx(float(nll.sum()), rel=1e-6)
    assert record["word_perplexity"] == pytest.approx(math.exp(record["nll"] / 15), rel=1e-9)
    code, _, err = run_cli(capsys, "eval", "perplexity", "--model", tmp_path / "bert",
                                "--data", data, "--stride", "2", "--device", "cpu")
    assert code == 2 and "--stride applies to causal LMs" in err
