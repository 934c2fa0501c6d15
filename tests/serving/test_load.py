"""lmlab serve under load and faults (issue 14), over loopback against an in-process server.

CLIENTS concurrent clients send REQUESTS_PER_CLIENT requests each, one after another: completions
and chat, streamed and not, prompts and budgets of mixed lengths, one in ten leaving early (a
stream closed after its first event, a plain request abandoned). Meanwhile another client sends
a stream of malformed requests. Checked: no 5xx anywhere (client side and in /metrics); every
request that stayed answered exactly once, and with its own answer (completions echo their
prompt, which carries the request's number; a sample is compared with offline greedy decoding);
every stream ends with [DONE]; every malformed request a 4xx in OpenAI's error shape; the
clients that left freed their rows; no running row or queued job left at the end; the
process's RSS after the run within 10% of after a warm-up round.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import time

import httpx2 as httpx
import pytest
import torch

pytest.importorskip("uvicorn")

import lmlab
from lmlab.serving import ServerConfig, create_app
from lmlab.tokenizer.chat import encode_prompt

KEY = "load-key"
MODEL = "tiny"
CLIENTS = 64  # concurrent clients: the number, kept whatever the machine
# The 20 requests per client (1,280 requests) take about 11 s on a busy 2-core machine;
# lower this, not CLIENTS, if a slower machine needs it.
REQUESTS_PER_CLIENT = 20
WARMUP_PER_CLIENT = 2
LEAVE_EVERY = 10  # one request in ten disconnects early
LEAVER_TOKENS = 30  # what a leaver asks for (at most), EOS banned: what it would waste
CONTEXT = 64  # the tiny model's context window
CHECKED_OFFLINE = 24  # answered completions compared with offline greedy decoding
BODY_LIMIT = 20_000
WORDS = ["the", "movie", "was", "a", "and", "it", "is", "very", "so", "plot", "actor", "film",
         "good", "bad"]


@pytest.fixture(scope="module")
def server(tiny, live_server):
    model, tok = tiny
    app = create_app(ServerConfig(model_name=MODEL, api_key=KEY, max_queue=256, max_running=16,
                                  max_tokens_cap=LEAVER_TOKENS, max_body_bytes=BODY_LIMIT),
                     model=model, tokenizer=tok)
    with live_server(app) as live:
        yield live


# -- the requests -------------------------------------------------------------------------------


def plan(number: int, rng: random.Random, tok, eos: int) -> dict:
    """Request `number`: its endpoint, body, whether it is streamed and whether it leaves."""
    chat, stream = rng.random() < 0.25, rng.random() < 0.5
    leaves = number % LEAVE_EVERY == LEAVE_EVERY - 1
    words = 0 if leaves else rng.randint(0, 10)
    prompt = f"#{number}: " + " ".join(rng.choice(WORDS) for _ in range(words))
    messages = [{"role": "user", "content": prompt}]
    room = CONTEXT - len(encode_prompt(tok, messages) if chat else tok.encode(prompt))
    body = {"model": MODEL, "temperature": 0, "stream": stream,
            "max_tokens": min(LEAVER_TOKENS if leaves else rng.randint(1, 20), room)}
    if leaves:
        body["logit_bias"] = {str(eos): -100}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = messages
    else:
        body.update(prompt=prompt, echo=not leaves)
    return {"number": number, "chat": chat, "stream": stream, "leaves": leaves,
            "path": "/v1/chat/completions" if chat else "/v1/completions", "body": body,
            "prompt": prompt}


def parse_stream(raw: str, chat: bool) -> dict:
    """A streamed answer as {id, text, finish_reason, completion_tokens}; checks its framing."""
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], raw[-200:]
    assert "data: [DONE]" not in events[:-2]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert len({c["id"] for c in chunks}) == 1, "one stream, one response id"
    *content, last = chunks
    assert last["choices"] == [] and last["usage"] is not None  # include_usage
    finishes = [c["choices"][0]["finish_reason"] for c in content]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    if chat:
        assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    else:
        text = "".join(c["choices"][0]["text"] for c in content)
    return {"id": last["id"], "text": text, "finish_reason": finishes[-1],
            "completion_tokens": last["usage"]["completion_tokens"]}


def parse_plain(body: dict, chat: bool) -> dict:
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length")
    return {"id": body["id"], "text": choice["message"]["content"] if chat else choice["text"],
            "finish_reason": choice["finish_reason"],
            "completion_tokens": body["usage"]["completion_tokens"]}


async def send(client: httpx.AsyncClient, request: dict, rng: random.Random):
    """('answered', parsed), ('left', None) or ('status', (code, text))."""
    path, body = request["path"], request["body"]
    if request["stream"]:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                return "status", (response.status_code, (await response.aread()).decode())
            if request["leaves"]:  # the first event, then the connection is closed
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        return "left", None
            raw = "".join([part async for part in response.aiter_text()])
        return "answered", parse_stream(raw, request["chat"])
    task = asyncio.ensure_future(client.post(path, json=body))
    if request["leaves"]:  # abandoned while it decodes (or waits for a row)
        await asyncio.sleep(rng.uniform(0.0, 0.02))
        if not task.done():
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return "left", None
    response = await task
    if response.status_code != 200:
        return "status", (response.status_code, response.text)
    return "answered", parse_plain(response.json(), request["chat"])


async def one_client(url: str, requests: list[dict], seed: int) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        for request in requests:
            out.append((request, *await send(client, request, rng)))
    return out


# -- the malformed requests ----------------------------------------------------------------------


async def chunked_oversized():  # no Content-Length: the limit is enforced while reading
    yield b'{"model": "tiny", "prompt": "'
    for _ in range(BODY_LIMIT // 1000 + 5):
        yield b"x" * 1000
    yield b'"}'


GOOD_AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
# name -> (method, path, request keywords (a callable for a fresh body), expected status)
MALFORMED = {
    "bad JSON": ("POST", "/v1/completions", {"content": b'{"model": "tiny", "prompt": '}, 400),
    "not an object": ("POST", "/v1/completions", {"json": ["tiny", "x"]}, 400),
    "empty body": ("POST", "/v1/chat/completions", {"content": b""}, 400),
    "not UTF-8": ("POST", "/v1/completions", {"content": b"\xff\xfe\x00"}, 400),
    "nested too deeply": ("POST", "/v1/completions", {"content": b"[" * 10_000}, 400),
    "max_tokens a string": ("POST", "/v1/completions",
                            {"json": {"model": MODEL, "prompt": "x", "max_tokens": "5"}}, 400),
    "prompt a number": ("POST", "/v1/completions", {"json": {"model": MODEL, "prompt": 5}}, 400),
    "messages a string": ("POST", "/v1/chat/completions",
                          {"json": {"model": MODEL, "messages": "hi"}}, 400),
    "stream a string": ("POST", "/v1/completions",
                        {"json": {"model": MODEL, "prompt": "x", "stream": "yes"}}, 400),
    "negative max_tokens": ("POST", "/v1/completions",
                            {"json": {"model": MODEL, "prompt": "x", "max_tokens": -1}}, 400),
    "huge max_tokens": ("POST", "/v1/completions",
                        {"json": {"model": MODEL, "prompt": "x", "max_tokens": 10**30}}, 400),
    "huge chat max_tokens": ("POST", "/v1/chat/completions",
                             {"json": {"model": MODEL, "max_tokens": 2**40,
                                       "messages": [{"role": "user", "content": "x"}]}}, 400),
    "huge seed": ("POST", "/v1/completions",
                  {"json": {"model": MODEL, "prompt": "x", "seed": 2**70, "stream": True}}, 400),
    "tiny temperature": ("POST", "/v1/completions",
                         {"json": {"model": MODEL, "prompt": "x", "temperature": 1e-300}}, 400),
    "NaN logit bias": ("POST", "/v1/completions",
                       {"content": b'{"model": "tiny", "prompt": "x", "logit_bias": {"5": NaN}}',
                        "headers": JSON}, 400),
    "unknown field": ("POST", "/v1/completions",
                      {"json": {"model": MODEL, "prompt": "x", "frobnicate": 1}}, 400),
    "unsupported field": ("POST", "/v1/chat/completions",
                          {"json": {"model": MODEL, "tools": [{"type": "function"}],
                                    "messages": [{"role": "user", "content": "x"}]}}, 400),
    "token id outside the vocabulary": ("POST", "/v1/completions",
                                        {"json": {"model": MODEL, "prompt": [1, 10**9]}}, 400),
    "oversized body": ("POST", "/v1/completions",
                       {"json": {"model": MODEL, "prompt": "x" * (2 * BODY_LIMIT)}}, 413),
    "oversized chunked body": ("POST", "/v1/completions", lambda: {"content": chunked_oversized()},
                               413),
    "wrong key": ("POST", "/v1/completions", {"json": {"model": MODEL, "prompt": "x"},
                                              "headers": {"Authorization": "Bearer nope"}}, 401),
    "no key": ("GET", "/metrics", {"headers": {"Authorization": ""}}, 401),
    "wrong model": ("POST", "/v1/completions", {"json": {"model": "gpt-4", "prompt": "x"}}, 404),
    "unknown route": ("POST", "/v1/edits", {"json": {}}, 404),
    "wrong method": ("GET", "/v1/completions", {}, 405),
}


async def malformed_stream(url: str, until: asyncio.Event) -> list[tuple[str, int, str]]:
    """Every MALFORMED request in turn, round after round, until `until` is set (at least one
    round): (name, status, body) of each."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=GOOD_AUTH) as client:
        while not out or not until.is_set():
            for name, (method, path, keywords, _) in MALFORMED.items():
                keywords = keywords() if callable(keywords) else keywords
                response = await client.request(method, path, **keywords)
                out.append((name, response.status_code, response.text))
                await asyncio.sleep(0.005)
    return out


# -- one round: the clients and the malformed stream together ----------------------------------


async def load_round(url: str, *, per_client: int, seed: int, tok, eos: int):
    rng = random.Random(seed)
    first = seed * 100_000  # request numbers differ between rounds
    requests = [[plan(first + c * per_client + j, rng, tok, eos) for j in range(per_client)]
                for c in range(CLIENTS)]
    done = asyncio.Event()
    faults = asyncio.ensure_future(malformed_stream(url, done))
    try:
        results = await asyncio.gather(*(one_client(url, rs, seed * 1000 + c)
                                         for c, rs in enumerate(requests)))
    finally:
        done.set()
    return [r for rs in results for r in rs], await faults


def metrics(http: httpx.Client) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(http: httpx.Client) -> dict[str, float]:
    """/metrics once no row runs and no job waits (rows of clients that left go at the next
    step); fails after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        m = metrics(http)
        if m["lmlab_running_rows"] == 0 and m["lmlab_queue_length"] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy: {m['lmlab_running_rows']} rows, " \
                                             f"{m['lmlab_queue_length']} queued"
        time.sleep(0.05)


def rss_kib() -> int:
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def check_malformed(faults: list[tuple[str, int, str]]) -> None:
    assert {name for name, _, _ in faults} == set(MALFORMED)
    for name, status, text in faults:
        assert status == MALFORMED[name][3], (name, status, text)
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, (name, text)
        assert error["message"] and error["type"], (name, text)


def test_load_and_faults(server, tiny, single_thread, request):
    model, tok = tiny
    eos = model.config.eos_token_id
    http = httpx.Client(base_url=server.url, headers=GOOD_AUTH, timeout=30)
    request.addfinalizer(http.close)

    _, warm_faults = asyncio.run(load_round(server.url, per_client=WARMUP_PER_CLIENT, seed=1,
                                            tok=tok, eos=eos))
    check_malformed(warm_faults)
    before = wait_idle(http)
    rss_warm = rss_kib()

    results, faults = asyncio.run(load_round(server.url, per_client=REQUESTS_PER_CLIENT, seed=2,
                                             tok=tok, eos=eos))
    after = wait_idle(http)
    rss_after = rss_kib()

    # No 5xx, and nothing but the malformed requests answered with an error.
    statuses = [(r["number"], value) for r, kind, value in results if kind == "status"]
    assert statuses == [], statuses[:5]
    assert not [k for k in after if k.startswith("lmlab_requests_total") and 'status="5' in k]
    check_malformed(faults)

    # Every request that stayed answered once, with its own answer.
    answered = [(r, value) for r, kind, value in results if kind == "answered"]
    left = [r for r, kind, _ in results if kind == "left"]
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    assert len({r["number"] for r, _, _ in results}) == len(results)
    assert all(r["leaves"] for r in left)
    assert len(left) >= len(results) // LEAVE_EVERY // 2  # most leavers really left early
    assert len({value["id"] for _, value in answered}) == len(answered), "a response id repeated"
    for r, value in answered:
        if not r["chat"] and not r["leaves"]:  # echo: the answer carries its request's number
            echoed = tok.decode(tok.encode(r["prompt"]))
            assert value["text"].startswith(echoed) and f"#{r['number']}:" in echoed
        if value["finish_reason"] == "length":
            assert value["completion_tokens"] == r["body"]["max_tokens"]
    completions = [(r, v) for r, v in answered if not r["chat"] and not r["leaves"]]
    for r, value in random.Random(0).sample(completions, min(CHECKED_OFFLINE, len(completions))):
        ids = tok.encode(r["prompt"])
        new = lmlab.generate(model, torch.tensor([ids]),
                             max_new_tokens=r["body"]["max_tokens"])[0, len(ids):].tolist()
        new = new[:new.index(eos) + 1] if eos in new else new
        assert value["text"] == tok.decode(ids) + tok.decode(new, skip_special_tokens=True), r

    # The clients that left freed their rows: each would have cost LEAVER_TOKENS tokens.
    generated = (after["lmlab_generation_tokens_total"]
                 - before["lmlab_generation_tokens_total"])
    kept = sum(value["completion_tokens"] for _, value in answered)
    wasted = sum(r["body"]["max_tokens"] for r in left)
    assert generated - kept <= wasted // 2, (generated, kept, wasted)

    # No memory growth beyond the warm-up's.
    assert rss_after <= 1.10 * rss_warm, (rss_warm, rss_after)
