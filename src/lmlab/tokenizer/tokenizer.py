"""A thin wrapper over a `tokenizers.Tokenizer` that also knows its special tokens.

The `tokenizers` library does the real work (training, encoding, the `tokenizer.json` format);
this module only picks GPT-2's byte-level BPE settings, BERT's WordPiece pipeline (see
`wordpiece.py`) or T5's SentencePiece Unigram layout (see `unigram.py`), builds a char-level
vocabulary for char-LM experiments, reads and writes the Hugging Face files (their format:
`hf_files.py`), and turns the library's bare exceptions into `lmlab.errors` that name the input
at fault. Text pairs for encoders are encoded by `encoding.py`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from lmlab.errors import CheckpointError, ConfigError, DataError, LmlabError
from lmlab.fileio import atomic_write_text
from lmlab.tokenizer import unigram, wordpiece
from lmlab.tokenizer.hf_files import (END_OF_TEXT, MANAGED_KEYS, NO_MAX_LENGTH, ROLES,
                                      byte_level, is_chat_template, load_directory,
                                      load_tokenizer_json, read_additional, read_chat_template,
                                      read_json, read_roles, read_text,
                                      remove_chat_template_files)
from lmlab.tokenizer.encoding import EncodedBatch, Encoding, Padding, Truncation, encode_pairs

# Roles a GPT-2 tokenizer does not have: written to tokenizer_config.json only when set, so a
# BPE tokenizer's files stay exactly as before.
_ENCODER_ROLES = ("cls", "sep", "mask")
# Oniguruma's "." does not match "\n", so "\n\n" would become one (unknown) piece.
_ANY_CHAR = Regex(r"[\s\S]")
# That Split as tokenizer.json writes it (the char-level fast path checks for it).
_CHAR_SPLIT = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
               "invert": False}
# Building the lookup table costs ~35 µs (the backend's JSON, parsed), ~20 characters of the
# backend's pipeline: shorter inputs (prompts) go straight to the backend.
_CHAR_TABLE_MIN_CHARS = 4096


class _SpecialToken:
    """`tokenizer.cls_token` (the string, or None) and `tokenizer.cls_token_id` (its id): one
    read-only attribute per role and form."""

    def __init__(self, role: str, *, as_id: bool = False) -> None:
        self.role, self.as_id = role, as_id

    def __get__(self, tokenizer: Tokenizer | None, owner: type) -> str | int | None:
        if tokenizer is None:
            return self
        return tokenizer._role_id(self.role) if self.as_id else tokenizer._special[self.role]

    def __set__(self, tokenizer: Tokenizer, value: object) -> None:
        raise AttributeError(f"{self.role}_token is fixed when a Tokenizer is built")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens (bos/eos/pad/unk, BERT's cls/sep/mask
    and any additional ones), optional `model_max_length` and `chat_template`, and the other
    tokenizer_config.json keys it was loaded with (`extra_config`, written back unchanged)."""

    bos_token, bos_token_id = _SpecialToken("bos"), _SpecialToken("bos", as_id=True)
    eos_token, eos_token_id = _SpecialToken("eos"), _SpecialToken("eos", as_id=True)
    pad_token, pad_token_id = _SpecialToken("pad"), _SpecialToken("pad", as_id=True)
    unk_token, unk_token_id = _SpecialToken("unk"), _SpecialToken("unk", as_id=True)
    cls_token, cls_token_id = _SpecialToken("cls"), _SpecialToken("cls", as_id=True)
    sep_token, sep_token_id = _SpecialToken("sep"), _SpecialToken("sep", as_id=True)
    mask_token, mask_token_id = _SpecialToken("mask"), _SpecialToken("mask", as_id=True)

    def __init__(self, backend: Backend, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, cls_token: str | None = None,
                 sep_token: str | None = None, mask_token: str | None = None,
                 model_max_length: int | None = None,
                 additional_special_tokens: Sequence[str] = (),
                 chat_template: str | list[dict[str, str]] | None = None,
                 extra_config: dict[str, Any] | None = None) -> None:
        self._backend = backend
        self._special = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "unk": unk_token,
                         "cls": cls_token, "sep": sep_token, "mask": mask_token}
        for role, token in self._special.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ConfigError(f"{role}_token {token!r} is not in the vocabulary")
        self._additional = tuple(additional_special_tokens)
        for token in self._additional:
            if backend.token_to_id(token) is None:
                raise ConfigError(f"additional special token {token!r} is not in the vocabulary")
        # transformers 5 calls them extra_special_tokens; from_pretrained keeps the file's name.
        self._additional_key = "additional_special_tokens"
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self.extra_config = dict(extra_config or {})

    @property
    def chat_template(self) -> str | list[dict[str, str]] | None:
        """The Jinja chat template (transformers' `tokenizer.chat_template`), or transformers'
        named templates `[{"name": ..., "template": ...}]`; saved in tokenizer_config.json."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, value: str | list[dict[str, str]] | None) -> None:
        if not is_chat_template(value):
            raise ConfigError("chat_template must be a Jinja string, a list of {'name': ...,"
                              f" 'template': ...}} objects or None, got {value!r:.80}")
        self._chat_template = value

    @property
    def additional_special_tokens(self) -> list[str]:
        return list(self._additional)

    @classmethod
    def train_bpe(cls, files: Sequence[str | Path] | None = None, *,
                  iterator: Iterable[str] | None = None, vocab_size: int, min_frequency: int = 2,
                  special_tokens: Sequence[str] = (END_OF_TEXT,), pad_token: str | None = None,
                  show_progress: bool = False) -> Tokenizer:
        """Train byte-level BPE exactly as GPT-2 was built, on text files or an iterator of strings.

        `<|endoftext|>` (else the first special token) serves as bos and eos, and as pad unless
        `pad_token` is given.
        """
        paths = _training_files(files, iterator)
        specials, roles = _specials(special_tokens, pad_token)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        smallest = len(alphabet) + len(specials)
        if not isinstance(vocab_size, int) or vocab_size < smallest:
            raise ConfigError(f"vocab_size must be an int of at least {smallest} ({len(alphabet)}"
                              f" byte tokens + {len(specials)} special tokens), got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ConfigError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        backend = byte_level(Backend(models.BPE()))
        # Seeding the trainer with all 256 byte symbols makes every byte encodable, whatever the
        # training text.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials, initial_alphabet=alphabet,
                                      show_progress=show_progress)
        try:
            if paths is not None:
                backend.train([str(p) for p in paths], trainer=trainer)
            else:
                backend.train_from_iterator(iterator, trainer=trainer)
        except LmlabError:
            raise  # already names the file and line (e.g. raised by the documents iterator)
        except Exception as error:  # tokenizers raises a bare Exception, e.g. for non-UTF-8 input
            source = ", ".join(map(str, paths)) if paths is not None else "iterator"
            raise DataError(f"{source}: cannot train BPE: {error}") from error
        return cls(backend, **roles)

    @classmethod
    def train_wordpiece(cls, files: Sequence[str | Path] | None = None, *,
                        iterator: Iterable[str] | None = None, vocab_size: int,
                        min_frequency: int = 2, lowercase: bool = True,
                        strip_accents: bool | None = None,
                        special_tokens: Sequence[str] = tuple(wordpiece.BERT_SPECIALS.values()),
                        limit_alphabet: int | None = 1000,
                        show_progress: bool = False) -> Tokenizer:
        """Train a BERT WordPiece vocabulary on text files or an iterator of strings.

        The text is normalized as BERT's (uncased when `lowercase`; accents stripped with
        lowercasing unless `strip_accents` says otherwise); the special tokens take the first
        ids ([PAD]=0 as in BERT) and must include [PAD] [UNK] [CLS] [SEP] [MASK].
        `limit_alphabet` keeps the most frequent characters (BERT's default 1000), so a rare
        symbol becomes [UNK] instead of spending vocabulary.
        """
        paths = _training_files(files, iterator)
        specials = [special_tokens] if isinstance(special_tokens, str) else list(special_tokens)
        missing = [t for t in wordpiece.BERT_SPECIALS.values() if t not in specials]
        if missing or len(set(specials)) < len(specials):
            raise ConfigError(f"special_tokens must be distinct and include {missing or specials}"
                              f", got {specials!r}")
        if not isinstance(vocab_size, int) or vocab_size <= len(specials):
            raise ConfigError(f"vocab_size must be an int above {len(specials)} (the special"
                              f" tokens), got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ConfigError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        try:
            backend = wordpiece.train_backend(
                paths, iterator, vocab_size=vocab_size, min_frequency=min_frequency,
                lowercase=lowercase, strip_accents=strip_accents, specials=specials,
                unk_token=wordpiece.BERT_SPECIALS["unk"], limit_alphabet=limit_alphabet,
                show_progress=show_progress)
        except LmlabError:
            raise
        except Exception as error:  # tokenizers raises a bare Exception, e.g. for non-UTF-8 input
            source = ", ".join(map(str, paths)) if paths is not None else "iterator"
            raise DataError(f"{source}: cannot train WordPiece: {error}") from error
        names = wordpiece.BERT_SPECIALS
        wordpiece.bert_pipeline(backend, lowercase=lowercase, strip_accents=strip_accents,
                                chinese_chars=True, cls_token=names["cls"],
                                sep_token=names["sep"])
        return cls(backend, **{f"{role}_token": token for role, token in names.items()})

    @classmethod
    def train_unigram(cls, files: Sequence[str | Path] | None = None, *,
                      iterator: Iterable[str] | None = None, vocab_size: int,
                      extra_ids: int = unigram.DEFAULT_EXTRA_IDS,
                      extra_special_tokens: Sequence[str] = (), max_piece_length: int = 16,
                      show_progress: bool = False) -> Tokenizer:
        """Train a SentencePiece-style Unigram vocabulary laid out as T5's (see `unigram.py`):
        <pad>=0 </s>=1 <unk>=2, the pieces, `extra_special_tokens` (e.g. language tags
        "<2de>"), then `extra_ids` sentinels with <extra_id_0> last. `vocab_size` counts them
        all (T5's 32100 = 32000 pieces + 100 sentinels). For translation, train on both sides'
        text for one shared vocabulary: `iterator=unigram.jsonl_texts(path, ["en", "de"])`.
        """
        paths = _training_files(files, iterator)
        extras = [extra_special_tokens] if isinstance(extra_special_tokens, str) \
            else list(extra_special_tokens)
        unigram.check_training(vocab_size=vocab_size, extra_special_tokens=extras,
                               extra_ids=extra_ids, max_piece_length=max_piece_length)
        try:
            backend = unigram.train_backend(
                paths, iterator, vocab_size=vocab_size, extra_special_tokens=extras,
                extra_ids=extra_ids, max_piece_length=max_piece_length,
                show_progress=show_progress)
        except LmlabError:
            raise
        except Exception as error:  # tokenizers raises a bare Exception
            if "not large enough" in str(error):  # it keeps every character of the text
                raise ConfigError(f"vocab_size {vocab_size} is too small for the characters of"
                                  " the training text (each needs a piece); raise it") from error
            source = ", ".join(map(str, paths)) if paths is not None else "iterator"
            raise DataError(f"{source}: cannot train Unigram: {error}") from error
        return cls(backend, **{f"{role}_token": t for role, t in unigram.T5_ROLES.items()},
                   additional_special_tokens=[*extras, *map(unigram.sentinel, range(extra_ids))])

    @classmethod
    def char_level(cls, text: str | None = None, *, files: Sequence[str | Path] | None = None,
                   special_tokens: Sequence[str] = (END_OF_TEXT,),
                   pad_token: str | None = None) -> Tokenizer:
        """One token per character of the training text.

        Ids are deterministic: special tokens first, then the characters sorted by code point.
        """
        if (text is None) == (files is None):
            raise ConfigError("char_level needs exactly one of text= or files=")
        if files is not None:
            text = "".join(read_text(p) for p in _training_files(files, None) or ())
        if not isinstance(text, str) or not text:
            raise DataError("char_level needs non-empty training text")
        specials, roles = _specials(special_tokens, pad_token)
        chars = sorted(set(text) - set(specials))
        vocab = {token: i for i, token in enumerate([*specials, *chars])}
        # Without an unk token WordLevel fails on unseen characters, which encode() reports as a
        # DataError instead of silently mapping them to an unknown id.
        backend = Backend(models.WordLevel(vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(_ANY_CHAR, "isolated")
        backend.decoder = decoders.Fuse()  # join characters without spaces
        backend.add_special_tokens([_special(t) for t in specials])
        return cls(backend, **roles)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or a directory with tokenizer.json (else GPT-2's vocab.json
        + merges.txt, else BERT's vocab.txt, else T5's SentencePiece spiece.model with
        tokenizer_config.json's `extra_ids` sentinels) and optionally tokenizer_config.json /
        special_tokens_map.json / chat_template.jinja."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory; expected a tokenizer"
                                  " directory or a tokenizer.json file")
        directory = path.parent if path.is_file() else path
        config = read_json(directory / "tokenizer_config.json")
        backend = (load_tokenizer_json(path) if path.is_file()
                   else load_directory(path, config))
        # A tokenizer.json may carry fixed padding/truncation (MiniLM's pads everything to 128);
        # transformers overrides them per call, and so do we: encode() returns the text's tokens.
        backend.no_truncation()
        backend.no_padding()
        named = {**read_json(directory / "special_tokens_map.json"), **config}
        roles = read_roles(named, backend, directory)
        where = directory / "tokenizer_config.json"
        key, additional = read_additional(named, where)
        if unigram.is_t5_layout(backend):  # as in T5Tokenizer, the sentinels are special anyway
            unigram.check_sentinels(backend, unigram.extra_ids_of(config, additional, where), where)
            additional = additional or list(map(backend.id_to_token, unigram.sentinel_ids(backend)))
        # As transformers does, make the named tokens special: matched whole in the input text.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = sorted(({t for t in roles.values() if t is not None} | set(additional)) - added)
        backend.add_special_tokens([_special(t) for t in missing])
        managed = MANAGED_KEYS | ({key} if additional else set())
        extra = {k: v for k, v in config.items() if k not in managed}
        max_length = config.get("model_max_length")
        if max_length is not None and (not isinstance(max_length, (int, float)) or max_length < 1):
            raise CheckpointError(f"{where}: model_max_length must be a positive int, got"
                                  f" {max_length!r}")
        if max_length is not None and max_length >= NO_MAX_LENGTH:
            extra["model_max_length"] = max_length  # "no known maximum": written back as read
            max_length = None
        tokenizer = cls(backend, **roles, additional_special_tokens=additional,
                        model_max_length=None if max_length is None else int(max_length),
                        chat_template=read_chat_template(directory, config), extra_config=extra)
        tokenizer._additional_key = key
        return tokenizer

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by
        transformers' AutoTokenizer; each file is written atomically. tokenizer_config.json holds
        `extra_config` with the keys lmlab manages rewritten from this tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special = {f"{role}_token": token for role, token in self._special.items()
                   if token is not None or role not in _ENCODER_ROLES}
        # Unless the loaded file said otherwise, transformers must not "clean up" spaces before
        # punctuation: lmlab's decode does not.
        config: dict[str, Any] = {"clean_up_tokenization_spaces": False, **self.extra_config,
                                  "tokenizer_class": "PreTrainedTokenizerFast", **special}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        present = {key: token for key, token in special.items() if token is not None}
        if self._additional:
            config[self._additional_key] = self.additional_special_tokens
            present["additional_special_tokens"] = self.additional_special_tokens
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        remove_chat_template_files(directory)
        if self.kind == "wordpiece":
            # BERT's files: vocab.txt (the vocabulary older tools read) and the normalizer
            # options transformers' BertTokenizer needs to rebuild the same pipeline from it.
            config.update(tokenizer_class="BertTokenizer",
                          **wordpiece.normalizer_options(self._backend))
            atomic_write_text(directory / "vocab.txt", wordpiece.vocab_lines(self._backend))
        elif unigram.is_t5(self._backend):  # T5Tokenizer(Fast) rebuilds this very pipeline
            config.update(tokenizer_class="T5Tokenizer", extra_ids=len(self.sentinel_ids))
        atomic_write_text(directory / "tokenizer.json", self._backend.to_str(pretty=True))
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))
        atomic_write_text(directory / "special_tokens_map.json", json.dumps(present, indent=2))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` runs the post-processor (GPT-2's adds
        nothing)."""
        return self._encode([text], add_special_tokens, parallel=False)[0]

    def encode_batch(self, texts: Sequence[str], *,
                     add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by tokenizers' thread pool."""
        return self._encode(texts, add_special_tokens, parallel=True)

    def _encode(self, texts: Sequence[str], add_special_tokens: bool, *,
                parallel: bool) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of str; use encode() for one str")
        if not all(isinstance(text, str) for text in texts):
            bad = next(text for text in texts if not isinstance(text, str))
            raise TypeError(f"can only encode str, got {type(bad).__name__}")
        long_enough = sum(map(len, texts)) >= _CHAR_TABLE_MIN_CHARS
        table = self._char_table() if long_enough and not add_special_tokens else None
        if table is not None:
            fast = [_lookup_chars(text, *table) for text in texts]
            if all(ids is not None for ids in fast):
                return fast
        try:
            if parallel:
                encodings = self._backend.encode_batch(list(texts),
                                                       add_special_tokens=add_special_tokens)
            else:
                encodings = [self._backend.encode(t, add_special_tokens=add_special_tokens)
                             for t in texts]
        except Exception as error:  # tokenizers raises a bare Exception
            raise self._encode_error(texts, error) from error
        return [encoding.ids for encoding in encodings]

    def encode_pair(self, text: str, text_pair: str | None = None, *,
                    add_special_tokens: bool = True, max_length: int | None = None,
                    truncation: Truncation = "longest_first") -> Encoding:
        """One text (or text pair) for an encoder: `[CLS] text [SEP] text_pair [SEP]` with
        token types, attention mask, offsets; no padding. Truncated to `max_length` tokens
        (special tokens included) when given, as transformers' `tokenizer(text, text_pair)`."""
        return self.encode_pairs([text], None if text_pair is None else [text_pair],
                                 add_special_tokens=add_special_tokens, max_length=max_length,
                                 truncation=truncation, padding="none")[0]

    def encode_pairs(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *,
                     add_special_tokens: bool = True, max_length: int | None = None,
                     truncation: Truncation = "longest_first", stride: int = 0,
                     return_overflowing: bool = False, padding: Padding = "longest",
                     pad_to_multiple_of: int | None = None) -> EncodedBatch:
        """A batch of texts (or text pairs), encoded in parallel and padded ("longest": to the
        longest row; "max_length"; "none").

        With `return_overflowing`, what truncation cuts off becomes further rows (windows that
        overlap by `stride` tokens), as transformers' `return_overflowing_tokens` — the sliding
        window of extractive QA with `truncation="only_second"`; `sample_index` maps rows to
        inputs.
        """
        return encode_pairs(self._backend, texts, text_pairs,
                            add_special_tokens=add_special_tokens, max_length=max_length,
                            truncation=truncation, stride=stride,
                            return_overflowing=return_overflowing, padding=padding,
                            pad_to_multiple_of=pad_to_multiple_of, pad_id=self.pad_token_id,
                            pad_token=self.pad_token)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], *,
                     skip_special_tokens: bool = False) -> list[str]:
        return self._backend.decode_batch([self._checked_ids(ids) for ids in batch],
                                          skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        # tokenizers silently drops unknown ids; a wrong id is a bug upstream that should surface.
        ids, size = [int(i) for i in ids], self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= size):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise DataError(f"token id {bad} is out of range for a vocabulary of {size}")
        return ids

    def _char_table(self) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        """For a char-level tokenizer exactly as `char_level` builds it (no normalizer, every
        character its own piece): its characters' code points (sorted), their ids, and the
        added tokens' texts; else None. tokenizers' WordLevel pipeline costs ~2 µs a character
        (2 s for tiny Shakespeare's 1.1M); a table lookup costs ~30 ns."""
        if self.kind != "char":
            return None
        spec = json.loads(self._backend.to_str())
        if spec.get("normalizer") is not None or spec.get("pre_tokenizer") != _CHAR_SPLIT:
            return None
        singles = {token: i for token, i in spec["model"]["vocab"].items() if len(token) == 1}
        points = np.array(sorted(ord(c) for c in singles), dtype=np.uint32)
        ids = np.array([singles[chr(p)] for p in points], dtype=np.int64)
        added = [t["content"] for t in spec.get("added_tokens", ())]
        return points, ids, added

    def _encode_error(self, texts: Sequence[str], error: Exception) -> DataError:
        if self.kind == "char":
            vocab = self._backend.get_vocab(with_added_tokens=True)
            added = [t.content for t in self._backend.get_added_tokens_decoder().values()]
            for text in texts:
                for token in added:  # matched whole, so their own characters may be unseen
                    text = text.replace(token, "")
                unknown = next((ch for ch in text if ch not in vocab), None)
                if unknown is not None:
                    return DataError(f"character {unknown!r} (U+{ord(unknown):04X}) is not in the"
                                     f" char-level vocabulary of {self.vocab_size} tokens; build"
                                     " the tokenizer from text that contains it")
        return DataError(f"cannot encode text with this {self.kind} tokenizer: {error}")

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def check_fits(self, model_vocab_size: int, *, where: str | Path) -> None:
        """Refuse a tokenizer whose ids reach past a model's embedding table (another model's
        tokenizer): its ids would index past the table mid-run. A smaller tokenizer is fine —
        embedding tables are often padded past the vocabulary."""
        if self.vocab_size > model_vocab_size:
            raise CheckpointError(f"{where}: the tokenizer has {self.vocab_size} tokens, more "
                                  f"than the model's vocabulary of {model_vocab_size} (its "
                                  "config.json vocab_size); expected the tokenizer saved with "
                                  "the model")

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def _role_id(self, role: str) -> int | None:
        token = self._special[role]
        return None if token is None else self.token_to_id(token)

    @property
    def sentinel_ids(self) -> list[int]:
        """T5's sentinel ids in order: [id of <extra_id_0>, id of <extra_id_1>, …] (descending
        ids in T5's layout); [] for a tokenizer without them."""
        return unigram.sentinel_ids(self._backend)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of every special token (named roles and added special tokens): never masked,
        never a prediction target of masked LM."""
        ids = {i for i in (self._role_id(role) for role in ROLES) if i is not None}
        ids.update(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)
        return frozenset(ids)

    @property
    def kind(self) -> str:
        """"bpe", "char" (WordLevel joined by Fuse, as `char_level` builds it), "wordpiece" or the
        model type."""
        model = type(self._backend.model).__name__
        if model == "WordLevel" and type(self._backend.decoder).__name__ == "Fuse":
            return "char"
        return model.lower()

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer JSON: equal for identical tokenizers, different
        otherwise (e.g. to check that a dataset was tokenized by a model's tokenizer)."""
        spec = json.loads(self._backend.to_str())
        canonical = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size},"
                f" eos_token={self.eos_token!r}, pad_token={self.pad_token!r})")


class StreamDecoder:
    """Turns token ids into text one id at a time, never emitting half a character.

    Byte-level BPE can split one character's UTF-8 bytes across tokens, and some decoders depend
    on context (e.g. strip a leading space), so each id cannot be decoded alone. As
    text-generation-inference does, we decode the window of ids since the last emission point and
    emit only what extends the text already emitted, holding back text that ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window: ids since the emission point before last
        self._read = 0  # ids[:read] have been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        emitted, text = self._decode(self._ids[: self._read]), self._decode(self._ids)
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        # The ids just emitted stay in the window as context for the next one.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Return whatever is held back (even an incomplete character) and start over."""
        emitted, text = self._decode(self._ids[: self._read]), self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(emitted):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


def _specials(special_tokens: Sequence[str],
              pad_token: str | None) -> tuple[list[str], dict[str, str | None]]:
    """The special tokens to add, and their roles: as in GPT-2, one end-of-text token serves as
    bos and eos, and as pad unless a pad token is given."""
    specials = [special_tokens] if isinstance(special_tokens, str) else list(special_tokens)
    if pad_token is not None and pad_token not in specials:
        specials.append(pad_token)
    if not all(isinstance(t, str) and t for t in specials) or len(set(specials)) < len(specials):
        raise ConfigError(f"special_tokens must be distinct non-empty strings, got {specials!r}")
    end = END_OF_TEXT if END_OF_TEXT in specials else (specials[0] if specials else None)
    return specials, {"bos_token": end, "eos_token": end, "pad_token": pad_token or end}


def _training_files(files: Sequence[str | Path] | str | Path | None,
                    iterator: Iterable[str] | None) -> list[Path] | None:
    if (files is None) == (iterator is None):
        raise ConfigError("training needs exactly one of files= or iterator=")
    if files is None:
        return None
    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    if not paths:
        raise ConfigError("files= is empty; pass at least one training text file")
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: training file not found")
    return paths


def _special(token: str) -> AddedToken:
    # Not normalized: a special token is matched in the raw text, as transformers does.
    return AddedToken(token, special=True, normalized=False)


def _lookup_chars(text: str, points: np.ndarray, ids: np.ndarray, added: list[str]
                  ) -> list[int] | None:
    """`text`'s char-level ids by table lookup, or None when the backend must encode it: it
    holds an added token (matched whole there) or a character outside the vocabulary (reported
    there)."""
    if not points.size or any(token in text for token in added):
        return None
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    where = np.minimum(np.searchsorted(points, codes), len(points) - 1)
    if not np.array_equal(points[where], codes):
        return None
    return ids[where].tolist()
