"""Extractive QA: windows and span labels on hand-made examples (answers at the very start, the
very end, and across a window boundary), n-best decoding back to context characters, and a tiny
BERT whose span loss falls through the one training loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab import DataError
from lmlab.tasks import qa
from lmlab.tasks.batching import EpochPlan
from lmlab.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
CONTEXT = " ".join(WORDS)  # 16 words, one token each in the tiny vocabulary


@pytest.fixture(scope="module")
def tok(tiny_bert_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_bert_dir)


def example(answer: str, qid: str = "q", question: str = "what is first") -> qa.QAExample:
    return qa.QAExample(id=qid, question=question, context=CONTEXT, answers=[answer],
                        answer_starts=[CONTEXT.index(answer)])


def window_text(windows: qa.Windows, w: int, tok: Tokenizer) -> str:
    return tok.decode(windows.ids[w][windows.starts[w]:windows.ends[w] + 1].tolist())


def test_every_word_is_one_token(tok):
    assert len(tok.encode(CONTEXT)) == len(WORDS)
    assert len(tok.encode("what is first")) == 3


def test_single_window_answers_at_start_and_end(tok):
    examples = [example("alpha"), example("omicron pi")]
    windows = qa.make_windows(tok, examples, max_length=32, stride=4)
    assert len(windows) == 2 and windows.example.tolist() == [0, 1]
    # [CLS] what is first [SEP] → the context starts at token 5
    assert (windows.starts[0], windows.ends[0]) == (5, 5)
    assert (windows.starts[1], windows.ends[1]) == (5 + 14, 5 + 15)
    assert window_text(windows, 1, tok) == "omicron pi"
    # tokens outside the context have no offsets
    assert (windows.offsets[0][:5] == -1).all() and (windows.offsets[0][-1] == -1).all()
    assert tuple(windows.offsets[0][5]) == (0, len("alpha"))


def test_long_context_windows_overlap_by_stride(tok):
    # 12 tokens per window: 5 for [CLS] q q q [SEP], 1 for the last [SEP] → 6 context tokens
    windows = qa.make_windows(tok, [example("alpha")], max_length=12, stride=2)
    firsts = [int(np.flatnonzero(o[:, 0] >= 0)[0]) for o in windows.offsets]
    spans = [CONTEXT[o[f, 0]:o[o[:, 0] >= 0][-1, 1]] for o, f in zip(windows.offsets, firsts)]
    assert spans[0] == "alpha beta gamma delta epsilon zeta"
    assert spans[1] == "epsilon zeta eta theta iota kappa"  # 2 tokens shared with window 0
    assert spans[-1].endswith("omicron pi")
    assert all(len(ids) <= 12 for ids in windows.ids)
    assert all(ids[:4].tolist() == windows.ids[0][:4].tolist() for ids in windows.ids)  # question kept


def test_answer_across_a_window_boundary_is_labelled_where_it_fits(tok):
    # "zeta eta" straddles windows 0 (…epsilon zeta) and 1 (epsilon zeta eta …)
    windows = qa.make_windows(tok, [example("zeta eta")], max_length=12, stride=2)
    labels = list(zip(windows.starts.tolist(), windows.ends.tolist()))
    assert labels[0] == (0, 0)  # only half of the answer is in window 0: [CLS]
    assert window_text(windows, 1, tok) == "zeta eta"
    assert all(label == (0, 0) for label in labels[2:])


def oracle_logits(windows: qa.Windows, scale: float = 10.0):
    """Logits that peak at each window's labelled span (and at [CLS] when it has none)."""
    starts, ends = [], []
    for w in range(len(windows)):
        s, e = np.zeros(len(windows.ids[w])), np.zeros(len(windows.ids[w]))
        s[windows.starts[w]] += scale
        e[windows.ends[w]] += scale
        starts.append(s)
        ends.append(e)
    return starts, ends


@pytest.mark.parametrize("answer", ["alpha", "omicron pi", "zeta eta", "eta theta iota"])
def test_decoding_recovers_the_answer_characters(tok, answer):
    examples = [example(answer)]
    windows = qa.make_windows(tok, examples, max_length=12, stride=2)
    starts, ends = oracle_logits(windows)
    (text, score), = qa.best_spans(examples, windows, starts, ends, n_best=5)
    assert text == answer and score == 20.0


def test_decoding_respects_max_answer_length_and_never_picks_the_question(tok):
    examples = [example("alpha")]
    windows = qa.make_windows(tok, examples, max_length=32, stride=4)
    n = len(windows.ids[0])
    start, end = np.zeros(n), np.zeros(n)
    start[1], end[2] = 50.0, 50.0  # the question's tokens: not answers
    start[5], end[5 + 9] = 10.0, 10.0  # a 10-token span
    end[5 + 1] = 5.0
    (text, _), = qa.best_spans(examples, windows, [start], [end], max_answer_length=10)
    assert text == " ".join(WORDS[:10])
    (text, _), = qa.best_spans(examples, windows, [start], [end], max_answer_length=9)
    assert text == "alpha beta"


def test_decoding_picks_the_best_window_of_each_question(tok):
    examples = [example("alpha", "a"), example("omicron pi", "b")]
    windows = qa.make_windows(tok, examples, max_length=12, stride=2)
    starts, ends = oracle_logits(windows)
    # make a wrong span in another window of question "b" score lower than the right one
    for w in np.flatnonzero(windows.example == 1)[:-1]:
        starts[w][6], ends[w][6] = 9.0, 9.0
    spans = qa.best_spans(examples, windows, starts, ends)
    assert [t for t, _ in spans] == ["alpha", "omicron pi"]


def test_relative_scores_subtract_each_window_s_no_answer_logits(tok):
    examples = [example("alpha", "a"), example("omicron pi", "b")]
    windows = qa.make_windows(tok, examples, max_length=32, stride=4)
    starts, ends = oracle_logits(windows)  # the right span scores 20 in both
    starts[0][0], ends[0][0] = 4.0, 3.0  # question "a": its passage looks unanswerable
    starts[1][0], ends[1][0] = -1.0, -2.0
    absolute = qa.best_spans(examples, windows, starts, ends)
    relative = qa.best_spans(examples, windows, starts, ends, relative=True)
    assert [t for t, _ in relative] == [t for t, _ in absolute] == ["alpha", "omicron pi"]
    assert [s for _, s in absolute] == [20.0, 20.0]
    assert [s for _, s in relative] == [20.0 - 7.0, 20.0 + 3.0]
    half = qa.best_spans(examples, windows, starts, ends, relative=0.5)  # a weight, for tuning
    assert [s for _, s in half] == [20.0 - 3.5, 20.0 + 1.5]


def test_negatives_are_the_bm25_best_contexts_without_the_answer():
    contexts = ["the river flows past the old mill in the north",
                "the mill by the river was built in 1850 by a miller",
                "the river north of the mill freezes in winter; the mill was built in 1850",
                "mountains rise far from any river"]
    examples = [qa.QAExample(id="q1", question="when was the mill by the river built?",
                             context=contexts[1], answers=["1850"],
                             answer_starts=[contexts[1].index("1850")]),
                qa.QAExample(id="q2", question="where do mountains rise?", context=contexts[3],
                             answers=["far from any river"],
                             answer_starts=[contexts[3].index("far")]),
                qa.QAExample(id="q3", question="what flows past the mill?", context=contexts[0],
                             answers=["the river"], answer_starts=[0])]
    out = qa.with_negatives(examples, 2)
    assert out[:3] == examples
    negatives = {e.id: e for e in out[3:]}
    assert all(not e.answers and not e.answer_starts for e in out[3:])
    # q1: contexts[2] ranks high but holds "1850" (it answers the question): skipped
    assert [negatives[f"q1/negative{k}"].context for k in range(2)] == [contexts[0], contexts[3]]
    assert negatives["q1/negative0"].question == examples[0].question
    # q3: every other context says "the river" (SQuAD-normalised: "river"), so none is a negative
    assert not any(i.startswith("q3/") for i in negatives)
    assert qa.with_negatives(examples, 0) == examples


def test_read_squad_selects_articles_and_checks_answers(tmp_path):
    data = {"version": "1.1", "data": [
        {"title": "A", "paragraphs": [{"context": CONTEXT, "qas": [
            {"id": "1", "question": "q?", "answers": [{"text": "beta", "answer_start": 6}]}]}]},
        {"title": "B", "paragraphs": [{"context": "x y", "qas": [
            {"id": "2", "question": "q?", "answers": [{"text": "y", "answer_start": 2}]}]}]}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    assert [e.id for e in qa.read_squad(path)] == ["1", "2"]
    assert [e.id for e in qa.read_squad(path, titles=["B"])] == ["2"]
    with pytest.raises(DataError, match="no article titled 'C'"):
        qa.read_squad(path, titles=["C"])
    data["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]: answer_start 0"):
        qa.read_squad(path)


def test_tiny_bert_span_loss_falls(tiny_bert_dir, tok, tmp_path, single_thread):
    from lmlab.models.bert import BertForQuestionAnswering
    from lmlab.training.loop import LoopConfig, OptimConfig, train

    rng = np.random.default_rng(0)
    examples = []
    for i in range(64):  # the answer is the word after "mu" in a shuffled context
        words = list(rng.permutation(WORDS))
        k = words.index("mu")
        if k == len(words) - 1:
            words[k], words[0] = words[0], words[k]
            k = 0
        context = " ".join(words)
        answer = words[k + 1]
        start = len(" ".join(words[:k + 1])) + 1
        examples.append(qa.QAExample(str(i), f"what follows {words[k]}", context, [answer], [start]))
    windows = qa.make_windows(tok, examples, max_length=32, stride=8)
    torch.manual_seed(0)
    model = BertForQuestionAnswering.from_encoder(tiny_bert_dir)
    plan = EpochPlan(windows.lengths, batch_size=16, seed=0)
    task = qa.QATask(train=windows, val=(examples[:16], qa.make_windows(
        tok, examples[:16], max_length=32, stride=8)), plan=plan, device=torch.device("cpu"),
        pad_id=0)
    cfg = LoopConfig(max_steps=16 * plan.steps_per_epoch, optim=OptimConfig(lr=5e-3),
                     warmup_steps=4, eval_every=plan.steps_per_epoch, eval_at_start=True)
    result = train(model, task, cfg, run_dir=tmp_path, device=torch.device("cpu"))
    assert result.metrics["val_loss"] < 0.6 * result.first_metrics["val_loss"], result
    assert result.metrics["val_f1"] > result.first_metrics["val_f1"] + 10, result
