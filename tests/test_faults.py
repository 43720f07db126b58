"""Faults, on all four endpoints (chat completions, Anthropic messages, Responses, /api/stream):
the upstream fails in every way it can (status, transport, timeout, broken stream), and the
bridge itself crashes, exits, prints garbage, is SIGKILLed, or loses its `node`. Each request
gets its protocol's error (an HTTP status before content, the terminal error event after),
within the configured timeout, never a 500 of our own; the server keeps serving and the pool refills.

Bridge faults need no hook in the proxy: the proxy runs a `node` found first on its PATH, here
a script that execs the real node with tests/fault_preload.mjs preloaded (it misbehaves as a
mode file says), or crashes at start, or is missing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, RunningProxy
from tests.fake_upstream import Reply
from tests.test_pool import wait_for

UPSTREAM_TIMEOUT_S = 1.5
ENDPOINTS = ["chat", "messages", "responses", "pi"]
UPSTREAM_MODELS = ["fake-chat/chat-model", "fake-anthropic/claude-test", "fake-responses/gpt-test"]
TEXT = " ".join(f"word{i}" for i in range(30))


@dataclass
class Outcome:
    """What a client saw: the HTTP status, the text streamed, the error (message) if any, and
    whether the stream ended with its protocol's terminal event."""
    status: int
    text: str = ""
    error: str | None = None
    terminated: bool = False
    events: list = field(default_factory=list)


def request_body(endpoint: str, model: str) -> tuple[str, dict]:
    messages = [{"role": "user", "content": "hi"}]
    if endpoint == "chat":
        return "/v1/chat/completions", {"model": model, "messages": messages, "stream": True}
    if endpoint == "messages":
        return "/v1/messages", {"model": model, "max_tokens": 100, "messages": messages, "stream": True}
    if endpoint == "responses":
        return "/v1/responses", {"model": model, "input": "hi", "stream": True}
    provider, model_id = model.split("/", 1)
    return "/api/stream", {"model": {"provider": provider, "id": model_id}, "context": {"messages": messages},
                           "options": {}}


def sse_events(lines) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, line[6:]))
            name = None
    return events


def outcome(response: requests.Response, endpoint: str, lines=None) -> Outcome:
    """`lines`: the body's lines, when the test read some of them itself."""
    if response.status_code != 200:
        body = response.json()
        if endpoint == "messages":
            assert body["type"] == "error", body
            message = body["error"]["message"]
        elif endpoint == "pi":
            message = body["error"]
        else:
            message = body["error"]["message"]
        assert isinstance(message, str) and message, body
        return Outcome(response.status_code, error=message, terminated=True)
    events = sse_events(response.iter_lines(decode_unicode=True) if lines is None else lines)
    seen = Outcome(200, events=events)
    for name, data in events:
        if data == "[DONE]":
            seen.terminated = endpoint == "chat"
            continue
        payload = json.loads(data)
        if endpoint == "chat":
            if "error" in payload:
                seen.error = payload["error"]["message"]
            for choice in payload.get("choices", []):
                seen.text += choice["delta"].get("content") or ""
        elif endpoint == "messages":
            if name == "error":
                seen.error, seen.terminated = payload["error"]["message"], True
            elif name == "content_block_delta" and payload["delta"]["type"] == "text_delta":
                seen.text += payload["delta"]["text"]
            seen.terminated = seen.terminated or name == "message_stop"
        elif endpoint == "responses":
            if name == "response.output_text.delta":
                seen.text += payload["delta"]
            if name == "response.failed":
                seen.error = payload["response"]["error"]["message"]
            seen.terminated = name in ("response.completed", "response.incomplete", "response.failed")
        else:
            if payload["type"] == "text_delta":
                seen.text += payload["delta"]
            if payload["type"] == "error":
                seen.error = payload["errorMessage"]
            seen.terminated = payload["type"] in ("done", "error")
    return seen


def call(proxy, endpoint: str, model: str, timeout: float = 30) -> Outcome:
    path, body = request_body(endpoint, model)
    with requests.post(f"{proxy.url}{path}", json=body, stream=True, timeout=timeout) as response:
        return outcome(response, endpoint)


def assert_failed_before_content(seen: Outcome, endpoint: str, status: int, fragment: str):
    """Before any content a failure is an HTTP error; /api/stream reports it, as pi-ai would,
    as the stream's only event."""
    if endpoint == "pi":
        assert seen.status == 200 and [json.loads(d)["type"] for _, d in seen.events] == ["error"], seen
    else:
        assert seen.status == status, seen
    assert fragment.lower() in seen.error.lower(), seen


def assert_failed_mid_stream(seen: Outcome, fragment: str):
    assert seen.status == 200 and seen.text.startswith("word0"), seen
    assert seen.error and fragment.lower() in seen.error.lower(), seen
    assert seen.terminated, "the stream ends with its protocol's terminal event"


def open_stream(proxy, endpoint: str, model: str = "fake-chat/chat-model", until: str = "word0"):
    """A streaming request read up to the line holding `until`: the response, the lines read and
    the iterator of the rest."""
    path, body = request_body(endpoint, model)
    response = requests.post(f"{proxy.url}{path}", json=body, stream=True, timeout=30)
    lines = response.iter_lines(decode_unicode=True)
    read = []
    for line in lines:
        read.append(line)
        if until in line:
            break
    return response, read, lines


# --- upstream faults ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(agent_dir, tmp_path_factory):
    """A proxy whose upstream timeout is short, so the timeout faults take little time."""
    running = RunningProxy(agent_dir, tmp_path_factory.mktemp("quick") / "proxy.log",
                           {"PI_PROXY_UPSTREAM_TIMEOUT_MS": str(int(UPSTREAM_TIMEOUT_S * 1000))})
    yield running
    running.stop()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("model", UPSTREAM_MODELS)
@pytest.mark.parametrize("status", [408, 413])
def test_upstream_408_and_413(quick, fake, endpoint, model, status):
    """408 is the upstream giving up waiting: a gateway timeout for our client. 413 keeps its
    meaning, except Anthropic's `request_too_large`, which pi-ai counts as a context overflow:
    then the client gets the overflow error it knows how to act on (compact, shorten)."""
    fake.push(Reply(status=status))
    seen = call(quick, endpoint, model)
    overflow = status == 413 and model.startswith("fake-anthropic/")
    expected = 504 if status == 408 else 400 if overflow else 413
    assert_failed_before_content(seen, endpoint, expected, str(status) if endpoint == "pi" else "")
    if overflow and endpoint == "messages":
        assert seen.error.startswith("prompt is too long"), seen
    assert len(fake.requests) == 1, "no retry behind the client's back"
    assert quick.wait_no_bridges()


# (fault, Reply, HTTP status, fragment of the message) for failures before any content
BEFORE_CONTENT = {
    "connection refused": (None, 502, "connection error"),
    "garbage instead of HTTP": (Reply(raw=b"\x00\x01garbage, not HTTP\r\n\r\n"), 502, "connection error"),
    "401": (Reply(status=401), 401, "401"),
    "403": (Reply(status=403), 403, "403"),
    "404": (Reply(status=404), 404, "404"),
    "429": (Reply(status=429, headers={"retry-after": "9"}), 429, "429"),
    "500": (Reply(status=500), 500, "500"),
    "502": (Reply(status=502), 502, "502"),
    "503": (Reply(status=503), 503, "503"),
    "529": (Reply(status=529), 529, "529"),
    "first byte never comes": (Reply(first_byte_delay=6, text="late"), 504, "sent nothing"),
    "silent after headers": (Reply(hang_after_headers=True), 504, "sent nothing"),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("fault", BEFORE_CONTENT)
def test_upstream_fault_before_content(quick, fake, endpoint, fault):
    reply, status, fragment = BEFORE_CONTENT[fault]
    model = "fake-dead/dead-model" if reply is None else "fake-anthropic/claude-test"
    if reply is not None:
        fake.push(reply)
    started = time.monotonic()
    seen = call(quick, endpoint, model)
    assert time.monotonic() - started < UPSTREAM_TIMEOUT_S + 3, "ends within the upstream timeout"
    fragment = fragment if endpoint == "pi" or not fragment.isdigit() else ""  # a status in the message: pi's
    assert_failed_before_content(seen, endpoint, status, fragment)
    if endpoint != "pi" and status == 429:
        assert seen.status == 429
    assert quick.wait_no_bridges()


MID_STREAM = {
    "cut": (Reply(text=TEXT, cut_after=7), "terminated"),
    "silent mid-stream": (Reply(text=TEXT, hang_after=7), "sent nothing for 1.5 s"),
    "malformed SSE line": (Reply(text=TEXT, malformed_after=7), "json"),
    "in-stream error event": (Reply(text=TEXT, stream_error="overloaded mid-stream"), "overloaded"),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("model", UPSTREAM_MODELS)
@pytest.mark.parametrize("fault", MID_STREAM)
def test_upstream_fault_mid_stream(quick, fake, endpoint, model, fault):
    reply, fragment = MID_STREAM[fault]
    fake.push(reply)
    started = time.monotonic()
    seen = call(quick, endpoint, model)
    assert time.monotonic() - started < UPSTREAM_TIMEOUT_S + 3, "ends within the upstream timeout"
    assert_failed_mid_stream(seen, fragment)
    assert quick.wait_no_bridges()


def test_the_server_still_serves_after_the_faults(quick, fake):
    for endpoint in ENDPOINTS:
        fake.push(Reply(text="still here"))
        seen = call(quick, endpoint, "fake-chat/chat-model")
        assert (seen.status, seen.text, seen.error, seen.terminated) == (200, "still here", None, True), seen


# --- bridge faults -----------------------------------------------------------------------------------

FAULTY_NODE = """#!/bin/sh
# A `node` for tests/test_faults.py: crashes at start in mode crash-at-start, else runs the real
# node with fault_preload.mjs, which misbehaves as the mode says.
if [ "$(cat "$FAULT_MODE_FILE" 2>/dev/null)" = crash-at-start ]; then
  echo "simulated crash at start" >&2
  exit 3
fi
exec {node} --import {preload} "$@"
"""


@pytest.fixture(scope="module")
def faulty(agent_dir, tmp_path_factory):
    """A proxy (pool of 2) whose `node` is tests' faulty one; .mode_file sets its behaviour."""
    directory = tmp_path_factory.mktemp("faulty-node")
    node = directory / "node"
    node.write_text(FAULTY_NODE.format(node=shutil.which("node"), preload=(ROOT / "tests" / "fault_preload.mjs").as_uri()))
    node.chmod(0o755)
    mode_file = directory / "mode"
    mode_file.write_text("")
    running = RunningProxy(agent_dir, directory / "proxy.log", {
        "PATH": f"{directory}:{os.environ['PATH']}", "FAULT_MODE_FILE": str(mode_file),
        "PI_PROXY_BRIDGE_POOL": "2"})
    running.node, running.mode_file = node, mode_file
    yield running
    running.stop()


def pool_full(proxy) -> bool:
    return wait_for(lambda: len(proxy.bridges(serving=False)) == 2)


@pytest.fixture
def mode(faulty):
    """Set the faulty node's mode; afterwards it behaves again, and the next test starts with a full pool."""
    assert pool_full(faulty)
    yield faulty.mode_file.write_text
    faulty.mode_file.write_text("")
    assert faulty.wait_no_bridges(), "no bridge outlives its request"
    assert pool_full(faulty), "the pool refills"


def assert_serves(proxy, fake, endpoint: str = "chat"):
    fake.push(Reply(text="served again"))
    seen = call(proxy, endpoint, "fake-chat/chat-model")
    assert (seen.status, seen.text, seen.error) == (200, "served again", None), seen


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("fault,message", [
    ("exit-mid", "the proxy's bridge exited unexpectedly (status 1): fault_preload: exiting mid-stream"),
    ("garbage-mid", "the proxy's bridge printed something that is not JSON"),
])
def test_bridge_exits_or_prints_non_json_mid_stream(faulty, mode, fake, endpoint, fault, message):
    mode(fault)
    fake.push(Reply(text=TEXT, delay=0.05))
    seen = call(faulty, endpoint, "fake-chat/chat-model")
    assert_failed_mid_stream(seen, message)
    mode("")
    assert_serves(faulty, fake, endpoint)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_bridge_prints_non_json_before_content(faulty, mode, fake, endpoint):
    mode("garbage-at-start")
    fake.push(Reply(text=TEXT))
    seen = call(faulty, endpoint, "fake-chat/chat-model")
    assert_failed_before_content(seen, endpoint, 502, "the proxy's bridge printed something that is not JSON")
    mode("")
    assert_serves(faulty, fake, endpoint)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_bridge_killed_mid_stream_like_the_oom_killer(faulty, mode, fake, endpoint):
    fake.push(Reply(text=TEXT, delay=0.1))
    response, read, rest = open_stream(faulty, endpoint, until="word1")
    with response:
        serving = faulty.bridges()
        assert len(serving) == 1, serving
        os.kill(serving[0], signal.SIGKILL)
        seen = outcome(response, endpoint, [*read, *rest])
    assert_failed_mid_stream(seen, "the proxy's bridge exited unexpectedly (status -9)")
    assert fake.wait_for_disconnect(timeout=2), "the upstream request was dropped"
    assert_serves(faulty, fake, endpoint)


def test_bridge_crashes_at_start(faulty, mode, fake):
    mode("crash-at-start")
    warm = faulty.bridges(serving=False)  # they started healthy
    for pid in warm:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in warm)), "killed and reaped"
    for endpoint in ENDPOINTS:
        seen = call(faulty, endpoint, "fake-chat/chat-model")
        assert_failed_before_content(seen, endpoint, 502, "the proxy's bridge exited unexpectedly (status 3): simulated crash")
    assert requests.get(f"{faulty.url}/healthz", timeout=5).status_code == 200
    assert not fake.requests, "nothing reached the upstream"
    mode("")
    assert pool_full(faulty), "the pool refills once node starts again"
    assert_serves(faulty, fake)


def test_node_disappearing_after_startup_is_503_until_it_returns(faulty, mode, fake):
    """The proxy resolves `node` on PATH once, at startup: if that file goes away, the warm
    bridges still serve; then each request is a 503 naming the problem, and the pool retries
    every second, so service resumes by itself once node is back."""
    moved = faulty.node.with_name("node.moved")
    faulty.node.rename(moved)
    try:
        served = 0
        while (seen := call(faulty, "chat", "fake-chat/chat-model")).status == 200:
            served += 1
            assert served <= 2, "only the two warm bridges can serve"
        for endpoint in ENDPOINTS:
            seen = call(faulty, endpoint, "fake-chat/chat-model")
            assert seen.status == 503, seen
            assert "cannot start its bridge process" in seen.error and "No such file" in seen.error, seen
        assert requests.get(f"{faulty.url}/healthz", timeout=5).status_code == 200
    finally:
        moved.rename(faulty.node)
    assert pool_full(faulty), "the pool refills once node is back"
    assert_serves(faulty, fake)


def test_node_missing_at_startup_is_a_clear_exit(agent_dir):
    env = {"PATH": "/nonexistent", "HOME": str(agent_dir.parent), "PI_CODING_AGENT_DIR": str(agent_dir)}
    done = subprocess.run([sys.executable, str(ROOT / "proxy.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert "`node` was not found on PATH; install Node.js 20 or newer" in done.stderr
    assert "Traceback" not in done.stderr
