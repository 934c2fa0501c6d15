"""`lmlab finetune translation`: pairs → tagged encoder inputs and labels, the label-smoothed
loss, a tiny T5 from scratch whose loss falls and validation BLEU rises, early stopping on BLEU,
an exact resume, multilingual models in both tag styles, and the bad-input rules."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import (TINY_TRANSLATION, TRANSLATION_WORDS, run_cli, translation_rows,
                      write_splits)
from lmlab import kernels
from lmlab.errors import ConfigError
from lmlab.kernels.dropout import NativeDropout
from lmlab.models import from_pretrained
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration
from lmlab.recipes import RECIPES, load_recipe_config
from lmlab.recipes.translation import (Languages, encode_split, load_translator, read_split,
                                       translate_lines)
from lmlab.tasks import translation as tr
from lmlab.tokenizer import Tokenizer


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lmlab ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [row[lang] for row in translation_rows(200, 0) for lang in ("en", "de", "fr")]
    return Tokenizer.train_unigram(iterator=texts, vocab_size=150,
                                   extra_special_tokens=["<2de>", "<2fr>"], extra_ids=0)


def config(files, **overrides):
    values = {"train": str(files / "train.jsonl"), "validation": str(files / "validation.jsonl"),
              "source_lang": "en", "target_lang": "de", **overrides}
    return load_recipe_config(RECIPES["translation"], None, values)


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_bleu" in r], [r["train_loss"] for r in rows
                                                  if "train_loss" in r]


# -- data: encoding, tags, truncation ------------------------------------------------------------
def test_the_tag_goes_first_in_the_source_or_first_in_the_labels(tokenizer):
    eos, tag = tokenizer.eos_token_id, tokenizer.token_to_id("<2de>")
    plain = tokenizer.encode("ka lo mi")
    google = tr.encode(tokenizer, ["ka lo mi"], ["hund katze baum"], max_source_length=32,
                       max_target_length=32, lang="de", tag_style="source_token")
    assert google.sources[0].tolist() == [tag, *plain, eos]
    assert google.labels[0].tolist() == [*tokenizer.encode("hund katze baum"), eos]
    assert not google.forced_bos
    mbart = tr.encode(tokenizer, ["ka lo mi"], ["hund katze baum"], max_source_length=32,
                      max_target_length=32, lang="de", tag_style="forced_bos")
    assert mbart.sources[0].tolist() == [*plain, eos]
    assert mbart.labels[0].tolist() == [tag, *tokenizer.encode("hund katze baum"), eos]
    assert mbart.forced_bos
    bilingual = tr.encode(tokenizer, ["ka lo mi"], ["hund"], max_source_length=32,
                          max_target_length=32, lang="de")  # no tag style: no tag
    assert bilingual.sources[0].tolist() == [*plain, eos] and bilingual.langs == ["de"]
    with pytest.raises(ConfigError, match="no tag token <2cs>"):
        tr.encode(tokenizer, ["ka"], ["x"], max_source_length=8, max_target_length=8, lang="cs",
                  tag_style="source_token")


def test_too_long_texts_are_cut_keeping_eos_and_counted(tokenizer, caplog):
    long = " ".join(["ka lo mi tu"] * 10)
    with caplog.at_level(logging.WARNING):
        out = tr.encode(tokenizer, [long, "ka"], [long, "ka"], max_source_length=6,
                        max_target_length=5, lang="de", tag_style="source_token",
                        where="train.jsonl")
    assert [len(s) for s in out.sources] == [6, 3] and [len(t) for t in out.labels] == [5, 2]
    assert out.sources[0][-1] == out.labels[0][-1] == tokenizer.eos_token_id
    assert out.truncated_sources == out.truncated_targets == 1
    assert "train.jsonl: truncated 1 of 2 sources longer than 6 tokens" in caplog.text


def test_multilingual_makes_one_example_per_pair_and_target_language(tokenizer, tmp_path):
    files = write_splits(tmp_path, {"train": translation_rows(5, 0),
                                    "validation": translation_rows(2, 1)})
    cfg = config(files, target_lang=None, target_langs="de,fr", tag_style="forced_bos")
    data = encode_split(cfg, read_split(cfg, files / "train.jsonl"), tokenizer)
    assert len(data) == 10 and data.langs == ["de"] * 5 + ["fr"] * 5
    tags = {tokenizer.token_to_id("<2de>"), tokenizer.token_to_id("<2fr>")}
    assert [int(labels[0]) for labels in data.labels] == \
        [tokenizer.token_to_id("<2de>")] * 5 + [tokenizer.token_to_id("<2fr>")] * 5
    assert not tags & {int(i) for s in data.sources for i in s}
    assert data.references[5] == translation_rows(5, 0)[0]["fr"]


def test_empty_sides_are_skipped_and_reported(tokenizer, tmp_path, caplog):
    rows = translation_rows(6, 0)
    rows[2]["de"], rows[4]["en"] = "", "   "
    files = write_splits(tmp_path, {"train": rows})
    with caplog.at_level(logging.WARNING):
        data = encode_split(config(files), read_split(config(files), files / "train.jsonl"),
                            tokenizer)
    assert len(data) == 4
    assert "skipped 2 pairs with an empty source or target (lines 3, 5)" in caplog.text


# -- the loss --------------------------------------------------------------------------------------
def test_the_loss_is_label_smoothed_cross_entropy_summed_over_real_tokens(tokenizer):
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        dropout_rate=0.0, n_positions=32)).eval()
    data = tr.encode(tokenizer, ["ka lo mi tu be", "ka"], ["hund katze baum haus", "hund"],
                     max_source_length=32, max_target_length=32)
    batch = tr.collate(data, [0, 1], pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    labels = batch["labels"]
    assert (labels == -100).sum() == len(data.labels[0]) - len(data.labels[1])
    # each row alone, unpadded: the summed loss must not see the padding
    log_probs = []
    for row in range(2):
        ids, target = (torch.from_numpy(data.sources[row])[None],
                       torch.from_numpy(data.labels[row])[None])
        logits = model(model.shift_right(target), encoder_hidden=model.encode(ids))
        log_probs.append(torch.log_softmax(logits[0].float(), -1))
    targets = [torch.tensor(t) for t in data.labels]
    nll = sum(-lp.gather(1, t[:, None]).sum() for lp, t in zip(log_probs, targets))
    uniform = sum(-lp.mean(-1).sum() for lp in log_probs)
    with torch.no_grad():
        torch.testing.assert_close(tr.summed_loss(model, batch), nll, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(tr.summed_loss(model, batch, label_smoothing=0.1),
                                   0.9 * nll + 0.1 * uniform, rtol=1e-5, atol=1e-4)
    assert tr.TranslationTask(train=None, val=None, plan=None, translate=None,
                              device=torch.device("cpu"), pad_id=0).num_targets(batch) == \
        sum(len(t) for t in data.labels)


# -- the config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"target_lang": "de", "target_langs": "de,fr"}, "target_lang and target_langs exclude"),
    ({"target_langs": "de,de"}, "target_langs must be distinct"),
    ({"target_langs": "d e"}, "is not a language code"),
    ({"model": "x", "d_model": "64"}, "model and the scratch keys exclude each other"),
    ({"label_smoothing": "1.5"}, r"label_smoothing must be in \[0, 1\)"),
    ({"tag_style": "prefix"}, "expected one of"),
])
def test_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe_config(RECIPES["translation"], None, values)


def test_languages_choose_the_direction():
    one = Languages(source="en", targets=["de"], tag_style=None, max_source_length=8,
                    max_target_length=8)
    assert one.direction(None) is None and one.direction("de") is None
    with pytest.raises(ConfigError, match=r"--to fr: not a target language of this model "
                                          r"\(its languages: de\)"):
        one.direction("fr")
    many = Languages(source="en", targets=["de", "fr", "cs"], tag_style="forced_bos",
                     max_source_length=8, max_target_length=8)
    assert many.direction("fr") == "fr" and many.tags["cs"] == "<2cs>"
    with pytest.raises(ConfigError, match=r"several languages \(de, fr, cs\); name one"):
        many.direction(None)


# -- training --------------------------------------------------------------------------------------
def test_a_tiny_model_from_scratch_learns_and_its_run_reads_back(tiny_translation_run):
    run = tiny_translation_run
    evaluations, losses = metrics(run)
    assert len(evaluations) == 6
    assert losses[-1] < 0.6 * losses[0]
    assert evaluations[-1]["val_loss"] < evaluations[0]["val_loss"]
    bleu, chrf = [e["val_bleu"] for e in evaluations], [e["val_chrf"] for e in evaluations]
    assert bleu[0] < 1 and max(bleu) > bleu[0] + 2 and max(chrf) > chrf[0] + 15, (bleu, chrf)
    results = json.loads((run / "results.json").read_text())
    assert results["validation"]["val_bleu"] == pytest.approx(max(bleu))
    scores = results["validation_scores"]
    assert scores["bleu"] == pytest.approx(max(bleu))
    assert scores["signatures"]["bleu"].startswith(f"BLEU = {scores['bleu']:.2f} (nrefs:1|")
    assert "tok:moses-de" in scores["signatures"]["tokenized_bleu"]
    rows = [json.loads(x) for x in (run / "translations_validation.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [r["en"] for r in translation_rows(40, 1)]
    assert json.loads((run / "translation.json").read_text())["targets"] == ["de"]
    assert isinstance(from_pretrained(run), T5ForConditionalGeneration)
    # the saved model translates as the run's report did
    model, tokenizer, languages = load_translator(run)
    again = list(translate_lines(model, tokenizer, languages, [r["source"] for r in rows],
                                 num_beams=2))
    assert sum(a == r["hypothesis"] for a, r in zip(again, rows)) >= 0.9 * len(rows)


def test_early_stopping_on_bleu_stops_the_run(translation_files, tmp_path, capsys):
    # at lr 1e-7 nothing is learnt: BLEU never beats the first epoch's, patience 1 stops at 2
    code, out, err = run_cli(capsys, "finetune", "translation", "--train",
                             translation_files / "train.jsonl", "--validation",
                             translation_files / "validation.jsonl", "--source_lang", "en",
                             "--target_lang", "de", "--epochs", "5", "--patience", "1",
                             "--out", tmp_path / "run", "--no-progress", *TINY_TRANSLATION,
                             "--lr", "1e-7", "--bleu_examples", "8")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stopped_early"] and results["steps"] == 2 * 19  # 300 pairs / 16 = 19 a epoch
    assert len(metrics(tmp_path / "run")[0]) == 2


def test_resume_continues_exactly(translation_files, tokenizer, tmp_path, monkeypatch):
    from lmlab.cli import main

    # one vocabulary for both runs: `tokenizers`' Unigram training is not deterministic
    tokenizer.save_pretrained(tmp_path / "vocabulary")
    args = ["finetune", "translation", "--train", str(translation_files / "train.jsonl"),
            "--validation", str(translation_files / "validation.jsonl"), "--source_lang", "en",
            "--target_lang", "de", "--epochs", "2", "--no-progress", *TINY_TRANSLATION,
            "--tokenizer", str(tmp_path / "vocabulary"), "--dropout_rate", "0.1",
            "--bleu_examples", "8", "--log_every", "1"]
    # Where the speed layer builds, the run's dropout masks are drawn in C (the loop swaps
    # kernels.NativeDropout in): the resume below is exact with them.
    training_calls, native_forward = [], NativeDropout.forward

    def counted(self, x):
        training_calls.append(self.training)
        return native_forward(self, x)

    monkeypatch.setattr(NativeDropout, "forward", counted)
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0
    assert any(training_calls) == kernels.available()
    evaluate, calls = tr.TranslationTask.evaluate, []

    def crash_in_the_second_evaluation(self, model, **kwargs):  # after epoch 1's checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return evaluate(self, model, **kwargs)

    monkeypatch.setattr(tr.TranslationTask, "evaluate", crash_in_the_second_evaluation)
    with pytest.raises(RuntimeError, match="power cut"):
        main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(tr.TranslationTask, "evaluate", evaluate)
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == \
        (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert metrics(tmp_path / "cut")[1][-19:] == metrics(tmp_path / "reference")[1][-19:]


@pytest.mark.parametrize("style", ["source_token", "forced_bos"])
def test_a_multilingual_model_translates_into_the_language_asked(translation_files, tmp_path,
                                                                 capsys, style):
    code, out, err = run_cli(capsys, "finetune", "translation", "--train",
                             translation_files / "train.jsonl", "--validation",
                             translation_files / "validation.jsonl", "--source_lang", "en",
                             "--target_langs", "de,fr", "--tag_style", style, "--epochs", "6",
                             "--out", tmp_path / "run", "--no-progress", *TINY_TRANSLATION,
                             "--bleu_examples", "16")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "translation.json").read_text())
    assert saved["tag_style"] == style and saved["tags"] == {"de": "<2de>", "fr": "<2fr>"}
    evaluations, _ = metrics(tmp_path / "run")
    assert {"val_bleu_de", "val_bleu_fr"} <= set(evaluations[-1])
    model, tokenizer, languages = load_translator(tmp_path / "run")
    sources = [row["en"] for row in translation_rows(10, 7)]
    for to, other in (("de", "fr"), ("fr", "de")):
        words = " ".join(translate_lines(model, tokenizer, languages, sources, to=to,
                                         num_beams=2)).split()
        asked = sum(w in TRANSLATION_WORDS[to] for w in words)
        wrong = sum(w in TRANSLATION_WORDS[other] for w in words)
        assert asked > 0.5 * len(words) and wrong < 0.1 * len(words), (to, words)


# -- bad input: one line, exit 2, before anything is written --------------------------------------
def _finetune(capsys, files, out, *extra):
    return run_cli(capsys, "finetune", "translation", "--train", files / "train.jsonl",
                   "--validation", files / "validation.jsonl", "--out", out, "--no-progress",
                   *TINY_TRANSLATION, *extra)


def test_a_pair_without_its_field_names_the_line(tmp_path, capsys):
    rows = translation_rows(5, 0)
    del rows[3]["de"]
    files = write_splits(tmp_path, {"train": rows, "validation": translation_rows(2, 1)})
    code, _, err = _finetune(capsys, files, tmp_path / "run", "--source_lang", "en",
                             "--target_lang", "de")
    assert code == 2
    assert one_line(err).endswith("train.jsonl line 4: missing field 'de' (fields: id, en, fr)")
    assert not (tmp_path / "run").exists()


def test_an_unknown_language_code_lists_the_fields(translation_files, tmp_path, capsys):
    code, _, err = _finetune(capsys, translation_files, tmp_path / "run", "--source_lang", "en",
                             "--target_langs", "de,it")
    assert code == 2
    assert "unknown language code 'it': the file has no field 'it' (fields: id, en, de, fr)" \
        in one_line(err)
    assert not (tmp_path / "run").exists()


def test_no_languages_and_no_model_are_errors(translation_files, tmp_path, capsys):
    code, _, err = _finetune(capsys, translation_files, tmp_path / "run")
    assert code == 2 and "no languages: set source_lang and target_lang" in one_line(err)
    code, _, err = run_cli(capsys, "finetune", "translation", "--train",
                           translation_files / "train.jsonl", "--validation",
                           translation_files / "validation.jsonl", "--source_lang", "en",
                           "--target_lang", "de", "--out", tmp_path / "run")
    assert code == 2 and "model: no model; pass --model DIR" in one_line(err)


def test_a_model_that_is_not_an_encoder_decoder_is_refused(tiny_gpt_dir, translation_files,
                                                           tmp_path, capsys):
    code, _, err = run_cli(capsys, "finetune", "translation", "--model", tiny_gpt_dir,
                           "--train", translation_files / "train.jsonl", "--validation",
                           translation_files / "validation.jsonl", "--source_lang", "en",
                           "--target_lang", "de", "--out", tmp_path / "run")
    assert code == 2 and "translation needs an encoder–decoder (T5)" in one_line(err)
    assert not (tmp_path / "run").exists()


def test_a_trained_t5_is_fine_tuned_further(tiny_translation_run, translation_files, tmp_path,
                                           capsys):
    base = json.loads((tiny_translation_run / "results.json").read_text())["validation"]
    code, _, err = run_cli(capsys, "finetune", "translation", "--model", tiny_translation_run,
                           "--train", translation_files / "train.jsonl", "--validation",
                           translation_files / "validation.jsonl", "--source_lang", "en",
                           "--target_lang", "de", "--epochs", "1", "--lr", "1e-3",
                           "--batch_size", "16", "--num_beams", "2", "--max_length", "32",
                           "--out", tmp_path / "more", "--no-progress")
    assert code == 0, err
    first = metrics(tmp_path / "more")[0][0]
    # it starts from the trained weights (a fresh model's first epoch ends near 2)
    assert first["val_loss"] < base["val_loss"] + 0.3
    # its vocabulary has no language tags: a multilingual fine-tune is refused, by name
    code, _, err = run_cli(capsys, "finetune", "translation", "--model", tiny_translation_run,
                           "--train", translation_files / "train.jsonl", "--validation",
                           translation_files / "validation.jsonl", "--source_lang", "en",
                           "--target_langs", "de,fr", "--max_length", "32",
                           "--out", tmp_path / "multi")
    assert code == 2 and "the tokenizer has no tag token <2de>" in one_line(err)
    code, _, err = run_cli(capsys, "finetune", "translation", "--model", tiny_translation_run,
                           "--train", translation_files / "train.jsonl", "--validation",
                           translation_files / "validation.jsonl", "--source_lang", "en",
                           "--target_lang", "de", "--max_length", "64",
                           "--out", tmp_path / "long")
    assert code == 2 and "max_source_length 64 exceeds the model's n_positions (32)" in \
        one_line(err)
