"""Upstream failures keep their meaning; streams always end; disconnects kill and reap the bridge."""

import socket
import threading
import time

import openai
import pytest
import requests

from tests.fake_upstream import Reply
from tests.helpers import ALL_APIS, sse_events

USER = [{"role": "user", "content": "hi"}]


# --- before the first byte: the upstream's status, in OpenAI's shape -------------------------------


@ALL_APIS
@pytest.mark.parametrize("status,error_class,error_type", [
    (400, openai.BadRequestError, "invalid_request_error"),
    (401, openai.AuthenticationError, "authentication_error"),
    (403, openai.PermissionDeniedError, "permission_error"),
    (404, openai.NotFoundError, "not_found_error"),
    (500, openai.InternalServerError, "api_error"),
    (502, openai.InternalServerError, "api_error"),
    (503, openai.InternalServerError, "api_error"),
    (529, openai.InternalServerError, "overloaded_error"),
])
def test_upstream_status_is_kept(client, fake, model, status, error_class, error_type):
    fake.push(Reply(status=status))
    with pytest.raises(error_class) as caught:
        client.chat.completions.create(model=model, messages=USER)
    assert caught.value.status_code == status
    assert caught.value.body["type"] == error_type
    assert caught.value.body["message"], "the upstream's message is passed on"


@ALL_APIS
def test_rate_limit_keeps_retry_after(client, fake, model):
    fake.push(Reply(status=429, headers={"retry-after": "7"}))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=model, messages=USER)
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body["type"] == "rate_limit_error"
    assert len(fake.requests) == 1, "pi-ai's SDKs must not retry behind the client's back"


def test_upstream_400_message_reaches_the_client(client, fake):
    fake.push(Reply(status=400, error_body={"error": {"message": "messages: field 'x' is bad",
                                                      "type": "invalid_request_error"}}))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-chat/chat-model", messages=USER)
    assert "field 'x' is bad" in caught.value.body["message"]


def test_streaming_request_gets_http_status_before_any_output(client, fake):
    fake.push(Reply(status=429, headers={"retry-after": "3"}))
    with pytest.raises(openai.RateLimitError) as caught:
        list(client.chat.completions.create(model="fake-anthropic/claude-test", messages=USER, stream=True))
    assert caught.value.response.headers["retry-after"] == "3"


def test_connection_refused_is_502(client):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="fake-dead/dead-model", messages=USER)
    assert caught.value.status_code == 502


def test_garbage_instead_of_http_is_502(client, fake):
    fake.push(Reply(raw=b"\x00\x01garbage, not HTTP at all\r\n\r\n"))
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="fake-chat/chat-model", messages=USER)
    assert caught.value.status_code == 502


def test_first_byte_that_never_comes_is_504(client, fake, proxy):
    fake.push(Reply(first_byte_delay=8, text="too late"))  # the proxy's upstream timeout is 4 s
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="fake-chat/chat-model", messages=USER)
    assert caught.value.status_code == 504
    assert time.monotonic() - started < 8, "gave up before the upstream's first byte (8 s)"
    assert proxy.wait_no_bridges()


def test_context_overflow_is_400_with_code(client, fake):
    fake.push(Reply(status=400, error_body={"type": "error", "error": {
        "type": "invalid_request_error", "message": "prompt is too long: 250000 tokens > 200000 maximum"}}))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-anthropic/claude-test", messages=USER)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "prompt is too long: 250000 tokens > 200000 maximum" in caught.value.body["message"]


def test_upstream_key_never_appears_in_error(client, fake):
    fake.push(Reply(status=401, error_body={"error": {
        "message": "Incorrect API key provided: sk-chat-SECRET-aaaa1111", "type": "invalid_request_error"}}))
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="fake-chat/chat-model", messages=USER)
    assert "sk-chat-SECRET-aaaa1111" not in caught.value.response.text
    assert "[redacted]" in caught.value.body["message"]


# --- after the headers: an error chunk, then [DONE] --------------------------------------------------


@ALL_APIS
def test_stream_cut_midway_ends_with_error_then_done(proxy, fake, model):
    fake.push(Reply(text="a b c d e f g h i j", cut_after=5))
    response = requests.post(f"{proxy.url}/v1/chat/completions", stream=True,
                             json={"model": model, "messages": USER, "stream": True})
    assert response.status_code == 200
    events = list(sse_events(response))
    assert events[-1] == (None, "[DONE]")
    assert '"error"' in events[-2][1]
    assert proxy.wait_no_bridges()


@ALL_APIS
def test_in_stream_upstream_error_raises_in_the_sdk(client, fake, model):
    fake.push(Reply(text="partial answer", stream_error="upstream exploded"))
    received = ""
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model=model, messages=USER, stream=True):
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert received == "partial answer"


def test_stream_that_hangs_after_content_ends_with_error(proxy, fake):
    fake.push(Reply(text="one two three", hang_after=3))  # silent for longer than the 4 s timeout
    started = time.monotonic()
    response = requests.post(f"{proxy.url}/v1/chat/completions", stream=True,
                             json={"model": "fake-chat/chat-model", "messages": USER, "stream": True})
    events = list(sse_events(response))
    assert events[-1] == (None, "[DONE]") and "timed out" in events[-2][1]
    assert time.monotonic() - started < 15
    assert proxy.wait_no_bridges()


# --- client disconnects -------------------------------------------------------------------------------


def open_raw_request(proxy, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def stream_body(model: str, stream: bool = True) -> bytes:
    return (b'{"model": "' + model.encode() + b'", "stream": ' + (b"true" if stream else b"false")
            + b', "messages": [{"role": "user", "content": "go"}]}')


@ALL_APIS
def test_dropping_a_slow_stream_kills_the_bridge_and_aborts_upstream(proxy, fake, model):
    fake.push(Reply(text=" ".join(f"w{i}" for i in range(200)), delay=0.1))
    sock = open_raw_request(proxy, stream_body(model))
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(4096)
    assert proxy.bridges(), "a bridge serves the stream"
    closed = time.monotonic()
    sock.close()
    assert fake.wait_for_disconnect(timeout=2.0)
    assert fake.disconnects[-1].time - closed < 2.0
    assert proxy.wait_no_bridges(timeout=2.0)


@pytest.mark.parametrize("stream", [True, False])
def test_dropping_a_request_while_upstream_is_silent(proxy, fake, stream):
    fake.push(Reply(hang_after_headers=True))
    sock = open_raw_request(proxy, stream_body("fake-chat/chat-model", stream))
    assert fake.wait_for_requests(1, timeout=5.0)
    time.sleep(0.3)
    assert proxy.bridges()
    closed = time.monotonic()
    sock.close()
    assert fake.wait_for_disconnect(timeout=2.0)
    assert fake.disconnects[-1].time - closed < 2.0
    assert proxy.wait_no_bridges(timeout=2.0)


def test_dropping_before_the_upstream_answers_at_all(proxy, fake):
    fake.push(Reply(first_byte_delay=3, text="late"))
    sock = open_raw_request(proxy, stream_body("fake-anthropic/claude-test"))
    assert fake.wait_for_requests(1, timeout=5.0)
    sock.close()
    assert proxy.wait_no_bridges(timeout=2.0)


def test_server_keeps_serving_after_disconnects(client, fake):
    fake.push(Reply(text="still alive"))
    assert client.chat.completions.create(model="fake-chat/chat-model", messages=USER).choices[0].message.content \
        == "still alive"


def test_concurrent_requests_are_served_in_parallel(client, fake):
    fake.default = Reply(text="parallel answer", delay=0.5)
    results, finished = [], []

    def ask():
        reply = client.chat.completions.create(model="fake-chat/chat-model", messages=USER)
        finished.append(time.monotonic())
        results.append(reply.choices[0].message.content)
    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["parallel answer"] * 4
    arrivals = [r.time for r in fake.requests]
    assert len(arrivals) == 4 and max(arrivals) < min(finished), "all four were upstream at once, none queued"
