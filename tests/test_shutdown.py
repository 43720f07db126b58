"""SIGTERM with streams in flight: the proxy stops accepting at once, lets the streams finish for
PI_PROXY_SHUTDOWN_GRACE_S, then ends the rest with their protocol's error event and exits,
leaving no bridge behind."""

import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.fake_upstream import Reply
from tests.helpers import (
    CLIENT_APIS,
    WORDS,
    alive,
    assert_failed_before_content,
    call,
    open_stream,
    outcome,
    request_body,
    running_proxy,
    wait_for,
)

GRACE_S = 3.0


@pytest.fixture
def graceful(agent_dir, tmp_path):
    with running_proxy(agent_dir, tmp_path / "proxy.log", {
        "PI_PROXY_SHUTDOWN_GRACE_S": str(GRACE_S), "PI_PROXY_UPSTREAM_TIMEOUT_MS": "30000",
        "PI_PROXY_BRIDGE_POOL": "2"}) as running:
        yield running


def refused(proxy) -> bool:
    try:
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):  # reset: closed with the connection in its backlog
        return True
    return False


def every_bridge(proxy) -> set:
    return set(proxy.bridges()) | set(proxy.bridges(serving=False))


def test_a_stream_that_ends_within_the_grace_completes(graceful, fake):
    assert wait_for(lambda: len(graceful.bridges(serving=False)) == 2)
    fake.push(Reply(text=WORDS, delay=0.05))  # about 1.5 s
    response, read, rest = open_stream(graceful, "chat")
    bridges = every_bridge(graceful)
    graceful.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: refused(graceful), timeout=1), "no new connection once SIGTERM came"
    seen = outcome(response, "chat", [*read, *rest])
    assert (seen.text, seen.error, seen.terminated) == (WORDS, None, True), seen
    assert graceful.proc.wait(timeout=GRACE_S) == 0, "exits as soon as nothing is in flight"
    assert not [pid for pid in bridges if alive(pid)], "no bridge outlives the proxy"


def test_streams_past_the_grace_end_with_their_error_event(graceful, fake):
    assert wait_for(lambda: len(graceful.bridges(serving=False)) == 2)
    streams = []
    for endpoint in CLIENT_APIS:
        fake.push(Reply(text=WORDS, hang_after=6))  # then silent, far within the 30 s upstream timeout
        streams.append((endpoint, *open_stream(graceful, endpoint)))
    bridges = every_bridge(graceful)
    assert len(graceful.bridges()) == 4
    graceful.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert wait_for(lambda: refused(graceful), timeout=1), "no new connection once SIGTERM came"
    for endpoint, response, read, rest in streams:
        seen = outcome(response, endpoint, [*read, *rest])
        assert seen.text.startswith("word0") and seen.terminated, (endpoint, seen)
        assert "the proxy is shutting down" in seen.error, (endpoint, seen)
    assert time.monotonic() - signalled >= GRACE_S - 0.2, "the streams had their grace"
    assert graceful.proc.wait(timeout=GRACE_S + 3) == 0
    assert time.monotonic() - signalled < GRACE_S + 2.5, "exits within the grace and a small margin"
    assert not [pid for pid in bridges if alive(pid)], "no bridge outlives the proxy"
    assert fake.wait_for_disconnect(timeout=2, count=4), "the upstream requests were dropped"


def test_a_request_on_a_kept_alive_connection_during_the_grace_is_refused(graceful, fake):
    keep = requests.Session()
    assert keep.get(f"{graceful.url}/v1/models", timeout=5).status_code == 200  # the connection stays open
    fake.push(Reply(text=WORDS, hang_after=6))
    response, *_ = open_stream(graceful, "chat")  # keeps the proxy in its grace
    graceful.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: refused(graceful), timeout=1)
    path, body = request_body("messages", "fake-chat/chat-model")
    refusal = keep.post(f"{graceful.url}{path}", json=body, timeout=5)
    assert refusal.status_code == 503 and refusal.headers["connection"] == "close"
    assert refusal.json()["error"]["message"].startswith("The proxy is shutting down"), refusal.text
    assert len(fake.requests) == 1, "the refused request never reached the upstream"
    response.close()
    assert graceful.proc.wait(timeout=GRACE_S) == 0, "the dropped stream left nothing in flight"


def test_requests_still_waiting_for_the_upstream_past_the_grace_get_503(graceful, fake):
    """Nothing reached the client yet: a 503 (on /api/stream its only event, the error), not a 502
    that would blame the upstream."""
    assert wait_for(lambda: len(graceful.bridges(serving=False)) == 2)
    with ThreadPoolExecutor(len(CLIENT_APIS)) as pool:
        answers = []
        for endpoint in CLIENT_APIS:
            fake.push(Reply(text=WORDS, first_byte_delay=20))
            answers.append((endpoint, pool.submit(call, graceful, endpoint, "fake-chat/chat-model")))
        assert wait_for(lambda: len(fake.requests) == len(CLIENT_APIS), timeout=10)
        graceful.proc.send_signal(signal.SIGTERM)
        for endpoint, answer in answers:
            assert_failed_before_content(answer.result(), endpoint, 503, "the proxy is shutting down")
    assert graceful.proc.wait(timeout=GRACE_S + 3) == 0
