"""Masked language modelling, optionally with next-sentence prediction: BERT's pretraining.

Examples come from a prepared token stream (`lmlab.data.segments`): with NSP a `[CLS] A [SEP] B
[SEP]` segment pair, else a `[CLS] window [SEP]` of block_size - 2 tokens; each is masked as BERT
does (`lmlab.data.masking`). Masking is dynamic — drawn anew every step, as RoBERTa showed is
better than BERT's fixed copies — and every example is a pure function of (seed, step, its row
in the global batch): a resumed run sees exactly the same batches, and N ranks together see the
batch one process would. Validation uses one fixed masking (its own seed), so evaluations are
comparable across steps and across runs.

Loss normalisation. The loop divides the summed loss of a step's micro-batches by the total of
`num_targets` over them (and over ranks). BERT's objective is mean MLM loss over the masked
tokens + mean NSP loss over the pairs. So `num_targets` is the number of masked tokens M, and
the task returns `sum MLM CE + (M / P) * sum NSP CE`, with M and P (pairs) counted over the
whole step — every micro-batch of every rank, M all-reduced when torch.distributed is running.
Divided by M that is exactly mean MLM + mean NSP for the step's whole batch, however it is split
into micro-batches or ranks (a per-micro-batch M/P would weight NSP by each micro-batch's masked
count instead).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.masking import IGNORE_INDEX, MaskingSpec, mask_sequence
from lmlab.data.segments import Documents, mlm_window, nsp_pair, pack
from lmlab.errors import ConfigError, DataError
from lmlab.tasks.batching import to_device
from lmlab.tasks.losses import summed_cross_entropy

log = logging.getLogger(__name__)
EVAL_SEED = 20_190_524  # validation masking: fixed, and the same for every run
_TRAIN, _EVAL = 1, 2  # keep the training and validation random streams apart


class MaskedLMTask:
    def __init__(
        self,
        *,
        tokenizer,
        train_tokens: np.ndarray,
        train_doc_ends: np.ndarray | None,
        val_tokens: np.ndarray | None,
        val_doc_ends: np.ndarray | None,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device,
        nsp: bool = True,
        mask_prob: float = 0.15,
        whole_word: bool = False,
        grad_accum: int = 1,
        eval_tokens: int | None = None,
        eval_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if block_size < 5:
            raise ConfigError(f"block_size must be >= 5 for [CLS] A [SEP] B [SEP], got {block_size}")
        ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("cls", "sep", "pad")}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"masked LM needs {', '.join(f'[{m.upper()}]' for m in missing)} in the"
                              f" tokenizer; this {tokenizer.kind} tokenizer has none (use"
                              " tokenizer: wordpiece or a BERT directory)")
        self.cls_id, self.sep_id, self.pad_id = ids["cls"], ids["sep"], ids["pad"]
        self.spec = MaskingSpec.from_tokenizer(tokenizer, mask_prob=mask_prob,
                                               whole_word=whole_word)
        self.nsp = nsp
        self.train = self._source(train_tokens, train_doc_ends, "train", required=True)
        self.val = None if val_tokens is None else self._source(val_tokens, val_doc_ends, "val",
                                                                 required=False)
        self.block_size, self.batch_size, self.grad_accum = block_size, batch_size, grad_accum
        self.seed, self.device = seed, device
        self.eval_tokens = eval_tokens
        self.eval_batch_size = eval_batch_size or max(batch_size, 32)
        self.rank, self.world_size = rank, world_size
        self._eval_cache: dict[int, list[dict]] = {}

    def _source(self, tokens: np.ndarray, ends: np.ndarray | None, split: str,
                *, required: bool) -> Documents | np.ndarray:
        """NSP needs the document index (and two documents); plain MLM only the stream."""
        if not self.nsp:
            return tokens
        if ends is None:
            raise DataError(f"next-sentence prediction needs the {split} split's document index;"
                            " the dataset was prepared before it existed: run `lmlab prepare`"
                            " again")
        docs = Documents(tokens, np.asarray(ends))
        if docs.largest == len(tokens):
            if required:
                raise DataError(f"next-sentence prediction needs at least 2 documents in the"
                                f" {split} split, found 1; give more files or JSONL lines")
            log.warning("the %s split has one document: NSP is not evaluated, only MLM", split)
            return tokens
        return docs

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size * self.world_size

    # -- examples ------------------------------------------------------------------------------
    def _example(self, source: Documents | np.ndarray, rng: np.random.Generator,
                 window: np.ndarray | None = None) -> dict[str, np.ndarray | int]:
        """One masked example; a segment pair when `source` has documents, else a window."""
        if isinstance(source, Documents):
            a, b, label = nsp_pair(source, rng, self.block_size - 3)
        else:
            a, b, label = (mlm_window(source, rng, self.block_size - 2) if window is None
                           else window), None, -1
        ids, types, attention = pack(a, b, cls_id=self.cls_id, sep_id=self.sep_id,
                                     pad_id=self.pad_id, length=self.block_size)
        inputs, labels = mask_sequence(ids, rng, self.spec)
        return {"input_ids": inputs, "token_type_ids": types, "attention_mask": attention,
                "labels": labels, "next_sentence_label": label}

    def _collate(self, rows: list[dict], nsp_weight: float) -> dict:
        used = max(int(r["attention_mask"].sum()) for r in rows)  # drop all-padding columns
        batch = {key: to_device(torch.from_numpy(np.stack([r[key][:used] for r in rows])),
                                self.device)
                 for key in ("input_ids", "token_type_ids", "attention_mask", "labels")}
        labels = np.array([r["next_sentence_label"] for r in rows])
        if (labels >= 0).all():
            batch["next_sentence_label"] = torch.from_numpy(labels).to(self.device)
        batch["num_masked"] = int(sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in rows))
        batch["nsp_weight"] = nsp_weight
        return batch

    def train_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of the global batch of `step`: row g of the global batch is
        drawn from a generator seeded with (seed, step, g) alone."""
        per_rank = self.batch_size * self.grad_accum
        first = self.rank * per_rank
        rows = [self._example(self.train, np.random.default_rng([self.seed, step, _TRAIN, g]))
                for g in range(first, first + per_rank)]
        weight = self._nsp_weight(rows) if self.nsp else 0.0
        return [self._collate(rows[i:i + self.batch_size], weight)
                for i in range(0, per_rank, self.batch_size)]

    def _nsp_weight(self, rows: list[dict]) -> float:
        """M / P: masked tokens per pair over the whole step, every rank included."""
        masked = torch.tensor(float(sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in rows)))
        if self.world_size > 1 and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            masked = masked.to(self.device)
            torch.distributed.all_reduce(masked)
        return float(masked) / (len(rows) * self.world_size)

    def num_targets(self, batch: dict) -> int:
        return batch["num_masked"]

    # -- loss ----------------------------------------------------------------------------------
    def _logits(self, model, batch: dict, masked: torch.Tensor):
        """(MLM logits at the masked positions, NSP logits or None). The model scores only the
        ~15% masked positions — the (T × vocab) output product is the largest matmul of a small
        BERT — and is called through its forward, so that DDP / FSDP / torch.compile wrappers
        keep gradients in sync."""
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"], masked=masked)
        return out if isinstance(out, tuple) else (out, None)

    def _losses(self, model, batch: dict):
        labels = batch["labels"]
        masked = labels != IGNORE_INDEX
        mlm_logits, nsp_logits = self._logits(model, batch, masked)
        mlm = summed_cross_entropy(mlm_logits.float(), labels[masked])
        if "next_sentence_label" not in batch:
            return mlm, mlm_logits, labels[masked], None
        if nsp_logits is None:
            raise ConfigError("objective mlm+nsp needs a model with a next-sentence head"
                              " (BertForPreTraining), got a masked-LM-only model")
        nsp = F.cross_entropy(nsp_logits.float(), batch["next_sentence_label"], reduction="sum")
        return mlm, mlm_logits, labels[masked], (nsp, nsp_logits)

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Summed MLM cross-entropy + (M / P) × summed NSP cross-entropy (see the module doc)."""
        mlm, _, _, nsp = self._losses(model, batch)
        return mlm if nsp is None else mlm + batch["nsp_weight"] * nsp[0]

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_batches(self, rows: int) -> list[dict]:
        """The first `rows` validation examples under the fixed masking (built once)."""
        if rows not in self._eval_cache:
            span = self.block_size - 2
            examples = []
            for i in range(rows):
                rng = np.random.default_rng([EVAL_SEED, _EVAL, i])
                # Without NSP: consecutive windows, so the split is covered exactly once.
                window = (None if isinstance(self.val, Documents)
                          else np.asarray(self.val[i * span:(i + 1) * span], dtype=np.int64))
                examples.append(self._example(self.val, rng, window))
            self._eval_cache = {rows: [self._collate(examples[i:i + self.eval_batch_size], 0.0)
                                       for i in range(0, rows, self.eval_batch_size)]}
        return self._eval_cache[rows]

    @torch.inference_mode()
    def evaluate(self, model, *, final: bool = False) -> dict[str, float]:
        """MLM loss / perplexity / accuracy at the masked tokens, and NSP loss / accuracy, on
        the validation split: its first `eval_tokens` tokens' worth of examples during training,
        all of it for the final figure. val_loss is their sum, BERT's pretraining loss."""
        if self.val is None:
            return {}
        tokens = len(self.val.tokens if isinstance(self.val, Documents) else self.val)
        if not final and self.eval_tokens is not None:
            tokens = min(tokens, self.eval_tokens)
        rows = max(1, tokens // (self.block_size - 2))
        sums = {"mlm": 0.0, "mlm_ok": 0, "masked": 0, "nsp": 0.0, "nsp_ok": 0, "pairs": 0}
        for batch in self._eval_batches(rows):
            mlm, logits, targets, nsp = self._losses(model, batch)
            sums["mlm"] += float(mlm)
            sums["mlm_ok"] += int((logits.argmax(-1) == targets).sum())
            sums["masked"] += len(targets)
            if nsp is not None:
                sums["nsp"] += float(nsp[0])
                sums["nsp_ok"] += int((nsp[1].argmax(-1) == batch["next_sentence_label"]).sum())
                sums["pairs"] += len(batch["next_sentence_label"])
        mlm_loss = sums["mlm"] / sums["masked"]
        metrics = {"val_loss": mlm_loss, "val_mlm_loss": mlm_loss,
                   "val_ppl": math.exp(min(mlm_loss, 50.0)),
                   "val_mlm_acc": sums["mlm_ok"] / sums["masked"]}
        if sums["pairs"]:
            nsp_loss = sums["nsp"] / sums["pairs"]
            metrics.update(val_loss=mlm_loss + nsp_loss, val_nsp_loss=nsp_loss,
                           val_nsp_acc=sums["nsp_ok"] / sums["pairs"])
        return metrics
