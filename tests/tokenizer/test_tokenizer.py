"""Tests of lmlab.tokenizer: round trips, parity with transformers, char-level goldens, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 pm, isn't it?\n",
    "def add(a, b):\n    return a + b  # sum\n\n\tif x == 1:\n\t\tpass\n",
    "Ünïcödé tëxt: naïve café, 日本語のテキスト, 中文文本, русский текст, العربية\n",
    "emoji 😀🎉👍🏽 and symbols ∑∫√ ≠ ≤ ≥ → ← ★ — “quotes” ‘single’\n",
    "whitespace    runs\n\n\n   and\ttabs\r\nwindows lines<|endoftext|>next document\n",
] * 20

# Strings that stress pre-tokenization: code, whitespace runs, newlines, unicode, special tokens.
PARITY_TEXTS = [
    "hello world",
    " leading space and trailing space ",
    "def f(x):\n    return {'a': [1, 2, 3]}\n",
    "many     spaces\t\ttabs\n\n\nnewlines\r\n",
    "naïve café 日本語 中文 😀🎉👍🏽 العربية",
    "first doc<|endoftext|>second doc",
    "<|endoftext|>",
    "it's they're we'll I'd 123456 3.14159",
    "\x00\x01 control \x7f chars \u200b zero-width",
    "",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(iterator=CORPUS, vocab_size=400)


def with_max_length(tok: Tokenizer, model_max_length: int) -> Tokenizer:
    """A copy of `tok` with a model_max_length, leaving the shared fixture untouched."""
    return Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                     pad_token=tok.pad_token, model_max_length=model_max_length)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(CORPUS), encoding="utf-8")
    return path


# ---- 1. round trips --------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_bpe_decode_inverts_encode(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["😀🎉👍🏽", "日本語のテキスト", "a\u0301e\u0301", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 <|endoftext|> 🏳️‍🌈"]))
def test_stream_decoder_emits_whole_characters(bpe: Tokenizer, text: str) -> None:
    stream = bpe.stream_decoder()
    chunks = [stream.push(token_id) for token_id in bpe.encode(text)]
    assert "".join(chunks) + stream.flush() == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in chunk for chunk in chunks)


def test_stream_decoder_holds_back_split_character(bpe: Tokenizer) -> None:
    # A rare 4-byte character is not merged, so its bytes arrive as several tokens.
    ids = bpe.encode("𝔘")
    assert len(ids) > 1
    stream = bpe.stream_decoder()
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["𝔘"]
    assert stream.flush() == ""


def test_encode_batch_and_decode_batch_match_single_calls(bpe: Tokenizer) -> None:
    batch = bpe.encode_batch(PARITY_TEXTS)
    assert batch == [bpe.encode(text) for text in PARITY_TEXTS]
    assert bpe.decode_batch(batch) == PARITY_TEXTS


def test_special_tokens_of_trained_bpe(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert len(bpe) == bpe.vocab_size == 400
    assert bpe.eos_token == bpe.bos_token == bpe.pad_token == "<|endoftext|>"
    assert bpe.eos_token_id == bpe.bos_token_id == bpe.pad_token_id == 0
    # The special token is matched whole, and skipped on request.
    assert bpe.encode("a<|endoftext|>b")[1] == 0
    assert bpe.decode(bpe.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"
    assert bpe.id_to_token(bpe.token_to_id("Ġqu")) == "Ġqu"  # GPT-2 marks a space as "Ġ"
    assert bpe.token_to_id("not a token") is None


def test_every_byte_is_encodable_even_if_unseen(bpe: Tokenizer) -> None:
    text = "".join(map(chr, range(0x2600, 0x2660)))  # symbols absent from the corpus
    assert bpe.decode(bpe.encode(text)) == text


def test_train_from_files_equals_train_from_iterator(corpus_file: Path) -> None:
    # tokenizers reads files line by line, so the same lines from an iterator train the same BPE.
    from_file = Tokenizer.train_bpe([corpus_file], vocab_size=400)
    lines = corpus_file.read_bytes().decode("utf-8").splitlines(keepends=True)  # keep "\r\n"
    from_lines = Tokenizer.train_bpe(iterator=iter(lines), vocab_size=400)
    assert from_file.vocab_size == 400
    assert from_file.fingerprint == from_lines.fingerprint
    assert from_file.decode(from_file.encode(PARITY_TEXTS[4])) == PARITY_TEXTS[4]


def test_pad_token_given(corpus_file: Path) -> None:
    tok = Tokenizer.train_bpe([corpus_file], vocab_size=300, pad_token="<|pad|>")
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.encode("<|pad|>") == [tok.pad_token_id]


# ---- 2. parity with transformers' GPT-2 tokenizer on vocab.json + merges.txt -------------------

@pytest.fixture(scope="module")
def gpt2_dir(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    trained = Tokenizer.train_bpe([corpus_file], vocab_size=500)
    directory = tmp_path_factory.mktemp("gpt2")
    trained.backend.model.save(str(directory))
    assert sorted(p.name for p in directory.iterdir()) == ["merges.txt", "vocab.json"]
    return directory


def test_gpt2_files_match_transformers(gpt2_dir: Path) -> None:
    # transformers 5 builds GPT2TokenizerFast from vocab=/merges= paths (vocab_file= is ignored).
    reference = transformers.GPT2TokenizerFast(vocab=str(gpt2_dir / "vocab.json"),
                                               merges=str(gpt2_dir / "merges.txt"))
    ours = Tokenizer.from_pretrained(gpt2_dir)
    assert len(reference) == ours.vocab_size == 500
    for text in PARITY_TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids) == text
    assert ours.eos_token == reference.eos_token == "<|endoftext|>"
    assert ours.eos_token_id == reference.eos_token_id


# ---- 3. save_pretrained is loadable by transformers --------------------------------------------

@pytest.mark.parametrize("loader", ["PreTrainedTokenizerFast", "AutoTokenizer"])
def test_save_pretrained_loads_in_transformers(bpe: Tokenizer, tmp_path: Path, loader: str) -> None:
    with_max_length(bpe, 128).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    reference = getattr(transformers, loader).from_pretrained(tmp_path)
    for text in PARITY_TEXTS:
        ids = bpe.encode(text)
        assert reference(text)["input_ids"] == ids, text
        assert reference.decode(ids) == text
    assert (reference.bos_token, reference.eos_token, reference.pad_token) == (
        bpe.bos_token, bpe.eos_token, bpe.pad_token)
    assert reference.pad_token_id == bpe.pad_token_id
    assert reference.model_max_length == 128


def test_save_then_load_is_identity(bpe: Tokenizer, tmp_path: Path) -> None:
    with_max_length(bpe, 256).save_pretrained(tmp_path / "nested" / "dir")
    loaded = Tokenizer.from_pretrained(tmp_path / "nested" / "dir")
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.model_max_length == 256
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        bpe.bos_token, bpe.eos_token, bpe.pad_token)
    assert not [p for p in (tmp_path / "nested" / "dir").iterdir() if p.suffix == ".tmp"]
    # A tokenizer.json file path works too.
    assert Tokenizer.from_pretrained(tmp_path / "nested" / "dir" / "tokenizer.json").fingerprint \
        == bpe.fingerprint


def test_special_tokens_read_from_config_dicts(bpe: Tokenizer, tmp_path: Path) -> None:
    bpe.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|endoftext|>", "special": True}, "pad_token": None,
        "model_max_length": int(1e30)}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == "<|endoftext|>"
    assert loaded.pad_token is None and loaded.pad_token_id is None
    assert loaded.bos_token == "<|endoftext|>"  # from special_tokens_map.json
    assert loaded.model_max_length is None


# ---- 4. char level ---------------------------------------------------------------------------

def test_char_level_ids_are_golden() -> None:
    tok = Tokenizer.char_level("hello world\n")
    # <|endoftext|>=0, then by code point: "\n"=1 " "=2 d=3 e=4 h=5 l=6 o=7 r=8 w=9
    assert tok.encode("hello\n") == [5, 4, 6, 6, 7, 1]
    assert tok.encode("world hello") == [9, 7, 8, 6, 3, 2, 5, 4, 6, 6, 7]
    assert tok.vocab_size == 10 and tok.kind == "char"
    assert tok.eos_token_id == 0
    assert tok.encode("he<|endoftext|>") == [5, 4, 0]


def test_char_level_round_trip_keeps_whitespace() -> None:
    text = "First Citizen:\nBefore we proceed,  hear me speak.\n\n\tAll:\r\n  Speak, speak. 😀\n"
    tok = Tokenizer.char_level(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_char_level_unknown_character_raises() -> None:
    tok = Tokenizer.char_level("hello world\n")
    with pytest.raises(DataError, match="'z'"):
        tok.encode("hello zoo")
    with pytest.raises(DataError, match="'Q'"):
        tok.encode_batch(["hello", "Q"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", " ", "\n", "😀", "\r", "<|endoftext|>"]),
                max_size=40).map("".join))
def test_char_level_table_lookup_equals_the_tokenizers_pipeline(text: str) -> None:
    tokenizer_module = sys.modules[Tokenizer.__module__]
    tokenizer_module._CHAR_TABLE_MIN_CHARS, threshold = 0, tokenizer_module._CHAR_TABLE_MIN_CHARS
    try:
        check_table_lookup(text)
    finally:
        tokenizer_module._CHAR_TABLE_MIN_CHARS = threshold


def check_table_lookup(text: str) -> None:
    tok = Tokenizer.char_level("ab \n😀\r")
    assert tok._char_table() is not None  # the fast path is the one under test
    expected = tok.backend.encode(text).ids
    assert tok.encode(text) == expected
    assert tok.encode_batch([text, "ab"]) == [expected, tok.backend.encode("ab").ids]


def test_char_level_table_lookup_is_not_used_for_another_pipeline() -> None:
    from tokenizers import normalizers

    tok = Tokenizer.char_level("abc ABC")
    tok.backend.normalizer = normalizers.Lowercase()
    assert tok._char_table() is None
    assert tok.encode("AbC") == tok.encode("abc")


def test_char_level_save_load(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_bytes("to be, or not to be\r\n".encode())
    tok = Tokenizer.char_level(files=[tmp_path / "input.txt"])
    assert tok.token_to_id("\r") is not None  # the file is read verbatim
    tok.save_pretrained(tmp_path / "tok")
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.kind == "char" and loaded.fingerprint == tok.fingerprint
    assert loaded.encode("not to be\n") == tok.encode("not to be\n")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reference("not to be\n")["input_ids"] == tok.encode("not to be\n")
    assert reference.decode(tok.encode("to be\n")) == "to be\n"


# ---- 5. errors ---------------------------------------------------------------------------------

def test_from_pretrained_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_from_pretrained_half_gpt2_files(gpt2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text((gpt2_dir / "vocab.json").read_text())
    with pytest.raises(CheckpointError, match="merges.txt"):
        Tokenizer.from_pretrained(tmp_path)


def test_from_pretrained_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model":')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_train_bpe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt"):
        Tokenizer.train_bpe([tmp_path / "nope.txt"], vocab_size=300)


def test_train_bpe_vocab_too_small() -> None:
    with pytest.raises(ConfigError, match="vocab_size must be an int of at least 257"):
        Tokenizer.train_bpe(iterator=CORPUS, vocab_size=256)


def test_train_bpe_needs_one_source(corpus_file: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        Tokenizer.train_bpe(vocab_size=300)
    with pytest.raises(ConfigError, match="exactly one"):
        Tokenizer.train_bpe([corpus_file], iterator=CORPUS, vocab_size=300)


def test_decode_out_of_range_id(bpe: Tokenizer) -> None:
    with pytest.raises(DataError, match="400"):
        bpe.decode([1, 400])


# ---- 6. fingerprint ----------------------------------------------------------------------------

def test_fingerprint_identifies_the_tokenizer(bpe: Tokenizer) -> None:
    again = Tokenizer.train_bpe(iterator=CORPUS, vocab_size=400)
    smaller = Tokenizer.train_bpe(iterator=CORPUS, vocab_size=390)
    assert len(bpe.fingerprint) == 64
    assert again.fingerprint == bpe.fingerprint
    assert smaller.fingerprint != bpe.fingerprint
    assert Tokenizer.char_level("ab").fingerprint != Tokenizer.char_level("abc").fingerprint
