"""What one request can make the proxy do (issue 12): input the bridge could not read is the
client's 400 before any bridge is taken; no exception loses a bridge; messages, tools, values and
nesting are capped (413/400) before schema validation; client text never forges a log line."""

import json
import socket
import sys
import threading
import time

import gevent
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proxy as proxy_module
from tests.fake_upstream import Reply
from tests.helpers import error_family, response_error, running_proxy

CHAT, RESPONSES, MESSAGES, PI = "/v1/chat/completions", "/v1/responses", "/v1/messages", "/api/stream"
HI = [{"role": "user", "content": "hi"}]
POOL = 2  # the default PI_PROXY_BRIDGE_POOL of the proxies started here


def node_children(running) -> list[int]:
    """Every bridge process of the proxy: serving, idle in the pool, or taken and forgotten."""
    return running.bridges(serving=True) + running.bridges(serving=False)


def settled(running, timeout: float = 5.0) -> list[int]:
    """The proxy's bridges once the pool has had time to refill: exactly the pool, unless one leaked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = node_children(running)
        if len(children) == POOL and not running.bridges(serving=True):
            return children
        time.sleep(0.1)
    return node_children(running)


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


class Raw:
    """JSON text spliced into a body as is (json.dumps itself cannot write ~1000 levels)."""

    def __init__(self, text: str):
        self.text = text


def encoded(body) -> bytes:
    text = json.dumps(body, default=lambda raw: f"@@{id(raw)}@@")
    for raw in _raws(body):
        text = text.replace(f'"@@{id(raw)}@@"', raw.text)
    return text.encode()


def _raws(value):
    if isinstance(value, Raw):
        yield value
    elif isinstance(value, dict):
        for member in value.values():
            yield from _raws(member)
    elif isinstance(value, list):
        for member in value:
            yield from _raws(member)


def deep_tools(depth: int) -> list:
    deep = Raw('{"a":' * depth + "{}" + "}" * depth)
    return [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x": deep}}}]


# --- nothing taken is ever lost ------------------------------------------------------------------


def test_deep_nesting_that_the_schema_passes_leaks_no_bridge(proxy, fake):
    """Issue 12 point 2: ~960 levels pass json.loads and the schema; serialising for the bridge
    failed after a bridge was taken: a 500 and a node process lost for good, each time."""
    settled(proxy)
    body = encoded({"model": "fake-chat/chat-model", "messages": HI, "tools": deep_tools(955)})
    for _ in range(3):
        response = requests.post(proxy.url + CHAT, data=body, headers={"Content-Type": "application/json"},
                                 timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].startswith("tools[0].function.parameters.x")
    assert len(settled(proxy)) == POOL, "a bridge taken from the pool was never closed"
    assert not fake.requests


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"model": "fake-chat/chat-model", "messages": HI, "temperature": float("nan")}, "temperature"),
    (CHAT, {"model": "fake-chat/chat-model", "messages": HI,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"n": {"type": "number", "maximum": float("inf")}}}}}]},
     "tools[0].function.parameters.properties.n.maximum"),
    (PI, {"model": {"provider": "fake-chat", "id": "chat-model"}, "context": {"messages": HI},
          "options": {"temperature": float("-inf")}}, "options.temperature"),
])
def test_nan_and_infinity_are_400_naming_the_field(proxy, fake, path, body, param):
    response = requests.post(proxy.url + path, data=json.dumps(body), headers={"Content-Type": "application/json"},
                             timeout=30)
    error = response_error(response, 400, error_family(path))
    assert param in error["message"] and "JSON has no such number" in error["message"]
    if path != PI:
        assert error["param"] == param
    assert not fake.requests


@pytest.mark.parametrize("path, body, param", [
    (RESPONSES, {"model": "fake-responses/gpt-test", "input": "hi", "prompt_cache_key": "a\r\nX-Injected: 1"},
     "prompt_cache_key"),
    (PI, {"model": {"provider": "fake-responses", "id": "gpt-test"}, "context": {"messages": HI},
          "options": {"sessionId": "s\n1"}}, "options.sessionId"),
    (PI, {"model": {"provider": "fake-chat", "id": "chat-model"}, "context": {"messages": HI},
          "options": {"headers": {"X-Trace": "a\r\nb"}}}, "options.headers.X-Trace"),
    (PI, {"model": {"provider": "fake-chat", "id": "chat-model"}, "context": {"messages": HI},
          "options": {"headers": {"X Bad:": "v"}}}, "options.headers.X Bad:"),
])
def test_header_bound_values_with_control_characters_are_400(proxy, fake, path, body, param):
    """Issue 12 point 10: CRLF in a value pi-ai sends as a header was a 502 quoting the bridge's
    request; it is the client's 400, naming the field, and nothing reaches the upstream."""
    response = requests.post(proxy.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    text = response.text
    assert param in text and '"op"' not in text and "apiKey" not in text
    if path != PI:
        assert response.json()["error"]["param"] == param
    assert not fake.requests


def bad_requests(fake) -> dict:
    """Ways a request can fail at each step after it is read, from outside: the body, the model,
    the translation, the upstream's answer, and the client going away."""
    chat = {"model": "fake-chat/chat-model", "messages": HI}
    return {
        "not json": lambda: (CHAT, b"{nope"),
        "deep": lambda: (CHAT, {**chat, "tools": deep_tools(955)}),
        "nan": lambda: (CHAT, {**chat, "temperature": float("nan")}),
        "crlf": lambda: (RESPONSES, {"model": "fake-responses/gpt-test", "input": "hi", "prompt_cache_key": "\r\n"}),
        "no model": lambda: (CHAT, {**chat, "model": "no/such"}),
        "orphan tool result": lambda: (CHAT, {**chat, "messages": [{"role": "tool", "tool_call_id": "x",
                                                                    "content": "r"}]}),
        "upstream 500": lambda: (fake.push(Reply(status=500)), (CHAT, chat))[1],
        "upstream 429": lambda: (fake.push(Reply(status=429, headers={"retry-after": "1"})), (CHAT, chat))[1],
        "upstream garbage": lambda: (fake.push(Reply(text="x y z", malformed_after=1)),
                                     (CHAT, {**chat, "stream": True}))[1],
        "stream ok": lambda: (fake.push(Reply(text="a b c")), (RESPONSES, {"model": "fake-responses/gpt-test",
                                                                          "input": "hi", "stream": True}))[1],
        "client leaves": lambda: (fake.push(Reply(text="never", hang_after_headers=True)),
                                  ("leave", {**chat, "stream": True}))[1],
    }


def send(running, path, body):
    if path == "leave":  # the client goes away while the upstream is silent
        raw = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            sock.recv(1)
        return
    data = body if isinstance(body, bytes) else encoded(body)
    response = requests.post(running.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert "Internal proxy error" not in response.text, "an exception of the proxy's own"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(sorted(bad_requests(None))), min_size=1, max_size=4))
def test_no_failure_path_leaks_a_bridge(proxy, fake, steps):
    """Each step fails somewhere else: the bridges are again exactly the pool afterwards."""
    fake.reset()
    cases = bad_requests(fake)
    for step in steps:
        send(proxy, *cases[step]())
    children = settled(proxy)
    assert len(children) == POOL, f"{len(children)} bridges after {steps}"


# --- bounded work per request ------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(agent_dir, tmp_path_factory):
    with running_proxy(agent_dir, tmp_path_factory.mktemp("logs") / "capped.log",
                       {"PI_PROXY_MAX_MESSAGES": "20", "PI_PROXY_MAX_TOOLS": "3", "PI_PROXY_MAX_DEPTH": "12",
                        "PI_PROXY_MAX_JSON_VALUES": "400"}) as running:
        yield running


def tools(count: int) -> list:
    return [{"type": "function", "function": {"name": f"t{i}", "parameters": {"type": "object"}}}
            for i in range(count)]


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"model": "fake-chat/chat-model", "messages": HI * 21}, "messages"),
    (CHAT, {"model": "fake-chat/chat-model", "messages": HI, "tools": tools(4)}, "tools"),
    (MESSAGES, {"model": "fake-anthropic/claude-test", "max_tokens": 5, "messages": HI * 21}, "messages"),
    (RESPONSES, {"model": "fake-responses/gpt-test", "input": HI * 21}, "input"),
    (PI, {"model": {"provider": "fake-chat", "id": "chat-model"}, "context": {"messages": HI * 21}},
     "context.messages"),
    (PI, {"model": {"provider": "fake-chat", "id": "chat-model"},
          "context": {"messages": HI, "tools": [{"name": f"t{i}", "parameters": {}} for i in range(4)]}},
     "context.tools"),
    # Not a valid request at all: the count comes before the schema.
    (CHAT, {"model": 7, "messages": [{"role": "nobody"}] * 21}, "messages"),
])
def test_counts_past_the_caps_are_413_naming_the_field(capped, fake, path, body, param):
    response = requests.post(capped.url + path, json=body, timeout=30)
    error = response_error(response, 413, error_family(path))
    assert param in error["message"]
    assert "PI_PROXY_MAX_MESSAGES" in error["message"] or "PI_PROXY_MAX_TOOLS" in error["message"]
    if path == MESSAGES:
        assert error["type"] == "request_too_large"
    assert not fake.requests


def test_values_and_nesting_past_the_caps(capped, fake):
    many = {"model": "fake-chat/chat-model", "messages": HI, "metadata": {f"k{i}": i for i in range(500)}}
    response = requests.post(capped.url + CHAT, json=many, timeout=30)
    assert response.status_code == 413 and "PI_PROXY_MAX_JSON_VALUES" in response.json()["error"]["message"]
    deep = {"model": "fake-chat/chat-model", "messages": HI, "metadata": nested(12)}
    response = requests.post(capped.url + CHAT, json=deep, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "metadata" + ".a" * 11  # the 13th level
    assert not fake.requests


def test_requests_at_the_caps_are_answered(capped, fake):
    fake.push(Reply(text="ok"))
    body = {"model": "fake-chat/chat-model", "messages": HI * 20, "tools": tools(3), "metadata": nested(9)}
    response = requests.post(capped.url + CHAT, json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert len(fake.requests[-1].body["messages"]) == 20


def test_the_default_caps_take_a_long_claude_code_session(proxy, fake):
    """Thousands of messages and dozens of tools are an ordinary Claude Code request."""
    fake.push(Reply(text="ok"))
    turns = [{"role": "user", "content": f"step {i}"} if i % 2 == 0 else {"role": "assistant", "content": "done"}
             for i in range(6001)]
    tools_ = [{"name": f"tool_{i}", "description": "d", "input_schema": {"type": "object"}} for i in range(80)]
    response = requests.post(proxy.url + MESSAGES, json={"model": "fake-anthropic/claude-test", "max_tokens": 10,
                                                         "messages": turns, "tools": tools_}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(fake.requests[-1].body["messages"]) == 6001


def test_a_large_request_is_answered_alongside_small_ones(proxy, fake):
    """A body parsed, validated and serialised off the loop still gets its answer, and small
    requests meanwhile get theirs (the stall itself is measured by bench/stall.py, not here)."""
    fake.push(Reply(text="ok"))
    turns = [{"role": "user", "content": "x" * 100}] * 8000
    result = {}
    big = threading.Thread(target=lambda: result.update(response=requests.post(
        proxy.url + CHAT, json={"model": "fake-chat/chat-model", "messages": turns}, timeout=60)))
    big.start()
    answered = 0
    while big.is_alive():
        assert requests.get(proxy.url + "/healthz", timeout=10).status_code == 200
        answered += 1
    big.join()
    assert result["response"].status_code == 200, result["response"].text
    assert answered > 1


@pytest.mark.parametrize("path, text", [
    ("messages", '{"model": "m", "messages": [1, 2, 3, this is never read'),
    ("context.messages", '{"context": {"messages": [{"role": "user"}, {}, {}, {}, and so on'),
])
def test_the_parser_refuses_an_array_at_its_cap_before_reading_on(path, text):
    """A 47 MB body of 1.4 M messages is refused after 100,001 of them are parsed, not after all of
    them are built (16 s of work, and a list the collector walks whole at each pass): here the
    garbage after the cap is never read."""
    with pytest.raises(proxy_module.ApiError) as refused:
        proxy_module.parse_json(text, {path: (2, "PI_PROXY_MAX_MESSAGES")})
    assert refused.value.status == 413 and refused.value.param == path
    assert "more than 2" in refused.value.message and "PI_PROXY_MAX_MESSAGES" in refused.value.message
    assert proxy_module.parse_json('{"messages": [1, 2], "tools": [1, 2, 3]}', {"messages": (2, "X")}) == \
        {"messages": [1, 2], "tools": [1, 2, 3]}, "at the cap, and arrays elsewhere, parse as json.loads does"


def test_the_bridge_line_carries_the_context_in_the_pieces_it_came_in():
    """A large request's context comes from its child process as JSON text in the pieces it was
    read in: they go into the line as they are (one 60 MB buffer, zeroed or joined, held the loop
    for tens of ms), and the line reads back as the request."""
    context = {"messages": [{"role": "user", "content": [{"type": "text", "text": "é \"q\"" * 50}], "timestamp": 0}]
               * 500, "tools": []}
    text = b"".join(proxy_module.json_text(context))
    pieces = proxy_module.JsonText(text[at:at + 1000] for at in range(0, len(text), 1000))
    bridge_request = {"op": "stream", "model": {"id": "m"}, "options": {"maxTokens": 5, "stop": None}}
    line = proxy_module.bridge_line(bridge_request, pieces)
    assert len(line) == len(pieces) + 2 and all(piece in line for piece in pieces), "no piece joined or copied"
    whole = b"".join(line)
    assert whole.endswith(b"\n") and b"\n" not in whole[:-1]
    assert json.loads(whole) == {**bridge_request, "context": context}
    assert json.loads(b"".join(proxy_module.bridge_line(bridge_request))) == bridge_request
    with pytest.raises(proxy_module.ApiError) as refused:
        proxy_module.json_text({"messages": [{"temperature": float("nan")}]})
    assert refused.value.status == 400 and "cannot be forwarded" in refused.value.message


def test_letting_the_loop_poll_returns_while_the_loop_is_never_idle():
    """Reading a large body and writing a long bridge line yield to the loop between chunks. The
    yield must let the loop poll, not wait for it to be idle: while another greenlet keeps it busy
    (here one that never stops yielding), gevent.idle() never returns, and a request would hang."""
    def spin():
        while True:
            gevent.sleep(0)

    spinner = gevent.spawn(spin)
    try:
        gevent.sleep(0.01)
        with gevent.Timeout(5):
            proxy_module.let_the_loop_poll()
        assert gevent.with_timeout(0.5, gevent.idle, timeout_value="waiting") == "waiting", \
            "the premise: gevent.idle() waits for a loop that is never idle"
    finally:
        spinner.kill()


FLOOD = "import sys\nline = b'x' * 200 + b'\\n'\nfor _ in range(60_000): sys.stdout.buffer.write(line)"


def test_a_bridge_printing_faster_than_its_client_reads_leaves_the_loop_to_others():
    """A bridge's output is read as a client's socket is, when the loop finds it readable: a read
    that finds output waiting never yields, and the hand-offs through its bounded queue alone
    never let the loop poll, so a fast bridge used to keep every timer and other socket waiting
    until it was done (the stall bench/stall.py measured at 130-280 ms on a 200,000-token stream)."""
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.005)

    bridge = proxy_module.Bridge([sys.executable, "-c", FLOOD])
    clock = gevent.spawn(ticker)
    try:
        read, started = 0, time.monotonic()
        while bridge.lines.get(timeout=30):
            read += 1
            busy = time.perf_counter() + 0.00002  # a translator's work per event
            while time.perf_counter() < busy:
                pass
        ended = time.monotonic()
    finally:
        clock.kill()
        bridge.close()
    assert read == 60_000
    during = [tick for tick in ticks if started <= tick <= ended]
    gaps = [later - earlier for earlier, later in zip([started, *during], [*during, ended], strict=True)]
    assert ended - started > 0.5, "long enough to tell"
    assert max(gaps) < 0.25, f"the loop's timers waited {max(gaps):.2f} s while the bridge's output was read"


# --- log forging -------------------------------------------------------------------------------


def test_client_text_cannot_forge_log_lines(proxy, fake):
    forged = "2026-01-01 00:00:00,000 ERROR pi-proxy: FORGED-LINE"
    fake.push(Reply(text="ok"))
    body = {"model": "fake-chat/chat-model", "messages": HI, f"x\r\n{forged}": 1}
    assert requests.post(proxy.url + CHAT, json=body, timeout=30).status_code == 200
    fake.push(Reply(text="ok"))
    body = {"model": "fake-responses/gpt-test", "input": [{"type": f"odd\n{forged}", "text": "t"}]}
    assert requests.post(proxy.url + RESPONSES, json=body, timeout=30).status_code == 200
    log = proxy.log_path.read_text()
    assert "FORGED-LINE" in log, "the names are logged (at DEBUG), escaped"
    assert not [line for line in log.splitlines() if line.startswith(forged[:10]) and "FORGED-LINE" in line]
    assert "\\r\\n" + forged in log


def test_lines_logged_by_child_processes_reach_the_log(proxy, fake):
    """Large requests are prepared in child processes, several at once here: what the translation
    logs (at DEBUG, 300 lines each) reaches the proxy's log whole."""
    padding = [{"role": "user", "content": "p" * 1000}] * 120  # over 100 KB: prepared in a child process
    def send(index, results):
        body = {"model": "fake-responses/gpt-test",
                "input": [*padding, *[{"type": f"odd-{index}", "text": "t"}] * 300, {"role": "user", "content": "hi"}]}
        results[index] = requests.post(proxy.url + RESPONSES, json=body, timeout=60).status_code
    for _ in range(4):
        fake.push(Reply(text="ok"))
    results = {}
    threads = [threading.Thread(target=send, args=(index, results)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {index: 200 for index in range(4)}
    log = proxy.log_path.read_text()
    for index in range(4):
        assert log.count(f"of type odd-{index} kept as text") == 300


@pytest.mark.parametrize("body", [
    b'{"model": "fake-chat/chat-model", "messages": [' + b" " * 200_000,  # not JSON
    json.dumps({"model": "fake-chat/chat-model", "messages": [{"role": "nobody"}] * 8000}).encode(),  # schema
    json.dumps({"model": "fake-chat/chat-model", "messages": HI, "metadata": nested(70),
                "user": "x" * 200_000}).encode(),  # nesting cap
])
def test_a_large_bad_request_writes_no_traceback(proxy, fake, body):
    """Bodies over 100 KB are checked in a child process: the client's 4xx comes back as the
    client's error, in its API's shape, and reaches the log as no traceback."""
    response = requests.post(proxy.url + CHAT, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()
    log = proxy.log_path.read_text()
    assert "Traceback" not in log and "failed with" not in log, log[-2000:]
    assert not fake.requests
