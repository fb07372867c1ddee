"""slm serve: the HTTP API in process (TestClient), a real uvicorn server under a burst of requests and with
clients that hang up, and the web page driven in headless Chromium. Every request goes to 127.0.0.1."""

import contextlib
import copy
import dataclasses
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from slm.generate import load_model
from slm.serve.app import bind, create_app

CHROMIUM = "/usr/bin/chromium"
STORY = {"prompt": "once upon a time", "max_new_tokens": 40, "temperature": 0.8, "top_k": 200, "seed": 1}


@pytest.fixture(scope="module")
def lm(trained_run):
    run_dir, _, _ = trained_run
    return load_model(run_dir / "best.pt", device="cpu")


@pytest.fixture(scope="module")
def client(lm):
    return TestClient(create_app(lm, max_prompt_chars=200, max_new_tokens_limit=64))


@pytest.fixture(scope="module")
def endless_lm(lm):
    """A copy of the model that never writes <|endoftext|>: every story runs to max_new_tokens, so a
    generation holds its slot for as long as a test needs it to."""
    model, eot = copy.deepcopy(lm.model), lm.tokenizer.eot_id
    model.register_forward_hook(lambda module, args, out: (out[0].index_fill(-1, torch.tensor([eot]), -torch.inf),
                                                           out[1]))
    return dataclasses.replace(lm, model=model)


@contextlib.contextmanager
def live_server(app):
    """``app`` under a real uvicorn server on 127.0.0.1 (a free port) in a background thread; yields its URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def sse_events(body: str) -> list[dict]:
    return [json.loads(block.removeprefix("data: ")) for block in body.split("\n\n") if block.strip()]


def wait_until_idle(url: str, seconds: float = 5.0) -> float:
    """Seconds until /health reports no generation running (fails after ``seconds``)."""
    start = time.monotonic()
    while (busy := httpx.get(f"{url}/health", trust_env=False).json()["generating"]) != 0:
        assert time.monotonic() - start < seconds, f"{busy} generation slot(s) still taken after {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


# --- the API, in process ---

def test_generate_is_reproducible(client, lm):
    first = client.post("/v1/generate", json=STORY)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["text"].strip() and out["prompt"] == STORY["prompt"] and out["step"] == lm.step
    assert 1 <= out["tokens"] <= 40 and out["finish_reason"] in ("eos", "length")
    assert (out["finish_reason"] == "length") == (out["tokens"] == 40)
    assert client.post("/v1/generate", json=STORY).json() == out  # same seed, same story
    others = {client.post("/v1/generate", json={**STORY, "seed": s}).json()["text"] for s in (2, 3, 4)}
    assert len(others | {out["text"]}) > 1  # other seeds, other stories


def test_generate_defaults_and_empty_prompt(client):
    r = client.post("/v1/generate", json={"max_new_tokens": 8, "seed": 0})  # '' starts a new story
    assert r.status_code == 200 and r.json()["prompt"] == "" and r.json()["tokens"] >= 1
    greedy = [client.post("/v1/generate", json={"prompt": "the dog", "max_new_tokens": 8, "temperature": 0}).json()
              for _ in range(2)]
    assert greedy[0] == greedy[1]  # temperature 0 is greedy: no seed needed


def test_stream_sends_pieces_then_done(client):
    r = client.post("/v1/generate/stream", json=STORY)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    *pieces, last = events
    assert len(pieces) >= 3 and all(set(e) == {"text"} and e["text"] for e in pieces)
    whole = client.post("/v1/generate", json=STORY).json()
    assert last == {"done": True, "finish_reason": whole["finish_reason"], "tokens": whole["tokens"]}
    assert "".join(e["text"] for e in pieces) == whole["text"]  # the stream is the same story, in pieces


@pytest.mark.parametrize("body, field", [
    ({**STORY, "temperature": -0.1}, "temperature"),
    ({**STORY, "temperature": 2.5}, "temperature"),
    ({**STORY, "temperature": "hot"}, "temperature"),
    ({**STORY, "top_k": -1}, "top_k"),
    ({**STORY, "top_p": 0}, "top_p"),
    ({**STORY, "top_p": 1.5}, "top_p"),
    ({**STORY, "max_new_tokens": 0}, "max_new_tokens"),
    ({**STORY, "max_new_tokens": 65}, "max_new_tokens"),  # over this app's limit of 64
    ({**STORY, "max_new_tokens": 1.5}, "max_new_tokens"),
    ({**STORY, "seed": -1}, "seed"),
    ({**STORY, "prompt": "x" * 201}, "prompt"),  # over max_prompt_chars=200
    ({**STORY, "prompt": 7}, "prompt"),
    ({**STORY, "max_tokens": 10}, "max_tokens"),  # misspelt field
    (["once upon a time"], None),  # not an object
])
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate/stream"])
def test_bad_input_is_a_clean_422(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail and all(e["msg"] for e in detail)
    if field:
        assert field in detail[0]["loc"]
    assert len(r.text) < 1000  # the input is not echoed back


@pytest.mark.parametrize("raw", [b'{"prompt": "once', b"", b"prompt=once"])
def test_malformed_json_is_a_clean_4xx(client, raw):
    r = client.post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["detail"]


def test_health(client, lm):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["params"] == lm.model.count_parameters() and h["step"] == lm.step
    assert h["device"] == "cpu" and h["generating"] == 0
    assert h["limits"] == {"max_prompt_chars": 200, "max_new_tokens": 64, "max_concurrency": 4}


def test_openapi_lists_the_routes(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/generate/stream", "/health"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert request["temperature"]["maximum"] == 2 and request["max_new_tokens"]["maximum"] == 64


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for element in ('id="prompt"', 'id="temperature"', 'id="top_k"', 'id="top_p"', 'id="max_new_tokens"',
                    'id="seed"', 'id="generate"', 'id="output"'):
        assert element in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", html)  # nothing fetched elsewhere


# --- a real server ---

def test_busy_server_answers_503_and_frees_slots_when_clients_hang_up(endless_lm):
    app = create_app(endless_lm, max_new_tokens_limit=100_000, max_concurrency=2)
    body = {**STORY, "max_new_tokens": 100_000}  # minutes of work: only a hang-up ends these early
    with live_server(app) as url, contextlib.ExitStack() as streams:
        readers = []  # keep each line iterator alive: dropping one closes its connection
        for _ in range(2):
            r = streams.enter_context(httpx.stream("POST", f"{url}/v1/generate/stream", json=body, timeout=30,
                                                   trust_env=False))
            readers.append(r.iter_lines())
            assert r.status_code == 200 and next(readers[-1]).startswith('data: {"text"')
        for path in ("/v1/generate", "/v1/generate/stream"):  # both slots are taken: refused at once
            busy = httpx.post(f"{url}{path}", json=STORY, timeout=5, trust_env=False)
            assert busy.status_code == 503 and "busy" in busy.json()["detail"] and busy.headers["retry-after"]
        assert httpx.get(f"{url}/health", trust_env=False).json()["generating"] == 2
        streams.close()  # both clients hang up mid-story
        assert wait_until_idle(url, seconds=5) < 5
        assert httpx.post(f"{url}/v1/generate", json={**STORY, "max_new_tokens": 5}, timeout=30,
                          trust_env=False).status_code == 200


def test_burst_of_100_requests(lm):
    """100 requests at once against max_concurrency=4: each is a whole story or a clean 503, nothing else."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1
    barrier = threading.Barrier(100)

    def request(i: int, url: str) -> tuple[int, dict | list]:
        stream = i % 4 == 0  # a quarter of them stream
        req = urllib.request.Request(f"{url}/v1/generate{'/stream' if stream else ''}", method="POST",
                                     data=json.dumps({**STORY, "max_new_tokens": 12, "seed": i}).encode(),
                                     headers={"Content-Type": "application/json"})
        barrier.wait(timeout=30)
        try:
            with opener.open(req, timeout=60) as r:
                text = r.read().decode()
                return r.status, sse_events(text) if stream else json.loads(text)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with live_server(create_app(lm, max_concurrency=4)) as url:
        start = time.monotonic()
        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(request, range(100), [url] * 100))
        elapsed = time.monotonic() - start
        ok = 0
        for status, body in results:
            if status == 503:
                assert "busy" in body["detail"]
            elif isinstance(body, list):  # a stream: pieces, then done
                assert status == 200 and body[-1]["done"] and 1 <= body[-1]["tokens"] <= 12, body
                ok += 1
            else:
                assert status == 200 and 1 <= body["tokens"] <= 12 and body["finish_reason"] in ("eos", "length")
                ok += 1
        assert ok >= 4 and elapsed < 30, (ok, elapsed)
        wait_until_idle(url)  # every slot came back
        assert httpx.get(f"{url}/health", trust_env=False).json()["status"] == "ok"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_page_streams_a_story_in_chromium(lm, tmp_path):
    from playwright.sync_api import sync_playwright

    with live_server(create_app(lm)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--no-proxy-server"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.includes('parameters')")
            page.fill("#prompt", STORY["prompt"])
            page.fill("#seed", "1")
            page.eval_on_selector("#max_new_tokens", "el => { el.value = 40; el.dispatchEvent(new Event('input')); }")
            page.click("#generate")
            page.wait_for_function("(document.getElementById('story') || {}).textContent", timeout=15_000)
            page.wait_for_selector("#output[data-state=done]", timeout=30_000)
            story = page.text_content("#story")
            status = page.text_content("#status")
            page.screenshot(path=tmp_path / "page.png")
        finally:
            browser.close()
        # the page sent the sliders' values: its story is the API's story for the same settings
        api = httpx.post(f"{url}/v1/generate", json={**STORY, "top_p": 1}, timeout=30, trust_env=False).json()
    assert story.strip() and story == api["text"]
    assert f"{api['tokens']} tokens" in status
