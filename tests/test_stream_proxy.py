"""pi's own protocol end to end: pi-agent-core's real `streamProxy` client (tests/stream_proxy_client.mjs)
-> /api/stream -> bridge.mjs -> pi-ai -> fake upstreams. The message streamProxy rebuilds must equal the
one pi-ai produces calling the same fake directly (tests/pi_direct.mjs)."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from proxy import (
    ZERO_USAGE,
    PiStreamEvents,
    addable_headers,
    build_registry,
    load_catalog,
    pi_events,
    pi_stream_context,
)
from tests.fake_upstream import FakeUpstream, Reply
from tests.helpers import ALL_APIS, PIXEL, last_request, models_json, running_proxy, sse_json
from tests.secret_scan import LEAK_WATCH, SECRETS

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "stream_proxy_client.mjs"
PI_DIRECT = ROOT / "tests" / "pi_direct.mjs"
HI = {"systemPrompt": "Be brief.", "messages": [{"role": "user", "content": "hi"}]}
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
         {"name": "add", "description": "Add numbers",
          "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}]
KEYS = {"fake-chat": SECRETS["fake-chat"], "fake-anthropic": SECRETS["fake-anthropic"],
        "fake-responses": SECRETS["fake-responses"]}


@pytest.fixture(scope="module")
def decoy():
    """A second upstream, where clients point their model's baseUrl: nothing may ever reach it."""
    upstream = FakeUpstream().start()
    yield upstream
    assert not upstream.requests, "a client-supplied baseUrl was contacted"
    upstream.stop()


def server_model(fake, name: str) -> dict:
    """The model exactly as the proxy's registry holds it."""
    return build_registry([], models_json(fake.base_url)).models[name]


def client_model(fake, decoy, name: str) -> dict:
    """What a client sends: the same model, but with its own idea of where and how to connect."""
    return {**server_model(fake, name), "baseUrl": f"{decoy.base_url}/v1", "headers": {"X-Decoy": "yes"}}


def run_node(script: Path, payload: dict) -> list[dict]:
    done = subprocess.run(["node", str(script)], input=json.dumps(payload), capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def via_proxy(proxy, fake, decoy, name: str, reply: Reply, context=HI, options=None, **extra) -> tuple[list, dict]:
    """The events streamProxy emitted and the message it rebuilt."""
    fake.push(reply)
    events = run_node(CLIENT, {"proxyUrl": proxy.url, "authToken": "any-token",
                               "model": client_model(fake, decoy, name),
                               "context": context, "options": options or {}, **extra})
    assert events[-1]["type"] == "result", events
    return events[:-1], events[-1]["message"]


def direct(fake, name: str, reply: Reply, context=HI, options=None) -> tuple[list, dict]:
    """pi-ai's own events and final message for the same call, without the proxy."""
    fake.push(reply)
    model = server_model(fake, name)
    events = run_node(PI_DIRECT, {"model": model, "context": context,
                                  "options": {"apiKey": KEYS[model["provider"]], "maxRetries": 0, **(options or {})}})
    last = events[-1]
    assert last["type"] in ("done", "error"), events
    return events, last.get("message") or last["error"]


def comparable(message: dict) -> dict:
    """What must match. Ids and signatures the fake generates per request (hex runs) differ
    legitimately, as do timestamps and the upstream's response id."""
    def scrub(value):
        if isinstance(value, str):
            return re.sub(r"[0-9a-f]{16,}", "<generated>", value)
        if isinstance(value, dict):
            return {key: scrub(item) for key, item in value.items()}
        return [scrub(item) for item in value] if isinstance(value, list) else value
    return scrub({key: message.get(key) for key in ("content", "stopReason", "usage", "errorMessage")})


def assert_same_as_direct(proxy, fake, decoy, name, reply, **kw):
    _, rebuilt = via_proxy(proxy, fake, decoy, name, reply, **kw)
    _, expected = direct(fake, name, reply, **kw)
    assert comparable(rebuilt) == comparable(expected)
    assert [rebuilt["provider"], rebuilt["model"]] == name.split("/")
    return rebuilt


# --- the rebuilt message equals pi-ai's own ----------------------------------------------------------


@ALL_APIS
def test_text(proxy, fake, decoy, model):
    rebuilt = assert_same_as_direct(proxy, fake, decoy, model, Reply(text="Hello from the proxied fake",
                                                                     usage={"input": 12, "output": 5, "cached": 3}))
    assert rebuilt["content"][0]["text"] == "Hello from the proxied fake"
    assert rebuilt["usage"]["input"] == 12 and rebuilt["usage"]["cost"]["total"] > 0


@ALL_APIS
def test_thinking_with_signature(proxy, fake, decoy, model):
    reply = Reply(reasoning="Let me think about it", reasoning_signature="sig-fixed-0123", text="Answer")
    rebuilt = assert_same_as_direct(proxy, fake, decoy, model, reply, options={"reasoning": "medium"})
    thinking = rebuilt["content"][0]
    assert thinking["type"] == "thinking" and "Let me think about it" in thinking["thinking"]
    assert thinking["thinkingSignature"], "the signature travels as contentSignature on thinking_end"


@ALL_APIS
def test_tool_calls_with_argument_deltas(proxy, fake, decoy, model):
    reply = Reply(text="Checking.", tool_calls=[("call_1", "get_weather", {"city": "Paris"}),
                                                ("call_2", "add", {"a": 1, "b": 2})])
    events, rebuilt = via_proxy(proxy, fake, decoy, model, reply, context={**HI, "tools": TOOLS})
    _, expected = direct(fake, model, reply, context={**HI, "tools": TOOLS})
    assert comparable(rebuilt) == comparable(expected)
    calls = [b for b in rebuilt["content"] if b["type"] == "toolCall"]
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                             ("add", {"a": 1, "b": 2})]
    assert rebuilt["stopReason"] == "toolUse"
    assert sum(e["type"] == "toolcall_delta" for e in events) > 2, "arguments streamed in fragments"


def test_tool_call_delivered_whole_gets_its_arguments_as_one_delta(proxy, fake, decoy):
    name = "fake-responses/gpt-test"
    reply = Reply(tool_calls=[("call_9", "get_weather", {"city": "Oslo"})], whole_tool_calls=True)
    direct_events, expected = direct(fake, name, reply, context={**HI, "tools": TOOLS})
    assert not [e for e in direct_events if e["type"] == "toolcall_delta"], "pi-ai streamed no argument delta"
    events, rebuilt = via_proxy(proxy, fake, decoy, name, reply, context={**HI, "tools": TOOLS})
    deltas = [e for e in events if e["type"] == "toolcall_delta"]
    assert len(deltas) == 1 and json.loads(deltas[0]["delta"]) == {"city": "Oslo"}
    assert comparable(rebuilt) == comparable(expected)
    assert rebuilt["content"][0]["arguments"] == {"city": "Oslo"}


@pytest.mark.parametrize("model", ["fake-chat/chat-model", "fake-anthropic/claude-test"])
def test_length_stop(proxy, fake, decoy, model):
    assert_same_as_direct(proxy, fake, decoy, model, Reply(text="cut short", stop="length"))


def test_length_stop_from_the_responses_api_is_reported_though_pi_ai_misses_it(proxy, fake, decoy):
    """pi-ai 0.73.1 ignores `response.incomplete`; the bridge reports it as pi-ai reports the
    other APIs' max-token stops (see bridge.mjs), so here the proxy is right where pi-ai is not."""
    model, reply = "fake-responses/gpt-test", Reply(text="cut short", stop="length", usage=dict(input=5, output=2))
    _, rebuilt = via_proxy(proxy, fake, decoy, model, reply)
    _, expected = direct(fake, model, reply)
    assert expected["stopReason"] == "stop", "pi-ai now handles response.incomplete: drop the bridge's fix"
    assert rebuilt["stopReason"] == "length" and (rebuilt["usage"]["input"], rebuilt["usage"]["output"]) == (5, 2)
    assert comparable(rebuilt)["content"] == comparable(expected)["content"]


@pytest.mark.parametrize("model,reply", [
    ("fake-chat/chat-model", Reply(status=429, headers={"retry-after": "3"})),
    ("fake-anthropic/claude-test", Reply(status=529)),
    ("fake-responses/gpt-test", Reply(status=400, error_body={"error": {"message": "bad field x",
                                                                        "type": "invalid_request_error"}})),
    ("fake-anthropic/claude-test", Reply(text="partial answer", stream_error="Overloaded mid-stream")),
    ("fake-chat/chat-model", Reply(text="partial answer", cut_after=4)),
])
def test_upstream_error(proxy, fake, decoy, model, reply):
    events, rebuilt = via_proxy(proxy, fake, decoy, model, reply)
    _, expected = direct(fake, model, reply)
    assert rebuilt["stopReason"] == "error" and rebuilt["errorMessage"]
    assert comparable(rebuilt) == comparable(expected)
    assert [e["type"] for e in events].count("error") == 1 and events[-1]["type"] == "error"


def test_upstream_error_never_shows_the_key(proxy, fake, decoy):
    key = SECRETS["fake-chat"]
    _, rebuilt = via_proxy(proxy, fake, decoy, "fake-chat/chat-model",
                           Reply(status=401, error_body={"error": {"message": f"Incorrect API key provided: {key}"}}))
    assert rebuilt["stopReason"] == "error" and "[redacted]" in rebuilt["errorMessage"]
    assert key not in json.dumps(rebuilt)


def test_history_from_a_rebuilt_message_round_trips(proxy, fake, decoy):
    """A pi-agent-core agent sends its rebuilt messages back with the tool results."""
    name = "fake-anthropic/claude-test"
    context = {**HI, "tools": TOOLS}
    _, first = via_proxy(proxy, fake, decoy, name, Reply(reasoning="plan", reasoning_signature="sig-keep",
                                                         tool_calls=[("toolu_1", "get_weather", {"city": "Rome"})]),
                         context=context, options={"reasoning": "low"})
    result = {"role": "toolResult", "toolCallId": "toolu_1", "toolName": "get_weather", "isError": False,
              "content": [{"type": "text", "text": "Sunny, 24 C"},
                          {"type": "image", "data": PIXEL, "mimeType": "image/png"}]}
    context["messages"] = [*context["messages"], first, result]
    _, second = via_proxy(proxy, fake, decoy, name, Reply(text="It is sunny."), context=context,
                          options={"reasoning": "low"})
    assert second["content"][-1]["text"] == "It is sunny."
    sent = last_request(fake, name).body["messages"]
    assert sent[1]["content"][0] == {"type": "thinking", "thinking": "plan", "signature": "sig-keep"}
    assert sent[2]["content"][0]["type"] == "tool_result" and sent[2]["content"][0]["tool_use_id"] == "toolu_1"


# --- the stream itself -------------------------------------------------------------------------------


def raw_events(proxy, body: dict) -> list[dict]:
    response = requests.post(f"{proxy.url}/api/stream", json=body, headers={"Authorization": "Bearer t"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert "data: [DONE]" not in lines
    return [event for _, event in sse_json(response.text)]


@ALL_APIS
def test_wire_format(proxy, fake, decoy, model):
    fake.push(Reply(reasoning="think", reasoning_signature="sig-wire", text="Hi there",
                    tool_calls=[("call_1", "get_weather", {"city": "Paris"})]))
    events = raw_events(proxy, {"model": client_model(fake, decoy, model), "context": {**HI, "tools": TOOLS},
                                "options": {"reasoning": "low"}})
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("done") == 1 and "error" not in kinds
    assert not any("partial" in e or "message" in e for e in events)
    done = events[-1]
    assert set(done) == {"type", "reason", "usage", "responseId"} and done["reason"] == "toolUse"
    assert done["usage"]["output"] == 20 and "cost" in done["usage"]
    thinking_end = next(e for e in events if e["type"] == "thinking_end")
    assert thinking_end["contentSignature"]
    start = next(e for e in events if e["type"] == "toolcall_start")
    assert start["id"].startswith("call_1") and start["toolName"] == "get_weather"
    end = next(e for e in events if e["type"] == "toolcall_end")
    assert set(end) == {"type", "contentIndex"}


def test_upstream_failure_before_any_content_is_an_error_event(proxy, fake, decoy):
    fake.push(Reply(status=503))
    events = raw_events(proxy, {"model": client_model(fake, decoy, "fake-chat/chat-model"), "context": HI})
    assert events[-1]["type"] == "error" and [e["type"] for e in events].count("error") == 1
    assert events[-1]["reason"] == "error" and events[-1]["errorMessage"].startswith("503")
    assert events[-1]["usage"] == ZERO_USAGE


def test_silent_upstream_ends_with_an_error_event(proxy, fake, decoy):
    fake.push(Reply(text="never", hang_after_headers=True))
    events = raw_events(proxy, {"model": client_model(fake, decoy, "fake-chat/chat-model"), "context": HI})
    assert events[-1]["type"] == "error" and "sent nothing" in events[-1]["errorMessage"]
    assert set(events[-1]["usage"]) == set(ZERO_USAGE)


@ALL_APIS
def test_abort_kills_the_bridge_and_the_upstream_call(proxy, fake, decoy, model):
    reply = Reply(text=" ".join(f"w{i}" for i in range(200)), delay=0.1)
    events, rebuilt = via_proxy(proxy, fake, decoy, model, reply, abortAfter=4)
    assert events[-1]["type"] == "error" and events[-1]["reason"] == "aborted"
    assert rebuilt["stopReason"] == "aborted"
    assert fake.wait_for_disconnect(timeout=2.0), "the upstream request was aborted"
    assert proxy.wait_no_bridges(timeout=2.0)


@pytest.mark.parametrize("reply", [Reply(hang_after_headers=True), Reply(text="a b c d", hang_after=3)])
def test_abort_while_the_upstream_is_silent(proxy, fake, decoy, reply):
    events, rebuilt = via_proxy(proxy, fake, decoy, "fake-chat/chat-model", reply, abortAfterMs=800)
    aborted = time.monotonic()
    assert events[-1]["type"] == "error" and rebuilt["stopReason"] == "aborted"
    assert fake.wait_for_disconnect(timeout=2.0)
    assert fake.disconnects[-1].time - aborted < 2.0
    assert proxy.wait_no_bridges(timeout=2.0)


# --- the client cannot redirect the server's credentials --------------------------------------------


@pytest.mark.parametrize("model,key_header", [("fake-chat/chat-model", "authorization"),
                                              ("fake-anthropic/claude-test", "x-api-key")])
def test_client_connection_fields_are_ignored_and_headers_only_added(proxy, fake, decoy, model, key_header):
    headers = {"AUTHORIZATION": "Bearer stolen", "X-Api-Key": "stolen", "x-goog-api-key": "stolen",
               "X-Trace": "trace-1", "X-Env-Name": "OPENAI_API_KEY", "X-Command": "!echo ran"}
    via_proxy(proxy, fake, decoy, model, Reply(text="ok"), options={"headers": headers})
    seen = last_request(fake, model).headers
    key = SECRETS[model.split("/")[0]]
    assert seen[key_header] in (key, f"Bearer {key}")
    assert "stolen" not in json.dumps(seen)
    assert seen["x-trace"] == "trace-1"
    assert seen["x-env-name"] == "OPENAI_API_KEY" and seen["x-command"] == "!echo ran", "client values stay literal"
    assert "x-decoy" not in seen, "the client's model.headers are ignored"
    assert not decoy.requests


@pytest.mark.parametrize("model, options, kept", [
    ("fake-anthropic/claude-test", {}, {"anthropic-version": "2023-06-01"}),
    ("fake-responses/gpt-test", {"sessionId": "sess-1"}, {"x-client-request-id": "sess-1"}),
])
def test_client_headers_never_replace_what_pi_ai_sets(proxy, fake, decoy, model, options, kept):
    """Issue 12 point 7: options.headers used to replace the headers pi-ai sets per request (and a
    Content-Length hung the upstream call for 120 s); they only add headers now."""
    headers = {name.upper(): "from-client" for name in kept} | {
        "Content-Length": "5", "Transfer-Encoding": "chunked", "Connection": "close", "Host": "evil.example",
        "X-Extra": "added"}
    started = time.monotonic()
    _, message = via_proxy(proxy, fake, decoy, model, Reply(text="ok"), options={**options, "headers": headers})
    assert message["stopReason"] == "stop" and time.monotonic() - started < 10
    seen = last_request(fake, model).headers
    assert {name: seen.get(name) for name in kept} == kept
    assert seen["x-extra"] == "added" and "evil" not in seen.get("host", "")
    assert seen.get("content-length") != "5" and seen.get("transfer-encoding") != "chunked"


def test_credential_and_framing_headers_are_never_addable():
    assert addable_headers({"Cookie": "c", "API-KEY": "k", "Chatgpt-Account-Id": "a", "X-New": "y"}) == {"X-New": "y"}
    assert addable_headers({"Content-Length": "5", "transfer-encoding": "chunked", "Host": "h", "Connection": "close",
                            "Keep-Alive": "1", "Upgrade": "h2c", "TE": "trailers"}) == {}


# --- options -----------------------------------------------------------------------------------------


def test_options_reach_the_anthropic_upstream(proxy, fake, decoy):
    name = "fake-anthropic/claude-test"
    via_proxy(proxy, fake, decoy, name, Reply(text="ok"),
              options={"maxTokens": 3000, "temperature": 0.3, "metadata": {"user_id": "user-9"},
                       "transport": "websocket", "cacheRetention": "none"})
    body = last_request(fake, name).body
    assert body["max_tokens"] == 3000 and body["temperature"] == 0.3
    assert body["metadata"] == {"user_id": "user-9"}
    assert "cache_control" not in json.dumps(body), "cacheRetention none"
    via_proxy(proxy, fake, decoy, name, Reply(text="ok"), options={"reasoning": "high",
                                                                   "thinkingBudgets": {"high": 5000}})
    body = last_request(fake, name).body
    assert body["thinking"]["type"] == "enabled" and body["thinking"]["budget_tokens"] == 5000
    assert "cache_control" in json.dumps(body), "caching is on by default"


def test_session_id_reaches_the_responses_upstream(proxy, fake, decoy):
    name = "fake-responses/gpt-test"
    via_proxy(proxy, fake, decoy, name, Reply(text="ok"), options={"sessionId": "session-42", "maxTokens": 500})
    body = last_request(fake, name).body
    assert body["prompt_cache_key"] == "session-42" and body["max_output_tokens"] == 500


# --- bad input: 4xx with {"error": message, "request_id"} -----------------------------------------------


def test_unknown_model_is_404(proxy, fake, decoy):
    model = {**client_model(fake, decoy, "fake-chat/chat-model"), "id": "no-such-model"}
    response = requests.post(f"{proxy.url}/api/stream", json={"model": model, "context": HI})
    assert response.status_code == 404
    assert response.json() == {"error": response.json()["error"], "request_id": response.headers["x-request-id"]}
    assert "fake-chat/no-such-model" in response.json()["error"]
    events = run_node(CLIENT, {"proxyUrl": proxy.url, "authToken": "t", "model": model, "context": HI})
    assert events[-1]["message"]["stopReason"] == "error"
    assert events[-1]["message"]["errorMessage"].startswith("Proxy error: The model 'fake-chat/no-such-model'")


def test_model_of_a_provider_without_key_is_401(proxy):
    anthropic = next(p for p in load_catalog(shutil.which("node")) if p["id"] == "anthropic")
    model = anthropic["models"][0]
    response = requests.post(f"{proxy.url}/api/stream", json={"model": model, "context": HI})
    assert response.status_code == 401 and "No credentials for provider 'anthropic'" in response.json()["error"]


def test_model_id_is_not_matched_across_providers(proxy, fake, decoy):
    model = {**client_model(fake, decoy, "fake-chat/chat-model"), "provider": "elsewhere"}
    response = requests.post(f"{proxy.url}/api/stream", json={"model": model, "context": HI})
    assert response.status_code == 404 and not fake.requests


@pytest.mark.parametrize("body,fragment", [
    ({"context": HI}, "model"),
    ({"model": {"id": "chat-model"}, "context": HI}, "provider"),
    ({"model": {"provider": "fake-chat", "id": "chat-model"}}, "context"),
    ({"model": {"provider": "fake-chat", "id": "chat-model"}, "context": {"messages": "hi"}}, "context.messages"),
    ({"model": {"provider": "fake-chat", "id": "chat-model"},
      "context": {"messages": [{"role": "system", "content": "x"}]}}, "context.messages[0].role"),
    ({"model": {"provider": "fake-chat", "id": "chat-model"},
      "context": {"messages": [{"role": "user", "content": [{"type": "image", "data": "x"}]}]}}, "mimeType"),
    ({"model": {"provider": "fake-chat", "id": "chat-model"}, "context": HI,
      "options": {"temperature": "hot"}}, "options.temperature"),
    ({"model": {"provider": "fake-chat", "id": "chat-model"}, "context": HI,
      "options": {"headers": {"X-A": 1}}}, "options.headers.X-A"),
    ({"model": {"provider": "fake-chat", "id": "chat-model"}, "context": HI,
      "options": {"reasoning": "extreme"}}, "options.reasoning"),
])
def test_invalid_requests_are_400(proxy, fake, body, fragment):
    response = requests.post(f"{proxy.url}/api/stream", json=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error", "request_id"} and fragment in response.json()["error"]
    assert not fake.requests


def test_malformed_json_is_400(proxy):
    response = requests.post(f"{proxy.url}/api/stream", data=b"{nope", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]


def test_null_options_mean_unset(proxy, fake, decoy):
    events = raw_events(proxy, {"model": client_model(fake, decoy, "fake-chat/chat-model"), "context": HI,
                                "options": {"temperature": None, "reasoning": None, "headers": None}})
    assert events[-1]["type"] == "done"
    assert "temperature" not in last_request(fake, "fake-chat/chat-model").body


# --- translation, without HTTP -----------------------------------------------------------------------


def test_translation_of_a_tool_call_without_deltas():
    events = PiStreamEvents(secrets=[])
    call = {"type": "toolCall", "id": "c1", "name": "f", "arguments": {"x": [1, "two"]}}
    assert events.translate({"type": "toolcall_start", "contentIndex": 2, "id": "c1", "toolName": "f"}) == [
        {"type": "toolcall_start", "contentIndex": 2, "id": "c1", "toolName": "f"}]
    # pi_events gives a call delivered whole its arguments as one delta
    frames = [frame for event in pi_events([{"type": "toolcall_end", "contentIndex": 2, "toolCall": call}])
              for frame in events.translate(event)]
    assert [f["type"] for f in frames] == ["toolcall_delta", "toolcall_end"]
    assert json.loads(frames[0]["delta"]) == {"x": [1, "two"]}
    assert frames[1] == {"type": "toolcall_end", "contentIndex": 2}
    # once a delta was streamed, the end carries nothing more
    streamed = pi_events([{"type": "toolcall_delta", "contentIndex": 3, "delta": '{"y":'},
                          {"type": "toolcall_end", "contentIndex": 3, "toolCall": call}])
    events.translate(next(streamed))
    assert events.translate(next(streamed)) == [
        {"type": "toolcall_end", "contentIndex": 3}]


def test_translation_of_the_end():
    events = PiStreamEvents(secrets=["sk-very-secret-1234"])
    usage = {**ZERO_USAGE, "input": 5}
    assert events.translate({"type": "done", "reason": "stop", "message": {"usage": usage, "content": []}}) == [
        {"type": "done", "reason": "stop", "usage": usage}]
    [error] = events.translate({"type": "error", "reason": "error",
                                "message": {"errorMessage": "401 bad key sk-very-secret-1234"}})
    assert error == {"type": "error", "reason": "error", "errorMessage": "401 bad key [redacted]", "usage": ZERO_USAGE}


# --- Google: the tool call's thoughtSignature comes back as pi-ai gave it ------------------------------

GEMINI = {"id": "gemini-3-pro-preview", "name": "Gemini 3 Pro", "reasoning": True, "input": ["text"],
          "contextWindow": 1000000, "maxTokens": 65536}
GOOGLE_KEY = "sk-google-SECRET-ffff6666"
LEAK_WATCH.add(GOOGLE_KEY)
WEATHER_CALLS = Reply(text="Checking both.", reasoning_signature="R2VtaW5pJ3MgdGhvdWdodHM=",
                      tool_calls=[("call_1", "get_weather", {"city": "Paris"}),
                                  ("call_2", "get_weather", {"city": "Rome"})])


@pytest.fixture(scope="module")
def google_proxy(fake, tmp_path_factory):
    """A proxy that also has a Google provider (the fake speaks Gemini's protocol, strict as Gemini 3)."""
    agent = tmp_path_factory.mktemp("google") / "agent"
    agent.mkdir()
    config = models_json(fake.base_url)
    config["providers"]["fake-google"] = {"baseUrl": f"{fake.base_url}/v1beta", "api": "google-generative-ai",
                                          "apiKey": GOOGLE_KEY, "models": [GEMINI]}
    (agent / "models.json").write_text(json.dumps(config))
    with running_proxy(agent, agent.parent / "proxy.log") as running:
        yield running, build_registry([], config).models["fake-google/gemini-3-pro-preview"]


def tool_results(message: dict) -> list:
    return [{"role": "toolResult", "toolCallId": block["id"], "toolName": block["name"], "isError": False,
             "content": [{"type": "text", "text": "sunny"}], "timestamp": 1} for block in message["content"]
            if block["type"] == "toolCall"]


def test_a_gemini_tool_calls_signature_goes_back_upstream_as_with_pi_ai_directly(google_proxy, fake):
    running, model = google_proxy
    context = {**HI, "tools": TOOLS}
    fake.push(WEATHER_CALLS)
    [*_, done] = run_node(PI_DIRECT, {"model": model, "context": context, "options": {"apiKey": GOOGLE_KEY}})
    direct_message = done["message"]
    signature = direct_message["content"][1]["thoughtSignature"]
    assert signature == WEATHER_CALLS.reasoning_signature
    fake.push(WEATHER_CALLS)
    events = run_node(CLIENT, {"proxyUrl": running.url, "authToken": "t", "model": model, "context": context})
    rebuilt = events[-1]["message"]
    assert [b.get("id") for b in rebuilt["content"]] == [None, f"call_1|pi-thought:{signature}", "call_2"], \
        "the client keeps only a call's id: the signature travels in it"

    for message in (direct_message, rebuilt):  # the next turn, from each client's own history
        fake.push(Reply(text="Sunny in both."))
        history = {**context, "messages": [*HI["messages"], message, *tool_results(message)]}
        if message is direct_message:
            [*_, last] = run_node(PI_DIRECT, {"model": model, "context": history, "options": {"apiKey": GOOGLE_KEY}})
        else:
            [*_, last] = run_node(CLIENT, {"proxyUrl": running.url, "authToken": "t", "model": model,
                                           "context": history})
        assert last["message"]["stopReason"] == "stop", last  # the strict fake refuses a call without its signature
    direct_turn, proxied_turn = (request.body for request in fake.requests[-2:])
    assert proxied_turn["contents"] == direct_turn["contents"]
    assert proxied_turn["contents"][1]["parts"][1]["thoughtSignature"] == signature
    unsigned = {**direct_message, "content": [{k: v for k, v in b.items() if k != "thoughtSignature"}
                                              for b in direct_message["content"]]}
    history = {**context, "messages": [*HI["messages"], unsigned, *tool_results(unsigned)]}
    [*_, refused] = run_node(PI_DIRECT, {"model": model, "context": history, "options": {"apiKey": GOOGLE_KEY}})
    assert "missing a thought_signature" in refused["error"]["errorMessage"], "the fake is as strict as Gemini 3"


def test_the_response_id_is_on_the_wire(google_proxy, fake):
    running, model = google_proxy
    fake.push(Reply(text="hi"))
    response = requests.post(f"{running.url}/api/stream", json={"model": model, "context": HI}, timeout=30)
    [done] = [data for _, data in sse_json(response) if data["type"] == "done"]
    assert done["responseId"].startswith("gresp-")


def test_call_ids_carry_a_signature_there_and_back():
    events = PiStreamEvents(secrets=[])
    [start] = events.translate({"type": "toolcall_start", "contentIndex": 2, "id": "c1", "toolName": "f",
                                "thoughtSignature": "c2lnbmF0dXJl"})
    assert start == {"type": "toolcall_start", "contentIndex": 2, "id": "c1|pi-thought:c2lnbmF0dXJl", "toolName": "f"}
    assert events.translate({"type": "toolcall_start", "contentIndex": 3, "id": "c2", "toolName": "f"})[0]["id"] == "c2"
    context = {"messages": [
        {"role": "assistant", "content": [{"type": "text", "text": "t"},
                                          {"type": "toolCall", "id": start["id"], "name": "f", "arguments": {}},
                                          {"type": "toolCall", "id": "c2", "name": "f", "arguments": {}}]},
        {"role": "toolResult", "toolCallId": start["id"], "content": []},
        {"role": "toolResult", "toolCallId": "c2", "content": []}]}
    restored = pi_stream_context(context)
    assert restored["messages"][0]["content"][1] == {"type": "toolCall", "id": "c1", "name": "f", "arguments": {},
                                                     "thoughtSignature": "c2lnbmF0dXJl"}
    assert restored["messages"][0]["content"][2] == context["messages"][0]["content"][2]
    assert [m.get("toolCallId") for m in restored["messages"]] == [None, "c1", "c2"]
