"""Classification fine-tuning: reading JSONL/CSV, label sets, batching, and tiny BERT and GPT runs
that learn a synthetic sentiment task through the one training loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab import DataError, from_pretrained
from lmlab.tasks import classification as clf
from lmlab.tasks.batching import EpochPlan
from lmlab.config import from_dict
from lmlab.recipes.classification import FinetuneClassificationConfig, finetune_classification


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# -- reading -------------------------------------------------------------------------------------
def test_jsonl_csv_and_tsv_read_alike(tmp_path):
    rows = [("a fine film", "x", "pos"), ("so bad", "y, z", "neg")]
    jsonl = write(tmp_path / "d.jsonl", "".join(
        json.dumps({"t": t, "p": p, "y": y}) + "\n" for t, p, y in rows) + "\n")  # blank line
    csv = write(tmp_path / "d.csv", "t,p,y\n" + "".join(f'{t},"{p}",{y}\n' for t, p, y in rows))
    tsv = write(tmp_path / "d.tsv", "t\tp\ty\n" + "".join(f"{t}\t{p}\t{y}\n" for t, p, y in rows))
    for path in (jsonl, csv, tsv):
        got = clf.read_examples(path, text_field="t", text_pair_field="p", label_field="y")
        assert [(e.text, e.pair, e.label) for e in got] == rows, path


def test_labels_inferred_sorted_numerically_when_ids(tmp_path):
    path = write(tmp_path / "d.jsonl", "".join(
        json.dumps({"text": "x", "label": y}) + "\n" for y in (10, 2, 9, 2, 1.0)))
    examples = clf.read_examples(path, text_field="text", text_pair_field=None, label_field="label")
    labels = clf.infer_labels(examples)
    assert labels == ["1", "2", "9", "10"]
    assert clf.label_ids(examples, labels).tolist() == [3, 1, 2, 1, 0]
    names = [clf.Example("x", None, n, "f") for n in ("b", "a", "c", "a")]
    assert clf.infer_labels(names) == ["a", "b", "c"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n', "line 1: missing field 'label'"),
    ('{"label": 1}\n', "line 1: missing field 'text'"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label"\n', "line 2: not valid JSON"),
    ('{"text": "a", "label": [1]}\n', "line 1: field 'label' must be a label name or an integer id"),
    ('{"text": 3, "label": 1}\n', "line 1: field 'text' must be a string"),
    ("", "no examples"),
])
def test_bad_records_name_file_and_line(tmp_path, content, message):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=message) as err:
        clf.read_examples(path, text_field="text", text_pair_field=None, label_field="label")
    assert str(path) in str(err.value)


def test_unknown_label_in_validation_names_file_and_line(tmp_path):
    path = write(tmp_path / "val.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n')
    examples = clf.read_examples(path, text_field="text", text_pair_field=None, label_field="label")
    with pytest.raises(DataError, match=r"val.jsonl line 2: label 'meh' is not one of the 2 labels"):
        clf.label_ids(examples, ["neg", "pos"])


def test_csv_line_numbers_count_physical_lines(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"two\nlines",1\nthree,\n')
    with pytest.raises(DataError, match=r"d.csv line 4: missing field 'label'"):
        clf.read_examples(path, text_field="text", text_pair_field=None, label_field="label")


# -- batching ------------------------------------------------------------------------------------
def test_epoch_plan_is_a_pure_function_of_seed_and_step():
    lengths = np.random.default_rng(0).integers(1, 50, size=103)
    a = EpochPlan(lengths, batch_size=8, seed=3)
    b = EpochPlan(lengths, batch_size=8, seed=3)
    assert a.steps_per_epoch == 13
    steps = [30, 2, 14, 2, 30]  # out of order, across epochs: the cache must not matter
    for step in steps:
        assert np.array_equal(a.batch(step), b.batch(step))
    epoch0 = np.concatenate([a.batch(s) for s in range(13)])
    assert sorted(epoch0.tolist()) == list(range(103))  # every example once per epoch
    epoch1 = np.concatenate([a.batch(s) for s in range(13, 26)])
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(EpochPlan(lengths, batch_size=8, seed=4).batch(0), a.batch(0))


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(1).integers(1, 100, size=4000)

    def padded(plan):
        return sum(len(b) * lengths[b].max() for b in (plan.batch(s) for s in range(plan.steps_per_epoch)))

    grouped = padded(EpochPlan(lengths, batch_size=32, seed=0))
    shuffled = padded(EpochPlan(lengths, batch_size=32, seed=0, group_by_length=False))
    assert grouped < 0.65 * shuffled, (grouped, shuffled, lengths.sum())


def test_ranks_split_a_global_batch_exactly():
    lengths = np.arange(50) % 7
    plans = [EpochPlan(lengths, batch_size=4, grad_accum=2, seed=0, rank=r, world_size=3)
             for r in range(3)]
    assert plans[0].steps_per_epoch == 3  # 24 examples per step
    for step in range(3):
        parts = [plan.micro_batches(step) for plan in plans]
        flat = sorted(int(i) for part in parts for micro in part for i in micro)
        assert flat == sorted(plans[0].batch(step).tolist())
        assert all(len(m) <= 4 for part in parts for m in part)


def test_padding_does_not_change_logits(tiny_bert_dir, sentiment_files):
    """Dynamic padding: an example's logits are the same alone and in a padded batch."""
    from lmlab.models.bert import BertForSequenceClassification
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_bert_dir)
    model = BertForSequenceClassification.from_encoder(tiny_bert_dir, id2label=["neg", "pos"]).eval()
    examples = clf.read_examples(sentiment_files / "validation.jsonl", text_field="sentence",
                                 text_pair_field=None, label_field="label")[:6]
    data = clf.encode(tok, examples, ["neg", "pos"], max_length=64)
    together = clf.predict_probabilities(model, data, batch_size=6, pad_id=0, token_types=True,
                                         device=torch.device("cpu"))
    alone = clf.predict_probabilities(model, data, batch_size=1, pad_id=0, token_types=True,
                                      device=torch.device("cpu"))
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


# -- learning ------------------------------------------------------------------------------------
def run_config(model_dir, files, **overrides) -> FinetuneClassificationConfig:
    values = dict(model=str(model_dir), train=str(files / "train.jsonl"),
                  validation=str(files / "validation.jsonl"), text_field="sentence",
                  max_length=32, batch_size=16, epochs=4, lr=2e-3, warmup_ratio=0.1, seed=0,
                  log_every=5)
    values.update(overrides)
    return from_dict(FinetuneClassificationConfig, values)


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_tiny_model_learns_sentiment(family, tiny_bert_dir, tiny_gpt_dir, sentiment_files,
                                     tmp_path, single_thread):
    model_dir = tiny_bert_dir if family == "bert" else tiny_gpt_dir
    cfg = run_config(model_dir, sentiment_files, epochs=6)
    out = finetune_classification(cfg, run_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    assert len(accuracies) >= 2  # one evaluation per epoch
    assert accuracies[0] < 0.9 or family == "bert"  # chance is 0.5; the first epoch may be enough
    assert out.validation["val_accuracy"] >= 0.95, accuracies
    assert out.validation["val_accuracy"] == max(accuracies)  # the best epoch is what is kept
    # the saved model is the best one, in the transformers layout, with its label names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    reloaded = from_pretrained(tmp_path)
    assert reloaded.config.id2label == ["neg", "pos"]
    rows = [json.loads(line) for line in (tmp_path / "predictions_validation.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and set(rows[0]) == {"text", "gold", "predicted", "probability"}
    assert np.mean([r["gold"] == r["predicted"] for r in rows]) == pytest.approx(
        out.validation["val_accuracy"])
    assert (tmp_path / "confusion_validation.png").stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best_step"] == out.train.best_step


def test_transformers_loads_the_fine_tuned_bert(tiny_bert_dir, sentiment_files, tmp_path,
                                                single_thread):
    transformers = pytest.importorskip("transformers")
    cfg = run_config(tiny_bert_dir, sentiment_files, epochs=1)
    finetune_classification(cfg, run_dir=tmp_path, progress=False)
    ours = from_pretrained(tmp_path)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert hf.config.id2label == {0: "neg", 1: "pos"}
