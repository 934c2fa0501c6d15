"""OpenAI's request parameters → lmlab's GenerationConfig: the table docs/serving.md lists.

Every parameter a request may carry maps onto a knob of the engine or is refused with a 400
naming it (lmlab.serving.schemas); the checks that need the model — the context window, the
vocabulary, the server's caps — are made here, before a request is queued.

    max_tokens / max_completion_tokens → max_new_tokens  (default: 16 for completions, the
                                          room left in the context for chat; never above the
                                          server's --max-tokens-cap)
    temperature  0 → greedy (do_sample=False); > 0 → do_sample=True, temperature (default 1)
    top_p, top_k, min_p, seed          → the same knobs when sampling (with temperature 0 they
                                          cannot change the argmax and are not applied)
    presence_penalty, frequency_penalty, logit_bias → the same knobs (OpenAI's meaning)
    repetition_penalty, no_repeat_ngram_size → the same knobs; min_tokens → min_new_tokens
    stop (+ the chat template's end-of-turn text) → stop_strings; the text is cut before it
    n            → n rows of the prompt: row i seeded with seed + 1,000,003 · i, as
                   lmlab.generate(..., num_return_sequences=n, seed=seed) seeds them
"""

from __future__ import annotations

from lmlab.generation import GenerationConfig
from lmlab.serving.schemas import APIError, Sampling

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Below this, logits / temperature can overflow to inf and the softmax to NaN, which fails the
# whole decoding step: every running request, not only the one that asked.
MIN_TEMPERATURE = 1e-6

# GenerationConfig's knob → the request parameter it comes from (for error messages).
API_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
             "stop_strings": "stop", "temperature": "temperature", "top_p": "top_p",
             "top_k": "top_k", "min_p": "min_p", "seed": "seed",
             "repetition_penalty": "repetition_penalty",
             "no_repeat_ngram_size": "no_repeat_ngram_size", "logit_bias": "logit_bias",
             "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty"}


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stops


def new_tokens(requested: int | None, *, name: str, prompt_len: int, context: int | None,
               cap: int | None, default: int | None, prompt_param: str) -> int:
    """The request's budget of new tokens, checked against the context window and the cap."""
    if context is not None and prompt_len >= context and requested != 0:
        raise APIError(400, f"the prompt is {prompt_len} tokens; the model's context window is "
                            f"{context} tokens, which leaves no room for a completion",
                       param=prompt_param, code="context_length_exceeded")
    room = None if context is None else context - prompt_len
    if requested is None:
        limits = [x for x in (default, room, cap) if x is not None]
        return min(limits) if limits else COMPLETIONS_DEFAULT_MAX_TOKENS
    if cap is not None and requested > cap:
        raise APIError(400, f"{name} is {requested}, above this server's cap of {cap} "
                            "(--max-tokens-cap)", param=name)
    if room is not None and requested > room:
        raise APIError(400, f"this model's context window is {context} tokens; the prompt is "
                            f"{prompt_len} and {name} asks for {requested} more; lower {name} "
                            "or shorten the prompt", param=name, code="context_length_exceeded")
    return requested


def generation_config(req: Sampling, *, max_new_tokens: int, eos: list[int], vocab: int,
                      extra_stops: list[str] = ()) -> GenerationConfig:
    """The request's knobs as a GenerationConfig, or an APIError 400 naming the parameter."""
    knobs: dict = {"max_new_tokens": max_new_tokens, "eos_token_id": eos}
    stops = stop_list(req.stop) + [s for s in extra_stops if s]
    if stops:
        knobs["stop_strings"] = stops
    if req.min_tokens is not None:
        if req.min_tokens > max_new_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) is above the request's "
                                f"max_tokens ({max_new_tokens})", param="min_tokens")
        knobs["min_new_tokens"] = req.min_tokens
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                 "no_repeat_ngram_size"):
        if getattr(req, name) is not None:
            knobs[name] = getattr(req, name)
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            if not key.isdigit() or int(key) >= vocab:
                raise APIError(400, f"logit_bias: {key!r} is not a token id of this model "
                                    f"(0 .. {vocab - 1})", param="logit_bias")
            bias[int(key)] = value
        knobs["logit_bias"] = bias
    temperature = 1.0 if req.temperature is None else req.temperature
    if 0 < temperature < MIN_TEMPERATURE:
        raise APIError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got "
                            f"{temperature}", param="temperature")
    if temperature > 0:
        knobs.update(do_sample=True, temperature=temperature)
        for name in ("top_p", "top_k", "min_p", "seed"):
            if getattr(req, name) is not None:
                knobs[name] = getattr(req, name)
    try:
        return GenerationConfig(**knobs)
    except ValueError as error:  # a knob's own check: name the request's parameter
        message = str(error)
        param = next((api for knob, api in API_NAMES.items() if message.startswith(knob)), None)
        raise APIError(400, message, param=param) from None
