"""Admission control (issue 12, point 4): at most PI_PROXY_MAX_BRIDGES bridges serve at once; more
requests wait in a bounded queue for a bounded time, then are refused in their API's shape (OpenAI
429, Anthropic 529 overloaded_error, pi `{"error"}`), with Retry-After; /healthz stays fast."""

import json
import socket
import threading
import time

import pytest
import requests

from proxy import default_max_bridges
from tests.fake_upstream import Reply
from tests.helpers import response_error, running_proxy

CHAT = {"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "fake-anthropic/claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
PI = {"model": {"provider": "fake-chat", "id": "chat-model"},
      "context": {"messages": [{"role": "user", "content": "hi", "timestamp": 0}]}, "options": {}}
QUEUE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def narrow(agent_dir, tmp_path_factory):
    """One bridge at a time, one request waiting, for QUEUE_TIMEOUT seconds."""
    with running_proxy(agent_dir, tmp_path_factory.mktemp("logs") / "narrow.log", {
        "PI_PROXY_MAX_BRIDGES": "1", "PI_PROXY_QUEUE_SIZE": "1", "PI_PROXY_QUEUE_TIMEOUT_S": str(QUEUE_TIMEOUT),
        "PI_PROXY_UPSTREAM_TIMEOUT_MS": "10000"}) as running:
        yield running


def in_background(call) -> dict:
    """Run call() in a thread; the dict gets its "result" and "finished" (monotonic) when done."""
    outcome = {}

    def run():
        outcome["result"] = call()
        outcome["finished"] = time.monotonic()
    outcome["thread"] = threading.Thread(target=run)
    outcome["thread"].start()
    return outcome


def post(proxy, path: str, body: dict) -> requests.Response:
    return requests.post(f"{proxy.url}{path}", json=body, timeout=30)


def wait_serving(proxy, count: int):
    deadline = time.monotonic() + 10
    while len(proxy.bridges()) < count:
        assert time.monotonic() < deadline, "the bridge never started serving"
        time.sleep(0.02)


def healthz_time(proxy) -> float:
    started = time.monotonic()
    assert requests.get(f"{proxy.url}/healthz", timeout=5).status_code == 200
    return time.monotonic() - started


def test_a_full_queue_and_a_long_wait_are_refused_in_each_apis_shape(narrow, fake):
    fake.push(Reply(text="slow", first_byte_delay=QUEUE_TIMEOUT + 1))
    assert narrow.wait_no_bridges(timeout=5)
    busy = in_background(lambda: post(narrow, "/v1/chat/completions", CHAT))
    assert fake.wait_for_requests(1, timeout=10)
    queued_at = time.monotonic()
    queued = in_background(lambda: post(narrow, "/v1/messages", MESSAGES))
    time.sleep(0.3)  # the queued request is waiting now

    started = time.monotonic()
    refused = {"openai": post(narrow, "/v1/chat/completions", CHAT), "pi": post(narrow, "/api/stream", PI),
               "anthropic": post(narrow, "/v1/messages", MESSAGES)}
    assert time.monotonic() - started < 1.0, "a full queue refuses at once"
    for response in refused.values():
        assert response.headers["Retry-After"] == "5"
        assert "busy" in response.text and "1 requests are waiting" in response.text
    assert response_error(refused["openai"], 429, "openai")["code"] == "proxy_overloaded"
    response_error(refused["pi"], 429, "pi")
    assert response_error(refused["anthropic"], 529, "anthropic")["type"] == "overloaded_error"
    assert max(healthz_time(narrow) for _ in range(5)) < 0.5, "healthz never waits for a bridge"

    queued["thread"].join()
    waited = queued["finished"] - queued_at
    assert queued["result"].status_code == 529 and "within 3 s" in queued["result"].json()["error"]["message"]
    assert QUEUE_TIMEOUT - 0.1 < waited < QUEUE_TIMEOUT + 2
    busy["thread"].join()
    assert busy["result"].status_code == 200, "the request in flight was served"
    assert len(fake.requests) == 1, "no refused request reached the upstream"


def test_a_waiting_request_is_served_when_a_bridge_ends(narrow, fake):
    fake.push(Reply(text="first", first_byte_delay=0.5))
    fake.push(Reply(text="second"))
    assert narrow.wait_no_bridges(timeout=5)
    first = in_background(lambda: post(narrow, "/v1/chat/completions", CHAT))
    assert fake.wait_for_requests(1, timeout=10)
    second = in_background(lambda: post(narrow, "/v1/chat/completions", CHAT))
    for outcome in (first, second):
        outcome["thread"].join()
    assert [o["result"].json()["choices"][0]["message"]["content"] for o in (first, second)] == ["first", "second"]
    arrivals = [r.time for r in fake.requests]
    assert arrivals[1] >= arrivals[0] + 0.5, "the second reached the upstream only after the first ended"
    assert post(narrow, "/v1/chat/completions", CHAT).status_code == 200, "the places are given back"


def test_healthz_stays_fast_under_load(start_proxy, fake):
    """Eight slow streams over a limit of two: six wait, and /healthz answers at once all along."""
    running = start_proxy({"PI_PROXY_MAX_BRIDGES": "2"}, name="load")
    fake.default = Reply(text=" ".join(["w"] * 10), delay=0.1)
    streams = [in_background(lambda: post(running, "/v1/chat/completions", {**CHAT, "stream": True}))
               for _ in range(8)]
    wait_serving(running, 2)
    timings = []
    while any(s["thread"].is_alive() for s in streams):
        timings.append(healthz_time(running))
        assert len(running.bridges()) <= 2
        time.sleep(0.05)
    assert all(s["result"].status_code == 200 and "[DONE]" in s["result"].text for s in streams)
    assert len(timings) > 5 and max(timings) < 0.5, timings


def test_the_default_limit_follows_memory_and_cores():
    limit = default_max_bridges()
    assert 4 <= limit <= 32 * len(__import__("os").sched_getaffinity(0))


def test_a_client_that_leaves_while_queued_leaves_the_queue(agent_dir, tmp_path, fake):
    """Its request never takes a bridge, so nothing is sent upstream for nobody."""
    with running_proxy(agent_dir, tmp_path / "proxy.log", {
            "PI_PROXY_MAX_BRIDGES": "1", "PI_PROXY_QUEUE_TIMEOUT_S": "30"}) as proxy:
        fake.push(Reply(text="slow", first_byte_delay=2), Reply(text="for nobody"))
        busy = in_background(lambda: post(proxy, "/v1/chat/completions", CHAT))
        assert fake.wait_for_requests(1, timeout=10)
        body = json.dumps(MESSAGES).encode()
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.3)  # queued behind the busy request
        busy["thread"].join()
        assert busy["result"].status_code == 200
        time.sleep(1.5)  # a bridge it took would have called the upstream by now
        assert len(fake.requests) == 1, "the gone client's request reached the upstream"
        recent = requests.get(f"{proxy.url}/usage", timeout=5).json()["recent"]
        gone = [record for record in recent if record["endpoint"] == "messages"]
        assert [(record["status"], record["outcome"]) for record in gone] == [(499, "client_gone")]
