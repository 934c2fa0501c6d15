"""Recipe `sft` (`lmlab finetune sft`): supervised fine-tuning of a causal LM (an lmlab GPT or a
transformers GPT-2 checkpoint) on instructions, prompt/completion pairs or conversations.

The data formats, the loss mask and packing are lmlab.tasks.sft's; the chat template is the
model's (or `chat_template`, or lmlab's default) and is saved with the fine-tuned model, so
`lmlab chat`, `lmlab generate` and the server render conversations exactly as training did.
With a `lora:` block only the adapter trains, and RUN_DIR holds it in PEFT's format
(adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel) instead of a full
model; checkpoints then hold the adapter weights only.

RUN_DIR: the model (or adapter) with its tokenizer and chat template, train_config.yaml,
metrics.jsonl, loss.png, checkpoints/, results.json (validation loss and perplexity per trained
token before and after training; distinct-1/2 of the sampled replies), and
`samples_<split>.jsonl`: replies to `samples` prompts of the test split (else validation), drawn
with the seed, under each of `sample_strategies`, next to the references.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import ConfigError
from lmlab.evaluation.text_metrics import distinct_n
from lmlab.generation import generate
from lmlab.models.gpt import GPT
from lmlab.models.hf import from_pretrained, read_config
from lmlab.recipes import run_steps
from lmlab.recipes.finetuning import (FinetuneConfig, adapt, FinetuneResult, FinetunedRun, check_model,
                                      family_class, finetuning_optim, finish, pad_id, resolve_model, start,
                                      train_epochs)
from lmlab.recipes.registry import Recipe, register_recipe
from lmlab.tasks import sft
from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, encode_prompt, template_source
from lmlab.training.loop import OptimConfig

log = logging.getLogger(__name__)


# The report's decoding strategies: generate's knobs (sampling is seeded with the run's seed).
STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "sampling": {"do_sample": True, "temperature": 0.8, "top_p": 0.9},
    "beam": {"num_beams": 4, "no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
}


def sft_optim() -> OptimConfig:
    return finetuning_optim(metric="val_loss")


@dataclass
class SFTConfig(FinetuneConfig):
    model: str = ""  # a causal LM directory: an lmlab GPT run or a transformers GPT-2 checkpoint
    # JSONL files; each may also be a list of files (several datasets in one run)
    train: str | list[str] | None = None
    validation: str | list[str] | None = None  # JSONL, like train
    test: str | list[str] | None = None
    max_length: int = 512  # tokens per example (per packed sequence), EOS included
    # -- data (lmlab/tasks/sft.py): the format is told from each file's fields unless set
    format: str = "auto"  # messages | prompt_completion | alpaca | turns | fields
    prompt_template: str | None = None  # format fields: e.g. "{title}\nby {author}\n\n"
    completion_field: str | None = None  # format fields: e.g. "text"
    speaker_roles: dict[str, str] | None = None  # format turns: {"USER": "user", …}
    system_prompt: str | None = None  # added to conversations that have none
    max_turns: int | None = None  # longer conversations become several examples (sft.py)
    # -- what trains
    train_on_prompt: bool = False  # False: the completion / assistant tokens (and EOS) only
    # An example whose prompt alone fills max_length has nothing to train: an error naming it,
    # or with this set, left out (the log counts them).
    drop_long_prompts: bool = False
    packing: bool = False  # several examples per sequence, block-diagonal attention
    chat_template: str | None = None  # a Jinja file or string; default: the model's, else lmlab's
    # The report: replies to `samples` prompts of the test split (else validation), drawn with
    # the seed (not picked by hand), under each decoding strategy named (STRATEGIES).
    samples: int = 5  # prompts replied to in the report; 0 = none
    # the report's decoding strategies: greedy, sampling, beam (STRATEGIES)
    sample_strategies: list[str] = field(default_factory=lambda: ["greedy"])
    sample_max_new_tokens: int = 128  # the length budget of each reply in the report
    optim: OptimConfig = field(default_factory=sft_optim)

    def __post_init__(self):
        super().__post_init__()
        if self.format not in sft.FORMATS:
            raise ConfigError(f"format: expected one of {', '.join(sft.FORMATS)}, got "
                              f"{self.format!r}")
        if self.format == "fields" and not self.completion_field:
            raise ConfigError("format 'fields' needs completion_field (and prompt_template)")
        if self.samples < 0 or self.sample_max_new_tokens <= 0:
            raise ConfigError("samples must be >= 0 and sample_max_new_tokens positive")
        unknown = [s for s in self.sample_strategies if s not in STRATEGIES]
        if unknown or not self.sample_strategies:
            raise ConfigError(f"sample_strategies: expected some of {', '.join(STRATEGIES)}, "
                              f"got {self.sample_strategies}")

    @property
    def data_format(self) -> sft.DataFormat:
        return sft.DataFormat(format=self.format, prompt_template=self.prompt_template,
                              completion_field=self.completion_field,
                              speaker_roles=self.speaker_roles, system_prompt=self.system_prompt,
                              max_turns=self.max_turns)


def chat_template_of(cfg: SFTConfig, tokenizer: Tokenizer) -> str:
    """The template training renders with, and saves with the model: `chat_template` (a file,
    else the Jinja text itself), the model's own, or lmlab's default."""
    if cfg.chat_template:
        path = Path(cfg.chat_template)
        if "{" not in cfg.chat_template and not path.is_file():
            raise ConfigError(f"chat_template: {cfg.chat_template} is neither a file nor a Jinja "
                              "template")
        return path.read_text(encoding="utf-8") if "{" not in cfg.chat_template \
            else cfg.chat_template
    return template_source(tokenizer) if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE


def check_causal_lm(model_dir: Path) -> None:
    """From config.json alone, before any data is read: the model must be a causal LM."""
    if family_class(model_dir, {GPT: None}) is None:
        model_type = read_config(model_dir).get("model_type")
        raise ConfigError(f"model: {model_dir} holds a {model_type} model; sft fine-tunes a "
                          "causal language model (an lmlab GPT or a GPT-2 checkpoint)")


def load_causal_lm(model_dir: Path) -> GPT:
    model = from_pretrained(model_dir)
    if not isinstance(model, GPT):  # a GPT-2 classifier checkpoint, say
        raise ConfigError(f"model: {model_dir} holds a {type(model).__name__}; sft fine-tunes a "
                          "causal language model (an lmlab GPT or a GPT-2 checkpoint)")
    return model


def encode_file(cfg: SFTConfig, tokenizer: Tokenizer, path, *,
                first: int | None = None) -> list[sft.EncodedExample]:
    """The examples of `path` (one file or several; the first `first` of them) encoded as the
    config says, with the tokenizer's chat template (lmlab's default when it has none)."""
    examples = sft.read_examples(path, cfg.data_format)[:first]
    return sft.encode_examples(tokenizer, examples, max_length=cfg.max_length,
                               train_on_prompt=cfg.train_on_prompt,
                               template=template_source(tokenizer),
                               drop_long_prompts=cfg.drop_long_prompts)


def prepare(cfg: SFTConfig, tokenizer: Tokenizer, paths: list):
    """The encoded examples of each file in `paths` (None stays None), with the template set on
    the tokenizer — everything that can fail on the input, done before any file is written."""
    tokenizer.chat_template = chat_template_of(cfg, tokenizer)
    return [None if path is None else encode_file(cfg, tokenizer, path) for path in paths]


def show_examples(cfg: SFTConfig, count: int) -> str:
    """`--show-masks N`: the first N training examples as the loss sees them."""
    if cfg.train is None:
        raise ConfigError("train: no train file; pass --train FILE")
    model_dir = resolve_model(cfg.model)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = chat_template_of(cfg, tokenizer)
    return sft.show_masks(tokenizer, encode_file(cfg, tokenizer, cfg.train, first=count))


@run_steps.undo_on_failure
def finetune_sft(cfg: SFTConfig, *, run_dir: str | Path, resume: bool = False,
                 progress: bool = True) -> FinetuneResult:
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if not cfg.model:
        raise ConfigError("model: no model; pass --model DIR (a causal LM directory)")
    for name in ("train", "validation"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"{name}: no {name} file; pass --{name} FILE")
    model_dir = resolve_model(cfg.model)
    check_causal_lm(model_dir)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    train_data, val_data, test_data = prepare(cfg, tokenizer,
                                              [cfg.train, cfg.validation, cfg.test])
    run_steps.seed_everything(cfg.optim.seed)  # LoRA's initial adapters come from the seed
    model = adapt(cfg, load_causal_lm(model_dir))
    check_model(cfg, model, tokenizer, model_dir)
    dist, device, _ = start(cfg, run_dir, resume=resume)
    model = dist.place(model, device)
    task = sft.SFTTask(train=train_data, val=val_data, batch_size=cfg.optim.batch_size,
                       grad_accum=cfg.optim.grad_accum, seed=cfg.optim.seed, device=device,
                       pad_id=pad_id(tokenizer), max_length=cfg.max_length, packing=cfg.packing,
                       group_by_length=cfg.group_by_length, eval_batch_size=cfg.eval_size,
                       rank=dist.rank, world_size=dist.world_size)
    before = None
    if dist.is_main:  # the figures before training: rank 0's to report, as evaluations are
        model.eval()
        before = task.evaluate(model)
        model.train()
    result = train_epochs(cfg, model, task, recipe="sft", run_dir=run_dir,
                          device=device, dist=dist, resume=resume, progress=progress)
    if not dist.is_main:  # under torchrun rank 0 alone saves and reports
        return finish(run_dir, result, started=t0, test=None, predictions=None, write=False)
    run_steps.save_model(model, tokenizer, run_dir, max_length=cfg.max_length, base=model_dir)
    model.eval()
    test = None
    if test_data is not None:
        test = sft.evaluate_loss(model, test_data, batch_size=cfg.eval_size,
                                 pad_id=pad_id(tokenizer), device=device, prefix="")
    split, path = ("test", cfg.test) if cfg.test else ("validation", cfg.validation)
    samples, extra = None, {"validation_before": before}
    if cfg.samples:
        rows, extra["samples"] = report_samples(cfg, model, tokenizer, path)
        samples = run_steps.write_jsonl(run_dir / f"samples_{split}.jsonl", rows)
    return finish(run_dir, result, started=t0, test=test, predictions=samples, extra=extra)


def report_samples(cfg: SFTConfig, model, tokenizer: Tokenizer, path
                   ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Replies to `cfg.samples` prompts drawn with the seed, under each strategy, and per
    strategy the distinct-1/2 (unique word uni/bigrams over all) and mean length of the replies."""
    examples = sft.read_examples(path, cfg.data_format)
    chosen = sorted(random.Random(cfg.optim.seed).sample(range(len(examples)),
                                                         min(cfg.samples, len(examples))))
    rows, figures = [], {}
    for name in cfg.sample_strategies:
        knobs = dict(STRATEGIES[name])
        if knobs.get("do_sample"):
            knobs["seed"] = cfg.optim.seed
        replies = sample_replies(model, tokenizer, [examples[i] for i in chosen],
                                 max_new_tokens=cfg.sample_max_new_tokens, **knobs)
        rows.extend({"strategy": name, **r} for r in replies)
        words = [r["generated"].split() for r in replies]
        figures[name] = {"distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2),
                         "mean_words": sum(map(len, words)) / max(len(words), 1)}
    return rows, figures


# -- replies: the report's samples, `lmlab predict` --------------------------------------------
def prompt_ids(tokenizer: Tokenizer, example: sft.SFTExample) -> tuple[list[int], str]:
    """What the model is given for an example (the conversation up to its last assistant
    message, with the generation prompt; or the plain prompt) and the reference reply."""
    if example.messages is None:
        return tokenizer.encode(example.prompt), example.completion
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return (encode_prompt(tokenizer, example.messages[:last]),
            example.messages[last]["content"])


@torch.inference_mode()
def sample_replies(model, tokenizer: Tokenizer, examples: list[sft.SFTExample], *,
                   max_new_tokens: int, **knobs) -> list[dict[str, Any]]:
    """Replies to each example's prompt, stopping at EOS: greedy, or as `knobs` (generate's
    decoding settings) say; a `seed` is offset by the example's position, so that every
    prompt draws its own random numbers. A prompt longer than the context keeps its end."""
    rows = []
    window = model.context_window
    device = next(model.parameters()).device
    seed = knobs.pop("seed", None)
    for position, example in enumerate(examples):
        if seed is not None:
            knobs["seed"] = seed + position
        ids, reference = prompt_ids(tokenizer, example)
        ids = ids[-(window - 1):]
        budget = min(max_new_tokens, window - len(ids))
        out = generate(model, torch.tensor([ids], device=device), max_new_tokens=budget,
                       eos_token_id=tokenizer.eos_token_id, **knobs)
        reply = tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        rows.append({"where": example.where, "prompt": tokenizer.decode(ids),
                     "reference": reference, "generated": reply})
    return rows


# -- a fine-tuned run: evaluate and predict ------------------------------------------------------
def evaluate_run(run: FinetunedRun, data: Path) -> dict[str, float]:
    """Loss and perplexity per trained token (the completion / assistant tokens) of `data`."""
    return sft.evaluate_loss(run.model, encode_file(run.cfg, run.tokenizer, data),
                             batch_size=run.cfg.eval_size,
                             pad_id=pad_id(run.tokenizer), device=run.device, prefix="")


def predict_run(run: FinetunedRun, data: Path, out: Path) -> Path:
    """Greedy replies to every example's prompt, next to the reference."""
    examples = sft.read_examples(data, run.cfg.data_format)
    rows = sample_replies(run.model, run.tokenizer, examples,
                          max_new_tokens=run.cfg.sample_max_new_tokens)
    return run_steps.write_jsonl(out, rows)


register_recipe(Recipe(
    name="sft", command="finetune", config=SFTConfig, run=finetune_sft, models=(GPT,),
    evaluate=evaluate_run, predict=predict_run, show_examples=show_examples,
    help="supervised fine-tuning of a causal LM on instructions or conversations (chat template, "
         "loss on replies only, packing, LoRA)",
))
