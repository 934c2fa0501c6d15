"""The Hugging Face files of a tokenizer: reading tokenizer.json, GPT-2's vocab.json +
merges.txt, BERT's vocab.txt or T5's spiece.model, and tokenizer_config.json with its special
tokens, chat templates (in the config or in transformers 5's .jinja files) and every other key,
so that what lmlab writes back is what transformers' AutoTokenizer reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors

from lmlab.errors import CheckpointError, DataError
from lmlab.tokenizer import unigram, wordpiece

END_OF_TEXT = "<|endoftext|>"
ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
# transformers writes this VERY_LARGE_INTEGER to mean "no known maximum length".
NO_MAX_LENGTH = int(1e30)
# tokenizer_config.json keys written from the Tokenizer's state; every other key read from the
# file is kept in `extra_config` and written back as it was, so that nothing is silently dropped.
MANAGED_KEYS = {f"{role}_token" for role in ROLES} | {
    "tokenizer_class", "model_max_length", "chat_template"}
# Where transformers 5 writes chat templates; these files take priority over the config's key.
CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"


def byte_level(backend: Backend) -> Backend:
    """GPT-2's pipeline: bytes mapped to printable characters, no prefix space, offsets kept."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def read_text(path: Path) -> str:
    try:  # bytes, not read_text(): universal newlines would turn "\r\n" into "\n"
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error


def load_tokenizer_json(path: Path) -> Backend:
    try:
        return Backend.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({error})") from error


def load_directory(directory: Path, config: dict[str, Any]) -> Backend:
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer_json(directory / "tokenizer.json")
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not vocab.is_file() and not merges.is_file():
        if (directory / "vocab.txt").is_file():
            return wordpiece.load_vocab_txt(directory, config)
        if (directory / unigram.SPM_FILE).is_file():
            where = directory / "tokenizer_config.json"
            additional = read_additional(config, where)[1]
            return unigram.load_spiece(directory, unigram.extra_ids_of(config, additional, where))
        raise CheckpointError(f"{directory}: no tokenizer found; expected tokenizer.json,"
                              " GPT-2's vocab.json + merges.txt, BERT's vocab.txt or T5's"
                              " spiece.model")
    for required in (vocab, merges):
        if not required.is_file():
            raise CheckpointError(f"{required}: not found; GPT-2 tokenizers need vocab.json +"
                                  " merges.txt")
    try:  # BPE's defaults are the settings transformers' GPT2TokenizerFast uses for these files
        return byte_level(Backend(models.BPE.from_file(str(vocab), str(merges))))
    except Exception as error:
        raise CheckpointError(f"{directory}: cannot read vocab.json + merges.txt"
                              f" ({error})") from error


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_additional(config: dict[str, Any], where: Path) -> tuple[str, list[str]]:
    """(the key, the tokens) of additional_special_tokens, which transformers 5 names
    extra_special_tokens (a dict there names model-specific tokens: an extra key, kept as is)."""
    key = "additional_special_tokens"
    if key not in config and isinstance(config.get("extra_special_tokens"), list):
        key = "extra_special_tokens"
    value = config.get(key) or []
    tokens = [t.get("content") if isinstance(t, dict) else t for t in value] \
        if isinstance(value, list) else [None]
    if not all(isinstance(t, str) and t for t in tokens):
        raise CheckpointError(f"{where}: {key} must be a list of strings or {{'content': ...}}"
                              f" objects, got {value!r:.80}")
    return key, tokens


def is_chat_template(value: Any) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str) for t in value))


def read_chat_template(directory: Path, config: dict[str, Any]) -> str | list | None:
    """The config's chat_template, unless transformers 5's template files are there: as in
    transformers, they take priority, and several become its [{"name", "template"}] list."""
    paths = {"default": directory / CHAT_TEMPLATE_FILE,
             **{p.stem: p for p in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))}}
    found = {name: read_text(path) for name, path in paths.items() if path.is_file()}
    if found:
        return found["default"] if list(found) == ["default"] else [
            {"name": name, "template": template} for name, template in found.items()]
    template = config.get("chat_template")
    if not is_chat_template(template):
        raise CheckpointError(f"{directory / 'tokenizer_config.json'}: chat_template must be a"
                              " string or a list of {'name': ..., 'template': ...} objects, got"
                              f" {template!r:.80}")
    return template


def remove_chat_template_files(directory: Path) -> None:
    # transformers 5 would read a stale chat_template.jinja instead of tokenizer_config.json's
    # chat_template: the directory must describe this tokenizer alone.
    stale = [directory / CHAT_TEMPLATE_FILE, *(directory / CHAT_TEMPLATE_DIR).glob("*.jinja")]
    for path in stale:
        path.unlink(missing_ok=True)


def read_roles(config: dict[str, Any], backend: Backend,
               directory: Path) -> dict[str, str | None]:
    """`{role}_token` from the configs (a string, null or an AddedToken dict); a role they do not
    name defaults, as for GPT-2's bare files, to <|endoftext|> (bos/eos/pad) when it is in the
    vocabulary, and for a WordPiece vocabulary to BERT's [PAD] [UNK] [CLS] [SEP] [MASK]."""
    defaults: dict[str, str] = {}
    if backend.token_to_id(END_OF_TEXT) is not None:
        defaults.update(bos=END_OF_TEXT, eos=END_OF_TEXT, pad=END_OF_TEXT)
    if type(backend.model).__name__ == "WordPiece":
        defaults.update({role: token for role, token in wordpiece.BERT_SPECIALS.items()
                         if backend.token_to_id(token) is not None})
    if unigram.is_t5_layout(backend):
        defaults.update(unigram.T5_ROLES)
    roles: dict[str, str | None] = {}
    for role in ROLES:
        key = f"{role}_token"
        value = config.get(key)
        if key not in config:
            value = defaults.get(role)
        elif isinstance(value, dict) and isinstance(value.get("content"), str):
            value = value["content"]
        elif value is not None and not isinstance(value, str):
            raise CheckpointError(f"{directory}: {key} must be a string or a {{'content': ...}}"
                                  f" object, got {value!r}")
        roles[key] = value
    return roles
