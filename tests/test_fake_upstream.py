"""Checks tests/fake_upstream.py against the real pi-ai (via tests/pi_direct.mjs) and the official
Python SDKs. Run: .venv/bin/python -m pytest tests/test_fake_upstream.py"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.fake_upstream import FakeUpstream, Reply
from tests.helpers import sse_events

ROOT = Path(__file__).resolve().parent.parent
PI_DIRECT = ROOT / "tests" / "pi_direct.mjs"
APIS = ["openai-completions", "anthropic-messages", "openai-responses"]
PATHS = {"openai-completions": "/v1/chat/completions", "anthropic-messages": "/v1/messages",
         "openai-responses": "/v1/responses"}
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
         {"name": "add", "description": "Add numbers",
          "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}]


@pytest.fixture(scope="module")
def fake_server():
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture()
def fake(fake_server):
    fake_server.reset()
    yield fake_server
    fake_server.reset()


def base_url_for(fake: FakeUpstream, api: str) -> str:
    # anthropic SDK appends /v1/messages itself; openai SDK appends /chat/completions or /responses
    return fake.base_url if api == "anthropic-messages" else fake.base_url + "/v1"


def pi_input(fake: FakeUpstream, api: str, tools: bool = False, options: dict | None = None,
             base_url: str | None = None) -> str:
    model = {"id": "m1", "name": "m1", "api": api, "provider": "fake",
             "baseUrl": base_url or base_url_for(fake, api), "reasoning": True, "input": ["text", "image"],
             "cost": {"input": 1, "output": 2, "cacheRead": 0.5, "cacheWrite": 1},
             "contextWindow": 128000, "maxTokens": 4096}
    context: dict = {"systemPrompt": "Be brief.", "messages": [{"role": "user", "content": "hi"}]}
    if tools:
        context["tools"] = TOOLS
    return json.dumps({"model": model, "context": context,
                       "options": {"apiKey": "sk-test-key", "maxRetries": 0, **(options or {})}})


def run_pi(fake: FakeUpstream, api: str, *replies: Reply, timeout: float = 20, **kw) -> list[dict]:
    fake.push(*replies)
    p = subprocess.run(["node", str(PI_DIRECT)], input=pi_input(fake, api, **kw), capture_output=True,
                       text=True, cwd=ROOT, timeout=timeout)
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert events, p.stderr
    return events


def final(events: list[dict]) -> dict:
    last = events[-1]
    assert last["type"] in ("done", "error"), last
    assert [e["type"] for e in events].count(last["type"]) == 1
    return last


def done_message(events: list[dict]) -> dict:
    last = final(events)
    assert last["type"] == "done", last
    return last["message"]


def blocks(msg: dict, typ: str) -> list[dict]:
    return [b for b in msg["content"] if b["type"] == typ]


# --------------------------------------------------------------------------- through pi-ai


@pytest.mark.parametrize("api", APIS)
def test_text_reasoning_usage(fake, api):
    text = "The quick brown fox jumps over the lazy dog."
    reasoning = "User greets me. I should greet back."
    events = run_pi(fake, api, Reply(text=text, reasoning=reasoning, reasoning_signature="SIG-123==",
                                     usage=dict(input=100, output=50, cached=30, reasoning=7)),
                    options={"reasoning": "medium"})
    types = [e["type"] for e in events]
    assert types[0] == "start"
    deltas = [e["delta"] for e in events if e["type"] == "text_delta"]
    assert len(deltas) > 3 and "".join(deltas) == text
    assert types.count("thinking_delta") >= 2
    msg = done_message(events)
    assert msg["stopReason"] == "stop"
    assert [b["text"] for b in blocks(msg, "text")] == [text]
    (thinking,) = blocks(msg, "thinking")
    assert thinking["thinking"] == reasoning
    if api == "anthropic-messages":
        assert thinking["thinkingSignature"] == "SIG-123=="
    elif api == "openai-responses":
        item = json.loads(thinking["thinkingSignature"])  # pi-ai stores the whole reasoning item
        assert item["type"] == "reasoning" and item["encrypted_content"] == "SIG-123=="
    else:
        assert thinking["thinkingSignature"] == "reasoning_content"  # the delta field name, no signature
    u = msg["usage"]
    assert (u["input"], u["output"], u["cacheRead"], u["totalTokens"]) == (100, 50, 30, 180)
    assert u["cost"]["total"] > 0
    # what pi-ai sent
    (req,) = fake.requests
    assert req.path == PATHS[api]
    assert req.body["model"] == "m1" and req.body["stream"] is True
    if api == "anthropic-messages":
        assert req.headers["x-api-key"] == "sk-test-key"
    else:
        assert req.headers["authorization"] == "Bearer sk-test-key"
    if api == "openai-completions":
        assert req.body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("api", APIS)
def test_tool_calls(fake, api):
    calls = [("call_abc", "get_weather", json.dumps({"city": "Paris"})),
             ("call_def", "add", json.dumps({"a": 1, "b": 2.5}))]
    events = run_pi(fake, api, Reply(text="Let me check.", tool_calls=calls), tools=True)
    assert [e["type"] for e in events].count("toolcall_delta") >= 4
    msg = done_message(events)
    assert msg["stopReason"] == "toolUse"
    got = blocks(msg, "toolCall")
    assert [(b["name"], b["arguments"]) for b in got] == [("get_weather", {"city": "Paris"}),
                                                         ("add", {"a": 1, "b": 2.5})]
    for b, (cid, _, _) in zip(got, calls, strict=True):
        if api == "openai-responses":
            assert b["id"].startswith(cid + "|fc_")  # pi-ai: "<call_id>|<item id>"
        else:
            assert b["id"] == cid
    sent = fake.requests[0].body["tools"]
    names = [t.get("name") or t.get("function", {}).get("name") for t in sent]  # chat nests under "function"
    assert names == ["get_weather", "add"]


@pytest.mark.parametrize("api", APIS)
def test_stop_length(fake, api):
    msg = done_message(run_pi(fake, api, Reply(text="cut short", stop="length",
                                               usage=dict(input=5, output=9))))
    assert blocks(msg, "text")[0]["text"] == "cut short"
    if api == "openai-responses":
        # The fake sends the real terminal event `response.incomplete` (status "incomplete",
        # incomplete_details.reason "max_output_tokens"). pi-ai 0.73.1 only handles
        # `response.completed`, so it reports a clean stop with zero usage.
        assert msg["stopReason"] == "stop", "pi-ai now handles response.incomplete - update docs/tests"
        assert msg["usage"]["output"] == 0
    else:
        assert msg["stopReason"] == "length"
        assert (msg["usage"]["input"], msg["usage"]["output"]) == (5, 9)


@pytest.mark.parametrize("api", APIS)
def test_http_429_retry_after(fake, api):
    last = final(run_pi(fake, api, Reply(status=429, headers={"retry-after": "7"})))
    assert last["type"] == "error" and last["reason"] == "error"
    assert last["error"]["errorMessage"].startswith("429 ")
    assert len(fake.requests) == 1  # maxRetries: 0 honoured


@pytest.mark.parametrize("api", APIS)
def test_cut_after_is_an_error(fake, api):
    events = run_pi(fake, api, Reply(text="one two three four five six seven eight", cut_after=5))
    last = final(events)
    # undici reports the missing terminating chunk as "terminated"; all three providers surface it.
    assert last["type"] == "error" and last["error"]["errorMessage"] == "terminated"


@pytest.mark.parametrize("api", APIS)
def test_clean_cut_is_silently_accepted_except_by_anthropic(fake, api):
    # HTTP body ends properly, but the SSE stream stops after 6 events (no finish/terminal event).
    full = "one two three four five six seven"
    last = final(run_pi(fake, api, Reply(text=full, cut_after=6, cut_clean=True)))
    if api == "anthropic-messages":
        assert last["type"] == "error"
        assert last["error"]["errorMessage"] == "Anthropic stream ended before message_stop"
    else:  # pi-ai 0.73.1 reports a truncated OpenAI stream as a normal stop, usage 0
        assert last["type"] == "done" and last["reason"] == "stop"
        assert last["message"]["usage"]["output"] == 0
        text = blocks(last["message"], "text")[0]["text"]
        assert full.startswith(text) and len(text) < len(full)  # silently truncated


@pytest.mark.parametrize("api", APIS)
def test_in_stream_error_event(fake, api):
    last = final(run_pi(fake, api, Reply(text="partial", stream_error="Overloaded right now")))
    assert last["type"] == "error"
    assert "Overloaded right now" in last["error"]["errorMessage"]
    assert blocks(last["error"], "text")[0]["text"] == "partial"


def _spawn_pi(fake, api) -> subprocess.Popen:
    p = subprocess.Popen(["node", str(PI_DIRECT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
    p.stdin.write(pi_input(fake, api))
    p.stdin.close()
    return p


def _read_until(p: subprocess.Popen, typ: str, timeout: float = 10) -> None:
    # Read the pipe's fd directly (os.read), NOT p.stdout.readline(): readline() pulls everything the
    # pipe holds (up to 8 KiB) into Python's TextIOWrapper buffer and returns one line, so when pi-ai
    # writes several lines at once (start, text_start, text_delta from one TCP chunk) the later lines
    # sit in that buffer while select() on the now-empty fd blocks until the timeout.
    fd = p.stdout.fileno()
    end = time.monotonic() + timeout
    buf = b""
    while True:
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip() and json.loads(line)["type"] == typ:
                return
        rem = end - time.monotonic()
        if rem <= 0 or not select.select([fd], [], [], rem)[0]:
            raise AssertionError(f"no {typ} event within {timeout}s")
        chunk = os.read(fd, 65536)
        assert chunk, "pi_direct exited early"
        buf += chunk


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode", ["hang_after_headers", "slow_stream", "hang_after"])
def test_killed_client_is_seen_as_disconnect(fake, api, mode):
    wait_for = "start"  # pi-ai emits "start" once the response headers arrived
    if mode == "hang_after_headers":
        fake.push(Reply(hang_after_headers=True))
    elif mode == "slow_stream":  # first event is sent at once, then a 30 s inter-event delay
        fake.push(Reply(text="a b c d e f g", delay=30))
    else:  # some content, then silence
        fake.push(Reply(text="a b c d e f g", hang_after=5))
        wait_for = "text_delta"
    p = _spawn_pi(fake, api)
    try:
        _read_until(p, wait_for)
        assert fake.disconnects == []
        t0 = time.monotonic()
        p.kill()
        assert fake.wait_for_disconnect(2.0), "fake upstream did not notice the client going away"
        (d,) = fake.disconnects
        assert d.path == PATHS[api] and d.time - t0 < 2.0
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------- wire level / python SDKs


def test_wire_formats(fake):
    r = Reply(text="hi there", reasoning="hmm", tool_calls=[("t1", "f", '{"x": 1}')], stop="length",
              usage=dict(input=3, output=4, cached=2, reasoning=1))
    fake.push(r, r, r)
    chat = list(sse_events(requests.post(fake.base_url + "/v1/chat/completions", stream=True, json={
        "model": "gpt", "stream": True, "stream_options": {"include_usage": True}})))
    assert all(e is None for e, _ in chat) and chat[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in chat[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 5
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    tc = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"]
          and "tool_calls" in c["choices"][0]["delta"]]
    assert tc[0]["id"] == "t1" and tc[0]["function"]["name"] == "f"
    assert "".join(t["function"]["arguments"] for t in tc) == '{"x": 1}' and len(tc) > 2

    anth = list(sse_events(requests.post(fake.base_url + "/v1/messages", stream=True,
                                          json={"model": "claude", "stream": True})))
    names = [e for e, _ in anth]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"] and "ping" in names
    assert all(json.loads(d)["type"] == e for e, d in anth)
    md = json.loads(anth[-2][1])
    assert md["delta"]["stop_reason"] == "max_tokens" and md["usage"]["output_tokens"] == 4
    ms = json.loads(anth[0][1])["message"]["usage"]
    assert (ms["input_tokens"], ms["cache_read_input_tokens"]) == (3, 2)

    resp = list(sse_events(requests.post(fake.base_url + "/v1/responses", stream=True,
                                          json={"model": "gpt", "stream": True})))
    data = [json.loads(d) for _, d in resp]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert all(e == d["type"] for (e, _), d in zip(resp, data, strict=True))
    assert data[0]["type"] == "response.created" and data[-1]["type"] == "response.incomplete"
    assert data[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data[-1]["response"]["usage"]["input_tokens"] == 5


def test_official_python_sdks(fake):
    openai = pytest.importorskip("openai")
    anthropic = pytest.importorskip("anthropic")
    oc = openai.OpenAI(base_url=fake.base_url + "/v1", api_key="k", max_retries=0)
    ac = anthropic.Anthropic(base_url=fake.base_url, api_key="k", max_retries=0)
    r = Reply(text="Hello big world", tool_calls=[("c1", "get_weather", '{"city": "Oslo"}')])

    fake.push(r)
    parts, calls = [], {}
    for ch in oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True,
                                         stream_options={"include_usage": True}):
        for c in ch.choices:
            parts.append(c.delta.content or "")
            for t in c.delta.tool_calls or []:
                calls.setdefault(t.index, "")
                calls[t.index] += t.function.arguments or ""
    assert "".join(parts) == "Hello big world" and json.loads(calls[0]) == {"city": "Oslo"}

    fake.push(r)
    with ac.messages.stream(model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s:
        m = s.get_final_message()
    assert m.content[0].text == "Hello big world" and m.content[1].input == {"city": "Oslo"}
    assert m.stop_reason == "tool_use"

    fake.push(r)
    with oc.responses.stream(model="m", input="x") as s:
        rr = s.get_final_response()
    assert rr.output_text == "Hello big world" and rr.output[1].call_id == "c1"

    # non-streaming JSON (request without "stream": true)
    fake.push(r, r, r)
    cc = oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert cc.choices[0].message.content == "Hello big world" and cc.choices[0].finish_reason == "tool_calls"
    am = ac.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert am.content[0].text == "Hello big world"
    ro = oc.responses.create(model="m", input="x")
    assert ro.output_text == "Hello big world"

    fake.push(Reply(status=429, headers={"retry-after": "7"}), Reply(status=529))
    with pytest.raises(openai.RateLimitError) as ei:
        oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert ei.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.APIStatusError) as ej:
        ac.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert ej.value.status_code == 529 and ej.value.body["error"]["type"] == "overloaded_error"


def test_many_chunks_is_cheap(fake):
    fake.push(Reply(text="x " * 8000, chunks=16000))
    t0 = time.perf_counter()
    resp = requests.post(fake.base_url + "/v1/responses", stream=True, json={"model": "m", "stream": True})
    deltas = [json.loads(d)["delta"] for e, d in sse_events(resp) if e == "response.output_text.delta"]
    assert len(deltas) == 16000 and "".join(deltas) == "x " * 8000
    assert time.perf_counter() - t0 < 2.0


def test_unknown_path_404_does_not_consume(fake):
    fake.push(Reply(text="kept"))
    r = requests.post(fake.base_url + "/v1/v1/messages", json={})
    assert r.status_code == 404 and "unknown path" in r.json()["error"]["message"]
    assert fake.pending == 1 and fake.requests[-1].path == "/v1/v1/messages"


def test_default_reply_and_delays(fake):
    r = requests.post(fake.base_url + "/v1/chat/completions", json={"model": "m"})
    assert r.json()["choices"][0]["message"]["content"] == "Hello from fake"
    fake.push(Reply(text="a b", first_byte_delay=0.3))
    t0 = time.monotonic()
    requests.post(fake.base_url + "/v1/chat/completions", json={"model": "m"})
    assert time.monotonic() - t0 >= 0.3


def test_raw_and_hang_do_not_block_others_and_stop_is_fast():
    fake = FakeUpstream().start()
    try:
        fake.push(Reply(hang_after_headers=True), Reply(raw=b"garbage\r\n\r\n"), Reply(text="ok"))
        hung = socket.create_connection(("127.0.0.1", fake.port))
        hung.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n"
                     b'{"stream": true}\n')
        assert fake.wait_for_requests(1)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(fake.base_url + "/v1/messages", json={"model": "m"}, timeout=5)
        ok = requests.post(fake.base_url + "/v1/messages", json={"model": "m"}, timeout=5)
        assert ok.json()["content"][0]["text"] == "ok"
        assert fake.disconnects == []
        t0 = time.monotonic()
        fake.stop()
        assert time.monotonic() - t0 < 1.0
        hung.settimeout(2)
        assert b"200" in hung.recv(4096)  # headers had been sent; then the fake closed it
    finally:
        fake.stop()
        hung.close()


def test_client_close_during_first_byte_delay_is_recorded(fake):
    fake.push(Reply(first_byte_delay=30))
    s = socket.create_connection(("127.0.0.1", fake.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert fake.wait_for_requests(1)
    t0 = time.monotonic()
    s.close()
    assert fake.wait_for_disconnect(2.0) and fake.disconnects[0].time - t0 < 2.0


# --------------------------------------------------------------------------- strict as the real APIs


def pi_turn(fake: FakeUpstream, api: str, messages: list, reply: Reply, options: dict) -> list[dict]:
    """pi-ai (directly) answering `messages` with the tools, through the fake scripted with `reply`."""
    request = json.loads(pi_input(fake, api, tools=True, options=options))
    request["context"]["messages"] = messages
    fake.push(reply)
    p = subprocess.run(["node", str(PI_DIRECT)], input=json.dumps(request), capture_output=True, text=True,
                       cwd=ROOT, timeout=20)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def test_anthropic_fake_takes_pi_ais_own_thinking_tool_loop_and_refuses_it_without_its_thinking(fake):
    """pi-ai replays its own thinking tool loop as the real API wants it, and the fake accepts it;
    the same history without the thinking block is refused with the real API's words."""
    api, options = "anthropic-messages", {"reasoning": "medium"}
    first = done_message(pi_turn(fake, api, [{"role": "user", "content": "weather?"}],
                                 Reply(reasoning="I need the weather.", tool_calls=[("toolu_1", "get_weather",
                                                                                     {"city": "Paris"})]), options))
    assert [b["type"] for b in first["content"]] == ["thinking", "toolCall"]
    result = {"role": "toolResult", "toolCallId": "toolu_1", "toolName": "get_weather",
              "content": [{"type": "text", "text": "sunny"}], "isError": False}
    history = [{"role": "user", "content": "weather?"}, first, result]
    assert done_message(pi_turn(fake, api, history, Reply(text="Sunny."), options))["content"][0]["text"] == "Sunny."
    assert not fake.refusals
    sent = fake.requests[-1].body["messages"][1]["content"]
    assert [b["type"] for b in sent] == ["thinking", "tool_use"]

    without_thinking = {**first, "content": first["content"][1:]}
    events = pi_turn(fake, api, [history[0], without_thinking, result], Reply(text="never sent"), options)
    assert final(events)["type"] == "error"
    assert fake.refusals[-1].startswith("messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, "
                                        "but found `tool_use`")
    assert fake.pending == 1, "a refused request consumes no reply"


def anthropic_status(fake: FakeUpstream, messages: list, thinking: bool = False) -> tuple[int, str]:
    body = {"model": "m", "max_tokens": 10, "messages": messages,
            **({"thinking": {"type": "enabled", "budget_tokens": 1024}} if thinking else {})}
    response = requests.post(fake.base_url + "/v1/messages", json=body)
    return response.status_code, response.json()["error"]["message"] if response.status_code != 200 else ""


CALL = {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_9", "content": "sunny"}


@pytest.mark.parametrize("messages,thinking,message", [
    ([{"role": "user", "content": [RESULT]}], False, "messages.0.content.0: unexpected `tool_use_id`"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": [RESULT]}],
     False, "messages.2.content.0: unexpected `tool_use_id`"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [CALL]}, {"role": "user", "content": "and?"}],
     False, "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_9"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [CALL]},
      {"role": "user", "content": [RESULT]}], True,
     "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}, CALL]},
      {"role": "user", "content": [RESULT]}], True, "messages.1.content.0.thinking.signature: Field required"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "forged"}, CALL]},
      {"role": "user", "content": [RESULT]}], True, "messages.1.content.0: Invalid `signature` in `thinking` block"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "forged"}, CALL]},
      {"role": "user", "content": [RESULT]}], True, "messages.1.content.0: Invalid `data` in `redacted_thinking`"),
])
def test_anthropic_fake_refuses_what_the_real_api_refuses(fake, messages, thinking, message):
    status, said = anthropic_status(fake, messages, thinking)
    assert (status, said[:len(message)]) == (400, message)
    assert fake.refusals == [said]


def test_anthropic_fake_accepts_a_tool_loop_without_thinking_and_redacted_data_it_issued(fake):
    loop = [{"role": "user", "content": "q"}, {"role": "assistant", "content": [CALL]},
            {"role": "user", "content": [RESULT, {"type": "text", "text": "reminder"}]}]
    assert anthropic_status(fake, loop) == (200, "")
    fake.push(Reply(redacted_thinking="opaque-EQ==", text="hi"))
    reply = requests.post(fake.base_url + "/v1/messages", json={"model": "m", "max_tokens": 10,
                                                                "messages": loop[:1]}).json()
    assert reply["content"][0] == {"type": "redacted_thinking", "data": "opaque-EQ=="}
    loop[1]["content"] = [reply["content"][0], CALL]
    assert anthropic_status(fake, loop, thinking=True) == (200, "")
    assert not fake.refusals


HI = {"role": "user", "content": "hi"}


def responses_call(fake, *input_items) -> requests.Response:
    return requests.post(f"{fake.base_url}/v1/responses", json={"model": "m", "input": list(input_items)}, timeout=10)


def test_responses_refuses_a_function_call_without_its_reasoning_item(fake):
    """As OpenAI does: a tool call the model made while reasoning goes back only with that reasoning."""
    fake.push(Reply(reasoning="Think.", tool_calls=[("call_1", "get_weather", {"city": "Paris"})]))
    reasoning, call = responses_call(fake, HI).json()["output"]
    answer = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    refused = responses_call(fake, HI, call, answer)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == (f"Item '{call['id']}' of type 'function_call' was provided without "
                                                  f"its required 'reasoning' item: '{reasoning['id']}'.")
    assert fake.refusals == [refused.json()["error"]["message"]]
    assert fake.pending == 0 and len(fake.requests) == 2, "a refused request consumes no reply"
    fake.push(Reply(text="Sunny."))
    accepted = responses_call(fake, HI, reasoning, call, answer)
    assert accepted.status_code == 200 and accepted.json()["output"][0]["content"][0]["text"] == "Sunny."
    fake.push(Reply(tool_calls=[("call_2", "get_weather", {"city": "Rome"})]))
    [plain_call] = responses_call(fake, HI).json()["output"]
    rain = {"type": "function_call_output", "call_id": "call_2", "output": "rain"}
    alone = responses_call(fake, HI, plain_call, rain)
    assert alone.status_code == 200, "a call made without reasoning needs none"
