"""The OpenAI-compatible server, tested as a user would: a real server on 127.0.0.1, the official
`openai` client, raw HTTP for malformed requests, a client that disconnects mid-stream, and a
concurrent load of 32 requests from 8 clients."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from behemoth.inference.sampling import SamplingParams

openai = pytest.importorskip("openai")

MODEL = "tiny"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0].server_address[1]}/v1", api_key="unused",
                         max_retries=0, timeout=60)


def expected_completion(runner, prompt, max_tokens, chat=False):
    """What the model answers alone, greedy, outside the server."""
    ids = runner.encode_chat([{"role": "user", "content": prompt}]) if chat else runner.encode_prompt(prompt)
    stop = runner.chat.stop_ids if chat else (runner.tokenizer.eos_id,)
    params = SamplingParams(max_new_tokens=max_tokens, stop_ids=stop)
    return runner.complete([ids], params, runner.chat.stop_strings if chat else (), lstrip=chat)[0].text


def raw(server, method, path, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server[0].server_address[1], timeout=30)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, health = raw(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok"


def test_completion_and_chat(client, server):
    runner = server[2]
    r = client.completions.create(model=MODEL, prompt="Q: 12+7=?\nA:", max_tokens=20, temperature=0)
    assert r.choices[0].text == expected_completion(runner, "Q: 12+7=?\nA:", 20)
    assert r.usage.prompt_tokens == len(runner.encode_prompt("Q: 12+7=?\nA:"))
    assert r.choices[0].finish_reason in ("stop", "length")
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "3*4=?"}], max_tokens=16,
                                       temperature=0)
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == expected_completion(runner, "3*4=?", 16, chat=True)


def test_streaming_equals_the_whole_answer(client):
    whole = client.completions.create(model=MODEL, prompt="Q: 5+5=?\nA:", max_tokens=24, temperature=0)
    pieces = [ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="Q: 5+5=?\nA:", max_tokens=24, temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 2
    msgs = [{"role": "user", "content": "9-4=?"}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_and_seeded_sampling(client):
    free = client.completions.create(model=MODEL, prompt="Q: 1+1=?\nA:", max_tokens=30, temperature=0).choices[0].text
    assert len(free) > 4, free  # the stop string below is taken from inside this greedy answer
    cut = client.completions.create(model=MODEL, prompt="Q: 1+1=?\nA:", max_tokens=30, temperature=0,
                                    stop=[free[3:5]]).choices[0]
    assert cut.text == free[:free.index(free[3:5])] and cut.finish_reason == "stop"
    a = client.completions.create(model=MODEL, prompt="Q:", max_tokens=20, temperature=1.0, seed=5).choices[0].text
    b = client.completions.create(model=MODEL, prompt="Q:", max_tokens=20, temperature=1.0, seed=5).choices[0].text
    assert a == b


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "x"}).encode(), 400, "'model' is required"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 5000}).encode(), 400, "above this server's limit"),
    (json.dumps({"model": MODEL, "prompt": "Q" * 3000}).encode(), 400, "context"),
    (json.dumps({"model": MODEL, "prompt": "x", "temperature": "hot"}).encode(), 400, "'temperature'"),
    (json.dumps({"model": MODEL, "prompt": 7}).encode(), 400, "'prompt'"),
])
def test_bad_requests_get_a_json_4xx(server, body, status, needle):
    got, err = raw(server, "POST", "/v1/completions", body)
    assert got == status and needle in err["error"]["message"], err


def test_bad_chat_and_unknown_route(server, client):
    got, err = raw(server, "POST", "/v1/chat/completions",
                   json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode())
    assert got == 400 and "role" in err["error"]["message"]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    got, err = raw(server, "POST", "/v1/chat/completions",
                   json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [image]}]}).encode())
    assert got == 400 and "no vision tower" in err["error"]["message"]
    assert raw(server, "GET", "/v2/nothing")[0] == 404
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_client_disconnect_frees_the_slot(server):
    srv, engine, _ = server
    before = engine.stats.cancelled
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    body = json.dumps({"model": MODEL, "prompt": "Q:", "max_tokens": 1500, "temperature": 1.0, "stream": True,
                       "ignore_eos": True})  # it cannot finish on its own before the disconnect is noticed
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.fp.readline()  # the first chunk arrived: generation is under way
    conn.sock.close()
    conn.close()
    deadline = time.time() + 20
    while (engine.active or engine.stats.cancelled == before) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.stats.cancelled == before + 1 and engine.active == 0
    assert engine.stats.tokens > 0


def test_client_leaving_a_non_streaming_request_frees_the_slot(server):
    """...and is no error: the server logs no traceback for it."""
    import logging

    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    srv, engine, _ = server
    before = engine.stats.cancelled
    sock = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30)
    body = json.dumps({"model": MODEL, "prompt": "Q:", "max_tokens": 1500, "temperature": 1.0, "ignore_eos": True})
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    deadline = time.time() + 20
    while engine.active == 0 and time.time() < deadline:  # wait until it is being generated
        time.sleep(0.01)
    sock.close()
    while (engine.active or engine.stats.cancelled == before) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the handler's answer to nobody
    logging.getLogger("uvicorn.error").removeHandler(handler)
    assert engine.stats.cancelled == before + 1 and engine.active == 0
    assert not errors, [r.getMessage() for r in errors]


def test_concurrent_load_every_request_answered(client, server):
    """8 clients x 4 requests (completion / chat, streamed or not): all answered, all correct, batched."""
    runner, engine = server[2], server[1]
    prompts = [f"Q: {a}+{b}=?\nA:" for a, b in zip(range(10, 42), range(50, 82), strict=True)]
    expected = {p: expected_completion(runner, p, 16) for p in prompts}
    expected_chat = {p: expected_completion(runner, p, 16, chat=True) for p in prompts}
    results: dict[int, bool] = {}
    errors: list[str] = []
    engine.stats.max_active = 0

    def worker(w: int) -> None:
        for j in range(4):
            i = w * 4 + j
            p = prompts[i]
            try:
                if i % 4 == 0:
                    got = client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0].text
                    results[i] = got == expected[p]
                elif i % 4 == 1:
                    s = client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0, stream=True)
                    results[i] = "".join(c.choices[0].text for c in s) == expected[p]
                elif i % 4 == 2:
                    m = [{"role": "user", "content": p}]
                    got = client.chat.completions.create(model=MODEL, messages=m, max_tokens=16, temperature=0)
                    results[i] = got.choices[0].message.content == expected_chat[p]
                else:
                    m = [{"role": "user", "content": p}]
                    s = client.chat.completions.create(model=MODEL, messages=m, max_tokens=16, temperature=0,
                                                       stream=True)
                    results[i] = "".join(c.choices[0].delta.content or "" for c in s) == expected_chat[p]
            except Exception as e:  # a lost or failed request is a test failure, reported below
                errors.append(f"request {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 32 and all(results.values()), [i for i, ok in results.items() if not ok]
    assert engine.stats.max_active > 1  # requests were decoded together, not one at a time


def test_serve_command_on_a_transformers_directory(hf_model_dir, tmp_path):
    """`behemoth serve` as a process on a transformers directory (Llama 4 chat format): it prints its
    address, answers, and stops cleanly on Ctrl-C."""
    import signal
    import subprocess
    import sys

    # stderr to a file, not a pipe nobody reads while the server runs: a full pipe would block its writes (its
    # request log, "stopped") and so its exit
    err = tmp_path / "serve.stderr"
    # and Ctrl-C's default meaning: a shell that starts a job in the background (`cmd &`, as a CI runner may)
    # makes it ignore SIGINT, which the server would inherit
    with err.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "behemoth", "serve", "--model", str(hf_model_dir), "--port",
                                 "0", "--name", MODEL], stdout=subprocess.PIPE, stderr=err_file, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        banner = proc.stdout.readline()
        assert "serving tiny on http://127.0.0.1:" in banner, banner + err.read_text()
        url = banner.split(" on ")[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                                      temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0, err.read_text()[-2000:]
