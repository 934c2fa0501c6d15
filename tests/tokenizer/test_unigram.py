"""T5's Unigram tokenizer: training laid out as T5's vocabulary (sentinels last, in reverse),
save → transformers' AutoTokenizer / T5Tokenizer give the same ids and text, SentencePiece's
spiece.model read as transformers and sentencepiece itself read it, and the bad inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmlab.data.prepare import build_tokenizer
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.unigram import jsonl_texts

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

MULTI30K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "multi30k_en_de"

EN = ("a the man woman dog child runs walks sits plays in on near with red blue small big park"
      " street ball water").split()
DE = ("ein eine der die das Mann Frau Hund Kind läuft geht sitzt spielt im auf neben mit rotem"
      " blauen kleinen großen Park Straße Ball Wasser").split()

SENTENCES = [
    "Two young men are playing football in the park.",
    "Zwei junge Männer spielen im Park Fußball.",
    "A dog runs near the water,  with a red ball!",
    "  Leading and trailing spaces  ",
    "tabs\tand\nnewlines",
    "Ünïcödé ß ½ ﬁnd ｄｏｇ № 漢字 😀",
    "<2de> a man <extra_id_0> in <extra_id_1>.",
    "glued<extra_id_3>tokens<2fr>here",
    "",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for words in (EN, DE) for _ in range(n // 2)]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train_unigram(iterator=corpus(), vocab_size=150, extra_ids=10,
                                   extra_special_tokens=["<2de>", "<2fr>"])


def test_layout_is_t5s(trained):
    size = trained.vocab_size
    assert size == 150 and trained.kind == "unigram"
    assert (trained.pad_token_id, trained.eos_token_id, trained.unk_token_id) == (0, 1, 2)
    assert [trained.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    # The sentinels end the vocabulary in reverse: the last id is <extra_id_0>.
    assert trained.sentinel_ids == list(range(size - 1, size - 11, -1))
    assert [trained.id_to_token(i) for i in trained.sentinel_ids] == [
        f"<extra_id_{i}>" for i in range(10)]
    assert (trained.token_to_id("<2de>"), trained.token_to_id("<2fr>")) == (size - 12, size - 11)
    assert set(trained.sentinel_ids) | {0, 1, 2, size - 12, size - 11} == trained.special_token_ids
    pieces = [trained.id_to_token(i) for i in range(3, size - 12)]
    assert all(not p.startswith("<") for p in pieces) and "▁" in "".join(pieces)


def test_encode_decode(trained):
    text = "the man plays with a ball in the park."
    ids = trained.encode(text)
    assert 2 not in ids and 1 not in ids
    assert trained.encode(text, add_special_tokens=True) == [*ids, 1]  # </s> appended, as T5
    assert trained.decode(ids) == text
    assert trained.decode([*ids, 1]) == text + "</s>"
    assert trained.decode([*ids, 1], skip_special_tokens=True) == text
    # nmt_nfkc normalization and whitespace runs, as SentencePiece
    assert trained.decode(trained.encode("  ﬁnd   the\tdog ")) == "find the dog"
    # tags and sentinels are matched whole, even glued to words
    ids = trained.encode("<2de> der Hund<extra_id_0>im Park")
    assert ids[0] == trained.token_to_id("<2de>") and trained.sentinel_ids[0] in ids


def assert_same_as_hf(ours: Tokenizer, hf, sentences) -> None:
    for text in sentences:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip), (text, skip)
    assert ours.encode_batch(sentences) == hf(sentences, add_special_tokens=False)["input_ids"]


def test_save_loads_in_transformers_with_the_same_ids(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "T5Tokenizer" and config["extra_ids"] == 10
    assert config["additional_special_tokens"][:3] == ["<2de>", "<2fr>", "<extra_id_0>"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == "T5Tokenizer" and len(hf) == trained.vocab_size
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    assert_same_as_hf(trained, hf, [*SENTENCES, *corpus(20, seed=1)])
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.fingerprint == trained.fingerprint
    assert again.sentinel_ids == trained.sentinel_ids
    assert again.additional_special_tokens == trained.additional_special_tokens


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory) -> Path:
    """A SentencePiece Unigram model trained by sentencepiece itself, in T5's id layout, in a
    directory as T5 checkpoints ship it: spiece.model + tokenizer_config.json."""
    root = tmp_path_factory.mktemp("spiece")
    (root / "corpus.txt").write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=120,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    directory = root / "t5"
    directory.mkdir()
    (directory / "spiece.model").write_bytes((root / "sp.model").read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 7, "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<pad>"}))
    return directory


def test_spiece_model_reads_as_transformers_and_sentencepiece(spiece_dir, tmp_path):
    ours = Tokenizer.from_pretrained(spiece_dir)
    assert ours.vocab_size == 127 and ours.sentinel_ids == list(range(126, 119, -1))
    assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2)
    assert_same_as_hf(ours, transformers.AutoTokenizer.from_pretrained(spiece_dir), SENTENCES)
    assert_same_as_hf(ours, transformers.T5Tokenizer.from_pretrained(spiece_dir), SENTENCES)
    processor = spm.SentencePieceProcessor(model_file=str(spiece_dir / "spiece.model"))
    for text in SENTENCES:
        if "<" not in text:  # sentencepiece knows nothing of the sentinels
            assert ours.encode(text, add_special_tokens=True) == processor.encode(text) + [1]
    # saved as tokenizer.json, it stays the same tokenizer for both
    ours.save_pretrained(tmp_path)
    assert_same_as_hf(ours, transformers.AutoTokenizer.from_pretrained(tmp_path), SENTENCES)
    assert Tokenizer.from_pretrained(tmp_path).fingerprint == ours.fingerprint


def test_spiece_model_alone_gets_t5s_100_sentinels(spiece_dir, tmp_path):
    (tmp_path / "spiece.model").write_bytes((spiece_dir / "spiece.model").read_bytes())
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == 220 and len(ours.sentinel_ids) == 100
    assert ours.id_to_token(219) == "<extra_id_0>" and ours.eos_token == "</s>"
    assert ours.additional_special_tokens == [f"<extra_id_{i}>" for i in range(100)]


def test_extra_ids_must_match_the_vocabulary(trained, spiece_dir, tmp_path):
    trained.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "extra_ids": 5}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: extra_ids is 5 .* 10"):
        Tokenizer.from_pretrained(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spiece.model").write_bytes((spiece_dir / "spiece.model").read_bytes())
    (bad / "tokenizer_config.json").write_text(json.dumps(
        {"extra_ids": 3, "additional_special_tokens": ["<extra_id_0>", "<extra_id_1>"]}))
    with pytest.raises(CheckpointError, match="extra_ids is 3 but additional_special_tokens"):
        Tokenizer.from_pretrained(bad)


def test_bad_spiece_model(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\xff\x00 not a model")
    with pytest.raises(CheckpointError, match="spiece.model: not a SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_training_input(tmp_path):
    text = corpus(40)
    with pytest.raises(ConfigError, match=r"vocab_size must be an int of at least 104"):
        Tokenizer.train_unigram(iterator=text, vocab_size=50)
    with pytest.raises(ConfigError, match="vocab_size 20 is too small for the characters"):
        Tokenizer.train_unigram(iterator=text, vocab_size=20, extra_ids=0)
    with pytest.raises(ConfigError, match="extra_ids must be an int >= 0"):
        Tokenizer.train_unigram(iterator=text, vocab_size=500, extra_ids=-1)
    with pytest.raises(ConfigError, match="extra_special_tokens must be distinct"):
        Tokenizer.train_unigram(iterator=text, vocab_size=500,
                                extra_special_tokens=["<extra_id_3>"])
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match=f"{missing.name}: training file not found"):
        Tokenizer.train_unigram([missing], vocab_size=500)
    with pytest.raises(ConfigError, match="exactly one of files= or iterator="):
        Tokenizer.train_unigram(vocab_size=500)


def test_shared_vocabulary_from_a_pairs_file(tmp_path):
    rng = random.Random(0)
    pairs = tmp_path / "train.jsonl"
    en, de = corpus(200)[:100], corpus(200)[100:]
    pairs.write_text("".join(json.dumps({"id": i, "en": e, "de": d}) + "\n"
                             for i, (e, d) in enumerate(zip(en, rng.sample(de, len(de))))))
    assert list(jsonl_texts(pairs, ["en", "de"]))[:2] == [en[0], json.loads(
        pairs.read_text().splitlines()[0])["de"]]
    shared = Tokenizer.train_unigram(iterator=jsonl_texts(pairs, ["en", "de"]), vocab_size=200)
    for text in ("the dog plays in the park.", "Der Hund spielt im großen Park."):
        assert 2 not in shared.encode(text)  # both languages' characters and words are covered
        assert shared.decode(shared.encode(text)) == text
    (tmp_path / "bad.jsonl").write_text('{"en": "a", "de": "b"}\n\n{"en": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 3: missing string field 'de'"):
        list(jsonl_texts(tmp_path / "bad.jsonl", ["en", "de"]))


@pytest.mark.skipif(not (MULTI30K / "train.jsonl").is_file(),
                    reason="multi30k not in ../shared/data")
def test_multi30k_shared_vocabulary(tmp_path):
    lines = (MULTI30K / "train.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = Tokenizer.train_unigram(iterator=jsonl_texts(tmp_path / "pairs.jsonl", ["en", "de"]),
                                  vocab_size=1000)
    hf_dir = tmp_path / "tok"
    tok.save_pretrained(hf_dir)
    records = [json.loads(line) for line in lines[:50]]
    assert_same_as_hf(tok, transformers.AutoTokenizer.from_pretrained(hf_dir),
                      [r[side] for r in records for side in ("en", "de")])
    assert tok.decode(tok.encode(records[0]["de"])) == " ".join(records[0]["de"].split())


def test_prepare_trains_unigram(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(corpus()), encoding="utf-8")
    tok = build_tokenizer("unigram", [str(tmp_path / "a.txt")], vocab_size=250)
    assert tok.kind == "unigram" and tok.vocab_size <= 250 and len(tok.sentinel_ids) == 100
    assert tok.sentinel_ids[0] == tok.vocab_size - 1 and tok.eos_token_id == 1


def test_train_from_files(tmp_path):
    (tmp_path / "en.txt").write_text("\n".join(corpus()[:200]), encoding="utf-8")
    (tmp_path / "de.txt").write_text("\n".join(corpus()[200:]), encoding="utf-8")
    tok = Tokenizer.train_unigram([tmp_path / "en.txt", tmp_path / "de.txt"], vocab_size=120,
                                  extra_ids=5)
    assert tok.vocab_size == 120 and tok.sentinel_ids == [119, 118, 117, 116, 115]
    assert 2 not in tok.encode("Der Hund läuft im Park. the dog runs in the park.")
