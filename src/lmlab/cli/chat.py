"""`lmlab chat`: a conversation with a causal language model in the terminal.

Every turn renders the whole conversation — the system prompt, the turns so far and the new
message — through lmlab.tokenizer.chat with the generation prompt, so the model reads exactly
what it was trained on (its tokenizer's chat template, lmlab's DEFAULT_CHAT_TEMPLATE when it has
none). The reply streams from the one token iterator (`generate_tokens`) through the tokenizer's
stream decoder, so a character split across tokens is never printed broken. It ends at EOS, at
the text that closes the template's assistant turn or opens the next user turn (found by
rendering a probe conversation: "<|im_end|>", "### User:", …), at a --stop text, or at the
length budget; the marker itself is neither printed nor kept.

When the conversation and the reply's budget outgrow the model's context window, the oldest
turns are dropped (the system prompt stays) and a note says so on stderr; a new message that
does not fit even alone is refused with a one-line error, and the conversation goes on.

`--seed` seeds every reply alike (as `lmlab generate --seed` seeds each call), so a reply
depends only on the conversation before it: the same conversation replays to the same replies.
"""

from __future__ import annotations

import sys
from typing import Iterator, TextIO

import torch

from lmlab.cli.generate import (
    _config_error,
    add_device_argument,
    add_knob_arguments,
    knobs_from,
    load_decoder,
)
from lmlab.errors import ConfigError
from lmlab.generation import GenerationConfig, generate_tokens
from lmlab.generation.generate import beam_search
from lmlab.generation.stopping import StopText
from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.chat import check_messages, encode_prompt, template_source, turn_markers
from lmlab.training.runtime import pick_device

PROMPT = "you> "
REPLY = "assistant> "
# Replies' default budget: 128 tokens, but at most half the context window, so that a small
# model keeps room for the conversation.
DEFAULT_REPLY_TOKENS = 128
HELP = """\
/reset        forget the conversation (the system prompt stays)
/system TEXT  set the system prompt; /system alone clears it
/help         this list
/exit         leave (also Ctrl-D); Ctrl-C stops a reply while it is written
To send a message that starts with /, write // instead."""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json + weights)")
    parser.add_argument("--adapter", metavar="DIR",
                        help="a LoRA adapter in PEFT's format (adapter_config.json + "
                             "adapter_model.safetensors) for --model")
    parser.add_argument("--system", metavar="TEXT", help="the system prompt")
    add_device_argument(parser)
    add_knob_arguments(parser, helps={
        "max_new_tokens": f"tokens per reply at most (default {DEFAULT_REPLY_TOKENS}, or half "
                          "the model's context window if that is less)",
        "max_length": "not for chat: the conversation grows; use --max-new-tokens",
        "num_return_sequences": "not for chat: one reply per turn",
        "seed": "seed for sampling; every reply is seeded alike, so a conversation replays",
    })


def run(args) -> int:
    model = load_decoder(args.model, device=pick_device(args.device, flag="--device"))
    if args.adapter:
        model = with_adapter(model, args.adapter)
    tokenizer = Tokenizer.from_pretrained(args.model)
    tokenizer.check_fits(model.config.vocab_size, where=args.model)
    template = template_source(tokenizer)
    markers = turn_markers(tokenizer, template)
    config = reply_config(args, model, tokenizer, markers)
    chat = Chat(model, tokenizer, config, template=template,
                markers=markers + (args.stop_strings or []), system=args.system)
    whose = ("its chat template" if tokenizer.chat_template is not None
             else "lmlab's default chat template (the tokenizer has none)")
    window = (f"a {model.context_window}-token context" if model.context_window is not None
              else "no context limit")
    print(f"lmlab chat: {args.model} with {whose}; {window}, replies of up to "
          f"{config.max_new_tokens} tokens. /help lists the commands, /exit or Ctrl-D leaves.",
          file=sys.stderr)
    converse(chat)
    return 0


def with_adapter(model, directory: str):
    """`model` with the PEFT LoRA adapter in `directory`, merged into its weights: plain
    layers again, so decoding runs as fast as the base model's (the CPU kernels apply)."""
    from lmlab.models.hf.peft import load_adapter
    from lmlab.models.lora import remove_lora

    load_adapter(model, directory)
    return remove_lora(model, merge=True).eval()


def reply_config(args, model, tokenizer, markers: list[str]) -> GenerationConfig:
    """The knobs of every reply: the command line's, the reply budget, and the stops (the
    tokenizer's EOS as well as the model's; the template's end-of-turn text)."""
    if args.max_length is not None:
        raise ConfigError("--max-length: a chat's prompt grows every turn; set the length of "
                          "a reply with --max-new-tokens")
    if args.num_return_sequences not in (None, 1):
        raise ConfigError("--num-return-sequences: lmlab chat writes one reply per turn")
    knobs = knobs_from(args, model)
    if args.eos_token_id is None and tokenizer.eos_token_id is not None:
        knobs["eos_token_id"] = sorted({*knobs["eos_token_id"], tokenizer.eos_token_id})
    window = model.context_window
    if args.max_new_tokens is None:
        knobs["max_new_tokens"] = (DEFAULT_REPLY_TOKENS if window is None
                                   else max(1, min(DEFAULT_REPLY_TOKENS, window // 2)))
    elif args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 for a chat, got {args.max_new_tokens}")
    elif window is not None and args.max_new_tokens >= window:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the "
                          f"conversation in the model's context window of {window} tokens")
    stops = markers + (args.stop_strings or [])
    if (knobs.get("num_beams") or 1) > 1:
        if args.stop_strings:
            raise ConfigError("--stop does not combine with --num-beams (beam search has no "
                              "stop strings yet)")
        stops = []  # the search ends at EOS; its reply is cut at the markers afterwards
    knobs["stop_strings"] = stops or None
    try:
        return GenerationConfig(**knobs)
    except ValueError as err:
        raise _config_error(err) from None


class Chat:
    """A conversation with a model: the system prompt, the turns so far (user and assistant
    messages in pairs), and how each reply is decoded."""

    def __init__(self, model, tokenizer, config: GenerationConfig, *, template: str,
                 markers: list[str], system: str | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.template, self.markers = template, markers
        self.system = system or None
        self.history: list[dict[str, str]] = []

    def messages(self, turns: list[dict[str, str]], user: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return check_messages(system + turns + [{"role": "user", "content": user}])

    def fits(self, prompt_len: int) -> bool:
        """Whether a prompt of this length and the reply's budget fit the context window."""
        try:
            self.config.budget(prompt_len, model=self.model)
        except ValueError:
            return False
        return True

    def prompt(self, user: str) -> tuple[list[int], int]:
        """The token ids the model continues after `user`'s message, and how many of the
        oldest turns had to be left out for them and the reply to fit the context window."""
        for dropped in range(len(self.history) // 2 + 1):
            messages = self.messages(self.history[2 * dropped:], user)
            ids = encode_prompt(self.tokenizer, messages, template=self.template)
            if self.fits(len(ids)):
                return ids, dropped
        window = self.model.context_window
        alone = "with the system prompt " if self.system else ""
        raise ConfigError(f"message not sent: {alone}it makes a {len(ids)}-token prompt, which "
                          f"with a reply of {self.config.max_new_tokens} tokens exceeds the "
                          f"model's context window of {window} tokens; shorten it (or lower "
                          "--max-new-tokens)")

    def tokens(self, ids: list[int]) -> Iterator[int]:
        """The reply's tokens as they are decoded (beam search's all at once, at its end)."""
        prompt = torch.tensor([ids])
        if self.config.num_beams == 1:
            for step in generate_tokens(self.model, prompt, self.config,
                                        tokenizer=self.tokenizer):
                yield int(step[0])
            return
        yield from beam_search(self.model, prompt, self.config)[0, len(ids):].tolist()

    def respond(self, user: str, out: TextIO, err: TextIO) -> str:
        """Write the reply to `user`'s message to `out` as it is decoded, and add the turn to
        the history. Ctrl-C ends the reply where it is (what was written is kept)."""
        ids, dropped = self.prompt(user)  # ConfigError: the message does not fit
        if dropped:
            self.history = self.history[2 * dropped:]
            print(f"[history trimmed: dropped {dropped} oldest turn{'s' * (dropped > 1)} to fit "
                  f"the {self.model.context_window}-token context]", file=err, flush=True)
        text, decoder = StopText(self.markers, trim=True), self.tokenizer.stream_decoder()
        eos = set(self.config.eos_token_id)
        out.write(REPLY)
        out.flush()
        stopped = False
        try:
            for token in self.tokens(ids):
                if token in eos:
                    break
                out.write(text.push(decoder.push(token)))
                out.flush()
                if text.ended:
                    break
            out.write(text.push(decoder.flush()) + text.finish())
        except KeyboardInterrupt:
            stopped = True
        out.write("\n")
        out.flush()
        if stopped:
            print("[reply stopped]", file=err, flush=True)
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": text.shown}]
        return text.shown


def converse(chat: Chat, *, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Read messages and commands with `input()` until /exit or end of input; answer each."""
    out, err = out or sys.stdout, err or sys.stderr
    try:  # line editing and history (↑) for input(), where the platform has readline
        import readline  # noqa: F401
    except ImportError:
        pass
    while True:
        try:
            line = input(PROMPT)
        except EOFError:  # Ctrl-D
            out.write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in a shell
            out.write("\n")
            continue
        command, _, rest = line.strip().partition(" ")
        if command == "/exit":
            return
        if command == "/help":
            print(HELP, file=out)
        elif command == "/reset":
            chat.history = []
            print("[conversation cleared" + (", system prompt kept]" if chat.system else "]"),
                  file=err)
        elif command == "/system":
            chat.system = rest.strip() or None
            print("[system prompt set]" if chat.system else "[system prompt cleared]", file=err)
        elif command.startswith("/") and not command.startswith("//"):
            print(f"[unknown command {command}; /help lists them]", file=err)
        elif line.strip():
            message = line.strip()
            message = message[1:] if message.startswith("//") else message
            try:
                chat.respond(message, out, err)
            except ConfigError as error:
                print(f"lmlab chat: error: {error}", file=err)
