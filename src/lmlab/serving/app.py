"""`create_app`: lmlab's OpenAI-compatible HTTP server (FastAPI) over the decoding engine.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and /v1/models/{id}),
GET /health, GET /metrics (Prometheus text), GET / (the chat page). Every route but /health
and the static chat page needs the API key when one is set (`Authorization: Bearer KEY`);
the page asks for the key and sends it with every call it makes. Errors are OpenAI's JSON
shape with its statuses: 400 a bad parameter (named in `param`) or a prompt longer than the
context, 401 a missing or wrong key, 404 an unknown model or route, 413 a body over the limit,
429 a full queue, 503 while the model loads.

The HTTP layer only translates: requests become jobs for the engine's thread
(lmlab.serving.scheduler), which decodes every running request together, a step at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.errors import DataError
from lmlab.generation.protocol import default_token_id, model_device
from lmlab.generation.stopping import StopText
from lmlab.serving.metrics import Metrics
from lmlab.serving.params import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    generation_config,
    new_tokens,
)
from lmlab.serving.responses import (
    Choice,
    Generation,
    chat_logprobs,
    completion_logprobs,
    usage,
)
from lmlab.serving.scheduler import EngineLoop, Job, QueueFull
from lmlab.serving.schemas import APIError, ChatRequest, CompletionRequest, parse
from lmlab.tokenizer.chat import encode_prompt, template_source, turn_markers

log = logging.getLogger(__name__)

PUBLIC = {"/health", "/"}  # no key needed: liveness, and the static page (which asks for it)
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/"}


@dataclass
class ServerConfig:
    """How the server runs: the model's name in the API, the key, and the bounds."""

    model_name: str
    api_key: str | None = None
    max_queue: int = 256  # requests (prompts) waiting for rows; beyond: 429
    max_running: int = 16  # rows decoded at once (the engine's batch)
    max_tokens_cap: int | None = None  # the most new tokens one choice may ask for
    max_body_bytes: int = 1 << 20  # a larger request body: 413


class Server:
    """The app's state: model, tokenizer, engine loop, metrics; not ready while loading."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.model = self.tokenizer = self.loop = None
        self.template = None
        self.markers: list[str] = []
        self.created = int(time.time())
        self.load_error: str | None = None

    def load(self, load: Callable[[], tuple[object, object]]) -> None:
        """Load in this (background) thread; a failure is kept for /health and the 503s."""
        try:
            self.start(*load())
        except Exception as error:  # noqa: BLE001 — reported by every route, not swallowed
            log.error("lmlab serve: the model failed to load: %s", error)
            self.load_error = str(error) or type(error).__name__

    def start(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.template = template_source(tokenizer)
        self.markers = turn_markers(tokenizer, self.template)
        self.context = model.context_window
        self.vocab = model.config.vocab_size
        loop = EngineLoop(model, tokenizer, max_running=self.config.max_running,
                          max_queue=self.config.max_queue, metrics=self.metrics)
        loop.start()
        self.loop = loop  # last: the server is ready

    @property
    def ready(self) -> bool:
        return self.loop is not None

    def check_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}",
                           code="load_failed")
        if not self.ready:
            raise APIError(503, "the model is still loading; retry shortly", code="loading")

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", param="model",
                           code="model_not_found")


def create_app(config: ServerConfig, *, model=None, tokenizer=None,
               load: Callable[[], tuple[object, object]] | None = None) -> FastAPI:
    """The app serving `model` with `tokenizer` — or, with `load`, what it returns: loaded in
    a thread at startup, every route but /health answering 503 until it is done."""
    if (model is None) == (load is None):
        raise ValueError("give either model (with tokenizer) or load")
    server = Server(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load is None:
            server.start(model, tokenizer)
        else:
            threading.Thread(target=server.load, args=(load,), name="lmlab-load",
                             daemon=True).start()
        yield
        if server.loop is not None:
            server.loop.stop()

    app = FastAPI(title="lmlab serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, "internal server error"))

    @app.get("/health")
    async def health():
        if not server.ready:
            status = "loading" if server.load_error is None else "failed"
            return JSONResponse({"status": status, "error": server.load_error},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(server)]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        server.check_model(name)
        return model_card(server)

    @app.get("/")
    async def chat_page():
        page = resources.files("lmlab.serving").joinpath("static/chat.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    async def checked(request: Request, schema, endpoint: str):
        """The request's body as `schema`, once the model is ready and the body is valid JSON
        of that shape naming the served model (each check an OpenAI-style error)."""
        server.check_ready()
        body = await read_json(request, config.max_body_bytes)
        req = parse(schema, body, endpoint=endpoint)
        server.check_model(req.model)
        return req

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await checked(request, CompletionRequest, "completions")
        return await complete(server, request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await checked(request, ChatRequest, "chat")
        return await chat(server, request, req)

    return app


class Guard:
    """ASGI middleware: the API key on every route but PUBLIC, the declared body size, and
    the request counter by route and status."""

    def __init__(self, app, *, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        error = self.check(path, dict(scope["headers"]))
        if error is not None:
            await error_response(error)(scope, receive, counted_send)
        else:
            await self.app(scope, receive, counted_send)
        self.server.metrics.request(path if path in ROUTES else "other", status["code"])

    def check(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        key = self.server.config.api_key
        if key and path not in PUBLIC:
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     key.encode()):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                     "KEY'", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and \
                int(length) > self.server.config.max_body_bytes:
            return body_too_large(self.server.config.max_body_bytes)
        return None


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} "
                         "bytes", code="request_too_large")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def read_json(request: Request, limit: int):
    """The request's JSON body, read up to `limit` bytes (413 beyond; 400 if not JSON)."""
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        body.append(chunk)
    try:
        return json.loads(b"".join(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    except RecursionError:  # e.g. 100,000 "[": the parser's recursion limit, not a server fault
        raise APIError(400, "the request body's JSON is nested too deeply") from None


def model_card(server: Server) -> dict:
    card = {"id": server.config.model_name, "object": "model", "created": server.created,
            "owned_by": "lmlab"}
    if server.ready:
        card["max_model_len"] = server.context
    return card


# -- the two generating endpoints --------------------------------------------------------------


def prompt_ids(server: Server, prompt) -> list[list[int]]:
    """A completions `prompt` (a string, strings, token ids, lists of ids) as token id lists."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        prompts = [server.tokenizer.encode(p) for p in
                   ([prompt] if isinstance(prompt, str) else prompt)]
    elif prompt and isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    for ids in prompts:
        bad = [i for i in ids if not 0 <= i < server.vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is not in this model's vocabulary "
                                f"(0 .. {server.vocab - 1})", param="prompt")
    return prompts


def check_n(server: Server, n: int) -> None:
    if n > server.config.max_running:
        raise APIError(400, f"n is {n}, above the {server.config.max_running} rows this "
                            "server decodes at once (--max-running)", param="n")


def check_stream_options(req) -> bool:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true",
                       param="stream_options")
    return bool(req.stream_options and req.stream_options.include_usage)


def start(server: Server, prompts: list[list[int]], configs: list, *, n: int,
          logprobs: int | None, trim: bool, stops: list[list[str]]) -> Generation:
    """Queue one job per prompt (n rows each; none for a budget of 0 tokens): 429 when full."""
    out = asyncio.Queue()
    loop = asyncio.get_running_loop()
    choices, jobs = [], []
    for p, (ids, config) in enumerate(zip(prompts, configs)):
        for i in range(n):
            choices.append(Choice(index=p * n + i, stop_text=StopText(stops[p], trim=trim)))
        if config.max_new_tokens == 0:
            for choice in choices[-n:]:
                choice.finish_reason = "length"
            continue
        jobs.append(Job(ids=ids, n=n, config=config, out=out, loop=loop, first_choice=p * n,
                        logprobs=logprobs))
    try:
        server.loop.submit(jobs)
    except QueueFull as error:
        raise APIError(429, str(error), code="queue_full") from None
    server.metrics.tokens(prompt=sum(len(ids) for ids in prompts))
    return Generation(server.loop, jobs, out, choices)


async def until_done_or_gone(request: Request, generation: Generation) -> bool:
    """Decode a response that is not streamed; False (and its rows cancelled) when the client
    disconnects first."""
    work = asyncio.ensure_future(generation.run())
    gone = asyncio.ensure_future(disconnected(request))
    done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        gone.cancel()
        work.result()  # raises what decoding raised
        return True
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work  # its `finally` cancels the rows
    return False


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stream_response(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def prompt_logprobs(model, ids: list[int], top: int) -> list[tuple[float | None, list | None]]:
    """Each prompt token's log-prob given the tokens before it (None for the first), and the
    `top` most likely tokens' there: what `echo` with `logprobs` returns, so that a harness
    can score a text's likelihood."""
    with torch.inference_mode():
        x = torch.tensor([ids], device=model_device(model))
        logits = model(x, cache=model.new_cache(1, len(ids)))[0, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen = log_probs.gather(1, x[0, 1:, None])[:, 0].tolist()
        best = log_probs.topk(min(top, log_probs.shape[-1]), dim=-1) if top else None
    out: list[tuple[float | None, list | None]] = [(None, None)]
    for i, lp in enumerate(chosen):
        out.append((lp, [] if best is None else
                    list(zip(best.indices[i].tolist(), best.values[i].tolist()))))
    return out


async def complete(server: Server, request: Request, req: CompletionRequest):
    n = req.n or 1
    check_n(server, n)
    if req.best_of is not None and req.best_of != n:
        raise APIError(400, "best_of other than n is not supported (lmlab does not rank "
                            "samples); drop best_of", param="best_of")
    include_usage = check_stream_options(req)
    prompts = prompt_ids(server, req.prompt)
    eos = [] if (e := default_token_id(server.model, "eos_token_id")) is None else [e]
    configs = []
    for ids in prompts:
        budget = new_tokens(req.max_tokens, name="max_tokens", prompt_len=len(ids),
                            context=server.context, cap=server.config.max_tokens_cap,
                            default=COMPLETIONS_DEFAULT_MAX_TOKENS, prompt_param="prompt")
        configs.append(generation_config(req, max_new_tokens=budget, eos=eos, vocab=server.vocab))
    stops = [configs[0].stop_strings or []] * len(prompts)
    echoed = []
    if req.echo:
        for ids in prompts:
            lps = (await asyncio.to_thread(prompt_logprobs, server.model, ids, req.logprobs)
                   if req.logprobs is not None else None)
            echoed.append((server.tokenizer.decode(ids), lps))
    log.debug("completion request from user %r: %d prompt(s), n=%d", req.user, len(prompts), n)
    generation = start(server, prompts, configs, n=n, logprobs=req.logprobs, trim=False,
                       stops=stops)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    prompt_tokens = sum(len(ids) for ids in prompts)

    def logprobs_of(choice_index: int, tokens: list[int], entries, offset: int,
                    with_prompt: bool):
        if req.logprobs is None:
            return None
        if with_prompt and req.echo:
            lps = echoed[choice_index // n][1]
            ids = prompts[choice_index // n]
            return completion_logprobs(server.tokenizer, ids + tokens, lps + entries)
        return completion_logprobs(server.tokenizer, tokens, entries, offset=offset)

    if not req.stream:
        if not await until_done_or_gone(request, generation):
            return Response(status_code=499)
        choices = []
        for c in generation.choices:
            prefix = echoed[c.index // n][0] if req.echo else ""
            choices.append({"index": c.index, "text": prefix + c.text,
                            "logprobs": logprobs_of(c.index, c.tokens, c.logprobs, 0, True),
                            "finish_reason": c.finish_reason})
        return {**head, "choices": choices, "usage": usage(prompt_tokens, generation.choices)}

    async def events():
        extra = {"usage": None} if include_usage else {}
        offsets = [0] * len(generation.choices)
        if req.echo:
            for c in generation.choices:
                text, lps = echoed[c.index // n]
                offsets[c.index] = len(text)
                lp = (None if req.logprobs is None else completion_logprobs(
                    server.tokenizer, prompts[c.index // n], lps))
                yield sse({**head, "choices": [{"index": c.index, "text": text, "logprobs": lp,
                                                "finish_reason": None}], **extra})
        for c in generation.choices:  # max_tokens 0: finished before any step
            if c.finish_reason is not None:
                yield sse({**head, "choices": [{"index": c.index, "text": "", "logprobs": None,
                                                "finish_reason": c.finish_reason}], **extra})
        async for deltas in generation.deltas():
            for d in deltas:
                if not d.text and d.finish_reason is None and req.logprobs is None:
                    continue
                entries = [(t.logprob, t.top_logprobs or []) for t in d.tokens]
                lp = logprobs_of(d.choice.index, [t.token for t in d.tokens], entries,
                                 offsets[d.choice.index], False)
                offsets[d.choice.index] += len(d.text)
                yield sse({**head, "choices": [{"index": d.choice.index, "text": d.text,
                                                "logprobs": lp,
                                                "finish_reason": d.finish_reason}], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, generation.choices)})
        yield "data: [DONE]\n\n"

    return stream_response(events())


def chat_prompt(server: Server, req: ChatRequest) -> list[int]:
    """The conversation rendered by the model's chat template — lmlab.tokenizer.chat, the code
    training renders it with — with the generation prompt."""
    messages = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        messages.append({"role": "system" if m.role == "developer" else m.role,
                         "content": content})
    try:
        return encode_prompt(server.tokenizer, messages, template=server.template)
    except DataError as error:
        raise APIError(400, str(error), param="messages") from None


async def chat(server: Server, request: Request, req: ChatRequest):
    n = req.n or 1
    check_n(server, n)
    include_usage = check_stream_options(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; give one",
                       param="max_tokens")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    ids = chat_prompt(server, req)
    budget = new_tokens(requested, name=name, prompt_len=len(ids), context=server.context,
                        cap=server.config.max_tokens_cap, default=None, prompt_param="messages")
    eos = {e for e in (default_token_id(server.model, "eos_token_id"),
                       server.tokenizer.eos_token_id) if e is not None}
    config = generation_config(req, max_new_tokens=budget, eos=sorted(eos), vocab=server.vocab,
                               extra_stops=server.markers)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    log.debug("chat request from user %r: %d prompt tokens, n=%d", req.user, len(ids), n)
    generation = start(server, [ids], [config], n=n, logprobs=logprobs, trim=True,
                       stops=[config.stop_strings or []])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if not req.stream:
        if not await until_done_or_gone(request, generation):
            return Response(status_code=499)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": (chat_logprobs(server.tokenizer, c.tokens, c.logprobs)
                                 if logprobs is not None else None),
                    "finish_reason": c.finish_reason} for c in generation.choices]
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage(len(ids), generation.choices)}

    head = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": req.model}

    async def events():
        extra = {"usage": None} if include_usage else {}
        for c in generation.choices:  # the role first, as OpenAI sends it
            yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant",
                                                                         "content": ""},
                                            "logprobs": None, "finish_reason": None}], **extra})
        for c in generation.choices:  # max_tokens 0 cannot happen for chat (>= 1), but
            if c.finish_reason is not None:  # a full context would end here
                yield sse({**head, "choices": [{"index": c.index, "delta": {},
                                                "logprobs": None,
                                                "finish_reason": c.finish_reason}], **extra})
        async for deltas in generation.deltas():
            for d in deltas:
                if not d.text and d.finish_reason is None and logprobs is None:
                    continue
                lp = None
                if logprobs is not None:
                    lp = chat_logprobs(server.tokenizer, [t.token for t in d.tokens],
                                       [(t.logprob, t.top_logprobs or []) for t in d.tokens])
                delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                yield sse({**head, "choices": [{"index": d.choice.index, "delta": delta,
                                                "logprobs": lp,
                                                "finish_reason": d.finish_reason}], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(len(ids), generation.choices)})
        yield "data: [DONE]\n\n"

    return stream_response(events())
