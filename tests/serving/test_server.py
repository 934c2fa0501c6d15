"""lmlab serve, driven over loopback by the official `openai` client (sync and async, streamed
and not): every endpoint, every parameter honoured or refused by name, every error status,
identity with offline `lmlab.generate` alone and under concurrency, and a client that leaves
mid-stream freeing its row."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx2 as httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import lmlab
from lmlab.serving import ServerConfig, create_app
from lmlab.tokenizer.chat import encode_prompt

KEY = "test-key"
MODEL = "tiny"
CAP = 40


@pytest.fixture(scope="module")
def live(tiny, live_server):
    model, tok = tiny
    app = create_app(ServerConfig(model_name=MODEL, api_key=KEY, max_queue=64, max_running=16,
                                  max_tokens_cap=CAP, max_body_bytes=20_000),
                     model=model, tokenizer=tok)
    with live_server(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as c:
        yield c


def offline(model, ids, **knobs) -> list[list[int]]:
    """lmlab.generate's new tokens per returned sequence, up to (and with) the first EOS."""
    out = lmlab.generate(model, torch.tensor([ids]), **knobs)[:, len(ids):].tolist()
    eos = model.config.eos_token_id
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


def text_of(tok, tokens) -> str:
    return tok.decode(tokens, skip_special_tokens=True)


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# -- completions -------------------------------------------------------------------------------


def test_greedy_completion_equals_offline_generate(client, tiny):
    model, tok = tiny
    prompt = "def add(a, b):"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                    logprobs=2)
    ids = tok.encode(prompt)
    want = offline(model, ids, max_new_tokens=12)[0]
    choice = out.choices[0]
    assert choice.text == text_of(tok, want)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(want)
    assert choice.finish_reason == ("stop" if want[-1] == model.config.eos_token_id else "length")
    # log-probs: the model's own, and greedy picks the most likely token
    assert len(choice.logprobs.token_logprobs) == len(want)
    logits = model(torch.tensor([ids + want[:1]]), cache=model.new_cache(1, len(ids) + 1))
    first = torch.log_softmax(logits[0, len(ids) - 1].float(), -1)
    assert choice.logprobs.token_logprobs[0] == pytest.approx(first.max().item(), abs=1e-4)
    assert max(choice.logprobs.top_logprobs[0].values()) == pytest.approx(
        choice.logprobs.token_logprobs[0], abs=1e-6)
    twice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      n=2)
    assert [c.text for c in twice.choices] == [choice.text] * 2


def test_seeded_sampling_with_n_equals_offline_generate(client, tiny):
    model, tok = tiny
    ids = tok.encode("import os")
    knobs = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, n=3,
                                    extra_body={"top_k": 50}, **knobs)
    want = offline(model, ids, max_new_tokens=10, do_sample=True, num_return_sequences=3,
                   top_k=50, **knobs)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [text_of(tok, w) for w in want]
    assert len({c.text for c in out.choices}) > 1  # n samples, not one repeated
    assert out.usage.completion_tokens == sum(len(w) for w in want)


def test_prompt_list_echo_and_prompt_logprobs(client, tiny):
    model, tok = tiny
    prompts = ["class A:", "for i in range(3):"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True,
                                    logprobs=1)
    assert [c.text for c in out.choices] == prompts
    ids = tok.encode(prompts[1])
    logits = model(torch.tensor([ids]), cache=model.new_cache(1, len(ids)))[0].float()
    expect = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    lp = out.choices[1].logprobs
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expect.tolist(), abs=1e-4)
    assert out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)


def test_stop_string_is_cut_and_never_streamed(client, tiny):
    model, tok = tiny
    ids = tok.encode("x = 1")
    full = text_of(tok, offline(model, ids, max_new_tokens=30, eos_token_id=[])[0])
    stop = full[8:10]  # a piece of what greedy decoding writes
    assert stop.strip()
    cut = full[:full.index(stop)]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0,
                                    stop=[stop, "never-written"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=ids, max_tokens=30, temperature=0, stop=stop, stream=True)]
    assert "".join(chunks) == cut


def test_streamed_completion_with_usage(client, tiny):
    model, tok = tiny
    ids = tok.encode("while True:")
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    want = offline(model, ids, max_new_tokens=8)[0]
    assert "".join(c.choices[0].text for c in chunks[:-1]) == text_of(tok, want)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)


# -- chat ----------------------------------------------------------------------------------------


def test_chat_uses_the_training_template_and_streams_like_openai(client, tiny, http):
    _, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                         temperature=0)
    ids = encode_prompt(tok, messages)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == out.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    # the raw stream: data: {json} events, then [DONE]
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": MODEL, "messages": messages, "max_tokens": 3,
                           "stream": True}) as response:
        raw = "".join(response.iter_text())
    events = raw.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_chat_logprobs_and_seeded_n(client):
    messages = [{"role": "user", "content": "write a loop"}]
    kw = {"model": MODEL, "messages": messages, "max_completion_tokens": 6, "seed": 7, "n": 2,
          "logprobs": True, "top_logprobs": 3}
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    content = a.choices[0].logprobs.content
    assert content and len(content[0].top_logprobs) == 3
    assert all(t.logprob <= 0 for t in content)


# -- the same answer under load ---------------------------------------------------------------


def test_sixteen_concurrent_async_requests_equal_offline(live, tiny):
    model, tok = tiny
    prompts = ["def f(x):", "import sys", "class B(A):", "return x + 1"] * 4
    knobs = [{"temperature": 0}, {"temperature": 0.8, "seed": 11}] * 8

    async def run():
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        async def one(i):
            if i % 3 == 0:  # some streamed
                stream = await client.completions.create(model=MODEL, prompt=prompts[i],
                                                         max_tokens=12, stream=True, **knobs[i])
                return "".join([c.choices[0].text async for c in stream])
            out = await client.completions.create(model=MODEL, prompt=prompts[i],
                                                  max_tokens=12, **knobs[i])
            return out.choices[0].text
        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    texts = asyncio.run(run())
    for prompt, knob, text in zip(prompts, knobs, texts):
        sample = {"do_sample": True, **knob} if knob["temperature"] else {}
        want = offline(model, tok.encode(prompt), max_new_tokens=12, **sample)[0]
        assert text == text_of(tok, want), (prompt, knob)


# -- errors --------------------------------------------------------------------------------------


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "max_tokens": CAP + 1}, "max_tokens"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"prompt": "word " * 80}, "prompt"),
    ({"prompt": "x", "max_tokens": 63}, "max_tokens"),
    ({"prompt": [1, 100000]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "n": 17}, "n"),
])
def test_bad_parameters_are_400_naming_them(http, body, param):
    error = error_of(http.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
])
def test_bad_chat_parameters_are_400_naming_them(http, body, param):
    error = error_of(http.post("/v1/chat/completions", json={"model": MODEL, **body}), 400)
    assert error["param"] == param


def test_error_statuses(live, http, client):
    anonymous = httpx.Client(base_url=live.url, timeout=10)
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        error_of(anonymous.request(method, path), 401)
        error_of(anonymous.request(method, path, headers={"Authorization": "Bearer nope"}), 401)
    assert anonymous.get("/health").json() == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [MODEL]
    error_of(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404)
    error_of(http.get("/v1/nothing-here"), 404)
    error_of(http.post("/v1/completions", content=b"{not json"), 400)
    error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 30_000}), 413)

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'
    error_of(http.post("/v1/completions", content=chunked()), 413)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", temperature=3)
    assert caught.value.body["param"] == "temperature"


@pytest.fixture(scope="module")
def slow(tiny, live_server, slow_model):
    model, tok = tiny
    app = create_app(ServerConfig(model_name=MODEL, max_queue=1, max_running=1),
                     model=slow_model(model), tokenizer=tok)
    with live_server(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_full_queue_is_429(slow):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 10, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(base_url=str(slow.base_url), timeout=30) as c:
            first = asyncio.ensure_future(c.post("/v1/completions", json=body))
            while metric(slow, "lmlab_running_rows") != 1:  # the one row is taken
                await asyncio.sleep(0.01)
            rest = await asyncio.gather(*(c.post("/v1/completions", json=body)
                                          for _ in range(5)))
            return [await first, *rest]

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429, 429, 429]
    assert error_of(next(r for r in responses if r.status_code == 429), 429)["code"]
    assert len({r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}) == 1


def test_loading_is_503(tiny, live_server):
    model, tok = tiny
    release = threading.Event()

    def load():
        release.wait(20)
        return model, tok

    app = create_app(ServerConfig(model_name=MODEL), load=load)
    with live_server(app) as server:
        c = httpx.Client(base_url=server.url, timeout=10)
        assert c.get("/health").status_code == 503
        error_of(c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 503)
        release.set()
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


def test_disconnect_mid_stream_frees_the_row(slow, tiny):
    _, tok = tiny
    before = metric(slow, "lmlab_cancelled_rows_total")
    body = {"model": MODEL, "prompt": "a", "max_tokens": 60, "stream": True,
            "logit_bias": {str(tok.eos_token_id): -100}}
    with slow.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(slow, "lmlab_running_rows") == 1
    # the client has gone: its row leaves at the next step
    deadline = time.monotonic() + 10
    while metric(slow, "lmlab_running_rows") != 0:
        assert time.monotonic() < deadline, "the row kept decoding"
        time.sleep(0.02)
    assert metric(slow, "lmlab_cancelled_rows_total") == before + 1
    assert metric(slow, "lmlab_generation_tokens_total") < 40
    assert metric(slow, "lmlab_time_to_first_token_seconds_count") >= 1
