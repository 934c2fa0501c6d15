"""LoRA in the classification recipe: a BERT's fused query/key/value gets per-part adapters, the
head trains in full, RUN_DIR holds a PEFT adapter that peft loads on transformers'
BertForSequenceClassification with the same logits, and the run still learns the task."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.models.bert import BertForSequenceClassification
from lmlab.models.hf.peft import load_adapter
from test_cli_errors import one_line, run_cli
from test_cli_finetune import common_args

pytest.importorskip("peft", reason="peft is the oracle of the adapter format")


@pytest.fixture(scope="module")
def lora_run(tiny_bert_dir, sentiment_files, tmp_path_factory):
    from contextlib import redirect_stdout
    from io import StringIO

    from lmlab.cli import main

    out = tmp_path_factory.mktemp("clf_lora")
    with redirect_stdout(StringIO()):
        code = main([str(a) for a in ["finetune", "classification",
                                      *common_args(tiny_bert_dir, sentiment_files, out),
                                      "--epochs", "8", "--lr", "1e-2", "--lora.r", "8",
                                      "--lora.target_modules", "query,key,value,dense"]])
    assert code == 0
    return out


def test_the_adapter_learns_and_peft_reads_it(lora_run, tiny_bert_dir):
    from peft import PeftModel
    from transformers import BertForSequenceClassification as HFClassifier

    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert not (lora_run / "model.safetensors").exists()
    results = json.loads((lora_run / "results.json").read_text())
    assert results["validation"]["val_accuracy"] >= 0.75  # chance is 0.5

    ours = load_adapter(BertForSequenceClassification.from_encoder(
        tiny_bert_dir, id2label=["neg", "pos"]), lora_run).eval()
    hf = HFClassifier.from_pretrained(tiny_bert_dir, num_labels=2)
    peft = PeftModel.from_pretrained(hf, lora_run).eval()
    ids = torch.tensor([[2, 40, 41, 57, 3, 0], [2, 77, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask),
                                   peft(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


def test_evaluate_on_a_classifier_adapter_says_why_not(lora_run, sentiment_files, capsys):
    code, _, err = run_cli(capsys, "evaluate", lora_run, "--data",
                           sentiment_files / "validation.jsonl")
    assert code == 2 and "a classifier's head needs its label set" not in err
    assert "LoRA run of recipe 'classification'" in one_line(err)
