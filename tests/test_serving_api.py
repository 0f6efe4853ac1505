"""The HTTP API on loopback through the official ``openai`` client: models, chat, completions, streaming,
routing, pinned experts, authentication, limits, metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from serving_fixtures import greedy, torch_threads

from meswitch.checkpoints import Checkpoint
from meswitch.compression.reconstruct import load_expert_model, open_artifact
from meswitch.serving.api import Server, ServerConfig, ServerThread, render_chat
from meswitch.serving.batching import SchedulerConfig
from meswitch.serving.engine import EngineConfig
from meswitch.serving.loader import LocalSource, ModelManager
from meswitch.serving.metrics import ServingMetrics

KEY = "test-key-123"
LIMITS = {"max_prompt_tokens": 200, "max_tokens_limit": 64}


@dataclass
class Live:
    manager: ModelManager
    open: ServerThread  # no authentication
    keyed: ServerThread  # bearer token KEY
    metrics: ServingMetrics

    def client(self, keyed: bool = False, key: str = KEY) -> openai.OpenAI:
        server = self.keyed if keyed else self.open
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live(served_family):
    with torch_threads(1):
        metrics = ServingMetrics()
        source = LocalSource(served_family.base, [served_family.artifact_dir()], served_family.router)
        manager = ModelManager(
            source, EngineConfig(device="cpu"), SchedulerConfig(max_batch=8, window_s=0.002), observer=metrics
        )
        manager.start()
        open_ = ServerThread(Server(manager, ServerConfig(**LIMITS), metrics).app).start()
        keyed = ServerThread(Server(manager, ServerConfig(api_key=KEY, **LIMITS), metrics).app).start()
        try:
            yield Live(manager, open_, keyed, metrics)
        finally:
            open_.stop()
            keyed.stop()
            manager.close()


def _greedy_text(served_family, name: str, ids: list[int], n: int, tokenizer) -> str:
    base = Checkpoint(served_family.base)
    model = load_expert_model(base, open_artifact(served_family.artifacts[name], base))
    out = greedy(model, ids, n, {tokenizer.eos_token_id, model.config.eos_token_id})
    return tokenizer.decode(out, skip_special_tokens=True)


def test_models_lists_every_expert_the_base_and_auto(live, served_family):
    models = {m.id: m for m in live.client().models.list()}
    assert set(models) == {*served_family.artifacts, "base", "auto"}
    for name, domain in served_family.domains.items():
        extra = models[name].model_extra["meswitch"]
        assert extra["kind"] == "expert" and extra["domain"] == domain and extra["tier"] == "device"
    assert models["auto"].model_extra["meswitch"]["domains"] == {d: n for n, d in served_family.domains.items()}


def test_pinned_completion_and_chat_equal_the_reconstructed_expert(live, served_family):
    client = live.client()
    name = sorted(served_family.artifacts)[0]
    tok = live.manager.current.experts[name].tokenizer
    prompt = "The answer is"
    r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
    ids = tok(prompt)["input_ids"]
    assert r.model == name and r.object == "text_completion"
    assert r.choices[0].text == _greedy_text(served_family, name, ids, 12, tok) != ""
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason in ("stop", "length")

    messages = [{"role": "user", "content": "Hello, who are you?"}]
    c = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    chat_ids = render_chat(tok, messages)
    assert c.model == name and c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == _greedy_text(served_family, name, chat_ids, 10, tok) != ""
    assert c.usage.prompt_tokens == len(chat_ids)
    assert c.model_extra["meswitch"]["version"] == live.manager.current.experts[name].version
    assert "routing" not in c.model_extra  # pinned: nothing was routed


def test_streaming_gives_the_same_text_as_a_whole_answer(live, served_family):
    client = live.client()
    name = sorted(served_family.artifacts)[-1]
    messages = [{"role": "user", "content": "Tell me something."}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=name, messages=messages, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert all(ch.model == name for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    plain = client.completions.create(model=name, prompt="x = 1", max_tokens=15, temperature=0)
    streamed = list(client.completions.create(model=name, prompt="x = 1", max_tokens=15, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_auto_routes_each_query_to_its_domains_expert(live, served_family):
    client = live.client()
    router = live.manager.current.router
    experts = {d: n for n, d in served_family.domains.items()}
    rows = [json.loads(line) for line in (served_family.root / "routing" / "test.jsonl").read_text().splitlines()]
    per_domain: dict[str, list[str]] = {}
    for row in rows:  # the served domains' queries (the family's test file also holds its extra domain's)
        if len(row["text"]) < 200 and row["domain"] in experts:  # well inside the server's 200-token prompt limit
            per_domain.setdefault(row["domain"], []).append(row["text"])
    assert len(per_domain) == len(served_family.domains) and all(len(t) >= 3 for t in per_domain.values())
    right = total = 0
    for domain, texts in sorted(per_domain.items()):
        for text in texts[:3]:
            r = client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": text}], max_tokens=2, temperature=0
            )
            routing = r.model_extra["routing"]
            direct = router.route(text)
            assert routing["domain"] == direct.domain and routing["confidence"] == pytest.approx(direct.confidence)
            assert routing["latency_ms"] > 0  # the router's own time, measured in the server
            answered = "base" if routing["fallback"] and routing["expert"] is None else experts[routing["domain"]]
            assert r.model == answered
            right += routing["domain"] == domain and r.model == experts[domain]
            total += 1
    assert right >= 0.75 * total, f"auto routed {right}/{total} queries to their domain's expert"
    assert live.metrics.route_seconds.collect()[0].samples  # the server's routing latency histogram
    counted = {s.name: s.value for s in live.metrics.route_seconds.collect()[0].samples}
    assert counted["meswitch_route_seconds_count"] >= total
    # Streaming answers carry the routing too.
    text = per_domain[sorted(per_domain)[0]][0]
    chunks = list(client.completions.create(model="auto", prompt=text, max_tokens=2, temperature=0, stream=True))
    assert all(ch.model_extra["routing"]["domain"] == router.route(text).domain for ch in chunks)


def test_authentication_on_and_off(live):
    assert live.client(keyed=True).models.list().data
    with pytest.raises(openai.AuthenticationError) as e:
        live.client(keyed=True, key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{live.keyed.url}/v1/completions", json={"model": "base", "prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{live.keyed.url}/healthz").status_code == 200  # probes need no key
    assert live.client(keyed=False, key="anything").models.list().data  # auth off: any key works


def test_oversize_and_invalid_requests_get_clear_4xx(live, served_family):
    client = live.client()
    name = sorted(served_family.artifacts)[0]
    long_prompt = " ".join(["word"] * 400)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt=long_prompt, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and "limit is 200" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="x" * 20_000, max_tokens=4)  # refused before tokenizing
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="hi", max_tokens=65)
    assert e.value.body["param"] == "max_tokens" and "at most 64" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=name, prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="hi", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-expert", prompt="hi")
    assert e.value.body["code"] == "model_not_found"


def test_concurrency_limit_answers_429_while_full(live, served_family):
    tight = ServerThread(Server(live.manager, ServerConfig(max_concurrent=1, **LIMITS), live.metrics).app).start()
    try:
        client = openai.OpenAI(base_url=f"{tight.url}/v1", api_key="x", max_retries=0, timeout=60)
        name = sorted(served_family.artifacts)[0]
        stream = client.completions.create(model=name, prompt="a", max_tokens=64, temperature=1.0, seed=1, stream=True)
        next(iter(stream))  # the first request is in flight
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=name, prompt="b", max_tokens=2)
        assert e.value.status_code == 429 and "limit 1" in e.value.body["message"]
        stream.close()  # the client goes away: its sequence is cancelled and the slot frees up
        deadline = time.monotonic() + 30
        while True:
            try:
                client.completions.create(model=name, prompt="b", max_tokens=2)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the abandoned stream never freed its place"
                time.sleep(0.05)
    finally:
        tight.stop()
    load = live.manager.current.scheduler.load
    assert load["running"] + load["waiting"] <= 8


def test_stop_sequences_cut_the_text(live, served_family):
    client = live.client()
    name = sorted(served_family.artifacts)[1]
    full = client.completions.create(model=name, prompt="Once", max_tokens=24, temperature=0).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]
    cut = client.completions.create(model=name, prompt="Once", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=name, prompt="Once", max_tokens=24, temperature=0, stop=stop,
                                              stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_is_reproducible(live, served_family):
    client = live.client()
    name = sorted(served_family.artifacts)[0]
    args = dict(model=name, prompt="Some text", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


def test_health_and_metrics(live, served_family):
    client = live.client()
    name = sorted(served_family.artifacts)[0]
    client.completions.create(model=name, prompt="hello", max_tokens=3, temperature=0)
    health = httpx.get(f"{live.open.url}/healthz").json()
    assert health["status"] == "ok" and set(health["experts"]) == set(served_family.artifacts)
    assert health["tiers"]["experts"]["device"] == len(served_family.artifacts)
    text = httpx.get(f"{live.open.url}/metrics").text
    for needle in (
        f'meswitch_requests_total{{endpoint="completions",model="{name}",status="200"}}',
        f'meswitch_completion_tokens_total{{model="{name}"}}',
        'meswitch_resident_experts{tier="device"} ' + f"{len(served_family.artifacts)}.0",
        "meswitch_request_seconds_bucket",
        "meswitch_time_to_first_token_seconds_count",
        "meswitch_batch_rows_bucket",
        "meswitch_inflight_requests 0.0",
    ):
        assert needle in text, needle
    # a client's model field never becomes a label of its own: unknown names share one
    for i in range(3):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=f"no-such-model-{i}", prompt="hello", max_tokens=1)
    text = httpx.get(f"{live.open.url}/metrics").text
    assert "no-such-model" not in text
    label = 'meswitch_requests_total{endpoint="completions",model="unknown",status="404"} '
    counted = [float(line.removeprefix(label)) for line in text.splitlines() if line.startswith(label)]
    assert counted and counted[0] >= 3  # (other tests of this module may have asked for unknown names too)


def test_unknown_chat_roles_are_refused_with_400(live, served_family):
    name = sorted(served_family.artifacts)[0]
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(
            model=name,
            messages=[{"role": "wizard", "content": "hello"}],
            max_tokens=2,  # type: ignore[list-item]
        )
    assert "role" in str(e.value)


def test_meswitch_serve_command_serves_on_loopback(served_family, tmp_path):
    import os
    import signal
    import subprocess

    from servers import MESWITCH_CLI, free_ports

    port = free_ports(1)[0]
    cmd = [*MESWITCH_CLI, "serve", "--base", str(served_family.base),
           "--experts", str(served_family.artifact_dir()), "--port", str(port), "--device", "cpu",
           "--threads", "1", "--api-key", KEY, "--reload-interval", "0"]  # fmt: skip
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "meswitch serve did not become healthy"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert {m.id for m in client.models.list()} == {*served_family.artifacts, "base"}  # no router given: no auto
        name = sorted(served_family.artifacts)[0]
        assert client.completions.create(model=name, prompt="Hi", max_tokens=3, temperature=0).model == name
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) is not None


def test_serve_refuses_to_expose_an_unauthenticated_server(served_family, monkeypatch, capsys):
    from meswitch.cli import main

    monkeypatch.delenv("MESWITCH_API_KEY", raising=False)
    rc = main(
        [
            "serve",
            "--host",
            "0.0.0.0",
            "--base",
            str(served_family.base),
            "--experts",
            str(served_family.artifact_dir()),
        ]
    )
    assert rc != 0
    err = capsys.readouterr().err
    assert "without authentication" in err and "--api-key" in err and "--allow-no-auth" in err


def test_serving_no_expert_is_an_error_unless_asked_for(served_family, tmp_path, capsys):
    from meswitch.cli import main

    rc = main(["serve", "--base", str(served_family.base), "--experts", str(tmp_path), "--device", "cpu"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "no expert to serve" in err and "--allow-no-experts" in err


def test_static_decoding_without_a_gpu_is_refused_with_the_flag_to_use(served_family, capsys):
    from meswitch.cli import main

    args = ["serve", "--base", str(served_family.base), "--experts", str(served_family.artifact_dir())]
    assert main([*args, "--device", "cpu", "--decode", "static"]) != 0
    assert "--decode static needs a GPU" in capsys.readouterr().err
    assert main([*args, "--kv-positions", "0"]) != 0
    assert "--kv-positions must be at least 1" in capsys.readouterr().err
    assert main([*args, "--shutdown-timeout", "-1"]) != 0
    assert "--shutdown-timeout must be 0 or more seconds, got -1" in capsys.readouterr().err
