"""The HTTP API at the edges a client hits: a bad request fails alone, never the batch it joins; a client
that hangs up frees its row; bodies that are no JSON object, refusals and the static cache's length get a 4xx
that names what is wrong. Real servers on loopback over the micro family (no mocks)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import torch
from serving_fixtures import torch_threads

from meswitch.serving.api import Server, ServerConfig, ServerThread
from meswitch.serving.batching import SchedulerConfig
from meswitch.serving.engine import EngineConfig
from meswitch.serving.loader import LocalSource, ModelManager

# The base's greedy answer to this prompt runs to max_tokens (no end-of-sequence): a row that stays in the batch.
LONG = {"model": "base", "prompt": "Once", "max_tokens": 200, "temperature": 0}


@dataclass
class Served:
    manager: ModelManager
    api: Server
    thread: ServerThread

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.thread.url}{path}", timeout=60, **kw)


def _serve(family, engine: EngineConfig, scheduler: SchedulerConfig):
    manager = ModelManager(LocalSource(family.base, [family.artifact_dir()]), engine, scheduler)
    manager.start()
    api = Server(manager, ServerConfig())
    thread = ServerThread(api.app).start()
    try:
        yield Served(manager, api, thread)
    finally:
        thread.stop()
        manager.close()


@pytest.fixture(scope="module")
def live(served_family):
    with torch_threads(1):
        yield from _serve(served_family, EngineConfig(device="cpu"), SchedulerConfig(max_batch=8, window_s=0.002))


@pytest.fixture(scope="module")
def static(served_family):
    """Static decode (the GPU's default path, run eagerly on the CPU) over a cache of 64 positions a sequence."""
    with torch_threads(1):
        yield from _serve(
            served_family,
            EngineConfig(device="cpu", payload="packed"),
            SchedulerConfig(max_batch=4, window_s=0.002, static=True, static_max_len=64),
        )


def _wait(condition, what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("extra", "status"),
    [({"temperature": 1.0, "seed": 2**70}, 400), ({"temperature": 1e-40}, 200)],
    ids=["seed-beyond-64-bits", "temperature-1e-40"],
)
def test_a_bad_sampling_request_fails_alone_never_the_batch_it_joins(live, extra, status):
    sched = live.manager.current.scheduler
    bad_body = {"model": "math", "prompt": "hi", "max_tokens": 4, **extra}
    with httpx.stream("POST", f"{live.thread.url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the neighbour is decoding
        bad: dict[str, httpx.Response] = {}
        with live.manager.current.engine.hold():  # the bad request joins the running batch at the next step
            t = threading.Thread(target=lambda: bad.update(r=live.post("/v1/completions", json=bad_body)))
            t.start()
            _wait(lambda: bad or sched.load["waiting"], "the bad request never reached the scheduler")
        t.join(60)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "error" not in events[-1], events[-1]  # the neighbour finished its answer
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert bad["r"].status_code == status, bad["r"].text
    if status == 400:
        assert bad["r"].json()["error"]["param"] == "seed"
    else:  # that cold is greedy
        greedy = live.post("/v1/completions", json={**bad_body, "temperature": 0}).json()
        assert bad["r"].json()["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_a_client_that_hangs_up_on_a_whole_answer_frees_its_place(live):
    body = json.dumps(LONG).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    with live.manager.current.engine.hold():  # no token comes while the client is there, or after
        with socket.create_connection((live.thread.host, live.thread.port)) as s:
            s.sendall(f"{head}\r\n\r\n".encode() + body)
            _wait(lambda: live.api.inflight == 1, "the request never started")
        _wait(lambda: live.api.inflight == 0, "the abandoned request still holds its place")
    _wait(live.manager.current.scheduler.idle, "the abandoned sequence is still generating")
    assert live.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200


def test_a_body_that_is_no_json_object_gets_a_400_that_says_what_to_send(live):
    json_type = {"Content-Type": "application/json"}
    r = live.post("/v1/completions", content=b'{"model": "base", "prompt": ', headers=json_type)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] is None  # not the character position
    r = live.post("/v1/completions", content=json.dumps(LONG).encode(), headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


def test_refusals_past_the_context_or_the_vocabulary_name_their_parameter(live):
    r = live.post("/v1/completions", json={**LONG, "max_tokens": 600})  # under --max-tokens, over the 512 context
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    r = live.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 600})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = live.post("/v1/completions", json={"model": "base", "prompt": [1, 10**6], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_the_static_cache_cuts_the_default_max_tokens_and_limits_the_prompt(static):
    chat = {"model": "math", "messages": [{"role": "user", "content": "What is two plus two? Tell me."}]}
    r = static.post("/v1/chat/completions", json={**chat, "temperature": 0})  # no max_tokens: 256 would not fit
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] <= 64
    r = static.post("/v1/completions", json={"model": "math", "prompt": "word " * 40, "max_tokens": 2})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert "the limit is 63" in error["message"]


def test_a_server_stopped_without_waiting_cancels_its_sequences_quietly(live, caplog):
    """A second Ctrl-C makes uvicorn exit without waiting for answers: its event loop closes while the scheduler
    thread still decodes their sequences. They are cancelled, with no "Event loop is closed" traceback for every
    event of every request."""
    api = Server(live.manager, ServerConfig())
    thread = ServerThread(api.app).start()
    sched = live.manager.current.scheduler
    decoding, lines = threading.Event(), []

    def ask() -> None:
        body = {**LONG, "stream": True}
        with contextlib.suppress(httpx.HTTPError), httpx.stream("POST", f"{thread.url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                lines.append(line)
                decoding.set()

    client = threading.Thread(target=ask)
    client.start()
    assert decoding.wait(30), "no token came"
    with live.manager.current.engine.hold():  # no token comes until the server is gone
        thread.server.should_exit = thread.server.force_exit = True  # what uvicorn does on a second Ctrl-C
        thread.thread.join(30)
        assert not thread.thread.is_alive()
    _wait(sched.idle, "the sequence of the stopped server is still decoding")
    client.join(30)
    assert "data: [DONE]" not in lines  # it was stopped, not answered to the end
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert live.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("cut", ["second-ctrl-c", "shutdown-timeout"])
def test_a_second_ctrl_c_or_the_shutdown_timeout_cuts_the_answers_in_progress_short(live, caplog, cut):
    """``serve_forever`` (what ``meswitch serve`` runs) in this, the main thread, sent real SIGINTs: the first stops
    taking requests and waits for the answers in progress; a second, or ``shutdown_timeout`` seconds, cuts them
    short (each ends at its next step with what it has: a whole answer, a stream that ends with [DONE]), and the
    server stops with no traceback."""
    import os
    import signal

    from servers import free_ports, port_open

    from meswitch.serving.api import serve_forever

    api, port = Server(live.manager, ServerConfig()), free_ports(1)[0]
    url, events, started = f"http://127.0.0.1:{port}/v1/completions", {"whole": [], "stream": []}, threading.Barrier(2)
    errors: list[BaseException] = []

    def stream() -> None:
        with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                events["stream"].append(line)
                if len(events["stream"]) == 1:
                    started.wait(30)

    def whole() -> None:
        events["whole"].append(httpx.post(url, json=LONG, timeout=60))

    def drive() -> None:
        try:
            _wait(lambda: port_open(port), "the server never listened", 30)
            clients = [threading.Thread(target=stream), threading.Thread(target=whole)]
            for c in clients:
                c.start()
            started.wait(30)  # the stream has its first token
            _wait(lambda: api.inflight == 2, "the whole answer never started")
            with live.manager.current.engine.hold():  # no token comes while the server is told to stop
                os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: it waits for the two answers
                time.sleep(0.5)  # (past the timeout of 0.3 s: cut short already, to end at their next step)
                assert api.inflight == 2, "the first Ctrl-C did not wait for the answers in progress"
                if cut == "second-ctrl-c":
                    os.kill(os.getpid(), signal.SIGINT)  # the second: cut them short
            for c in clients:
                c.join(30)
        except BaseException as e:  # reported by the main thread, once the server is stopped
            errors.append(e)
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)

    driver = threading.Thread(target=drive)
    driver.start()
    timeout = None if cut == "second-ctrl-c" else 0.3
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises the first Ctrl-C again once it has stopped
        serve_forever(api, "127.0.0.1", port, shutdown_timeout=timeout)
    driver.join(60)
    assert not errors, errors
    answer = events["whole"][0]
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] < LONG["max_tokens"]  # cut short
    assert [line for line in events["stream"] if line][-1] == "data: [DONE]"
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert ("Ctrl-C again: 2 answers" if timeout is None else "after 0.3 s: 2 answers") in caplog.text


def test_a_prefill_that_fails_fails_its_own_requests_not_the_running_batch(live, monkeypatch):
    """A failure in the prefill of requests joining a running batch (a GPU out of memory on a long prompt, say;
    simulated here by the engine's forward raising on that prompt, as no allocation can be made to fail on a CPU)
    fails those requests with a 500, and the sequences already decoding finish their answers."""
    engine = live.manager.current.engine
    forward = engine.forward
    tok = live.manager.current.base.tokenizer

    def failing_forward(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1 and (input_ids == marker).any(dim=1).all():  # the prefill of the marked prompt
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(input_ids, *args, **kwargs)

    marker = tok("zebra", add_special_tokens=False)["input_ids"][-1]
    monkeypatch.setattr(engine, "forward", failing_forward)
    sched = live.manager.current.scheduler
    with httpx.stream("POST", f"{live.thread.url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the neighbour is decoding
        bad: dict[str, httpx.Response] = {}
        body = {"model": "math", "prompt": "zebra zebra", "max_tokens": 4}
        with engine.hold():  # it joins the running batch at the next step
            t = threading.Thread(target=lambda: bad.update(r=live.post("/v1/completions", json=body)))
            t.start()
            _wait(lambda: bad or sched.load["waiting"], "the request never reached the scheduler")
        t.join(60)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert bad["r"].status_code == 500 and "out of memory (simulated)" in bad["r"].text, bad["r"].text
    assert "error" not in events[-1], events[-1]  # the neighbour finished its answer
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", ["live", "static"])
def test_an_expert_whose_logits_turn_nan_fails_its_own_request_and_the_batch_decodes_on(path, request, monkeypatch):
    """A decode step where one row's logits are NaN (an expert whose forward overflowed: simulated by setting that
    expert's rows of the step's output to NaN, as no validated expert can be made to overflow the CPU's float32)
    fails that request with a 500 that names the expert; the base's sequence in the same batch finishes its answer.
    Both decode paths: the dynamic cache's forward and the static decoder's step."""
    served = request.getfixturevalue(path)
    sched = served.manager.current.scheduler
    target = sched.decoder if path == "static" else served.manager.current.engine
    name = "decode" if path == "static" else "forward"
    step = getattr(target, name)

    def overflowing(*args, **kwargs):
        out = step(*args, **kwargs)
        slots = args[2] if path == "static" else args[1]
        rows = [i for i, s in enumerate(slots) if s is not None and s.name == "math"]
        decoding = path == "static" or args[0].shape[1] == 1  # the prompt's own step stays finite: the row decodes
        if rows and decoding:
            out = out.clone()
            out[rows] = float("nan")
        return out

    monkeypatch.setattr(target, name, overflowing)
    body = {**LONG, "max_tokens": 40} if path == "static" else LONG  # the static cache holds 64 positions
    with httpx.stream("POST", f"{served.thread.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the neighbour is decoding
        bad: dict[str, httpx.Response] = {}
        expert_body = {"model": "math", "prompt": "hi", "max_tokens": 8, "temperature": 0.7}
        with served.manager.current.engine.hold():  # it joins the running batch at the next step
            t = threading.Thread(target=lambda: bad.update(r=served.post("/v1/completions", json=expert_body)))
            t.start()
            _wait(lambda: bad or sched.load["waiting"], "the request never reached the scheduler")
        t.join(60)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert bad["r"].status_code == 500, bad["r"].text
    assert "expert 'math' gave NaN or infinite logits at token 2" in bad["r"].text, bad["r"].text
    assert "error" not in events[-1], events[-1]  # the neighbour finished its answer
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    monkeypatch.undo()
    assert served.post("/v1/completions", json={**expert_body, "temperature": 0}).status_code == 200


@pytest.mark.parametrize("path", ["live", "static"])
def test_a_failed_decode_step_costs_its_requests_a_prefill_not_their_answers(path, request, monkeypatch, caplog):
    """A decode step that raises (a GPU out of memory while the batch held the most: simulated by the step raising
    torch's OutOfMemoryError once, as no allocation can be made to fail on a CPU) sends each of its requests back to
    be prefilled with its prompt and what it had emitted: both answers, an expert's and the base's decoding in one
    batch, come back whole and equal to the answers of a run without the failure. Both decode paths."""
    served = request.getfixturevalue(path)
    sched = served.manager.current.scheduler
    target = sched.decoder if path == "static" else served.manager.current.engine
    name = "decode" if path == "static" else "forward"
    bodies = [{"model": "math", "prompt": "hi", "max_tokens": 12, "temperature": 0},
              {"model": "base", "prompt": "Once", "max_tokens": 20, "temperature": 0}]  # fmt: skip

    def both() -> list[httpx.Response]:
        out: dict[int, httpx.Response] = {}
        with served.manager.current.engine.hold():  # both join one batch
            threads = [threading.Thread(target=lambda i=i, b=b: out.update({i: served.post("/v1/completions", json=b)}))
                       for i, b in enumerate(bodies)]  # fmt: skip
            for t in threads:
                t.start()
            _wait(lambda: sum(sched.load.values()) == 2, "the requests never reached the scheduler")
        for t in threads:
            t.join(60)
        return [out[i] for i in range(len(bodies))]

    want = [r.json()["choices"][0]["text"] for r in both()]
    step = getattr(target, name)
    calls = {"decode": 0}

    def failing_once(*args, **kwargs):
        decoding = path == "static" or args[0].shape[1] == 1
        if decoding:
            calls["decode"] += 1
            if calls["decode"] == 5:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return step(*args, **kwargs)

    monkeypatch.setattr(target, name, failing_once)
    with caplog.at_level("WARNING", logger="meswitch.serving.batching"):
        got = both()
    assert calls["decode"] > 5  # it failed, and decoding went on after it
    assert "2 requests go back to the queue" in caplog.text
    assert [r.status_code for r in got] == [200, 200], [r.text for r in got]
    assert [r.json()["choices"][0]["text"] for r in got] == want
    assert [r.json()["usage"]["completion_tokens"] for r in got] == [12, 20]


@pytest.mark.parametrize("path", ["live", "static"])
def test_a_request_in_a_second_failed_step_fails_with_its_error_and_the_server_goes_on(path, request, monkeypatch):
    """Every decode step raising (simulated, as above): a request is sent back once and fails at its second failed
    step, with a 500 that gives the error; the scheduler thread lives on and answers the next request."""
    served = request.getfixturevalue(path)
    sched = served.manager.current.scheduler
    target = sched.decoder if path == "static" else served.manager.current.engine
    name = "decode" if path == "static" else "forward"
    step = getattr(target, name)
    calls = {"decode": 0}

    def failing(*args, **kwargs):
        if path == "static" or args[0].shape[1] == 1:
            calls["decode"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return step(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    body = {"model": "math", "prompt": "hi", "max_tokens": 6, "temperature": 0}
    r = served.post("/v1/completions", json=body)
    assert r.status_code == 500 and "out of memory (simulated)" in r.text, r.text
    assert calls["decode"] == 2  # sent back once, failed the second time
    monkeypatch.undo()
    assert served.post("/v1/completions", json=body).status_code == 200
