"""Chat templates: one contract for training, `lmlab chat`, evaluation and the server.

A chat template is the Jinja program a model's tokenizer_config.json carries (`chat_template`);
rendering it turns OpenAI-style messages ({"role": "system" | "user" | "assistant", "content":
...}) into the one string the model was trained on. It is rendered here exactly as transformers'
`apply_chat_template` renders it — the same sandboxed Jinja environment (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not escape
HTML), the tokenizer's special tokens as variables, and the rendered string encoded without
adding special tokens — so a model fine-tuned here and served by transformers (or the reverse)
sees the same tokens.

Training also needs to know which tokens are the assistant's: `encode_chat` renders the
conversation once per assistant message — the prefix up to it with the generation prompt, then
the prefix that includes it — and the characters in between are that reply (with whatever the
template closes it with, e.g. an end-of-turn token). A token is trained when its characters
overlap a reply, as transformers' `return_assistant_tokens_mask` decides; but unlike that option
this works for every template, not only those written with `{% generation %}` tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmlab.errors import DataError

ROLES = ("system", "user", "assistant")

# For models without a template (lmlab's own, GPT-2): plain-text turns separated by blank lines.
# Every assistant reply ends with the EOS token, and the separator opens the next turn rather
# than closing the reply, so a fine-tuned model learns to stop right after its reply, and
# decoding stops on EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '### User:\\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ ('\\n\\n' if messages else '') + '### Assistant:\\n' }}"
    "{% endif %}"
)


# Contents of the probe conversation that finds a template's end-of-turn text.
_PROBE_REPLY, _PROBE_NEXT = "lmlab-probe-reply-7f3a", "lmlab-probe-next-9c1e"


class ChatTemplateError(DataError):
    """A template that does not compile or render, or that never renders the assistant's part."""


@dataclass(frozen=True)
class ChatEncoding:
    """A rendered conversation: its text, token ids, and which tokens are the assistant's."""

    text: str
    ids: list[int]
    trained: list[bool]  # per token: part of an assistant reply


def template_source(tokenizer, name: str | None = None) -> str:
    """The tokenizer's chat template (the named one of transformers' list form, else
    "default"), or lmlab's DEFAULT_CHAT_TEMPLATE when it has none."""
    template = tokenizer.chat_template
    if template is None:
        return DEFAULT_CHAT_TEMPLATE
    if isinstance(template, str):
        return template
    by_name = {t["name"]: t["template"] for t in template}
    wanted = name or "default"
    if wanted not in by_name:
        raise ChatTemplateError(f"chat template {wanted!r} not found; the tokenizer has "
                                f"{', '.join(sorted(by_name))}")
    return by_name[wanted]


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The template compiled in transformers' environment: sandboxed (templates come from
    model hubs and are untrusted code), trim_blocks + lstrip_blocks, loop controls, and the
    helpers templates call."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}…{% endgeneration %}` marks assistant text for transformers'
        # assistant mask; the spans are found by rendering prefixes here, so it only renders.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body
                                          ).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"chat template does not compile: {error.message} (template "
                                f"line {error.lineno})") from None


def special_token_variables(tokenizer) -> dict[str, Any]:
    """What transformers passes to a template besides the messages: the special tokens that
    are set (bos_token, eos_token, …) and the additional ones."""
    values: dict[str, Any] = {}
    for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        token = getattr(tokenizer, f"{role}_token")
        if token is not None:
            values[f"{role}_token"] = token
    if tokenizer.additional_special_tokens:
        values["additional_special_tokens"] = list(tokenizer.additional_special_tokens)
    return values


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """OpenAI-style messages: a non-empty list of {"role": system|user|assistant, "content":
    str}; `where` names the input (file and line) in the error."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {message['role']!r}; "
                            f"expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {i}'s content must be a string")
    return messages


def render_chat(tokenizer, messages: list[dict[str, str]], *,
                add_generation_prompt: bool = False, template: str | None = None,
                where: str = "messages") -> str:
    """The conversation as the model reads it — transformers'
    `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`."""
    import jinja2

    compiled = compile_template(template or template_source(tokenizer))
    try:
        return compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               **special_token_variables(tokenizer))
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"{where}: the chat template fails to render: {error}") from None


def encode_prompt(tokenizer, messages: list[dict[str, str]], *,
                  template: str | None = None) -> list[int]:
    """Token ids of a conversation with the generation prompt: what the model continues with
    its reply (`apply_chat_template(..., add_generation_prompt=True)`)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True, template=template)
    return tokenizer.encode(text)


def assistant_spans(tokenizer, messages: list[dict[str, str]], *, template: str | None = None,
                    where: str = "messages") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies."""
    def render(part, generation_prompt):
        return render_chat(tokenizer, part, add_generation_prompt=generation_prompt,
                           template=template, where=where)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        through = render(messages[:i + 1], False)
        # A template that renders a prefix differently from the whole (e.g. it numbers turns
        # from the end) has no consistent spans: refuse rather than train on the wrong tokens.
        if not (text.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(f"{where}: the chat template renders message {i} "
                                    "differently as the conversation grows; cannot tell which "
                                    "tokens are the assistant's")
        start, end = len(before), len(through)
        if message["content"].strip() and message["content"].strip() not in text[start:end]:
            raise ChatTemplateError(f"{where}: the chat template never renders assistant "
                                    f"message {i}; it cannot be trained on")
        spans.append((start, end))
    return text, spans


def encode_chat(tokenizer, messages: list[dict[str, str]], *, template: str | None = None,
                where: str = "messages") -> ChatEncoding:
    """Token ids of the rendered conversation (as transformers tokenizes it) and, per token,
    whether it belongs to an assistant reply."""
    text, spans = assistant_spans(tokenizer, messages, template=template, where=where)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    trained, span = [], 0
    for start, end in encoding.offsets:
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        trained.append(span < len(spans) and end > spans[span][0])
    return ChatEncoding(text=text, ids=list(encoding.ids), trained=trained)


def turn_markers(tokenizer, template: str | None = None) -> list[str]:
    """The text a reply ends at, as the template writes it: what closes an assistant message
    ("<|im_end|>") and what opens the next user turn ("### User:", "<|im_start|>user"), found
    by rendering a probe conversation. The tokenizer's EOS, which stops decoding anyway, and
    bare whitespace are left out; a template that refuses the probe has none (EOS ends
    replies)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        closed = render_chat(tokenizer, probe, template=template)
        followed = render_chat(tokenizer, probe + [{"role": "user", "content": _PROBE_NEXT}],
                               template=template)
    except ChatTemplateError:  # e.g. a template that demands a system message first
        return []
    if _PROBE_REPLY not in closed or _PROBE_NEXT not in followed:
        return []
    closer = closed[closed.rindex(_PROBE_REPLY) + len(_PROBE_REPLY):]
    end = followed.index(_PROBE_REPLY) + len(_PROBE_REPLY)
    between = followed[end:followed.index(_PROBE_NEXT, end)]
    opener = between.removeprefix(closer)
    markers = []
    for text in (closer.strip(), opener.strip()):
        if text and text != tokenizer.eos_token and text not in markers:
            markers.append(text)
    return markers
