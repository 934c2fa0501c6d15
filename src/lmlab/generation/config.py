"""GenerationConfig: every decoding knob, with transformers' names and meaning, validated once.

An unknown knob is a TypeError (keyword-only dataclass); a value out of range or a combination that
would make transformers silently switch strategy (a sampling knob without do_sample, a beam knob
without num_beams > 1) is a ValueError that says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

EarlyStopping = Union[bool, Literal["never"]]
# The one default length budget, for the library and every command: transformers' 20 tokens.
DEFAULT_MAX_NEW_TOKENS = 20


@dataclass(kw_only=True)
class GenerationConfig:
    # -- length
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens; used when max_new_tokens is None
    min_new_tokens: int = 0
    # -- strategy
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    # -- sampling warpers (do_sample=True)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    # -- logits processors (any strategy)
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    sequence_bias: dict[tuple[int, ...], float] | None = None
    frequency_penalty: float = 0.0  # OpenAI: minus penalty × count of the token in the output
    presence_penalty: float = 0.0  # OpenAI: minus penalty if the token occurs in the output
    logit_bias: dict[int, float] | None = None  # OpenAI: added to the token's logit
    # the first token after a one-token prompt (an encoder–decoder's target-language tag)
    forced_bos_token_id: int | None = None
    # -- beam search (num_beams > 1)
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    # -- stopping and padding
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None
    # -- randomness
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens is None and self.max_length is None:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        _check(self.max_new_tokens is None or self.max_new_tokens >= 0,
               f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        _check(self.max_length is None or self.max_length > 0,
               f"max_length must be > 0, got {self.max_length}")
        _check(isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0,
               f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        _check(isinstance(self.num_beams, int) and self.num_beams >= 1,
               f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        _check(isinstance(self.num_return_sequences, int) and self.num_return_sequences >= 1,
               f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}")
        if self.num_beams == 1:
            beam_knobs = [name for name, used in (
                ("length_penalty", self.length_penalty != 1.0),
                ("early_stopping", self.early_stopping is not False),
            ) if used]
            _check(not beam_knobs, f"{_only(beam_knobs)} to beam search; pass num_beams > 1")
            _check(self.num_return_sequences == 1 or self.do_sample,
                   f"num_return_sequences={self.num_return_sequences} needs num_beams >= "
                   f"{self.num_return_sequences} or do_sample=True; greedy decoding returns one "
                   "sequence per prompt")
        else:
            _check(self.num_return_sequences <= self.num_beams,
                   f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                   f"({self.num_beams})")
            _check(self.early_stopping in (True, False, "never"),
                   f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not self.do_sample:
            sampling_knobs = [name for name, used in (
                ("temperature", self.temperature != 1.0), ("top_k", self.top_k is not None),
                ("top_p", self.top_p is not None), ("min_p", self.min_p is not None),
                ("typical_p", self.typical_p is not None),
                ("epsilon_cutoff", self.epsilon_cutoff is not None),
                ("eta_cutoff", self.eta_cutoff is not None), ("seed", self.seed is not None),
            ) if used]
            # transformers warns and decodes greedily; a silent strategy switch is worse.
            _check(not sampling_knobs, f"{_only(sampling_knobs)} to sampling; pass do_sample=True")
        self.logits_processors(prompt_len=0)  # builds, and so validates, every processor

    def new_tokens_for(self, prompt_len: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length < prompt_len:
            raise ValueError(
                f"max_length ({self.max_length}) is shorter than the prompt ({prompt_len} "
                "tokens); use max_new_tokens to set the number of new tokens"
            )
        return self.max_length - prompt_len

    @property
    def pad_id(self) -> int:
        """The id written after a row has finished: pad_token_id, else the first EOS, else 0.
        Greedy, sampling and speculative decoding write it as given, as transformers does;
        beam search writes `beam_pad_id`."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0

    @property
    def beam_pad_id(self) -> int:
        """The id beam search writes after a hypothesis's EOS. transformers' `_beam_search` fills
        with `pad_token_id or eos_token_id[0]`; 0 is falsy, so an explicit pad id of 0 pads with
        the first EOS there (its greedy and sampling write 0). We match it: beam search promises
        transformers' tokens, and a padded batch with pad id 0 is the common case."""
        if self.pad_token_id == 0 and self.eos_token_id:
            return self.eos_token_id[0]
        return self.pad_id

    def budget(self, prompt_len: int, *, model, name: str = "") -> int:
        """New tokens to generate after a prompt of `prompt_len`, checked against the model's
        context window — the one place every strategy and the CLI check it, before any work."""
        new_tokens = self.new_tokens_for(prompt_len)
        total = prompt_len + new_tokens
        window = getattr(model, "context_window", None)
        if window is not None and total > window:
            whose = f"the {name} model's" if name else "the model's"
            raise ValueError(
                f"prompt ({prompt_len} tokens) + {new_tokens} new tokens = {total} exceeds "
                f"{whose} context window of {window} tokens"
            )
        return new_tokens

    def logits_processors(self, *, prompt_len: int, attention_mask=None, padding: int = 0) -> list:
        """Processors then (when sampling) warpers, in transformers' order. Left padding stays
        out of the repetition penalty, as in transformers: `padding` leading positions of every
        row, or per row from `attention_mask` (B, prompt_len)."""
        from lmlab.generation.processors import build_logits_processors

        return build_logits_processors(self, prompt_len=prompt_len, attention_mask=attention_mask,
                                       padding=padding)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _only(names: list[str]) -> str:
    """"top_k only applies", "top_k and top_p only apply": messages name parameters as they are
    spelled here; a command line renders them as its flags (lmlab.cli.generate.in_flag_words)."""
    if not names:  # the message is built before the check: nothing to say
        return ""
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{listed} only {'applies' if len(names) == 1 else 'apply'}"
