"""`slm serve`: one trained model behind a small HTTP API and a web page.

    POST /v1/generate          {"prompt": "once upon a time", "max_new_tokens": 100, ...} -> {"text": ..., ...}
    POST /v1/generate/stream   same body -> Server-Sent Events: data: {"text": piece} ... data: {"done": true, ...}
    GET  /health               model size, training step, device, limits, generations running
    GET  /                     a page to try the model in a browser (static/index.html)
    GET  /docs, /openapi.json  the API schema (made by FastAPI)

The model is loaded once and shared: every request samples with its own KV cache (slm.generate.sampling), so
requests never touch each other's state. Token steps run in worker threads, so the event loop stays free to
answer other requests while a story is being written. At most ``max_concurrency`` generations run at once;
one more is refused at once with 503 instead of waiting in a queue, so a burst cannot pile up work.
"""

# no `from __future__ import annotations` here: FastAPI reads the request models, defined inside create_app,
# from the endpoints' annotations when the routes are declared
import json
import logging
import socket
import threading
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from slm.errors import SlmError
from slm.generate import StreamDecoder, generate_ids, load_model
from slm.generate.model_io import LoadedModel

log = logging.getLogger("slm.serve")


class Slots:
    """At most ``n`` generations at once. ``try_acquire`` never waits: a full server answers 503 instead."""

    def __init__(self, n: int):
        self.n, self.in_use, self.lock = n, 0, threading.Lock()

    def try_acquire(self) -> bool:
        with self.lock:
            if self.in_use >= self.n:
                return False
            self.in_use += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.in_use -= 1


class Generation:
    """One request's sampling loop, one token per ``step()`` (each a forward pass: call it in a worker thread).

    ``tokens`` counts the new tokens (not <|endoftext|>); ``finish_reason`` is final once ``done``.
    """

    def __init__(self, lm: LoadedModel, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, seed: int | None):
        tok = lm.tokenizer
        prompt_ids = tok.encode(prompt) if prompt else [tok.eot_id]  # an empty prompt starts a new story
        self.ids = generate_ids(lm.model, prompt_ids, max_new_tokens, temperature, top_k or None, top_p,
                                eos_id=tok.eot_id, seed=seed, dtype=lm.dtype)
        self.eot_id, self.decoder = tok.eot_id, StreamDecoder(tok)
        self.tokens, self.finish_reason, self.done = 0, "length", False

    def step(self) -> str:
        """Text of the next token ('' while a multi-byte character is unfinished); at the end, what is left."""
        with torch.inference_mode():  # entered and left within this call: grad mode is per thread
            token = next(self.ids, None)
        if token is None or token == self.eot_id:
            self.done, self.finish_reason = True, "length" if token is None else "eos"
            return self.decoder.flush()
        self.tokens += 1
        return self.decoder.push(token)

    def run(self) -> str:
        pieces = []
        while not self.done:
            pieces.append(self.step())
        return "".join(pieces)

    def close(self) -> None:
        self.ids.close()


class SlotStreamingResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` when it ends, however it ends: finished, client gone
    (Starlette cancels the stream when the client disconnects), or server shutting down."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data: dict) -> str:
    """One Server-Sent Event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(model: str | Path | LoadedModel, max_prompt_chars: int = 4000, max_new_tokens_limit: int = 1024,
               max_concurrency: int = 4) -> FastAPI:
    """The FastAPI app serving ``model`` (a checkpoint path, loaded once, or a ``LoadedModel``)."""
    for name, value in [("max_prompt_chars", max_prompt_chars), ("max_new_tokens_limit", max_new_tokens_limit),
                        ("max_concurrency", max_concurrency)]:
        if value < 1:
            raise SlmError(f"{name} must be at least 1, got {value}")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    params = lm.model.count_parameters()
    slots = Slots(max_concurrency)
    page = resources.files("slm.serve").joinpath("static", "index.html").read_text(encoding="utf-8")

    # request and response bodies; the bounds become 422 errors and part of the OpenAPI schema
    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored
        prompt: str = Field("", max_length=max_prompt_chars, description="text to continue ('' = a new story)")
        max_new_tokens: int = Field(min(200, max_new_tokens_limit), ge=1, le=max_new_tokens_limit)
        temperature: float = Field(0.8, ge=0, le=2, description="0 = greedy (always the most likely token)")
        top_k: int = Field(200, ge=0, description="sample from the k most likely tokens (0 = all)")
        top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold (1 = off)")
        seed: int | None = Field(None, ge=0, le=2**63 - 1, description="the same seed gives the same text")

    class GenerateResponse(BaseModel):
        text: str
        prompt: str
        tokens: int = Field(description="new tokens generated, <|endoftext|> not counted")
        finish_reason: Literal["eos", "length"]
        step: int = Field(description="training step of the checkpoint")

    app = FastAPI(title="slm", version="0.1.0",
                  description="Text generation with a small GPT trained by slm. Try it in a browser at /.")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        # FastAPI's 422, without echoing the input back (it can be a very long prompt)
        detail = [{k: v for k, v in err.items() if k != "input"} for err in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)

    def start(req: GenerateRequest) -> Generation:
        """Take a generation slot (or answer 503 at once) and set up the sampling loop."""
        if not slots.try_acquire():
            raise HTTPException(503, f"busy: {max_concurrency} generations are running; retry shortly",
                                headers={"Retry-After": "1"})
        try:
            return Generation(lm, req.prompt, req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.seed)
        except BaseException:
            slots.release()
            raise

    busy = {503: {"description": "max_concurrency generations are already running"}}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=busy)
    async def generate(req: GenerateRequest):
        """Write a continuation of the prompt and return it whole."""
        gen = start(req)
        try:
            text = await run_in_threadpool(gen.run)
        finally:
            slots.release()
        return GenerateResponse(text=text, prompt=req.prompt, tokens=gen.tokens, finish_reason=gen.finish_reason,
                                step=lm.step)

    @app.post("/v1/generate/stream", responses={200: {"content": {"text/event-stream": {}}}, **busy})
    async def generate_stream(req: GenerateRequest):
        """Server-Sent Events: `data: {"text": piece}` as each piece is decoded, then
        `data: {"done": true, "finish_reason": ..., "tokens": n}`."""
        gen = start(req)

        async def events():
            try:
                while not gen.done:
                    piece = await run_in_threadpool(gen.step)  # one forward pass, off the event loop
                    if piece:
                        yield sse({"text": piece})
            except Exception as e:  # the 200 header is sent already: report the failure as the last event
                log.exception("generation failed")
                yield sse({"error": f"generation failed: {e}"})
                return
            yield sse({"done": True, "finish_reason": gen.finish_reason, "tokens": gen.tokens})

        def close():  # runs when the response ends, also when the client went away mid-story
            gen.close()
            slots.release()

        return SlotStreamingResponse(events(), on_close=close)

    @app.get("/health")
    async def health():
        """Liveness and what is served."""
        return {"status": "ok", "params": params, "step": lm.step, "device": str(lm.device),
                "generating": slots.in_use,
                "limits": {"max_prompt_chars": max_prompt_chars, "max_new_tokens": max_new_tokens_limit,
                           "max_concurrency": max_concurrency}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0 = any free port), or a one-line error saying the address is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SlmError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    return sock


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          **limits) -> None:
    """Load ``checkpoint`` and serve it with uvicorn until Ctrl-C. ``limits``: the keyword arguments of
    ``create_app`` (max_prompt_chars, max_new_tokens_limit, max_concurrency)."""
    import uvicorn

    sock = bind(host, port)  # first, so a taken port is reported before a long model load
    try:
        lm = load_model(checkpoint, device)
        app = create_app(lm, **limits)
    except BaseException:
        sock.close()
        raise
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}/"
    print(f"serving {checkpoint} (step {lm.step:,}, {lm.model.count_parameters():,} parameters, {lm.device}) "
          f"at {url}  (API schema: {url}openapi.json, {url}docs; Ctrl-C to stop)", flush=True)
    # timeout_graceful_shutdown: on Ctrl-C, streams still running get 5 s to finish before they are cut
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
