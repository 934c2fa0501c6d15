"""`lmlab chat`: conversations through a pseudo-terminal whose replies equal the library's
generate() on the same rendered conversation (the whole history, the oldest turns dropped to fit
the context window); the commands; replies that stream, stop on Ctrl-C, come from an adapter or
a beam search; bad input as one line."""

from __future__ import annotations

import os
import shutil
import sys
from functools import lru_cache

import pytest
import torch

from lmlab.cli import chat as chat_cli
from lmlab.cli.chat import PROMPT, REPLY
from lmlab.generation.stopping import StopText
from lmlab.generation import generate
from lmlab.models import from_pretrained
from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, encode_prompt, turn_markers

from test_cli_errors import assert_usage_error, run_cli  # noqa: E402  (same folder)

try:
    import pexpect
except ImportError:
    pexpect = None
needs_pty = pytest.mark.skipif(pexpect is None, reason="pexpect is not installed; it drives "
                                                       "lmlab chat through a pseudo-terminal")

# A template of few tokens, so that several turns fit tiny_gpt_dir's 64 positions; the text
# that opens a user turn, "u:", ends a reply.
COMPACT = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{{ eos_token }}"
           "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
WINDOW = 64
SAMPLED = dict(do_sample=True, seed=0, top_k=5)
SAMPLED_FLAGS = ["--do-sample", "--seed", "0", "--top-k", "5"]


@pytest.fixture(scope="module")
def compact_dir(tiny_gpt_dir, tmp_path_factory):
    """tiny_gpt_dir whose tokenizer carries the COMPACT chat template."""
    directory = tmp_path_factory.mktemp("compact") / "model"
    shutil.copytree(tiny_gpt_dir, directory)
    tok = Tokenizer.from_pretrained(directory)
    tok.chat_template = COMPACT
    tok.save_pretrained(directory)
    return directory


@lru_cache(maxsize=None)
def load(directory: str):
    return from_pretrained(directory), Tokenizer.from_pretrained(directory)


def library_reply(directory, messages, *, max_new_tokens: int, model=None, **knobs) -> str:
    """What generate() continues the rendered conversation with, as text."""
    base, tok = load(str(directory))
    ids = encode_prompt(tok, messages)
    out = generate(model or base, torch.tensor([ids]), max_new_tokens=max_new_tokens, **knobs)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def replay(directory, script, *, max_new_tokens: int, system=None, marker=None, **knobs):
    """Each line's expected outcome, from the library: None for a command, "refused" for a
    message that does not fit even alone, else (oldest turns dropped, reply) — the prompt is
    the system prompt, the history and the message, without as few of the oldest turns as the
    prompt and the reply's budget need to fit the context window."""
    _, tok = load(str(directory))
    history, outcomes = [], []
    for line in script:
        if line == "/reset" or line.startswith("/system"):
            if line == "/reset":
                history = []
            else:
                system = line[len("/system "):] or None
            outcomes.append(None)
            continue
        turn = [{"role": "user", "content": line}]
        head = [{"role": "system", "content": system}] if system else []
        fits = [d for d in range(len(history) // 2 + 1)
                if len(encode_prompt(tok, head + history[2 * d:] + turn)) + max_new_tokens
                <= WINDOW]
        if not fits:
            outcomes.append("refused")
            continue
        history = history[2 * fits[0]:]
        reply = library_reply(directory, head + history + turn, max_new_tokens=max_new_tokens,
                              **knobs)
        assert marker is None or marker not in reply, "pick another seed: the reply has a marker"
        outcomes.append((fits[0], reply))
        history += turn + [{"role": "assistant", "content": reply}]
    return outcomes


class Session:
    """`lmlab chat` in a pseudo-terminal, a line at a time."""

    def __init__(self, directory, *flags: str):
        self.child = pexpect.spawn(
            sys.executable, ["-m", "lmlab", "chat", "--model", str(directory), *flags],
            env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}, encoding="utf-8",
            timeout=30)
        self.child.expect_exact(PROMPT)
        self.banner = self.child.before

    def say(self, line: str) -> tuple[str, str | None]:
        """(what came before the reply — notes, errors — and the reply, or None)."""
        self.child.sendline(line)
        self.child.expect_exact(PROMPT)
        echo, _, rest = self.child.before.partition("\r\n")
        assert echo == line
        if REPLY not in rest:
            return rest, None
        notes, _, reply = rest.partition(REPLY)
        assert reply.endswith("\r\n"), reply
        return notes, reply[:-2].replace("\r\n", "\n")

    def end(self, how: str = "/exit") -> int:
        if how == "eof":
            self.child.sendeof()
        else:
            self.child.sendline(how)
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def talk(session: Session, script, outcomes) -> list[str]:
    """Say every line; check each reply and trim note against the library's; the notes."""
    notes = []
    for line, expected in zip(script, outcomes, strict=True):
        note, reply = session.say(line)
        notes.append(note)
        if expected is None or expected == "refused":
            assert reply is None, (line, reply)
            continue
        dropped, text = expected
        assert reply == text, (line, reply, text)
        trimmed = (f"[history trimmed: dropped {dropped} oldest turn{'s' * (dropped > 1)} "
                   f"to fit the {WINDOW}-token context]")
        assert (trimmed in note) == bool(dropped), (line, note)
    return notes


# -- through a pseudo-terminal ------------------------------------------------------------------
@needs_pty
def test_turns_continue_the_whole_conversation_and_commands_edit_it(compact_dir):
    script = ["hi", "the movie", "/reset", "good", "/system be brief", "ok", "/system", "so"]
    outcomes = replay(compact_dir, script, max_new_tokens=8, marker="u:", **SAMPLED)
    # The second reply is the conversation's, not what the message alone gets.
    assert outcomes[1][1] != library_reply(compact_dir, [{"role": "user", "content": "the movie"}],
                                           max_new_tokens=8, **SAMPLED)
    assert all(o is None or o[1] for o in outcomes)  # no empty reply: the checks have teeth
    session = Session(compact_dir, "--max-new-tokens", "8", *SAMPLED_FLAGS)
    assert "its chat template" in session.banner and "64-token context" in session.banner
    notes = talk(session, script, outcomes)
    assert "[conversation cleared]" in notes[2]
    assert "[system prompt set]" in notes[4] and "[system prompt cleared]" in notes[6]
    assert session.end("eof") == 0  # Ctrl-D


@needs_pty
def test_oldest_turns_are_dropped_to_fit_the_context_and_the_system_prompt_stays(compact_dir):
    script = ["hi", "yo", "ok", "so", "no"]
    outcomes = replay(compact_dir, script, max_new_tokens=8, system="be brief", marker="u:",
                      **SAMPLED)
    assert [o[0] for o in outcomes] == [0, 0, 0, 1, 1]  # "so" drops "hi" and keeps "yo", "ok"
    session = Session(compact_dir, "--system", "be brief", "--max-new-tokens", "8",
                      *SAMPLED_FLAGS)
    talk(session, script, outcomes)
    assert session.end("/exit") == 0


@needs_pty
def test_default_template_greedy_and_a_message_too_long_for_the_context(tiny_gpt_dir):
    script = ["hi", "yo", "x" * 60, "so"]
    outcomes = replay(tiny_gpt_dir, script, max_new_tokens=8, no_repeat_ngram_size=1)
    assert outcomes[1][0] == 1 and outcomes[2] == "refused"
    session = Session(tiny_gpt_dir, "--max-new-tokens", "8", "--no-repeat-ngram-size", "1")
    assert "lmlab's default chat template" in session.banner
    notes = talk(session, script, outcomes)
    refusal = notes[2].replace("\r\n", "\n")
    assert refusal.count("\n") == 1 and refusal.startswith("lmlab chat: error: message not sent"), \
        refusal
    assert "context window of 64 tokens" in refusal
    # (Ctrl-C at the prompt is left out here: a SIGINT through the pseudo-terminal raced
    # readline's prompt and timed out once in CI; Ctrl-C is tested in process.)
    assert session.end("/exit") == 0


# -- in process -----------------------------------------------------------------------------------
def chat_in_process(capsys, monkeypatch, directory, lines, *flags):
    """(exit status, stdout, stderr) of `lmlab chat` given `lines`, then end of input."""
    feed = iter(lines)

    def fake_input(prompt=""):
        sys.stdout.write(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    return run_cli(capsys, "chat", "--model", directory, *flags)


def replies(out: str) -> list[str]:
    return [part[:part.rindex("\n" + PROMPT)] for part in out.split(REPLY)[1:]]


def test_reply_streams_token_by_token(capsys, monkeypatch, compact_dir):
    written_before_token = []
    real = chat_cli.generate_tokens

    def spy(*args, **kwargs):
        for step in real(*args, **kwargs):
            written_before_token.append(capsys.readouterr().out)
            yield step

    monkeypatch.setattr(chat_cli, "generate_tokens", spy)
    code, out, _ = chat_in_process(capsys, monkeypatch, compact_dir, ["hi"],
                                   "--max-new-tokens", "8", *SAMPLED_FLAGS)
    assert code == 0
    expected = library_reply(compact_dir, [{"role": "user", "content": "hi"}],
                             max_new_tokens=8, **SAMPLED)
    streamed = "".join(written_before_token) + out
    assert replies(streamed) == [expected]
    # Text was written while later tokens were still to come, in several pieces.
    pieces = [w for w in written_before_token[1:] if w]
    assert len(pieces) >= 3 and "".join(pieces) in expected


def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on(capsys, monkeypatch, compact_dir):
    real, calls = chat_cli.generate_tokens, []

    def interrupted_first(*args, **kwargs):
        calls.append(1)
        for i, step in enumerate(real(*args, **kwargs)):
            if len(calls) == 1 and i == 4:
                raise KeyboardInterrupt
            yield step

    monkeypatch.setattr(chat_cli, "generate_tokens", interrupted_first)
    code, out, err = chat_in_process(capsys, monkeypatch, compact_dir, ["hi", "yo"],
                                     "--max-new-tokens", "8", *SAMPLED_FLAGS)
    assert code == 0 and "[reply stopped]" in err
    first, second = replies(out)
    full = library_reply(compact_dir, [{"role": "user", "content": "hi"}],
                         max_new_tokens=8, **SAMPLED)
    assert first and full.startswith(first) and first != full
    # the partial reply is the history the next one continues
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "yo"}]
    assert second == library_reply(compact_dir, history, max_new_tokens=8, **SAMPLED)


def test_adapter_replies_are_the_adapted_models(capsys, monkeypatch, compact_dir, tmp_path):
    from lmlab.models.hf.peft import save_adapter
    from lmlab.models.lora import LoraConfig, apply_lora, lora_parameters

    adapted = apply_lora(from_pretrained(compact_dir), LoraConfig(r=2, alpha=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(adapted).values():
            p.normal_(0, 0.5)
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=None)
    adapted.eval()
    code, out, _ = chat_in_process(capsys, monkeypatch, compact_dir, ["hi"], "--adapter",
                                   tmp_path / "adapter", "--max-new-tokens", "8")
    assert code == 0
    message = [{"role": "user", "content": "hi"}]
    expected = library_reply(compact_dir, message, max_new_tokens=8, model=adapted)
    assert replies(out) == [expected]
    assert expected != library_reply(compact_dir, message, max_new_tokens=8)


def test_beam_search_reply_is_generates(capsys, monkeypatch, compact_dir):
    code, out, _ = chat_in_process(capsys, monkeypatch, compact_dir, ["hi"],
                                   "--max-new-tokens", "6", "--num-beams", "3")
    assert code == 0
    assert replies(out) == [library_reply(compact_dir, [{"role": "user", "content": "hi"}],
                                          max_new_tokens=6, num_beams=3)]


# -- the end of a turn ----------------------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_turn_markers_are_read_from_the_template(tiny_gpt_dir):
    _, tok = load(str(tiny_gpt_dir))
    # lmlab's default closes a reply with EOS (which stops decoding anyway)
    assert turn_markers(tok, DEFAULT_CHAT_TEMPLATE) == ["### User:"]
    assert turn_markers(tok, CHATML) == ["<|im_end|>", "<|im_start|>user"]
    assert turn_markers(tok, COMPACT) == ["u:"]


def test_turn_text_never_shows_a_marker_or_the_whitespace_before_it():
    text = StopText(["### User:"], trim=True)
    shown = [text.push(chunk) for chunk in ["Hi", " there", "\n\n#", "#", "# Us", "er:", "x"]]
    assert shown == ["Hi", " there", "", "", "", "", ""]
    assert text.ended and text.shown == "Hi there"
    # text that only looked like the start of a marker comes out once it is known not to be
    text = StopText(["### User:"], trim=True)
    assert [text.push(c) for c in ["a ", "##", "#!", " b "]] == ["a", "", " ###!", " b"]
    assert text.finish() == " " and text.shown == "a ###! b "


# -- errors ---------------------------------------------------------------------------------------
def test_a_bert_is_refused_naming_model(capsys, tiny_bert_dir):
    assert_usage_error(capsys, "chat", "--model", tiny_bert_dir, prefix="lmlab chat: error: ",
                       names=["--model", str(tiny_bert_dir), "cannot generate text"])


def test_a_missing_model_is_one_line(capsys, tmp_path):
    assert_usage_error(capsys, "chat", "--model", tmp_path / "nowhere",
                       prefix="lmlab chat: error: ", names=[str(tmp_path / "nowhere")])


@pytest.mark.parametrize("flags, names", [
    (["--max-new-tokens", "64"], ["--max-new-tokens 64", "64 tokens"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["--temperature", "0.5"], ["temperature", "--do-sample"]),
    (["--num-return-sequences", "2"], ["--num-return-sequences", "one reply"]),
    (["--max-length", "32"], ["--max-length", "--max-new-tokens"]),
    (["--num-beams", "2", "--stop", "x"], ["--stop", "--num-beams"]),
])
def test_bad_knobs_are_one_line(capsys, tiny_gpt_dir, flags, names):
    assert_usage_error(capsys, "chat", "--model", tiny_gpt_dir, *flags,
                       prefix="lmlab chat: error: ", names=names)


def test_a_missing_adapter_is_one_line(capsys, tiny_gpt_dir, tmp_path):
    assert_usage_error(capsys, "chat", "--model", tiny_gpt_dir, "--adapter", tmp_path / "none",
                       prefix="lmlab chat: error: ", names=[str(tmp_path / "none")])
