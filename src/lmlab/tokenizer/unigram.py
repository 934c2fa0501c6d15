"""T5's SentencePiece Unigram tokenizer on a `tokenizers.Tokenizer`: train it, lay it out as T5's
vocabulary, read a SentencePiece `spiece.model`.

The layout is T5's, so that transformers' `T5Tokenizer` reads the files unchanged: `<pad>`=0,
`</s>`=1, `<unk>`=2, the learnt pieces, any extra special tokens (language tags such as `<2de>`),
then the sentinels in reverse, `<extra_id_{N-1}>` … `<extra_id_0>`, so that the last id is
`<extra_id_0>`. The pipeline is the one T5's tokenizer.json holds — and the one transformers'
`T5Tokenizer` rebuilds whatever a tokenizer.json says, keeping only its vocabulary, its
post-processor and a `Precompiled` normalizer: SentencePiece's `nmt_nfkc` normalization as a
precompiled char map, `WhitespaceSplit` then `Metaspace` ("▁" before every word), the `Metaspace`
decoder, and `$A </s>` (`$A </s> $B </s>` for pairs) when special tokens are added.

`sentencepiece` (and the protobuf module it reads its files with) is imported only to get the
`nmt_nfkc` char map and to read `spiece.model`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmlab.errors import CheckpointError, ConfigError, DataError

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
T5_ROLES = {"pad": PAD, "eos": EOS, "unk": UNK}  # at ids 0, 1, 2, as in T5
SPM_FILE = "spiece.model"
DEFAULT_EXTRA_IDS = 100  # T5's sentinels, and transformers' T5Tokenizer default
_SENTINEL_PREFIX = "<extra_id_"
logger = logging.getLogger(__name__)


def sentinel(i: int) -> str:
    return f"{_SENTINEL_PREFIX}{i}>"


def sentinel_ids(backend: Backend) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, … (consecutive from 0) that are in the vocabulary."""
    ids: list[int] = []
    while (i := backend.token_to_id(sentinel(len(ids)))) is not None:
        ids.append(i)
    return ids


def is_t5_layout(backend: Backend) -> bool:
    """A Unigram vocabulary that starts `<pad>` `</s>` `<unk>` as T5's (and mT5's) does."""
    return type(backend.model).__name__ == "Unigram" and all(
        backend.token_to_id(token) == i for i, token in enumerate(T5_ROLES.values()))


def is_t5(backend: Backend) -> bool:
    """T5's layout and T5's pipeline (normalization by a precompiled char map, or none): what
    transformers' T5Tokenizer rebuilds from the files exactly, so they can name that class."""
    spec, t5 = json.loads(backend.to_str()), json.loads(t5_pipeline(Backend(models.Unigram()),
                                                                     None).to_str())
    return is_t5_layout(backend) and spec["pre_tokenizer"] == t5["pre_tokenizer"] \
        and spec["decoder"] == t5["decoder"] \
        and (spec["normalizer"] or {}).get("type", "Precompiled") == "Precompiled"


@functools.cache
def nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's `nmt_nfkc` rule (NFKC plus whitespace and control-character clean-up), the
    normalization T5 was trained with, as the precompiled char map `normalizers.Precompiled`
    takes."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    spec = sentencepiece_model_pb2.NormalizerSpec()
    spec.ParseFromString(sentencepiece.SentencePieceNormalizer(
        rule_name="nmt_nfkc").serialized_normalizer_spec())
    return spec.precompiled_charsmap


def t5_pipeline(backend: Backend, charsmap: bytes | None) -> Backend:
    """Set T5's normalizer, pre-tokenizer and decoder on `backend` (the post-processor needs `</s>`
    in the vocabulary: `t5_post_processor`)."""
    backend.normalizer = normalizers.Precompiled(charsmap) if charsmap else None
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return backend


def t5_post_processor(backend: Backend) -> Backend:
    """`$A </s>` (and `$A </s> $B </s>`) when special tokens are added, as T5TokenizerFast."""
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", EOS], pair=["$A", EOS, "$B", EOS],
        special_tokens=[(EOS, backend.token_to_id(EOS))])
    return backend


def with_t5_specials(backend: Backend, pieces: Sequence[tuple[str, float]], *, unk_id: int,
                     extra_special_tokens: Sequence[str], extra_ids: int) -> Backend:
    """Rebuild `backend`'s model from `pieces` + the extra special tokens + the sentinels in
    reverse (score 0, as transformers' T5 converter gives them), and make them special."""
    extras = [*extra_special_tokens, *(sentinel(i) for i in range(extra_ids - 1, -1, -1))]
    clash = sorted(set(extras) & {piece for piece, _ in pieces})
    if clash:
        raise ConfigError(f"extra special tokens {clash} are already pieces of the vocabulary")
    backend.model = models.Unigram([*map(tuple, pieces), *((t, 0.0) for t in extras)],
                                   unk_id=unk_id, byte_fallback=False)
    specials = [piece for piece, _ in pieces if piece in T5_ROLES.values()]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in [*specials, *extras]])
    # tokenizer.json's reader rounds some scores in their last bit: read once, they then stay as
    # they are, so the saved and reloaded tokenizer has the same fingerprint.
    return Backend.from_str(t5_post_processor(backend).to_str())


def check_training(*, vocab_size: int, extra_special_tokens: Sequence[str], extra_ids: int,
                   max_piece_length: int) -> None:
    """Refuse arguments of `Tokenizer.train_unigram` that cannot give a T5 vocabulary."""
    if not isinstance(extra_ids, int) or isinstance(extra_ids, bool) or extra_ids < 0:
        raise ConfigError(f"extra_ids must be an int >= 0, got {extra_ids!r}")
    extras = list(extra_special_tokens)
    reserved = {*T5_ROLES.values(), *(sentinel(i) for i in range(extra_ids))}
    if isinstance(extra_special_tokens, str) or not all(isinstance(t, str) and t for t in extras) \
            or len(set(extras)) < len(extras) or reserved & set(extras):
        raise ConfigError("extra_special_tokens must be distinct non-empty strings other than"
                          f" <pad> </s> <unk> and the sentinels, got {extra_special_tokens!r}")
    smallest = len(T5_ROLES) + 1 + extra_ids + len(extras)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < smallest:
        raise ConfigError(f"vocab_size must be an int of at least {smallest} (<pad> </s> <unk>,"
                          f" {extra_ids} sentinels, {len(extras)} extra special tokens and the"
                          f" pieces), got {vocab_size!r}")
    if not isinstance(max_piece_length, int) or max_piece_length < 1:
        raise ConfigError(f"max_piece_length must be an int >= 1, got {max_piece_length!r}")


def train_backend(paths: Sequence[Path] | None, iterator: Iterable[str] | None, *,
                  vocab_size: int, extra_special_tokens: Sequence[str], extra_ids: int,
                  max_piece_length: int, show_progress: bool) -> Backend:
    """Train `vocab_size` tokens' worth of Unigram pieces (less the sentinels and extra special
    tokens) on normalized text, then lay them out as T5's vocabulary. Like SentencePiece, a
    corpus with fewer distinct pieces gives a smaller vocabulary (the sentinels still end it).

    Raises whatever `tokenizers` raises; the caller names the input at fault."""
    backend = t5_pipeline(Backend(models.Unigram()), nmt_nfkc_charsmap())
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - extra_ids - len(extra_special_tokens),
        special_tokens=list(T5_ROLES.values()), unk_token=UNK,
        max_piece_length=max_piece_length, show_progress=show_progress)
    if paths is not None:
        backend.train([str(p) for p in paths], trainer=trainer)
    else:
        backend.train_from_iterator(iterator, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    if len(model["vocab"]) < trainer.vocab_size:
        logger.warning("the training text gives %d Unigram pieces, not the %d asked for: the"
                       " vocabulary has %d tokens", len(model["vocab"]), trainer.vocab_size,
                       len(model["vocab"]) + extra_ids + len(extra_special_tokens))
    return with_t5_specials(backend, model["vocab"], unk_id=model["unk_id"],
                            extra_special_tokens=extra_special_tokens, extra_ids=extra_ids)


def extra_ids_of(config: dict[str, Any], additional: Sequence[str], where: Path) -> int | None:
    """The number of sentinels tokenizer_config.json asks for: `extra_ids`, else the count of
    `<extra_id_…>` tokens among its additional special tokens, else None (not said). Both given
    must agree, as transformers' T5Tokenizer requires."""
    named = sum(token.startswith(_SENTINEL_PREFIX) for token in additional)
    extra_ids = config.get("extra_ids")
    if extra_ids is None:
        return named or None
    if not isinstance(extra_ids, int) or isinstance(extra_ids, bool) or extra_ids < 0:
        raise CheckpointError(f"{where}: extra_ids must be an int >= 0, got {extra_ids!r}")
    if named and extra_ids and named != extra_ids:
        raise CheckpointError(f"{where}: extra_ids is {extra_ids} but additional_special_tokens"
                              f" names {named} <extra_id_…> tokens; they must agree")
    return extra_ids


def check_sentinels(backend: Backend, expected: int | None, where: Path) -> None:
    found = len(sentinel_ids(backend))
    if expected is not None and expected != found:
        raise CheckpointError(f"{where}: extra_ids is {expected} but the vocabulary has {found}"
                              " sentinels <extra_id_0>…; expected the tokenizer_config.json saved"
                              " with this tokenizer")


def load_spiece(directory: Path, extra_ids: int | None) -> Backend:
    """A T5 tokenizer from SentencePiece's `spiece.model` as transformers' T5Tokenizer converts
    it: its pieces and scores, `extra_ids` sentinels (default 100) appended in reverse, its
    precompiled normalization, and T5's pipeline."""
    path = directory / SPM_FILE
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # pragma: no cover - a dependency of lmlab
        raise CheckpointError(f"{path}: reading spiece.model needs the sentencepiece and protobuf"
                              " packages") from error
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf's DecodeError, or a file it cannot read
        raise CheckpointError(f"{path}: not a SentencePiece model ({error})") from error
    kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    if kind != "UNIGRAM":
        raise CheckpointError(f"{path}: a SentencePiece {kind} model; only Unigram models (T5's)"
                              " can be read")
    pieces = [(piece.piece, piece.score) for piece in proto.pieces]
    if not pieces:
        raise CheckpointError(f"{path}: the SentencePiece model has no pieces")
    backend = t5_pipeline(Backend(models.Unigram()),
                          proto.normalizer_spec.precompiled_charsmap or None)
    return with_t5_specials(backend, pieces, unk_id=proto.trainer_spec.unk_id,
                            extra_special_tokens=(),
                            extra_ids=DEFAULT_EXTRA_IDS if extra_ids is None else extra_ids)


def jsonl_texts(path: str | Path, fields: Sequence[str]) -> Iterator[str]:
    """The `fields` of every record of a JSONL file, in order: the text of both sides of a
    translation pairs file, to train one vocabulary shared by source and target, e.g.
    `Tokenizer.train_unigram(iterator=jsonl_texts("train.jsonl", ["en", "de"]), vocab_size=8000)`.
    A missing field, a non-string value or a line that is not JSON is a DataError naming the
    line."""
    path = Path(path)
    if isinstance(fields, str) or not fields:
        raise ConfigError(f"fields must be a non-empty list of field names, got {fields!r}")
    if not path.is_file():
        raise DataError(f"{path}: training file not found")
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DataError(f"{path} line {number}: not a UTF-8 JSON record"
                                f" ({error})") from error
            for field in fields:
                value = record.get(field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise DataError(f"{path} line {number}: missing string field {field!r}")
                yield value
