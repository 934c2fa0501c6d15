"""Supervised fine-tuning of a causal LM on instructions and conversations: data, batches, loss.

An example file is JSONL in one of the formats people have, told apart by its fields:

    messages            {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}
    prompt_completion   {"prompt": ..., "completion": ...}          (plain text, no template)
    alpaca              {"instruction": ..., "input": ..., "output": ...}
    turns               {"turns": [{"speaker": "USER"|"SYSTEM", "utterance": ...}]}  (SGD),
                        the speakers mapped to roles by `speaker_roles`
    fields              any record, with `prompt_template` ("{title}\\nby {author}\\n\\n",
                        Python format fields) and `completion_field` ("text")

Conversations (messages, alpaca, turns) are rendered with the model's chat template
(lmlab.tokenizer.chat), exactly as `lmlab chat` and the server render them, so the model is
spoken to at inference as it was trained. Plain prompt/completion pairs are concatenated.

The loss covers the completion / assistant tokens only (`train_on_prompt` counts every token).
Every example ends with the EOS token, which is trained — the labels come from the trained
mask, never from `ids != pad`, so EOS is learned even where the pad token is EOS (the bug that
makes fine-tuned models never stop). Batches are length-grouped and dynamically padded, or,
with packing, several examples share a sequence with positions restarting at each example and a
block-diagonal causal mask: no token attends across examples, so each example's loss is the
same as unpacked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import ConfigError, DataError
from lmlab.tasks.batching import EpochPlan, length_sorted_batches, pad_rows, without_targets
from lmlab.tasks.classification import iter_records
from lmlab.tasks.losses import summed_cross_entropy
from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.chat import check_messages, encode_chat

log = logging.getLogger(__name__)
FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "turns", "fields")
IGNORE = -100  # the label of a position that is not trained
# Alpaca's instruction (+ input) as the user's message: the model learns the instruction in
# the chat template it will be served with.
DEFAULT_SPEAKER_ROLES = {"USER": "user", "SYSTEM": "assistant"}


@dataclass
class SFTExample:
    """One example: a conversation (messages), or a prompt and its completion as plain text."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    completion: str | None
    where: str  # "FILE line N", for errors


@dataclass
class EncodedExample:
    ids: np.ndarray  # (T,) token ids, EOS last
    labels: np.ndarray  # (T,) the next token where it is trained, else IGNORE
    where: str

    @property
    def trained(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass(frozen=True)
class DataFormat:
    """How records become examples (the recipe's config keys of the same names)."""

    format: str = "auto"
    prompt_template: str | None = None  # format "fields"
    completion_field: str | None = None  # format "fields"
    speaker_roles: dict[str, str] | None = None  # format "turns"
    system_prompt: str | None = None  # prepended to every conversation that has none
    # A conversation longer than this many messages (system aside) becomes several examples,
    # each starting at a user message, so that a long dialogue is learned whole rather than
    # truncated away at max_length.
    max_turns: int | None = None


# -- reading -------------------------------------------------------------------------------------
def detect_format(record: dict[str, Any], data: DataFormat, where: str) -> str:
    if data.format != "auto":
        return data.format
    if data.completion_field is not None:
        return "fields"
    for fmt, keys in (("messages", {"messages"}), ("prompt_completion", {"prompt", "completion"}),
                      ("alpaca", {"instruction", "output"}), ("turns", {"turns"})):
        if keys <= record.keys():
            return fmt
    raise DataError(f"{where}: cannot tell the format from the fields ({', '.join(record)}); "
                    "expected messages, prompt + completion, instruction + output (Alpaca) or "
                    "turns — or set completion_field and prompt_template")


def _field(record: dict[str, Any], name: str, where: str, *, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: missing field '{name}' (a string; fields: "
                        f"{', '.join(record)})" if value is None else
                        f"{where}: field '{name}' must be a string, got {value!r:.60}")
    return value


def to_example(record: dict[str, Any], fmt: str, data: DataFormat, where: str) -> SFTExample:
    if fmt == "messages":
        messages = check_messages(record.get("messages"), where)
    elif fmt == "prompt_completion":
        return SFTExample(None, _field(record, "prompt", where),
                          _field(record, "completion", where), where)
    elif fmt == "alpaca":
        instruction = _field(record, "instruction", where)
        extra = _field(record, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _field(record, "output", where)}]
    elif fmt == "turns":
        messages = _turns(record, data.speaker_roles or DEFAULT_SPEAKER_ROLES, where)
    elif fmt == "fields":
        if data.completion_field is None:
            raise ConfigError("format 'fields' needs completion_field (and prompt_template)")
        try:
            prompt = (data.prompt_template or "").format_map(record)
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"{where}: prompt_template {data.prompt_template!r} cannot be "
                            f"filled ({err!r}; fields: {', '.join(record)})") from None
        return SFTExample(None, prompt, _field(record, data.completion_field, where), where)
    else:
        raise ConfigError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if data.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data.system_prompt}, *messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message; nothing to train on")
    return SFTExample(messages, None, None, where)


def _turns(record: dict[str, Any], roles: dict[str, str], where: str) -> list[dict[str, str]]:
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'turns' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("speaker") if isinstance(turn, dict) else None
        if speaker not in roles:
            raise DataError(f"{where}: turn {i} has speaker {speaker!r}; expected one of "
                            f"{', '.join(roles)} (set speaker_roles)")
        messages.append({"role": roles[speaker], "content": _field(turn, "utterance", where)})
    return check_messages(messages, where)


def split_conversation(example: SFTExample, max_turns: int) -> list[SFTExample]:
    """Consecutive pieces of at most `max_turns` messages, each starting at a user message and
    ending with an assistant reply (so no reply is cut off from its question); the system
    message, if any, heads every piece."""
    messages = example.messages
    system = [messages[0]] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    pieces, start = [], 0
    while start < len(rest):
        window = range(start, min(start + max_turns, len(rest)))
        last = max((i for i in window if rest[i]["role"] == "assistant"), default=None)
        if last is not None:
            pieces.append(SFTExample(system + rest[start:last + 1], None, None,
                                     f"{example.where} (messages {start + 1}-{last + 1})"))
        start = window.stop if last is None else last + 1
        while start < len(rest) and rest[start]["role"] != "user":
            start += 1
    return pieces


def read_examples(paths: str | Path | Sequence[str | Path],
                  data: DataFormat = DataFormat()) -> list[SFTExample]:
    """The examples of one JSONL file or several (concatenated, in order); a record without
    the expected fields is a DataError naming the file and line."""
    if data.format not in FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(FORMATS)}, got {data.format!r}")
    if data.max_turns is not None and data.max_turns < 2:
        raise ConfigError(f"max_turns must be at least 2 (a user message and a reply), got "
                          f"{data.max_turns}")
    examples = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path, found = Path(path), 0
        for number, record in iter_records(path, "jsonl"):
            where = f"{path} line {number}"
            example = to_example(record, detect_format(record, data, where), data, where)
            pieces = [example]
            if data.max_turns is not None and example.messages is not None:
                pieces = split_conversation(example, data.max_turns)
            examples.extend(pieces)
            found += 1
        if not found:
            raise DataError(f"{path}: no examples")
    return examples


# -- encoding ------------------------------------------------------------------------------------
def encode_example(tokenizer: Tokenizer, example: SFTExample, *, max_length: int,
                   train_on_prompt: bool = False, template: str | None = None) -> EncodedExample:
    """Token ids and next-token labels of one example: the completion / assistant tokens (every
    token with `train_on_prompt`) and the final EOS are trained. Truncated to `max_length` from
    the end; a prompt that fills the whole context leaves nothing to train, an error."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; SFT ends every example with one")
    if example.messages is not None:
        chat = encode_chat(tokenizer, example.messages, template=template, where=example.where)
        ids, trained = list(chat.ids), list(chat.trained)
        ends_with_reply = example.messages[-1]["role"] == "assistant"
    else:
        prompt, completion = tokenizer.encode(example.prompt), tokenizer.encode(example.completion)
        ids, trained = prompt + completion, [False] * len(prompt) + [True] * len(completion)
        ends_with_reply = True
    if not ids or ids[-1] != eos:  # the template may close replies with EOS itself
        ids.append(eos)
        trained.append(ends_with_reply)
    elif ends_with_reply:
        trained[-1] = True
    if train_on_prompt:
        trained = [True] * len(ids)
    prompt_length = trained.index(True) if True in trained else len(ids)
    ids, trained = ids[:max_length], trained[:max_length]
    ids_array = np.asarray(ids, dtype=np.int64)
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    # Position t predicts token t+1: its label is that token where the token is trained. The
    # last position predicts nothing (across packed examples too).
    targets = np.asarray(trained[1:], dtype=bool)
    labels[:-1][targets] = ids_array[1:][targets]
    encoded = EncodedExample(ids=ids_array, labels=labels, where=example.where)
    if encoded.trained == 0:
        raise PromptTooLong(f"{example.where}: the prompt is {prompt_length} tokens and fills "
                            f"the whole context (max_length {max_length}), leaving no token to "
                            "train; raise max_length, shorten the example, or set "
                            "drop_long_prompts: true")
    return encoded


class PromptTooLong(DataError):
    """An example whose prompt leaves no room in max_length for a trained token."""


def encode_examples(tokenizer: Tokenizer, examples: Sequence[SFTExample], *, max_length: int,
                    train_on_prompt: bool = False, template: str | None = None,
                    drop_long_prompts: bool = False) -> list[EncodedExample]:
    """Every example encoded; with `drop_long_prompts`, those whose prompt fills the context
    are left out (and counted in the log) instead of stopping the run."""
    encoded, dropped = [], []
    for example in examples:
        try:
            encoded.append(encode_example(tokenizer, example, max_length=max_length,
                                          train_on_prompt=train_on_prompt, template=template))
        except PromptTooLong:
            if not drop_long_prompts:
                raise
            dropped.append(example.where)
    if dropped:
        log.warning("dropped %d of %d examples whose prompt fills max_length %d (first: %s)",
                    len(dropped), len(examples), max_length, dropped[0])
    if not encoded:
        raise DataError(f"{examples[0].where if examples else 'data'}: every example's prompt "
                        f"fills max_length {max_length}; nothing to train")
    return encoded


def show_masks(tokenizer: Tokenizer, encoded: Sequence[EncodedExample]) -> str:
    """The examples as text with the trained tokens between ⟦ and ⟧ — what the loss sees."""
    parts = []
    for example in encoded:
        ids, trained = example.ids, np.r_[False, example.labels[:-1] != IGNORE]
        pieces, run, state = [], [], False
        for token, flag in zip(ids.tolist(), trained.tolist()):
            if flag != state and run:
                text = tokenizer.decode(run)
                pieces.append(f"⟦{text}⟧" if state else text)
                run = []
            state = flag
            run.append(token)
        if run:
            text = tokenizer.decode(run)
            pieces.append(f"⟦{text}⟧" if state else text)
        parts.append(f"--- {example.where}: {len(ids)} tokens, {example.trained} trained\n"
                     + "".join(pieces))
    return "\n".join(parts)


# -- packing ---------------------------------------------------------------------------------------
@dataclass
class Packed:
    """Examples laid end to end in sequences of at most `max_length` tokens."""

    sequences: list[list[int]]  # per sequence, the indices of its examples in order

    def lengths(self, examples: Sequence[EncodedExample]) -> np.ndarray:
        return np.array([sum(len(examples[i].ids) for i in seq) for seq in self.sequences])


def pack(examples: Sequence[EncodedExample], max_length: int) -> Packed:
    """First-fit decreasing: longest examples first, each into the first sequence with room —
    examples are never split, and sequences come out nearly full."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    sequences: list[list[int]] = []
    room: list[int] = []
    for i in order:
        size = len(examples[i].ids)
        slot = next((s for s, free in enumerate(room) if free >= size), None)
        if slot is None:
            sequences.append([i])
            room.append(max_length - size)
        else:
            sequences[slot].append(i)
            room[slot] -= size
    return Packed(sequences)


# -- batches -------------------------------------------------------------------------------------
def collate(examples: Sequence[EncodedExample], groups: Sequence[Sequence[int]], *, pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """A right-padded batch: each row is one group of examples (one example unpacked). Padding
    has label IGNORE; causal attention keeps it from affecting real tokens. A row of several
    examples gets `document_ids` (which example each token is in) and positions restarting at
    each example."""
    ids = [np.concatenate([examples[i].ids for i in g]) for g in groups]
    labels = [np.concatenate([examples[i].labels for i in g]) for g in groups]
    batch = {"input_ids": pad_rows(ids, pad_id).to(device),
             "labels": pad_rows(labels, IGNORE).to(device)}
    if any(len(g) > 1 for g in groups):
        documents = [np.concatenate([np.full(len(examples[i].ids), d) for d, i in enumerate(g)])
                     for g in groups]
        positions = [np.concatenate([np.arange(len(examples[i].ids)) for i in g]) for g in groups]
        # Padding is a document of its own (-1), so it never joins the last example.
        batch["document_ids"] = pad_rows(documents, -1).to(device)
        batch["positions"] = pad_rows(positions, 0).to(device)
    return batch


def summed_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the trained positions only."""
    logits = model(batch["input_ids"], positions=batch.get("positions"),
                   document_ids=batch.get("document_ids"))
    labels = batch["labels"]
    keep = labels != IGNORE
    return summed_cross_entropy(logits[keep].float(), labels[keep])


class SFTTask:
    """Causal-LM loss on the trained tokens of instruction / conversation examples; evaluation
    = loss and perplexity per trained token over the whole validation file."""

    def __init__(self, *, train: Sequence[EncodedExample], val: Sequence[EncodedExample] | None,
                 batch_size: int, grad_accum: int = 1, seed: int, device: torch.device,
                 pad_id: int, max_length: int, packing: bool = False,
                 group_by_length: bool = True, eval_batch_size: int = 32, rank: int = 0,
                 world_size: int = 1):
        self.train, self.val = list(train), list(val or [])
        self.device, self.pad_id, self.eval_batch_size = device, pad_id, eval_batch_size
        self.groups = (pack(self.train, max_length).sequences if packing
                       else [[i] for i in range(len(self.train))])
        lengths = [sum(len(self.train[i].ids) for i in g) for g in self.groups]
        self.plan = EpochPlan(lengths, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                              group_by_length=group_by_length, rank=rank, world_size=world_size)

    @property
    def tokens_per_epoch(self) -> int:
        return int(sum(len(e.ids) for e in self.train))

    def train_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        def batch(rows):
            return collate(self.train, [self.groups[r] for r in rows], pad_id=self.pad_id,
                           device=self.device)

        shares = self.plan.micro_batches(step)
        return ([batch(rows) for rows in shares] if shares  # all labels IGNORE: no targets
                else [without_targets(batch(self.plan.stand_in(step)), ["labels"])])

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(model, batch)

    @torch.inference_mode()
    def evaluate(self, model, *, final: bool = False) -> dict[str, float]:
        if not self.val:
            return {}
        return evaluate_loss(model, self.val, batch_size=self.eval_batch_size,
                             pad_id=self.pad_id, device=self.device)


@torch.inference_mode()
def evaluate_loss(model, examples: Sequence[EncodedExample], *, batch_size: int, pad_id: int,
                  device: torch.device, prefix: str = "val_") -> dict[str, float]:
    """Mean loss per trained token over `examples` (each alone, longest first) and its
    perplexity."""
    total, count = 0.0, 0
    for rows in length_sorted_batches([len(e.ids) for e in examples], batch_size):
        batch = collate(examples, [[int(r)] for r in rows], pad_id=pad_id, device=device)
        total += float(summed_loss(model, batch))
        count += int((batch["labels"] != IGNORE).sum())
    loss = total / max(count, 1)
    return {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50.0)),
            f"{prefix}tokens": float(count)}
