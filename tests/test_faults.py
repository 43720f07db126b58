"""Faults, on all four endpoints (chat completions, Anthropic messages, Responses, /api/stream):
the upstream fails in every way it can (status, transport, timeout, broken stream), and the
bridge itself crashes, exits, prints garbage, is SIGKILLed, or loses its `node`. Each request
gets its protocol's error (an HTTP status before content, the terminal error event after),
within the configured timeout, never a 500 of our own; the server keeps serving and the pool refills.

Bridge faults need no hook in the proxy: the proxy runs a `node` found first on its PATH, here
a script that execs the real node with tests/fault_preload.mjs preloaded (it misbehaves as a
mode file says), or crashes at start, or is missing."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.fake_upstream import Reply
from tests.helpers import (
    CLIENT_APIS,
    ROOT,
    WORDS,
    assert_failed_before_content,
    assert_failed_mid_stream,
    call,
    open_stream,
    outcome,
    running_proxy,
    wait_for,
)

UPSTREAM_TIMEOUT_S = 1.5
UPSTREAM_MODELS = ["fake-chat/chat-model", "fake-anthropic/claude-test", "fake-responses/gpt-test"]


# --- upstream faults ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(agent_dir, tmp_path_factory):
    """A proxy whose upstream timeout is short, so the timeout faults take little time."""
    with running_proxy(agent_dir, tmp_path_factory.mktemp("quick") / "proxy.log",
                       {"PI_PROXY_UPSTREAM_TIMEOUT_MS": str(int(UPSTREAM_TIMEOUT_S * 1000))}) as running:
        yield running


@pytest.mark.parametrize("endpoint", CLIENT_APIS)
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


@pytest.mark.parametrize("endpoint", CLIENT_APIS)
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
    "cut": (Reply(text=WORDS, cut_after=7), "terminated"),
    "silent mid-stream": (Reply(text=WORDS, hang_after=7), "sent nothing for 1.5 s"),
    "malformed SSE line": (Reply(text=WORDS, malformed_after=7), "json"),
    "in-stream error event": (Reply(text=WORDS, stream_error="overloaded mid-stream"), "overloaded"),
}


@pytest.mark.parametrize("endpoint", CLIENT_APIS)
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
    for endpoint in CLIENT_APIS:
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
    node.write_text(FAULTY_NODE.format(node=shutil.which("node"),
                                       preload=(ROOT / "tests" / "fault_preload.mjs").as_uri()))
    node.chmod(0o755)
    mode_file = directory / "mode"
    mode_file.write_text("")
    with running_proxy(agent_dir, directory / "proxy.log", {
        "PATH": f"{directory}:{os.environ['PATH']}", "FAULT_MODE_FILE": str(mode_file),
        "PI_PROXY_BRIDGE_POOL": "2"}) as running:
        running.node, running.mode_file = node, mode_file
        yield running


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


@pytest.mark.parametrize("endpoint", CLIENT_APIS)
@pytest.mark.parametrize("fault,message", [
    ("exit-mid", "the proxy's bridge exited unexpectedly (status 1): fault_preload: exiting mid-stream"),
    ("garbage-mid", "the proxy's bridge printed something that is not JSON"),
])
def test_bridge_exits_or_prints_non_json_mid_stream(faulty, mode, fake, endpoint, fault, message):
    mode(fault)
    fake.push(Reply(text=WORDS, delay=0.05))
    seen = call(faulty, endpoint, "fake-chat/chat-model")
    assert_failed_mid_stream(seen, message)
    mode("")
    assert_serves(faulty, fake, endpoint)


@pytest.mark.parametrize("endpoint", CLIENT_APIS)
def test_bridge_prints_non_json_before_content(faulty, mode, fake, endpoint):
    mode("garbage-at-start")
    fake.push(Reply(text=WORDS))
    seen = call(faulty, endpoint, "fake-chat/chat-model")
    assert_failed_before_content(seen, endpoint, 502, "the proxy's bridge printed something that is not JSON")
    mode("")
    assert_serves(faulty, fake, endpoint)


@pytest.mark.parametrize("endpoint", CLIENT_APIS)
def test_bridge_killed_mid_stream_like_the_oom_killer(faulty, mode, fake, endpoint):
    fake.push(Reply(text=WORDS, delay=0.1))
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
    for endpoint in CLIENT_APIS:
        seen = call(faulty, endpoint, "fake-chat/chat-model")
        assert_failed_before_content(seen, endpoint, 502,
                                     "the proxy's bridge exited unexpectedly (status 3): simulated crash")
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
        for endpoint in CLIENT_APIS:
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
