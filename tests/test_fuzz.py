"""Property-based fuzzing of every endpoint: generated and mutated request bodies, sent to the real
proxy. Every answer must be a well-formed 2xx or 4xx in the endpoint's own shape: never a 5xx of
the proxy's own, never a hang, never a bridge left behind.

`make test` tries a few hundred bodies per endpoint; `make soak` (HYPOTHESIS_PROFILE=soak) thousands.
"""

import copy
import json
import os

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_upstream import Reply
from tests.helpers import api_error, error_family, response_error

settings.register_profile("default", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("soak", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                    max_leaves=12)
MODELS = st.sampled_from(["fake-chat/chat-model", "fake-anthropic/claude-test", "fake-responses/gpt-test",
                          "shared-model", "no-such-model", "claude-sonnet-4-5-20250929", ""])
TEXT_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                      min_size=1, max_size=2)

CHAT = st.fixed_dictionaries(
    {"model": MODELS,
     "messages": st.lists(st.fixed_dictionaries({
         "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
         "content": st.one_of(st.text(max_size=40), TEXT_PARTS)}), min_size=1, max_size=3)},
    optional={"stream": st.booleans(), "temperature": st.floats(0, 2), "max_tokens": st.integers(1, 50),
              "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=2)),
              "tool_choice": st.sampled_from(["auto", "none", "required"]),
              "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
              "n": st.integers(1, 3), "reasoning_effort": st.sampled_from(["none", "low", "high"])})
MESSAGES = st.fixed_dictionaries(
    {"model": MODELS, "max_tokens": st.integers(1, 50),
     "messages": st.lists(st.fixed_dictionaries({
         "role": st.sampled_from(["user", "assistant", "system"]),
         "content": st.one_of(st.text(max_size=40), TEXT_PARTS)}), min_size=1, max_size=3)},
    optional={"stream": st.booleans(), "system": st.text(max_size=20), "temperature": st.floats(0, 1),
              "stop_sequences": st.lists(st.text(max_size=5), max_size=2),
              "thinking": st.sampled_from([{"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"},
                                           {"type": "disabled"}]),
              "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "f"}]),
              "tools": st.just([{"name": "f", "input_schema": {"type": "object"}}])})
RESPONSES = st.fixed_dictionaries(
    {"model": MODELS,
     "input": st.one_of(st.text(max_size=40), st.lists(st.one_of(
         st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"]),
                                "content": st.one_of(st.text(max_size=40), st.lists(st.fixed_dictionaries(
                                    {"type": st.sampled_from(["input_text", "output_text"]),
                                     "text": st.text(max_size=20)}), min_size=1, max_size=2))},
                               optional={"type": st.just("message")}),
         st.fixed_dictionaries({"type": st.just("function_call"), "call_id": st.text(max_size=8),
                                "name": st.just("f"), "arguments": st.just("{}")}),
         st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.text(max_size=8),
                                "output": st.text(max_size=20)}),
         st.fixed_dictionaries({"type": st.just("reasoning"), "summary": st.just([])})), min_size=1, max_size=3))},
    optional={"stream": st.booleans(), "instructions": st.text(max_size=20), "temperature": st.floats(0, 2),
              "max_output_tokens": st.integers(1, 50), "store": st.booleans(),
              "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "name": "f"}]),
              "tools": st.sampled_from([[{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                                        [{"type": "custom", "name": "g"}], [{"type": "web_search"}]]),
              "reasoning": st.sampled_from([{"effort": "low"}, {"effort": "high"}, {"effort": None}]),
              "text": st.sampled_from([{"format": {"type": "text"}}, {"format": {"type": "json_object"}}])})
PI_MODELS = st.sampled_from([{"provider": "fake-chat", "id": "chat-model"},
                             {"provider": "fake-anthropic", "id": "claude-test"},
                             {"provider": "fake-responses", "id": "gpt-test"},
                             {"provider": "fake-chat", "id": "chat-model", "baseUrl": "http://127.0.0.1:9/v1",
                              "headers": {"Authorization": "Bearer stolen"}},
                             {"provider": "nope", "id": "x"}])
PI_STREAM = st.fixed_dictionaries(
    {"model": PI_MODELS,
     "context": st.fixed_dictionaries(
         {"messages": st.lists(st.one_of(
             st.fixed_dictionaries({"role": st.just("user"),
                                    "content": st.one_of(st.text(max_size=40), TEXT_PARTS)}),
             st.fixed_dictionaries({"role": st.just("assistant"), "content": TEXT_PARTS}),
             st.fixed_dictionaries({"role": st.just("toolResult"), "toolCallId": st.text(max_size=8),
                                    "content": TEXT_PARTS})), min_size=1, max_size=3)},
         optional={"systemPrompt": st.text(max_size=20),
                   "tools": st.just([{"name": "f", "parameters": {"type": "object"}}])})},
    optional={"options": st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "maxTokens": st.integers(1, 50),
        "reasoning": st.sampled_from(["minimal", "low", "high"]), "sessionId": st.text(max_size=8),
        "headers": st.dictionaries(st.sampled_from(["x-extra", "Authorization", "x-api-key"]),
                                   st.text(max_size=8), max_size=2)})})


@st.composite
def mutated(draw, bodies):
    """A valid-looking body with one part replaced by arbitrary JSON, deleted, or left alone."""
    body = copy.deepcopy(draw(bodies))  # st.just hands out one shared object
    path, node = [], body
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    if not path:
        return body if draw(st.booleans()) else draw(JSON)
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        parent[path[-1]] = draw(JSON)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    return body


# How each family's streams may end: its terminal event or its error event.
TERMINALS = {"anthropic": ("event: message_stop", "event: error"),
             "openai": ("data: [DONE]", "event: error"),
             "responses": ("event: response.completed", "event: response.incomplete", "event: response.failed"),
             "pi": ('data: {"type":"done"', 'data: {"type":"error"')}


def check_answer(response, family: str):
    assert response.status_code < 500 or response.status_code in (502, 504), \
        f"{response.status_code}: {response.text[:300]}"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        last = response.text.rstrip().rsplit("\n\n", 1)[-1]
        assert last.startswith(TERMINALS[family]), f"a stream must end properly, not with {last[:200]!r}"
        return
    body = response.json()
    if response.status_code >= 400:
        api_error(body, "openai" if family == "responses" else family)


@pytest.fixture
def answering(fake):
    fake.default = Reply(text="fuzzed", tool_calls=[])
    return fake


@given(body=mutated(CHAT))
def test_chat_completions_fuzz(proxy, answering, body):
    check_answer(requests.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=30), "openai")


@given(body=mutated(MESSAGES))
def test_messages_fuzz(proxy, answering, body):
    check_answer(requests.post(f"{proxy.url}/v1/messages", json=body, timeout=30), "anthropic")


@given(body=mutated(MESSAGES))
def test_count_tokens_fuzz(proxy, answering, body):
    check_answer(requests.post(f"{proxy.url}/v1/messages/count_tokens", json=body, timeout=30), "anthropic")


@given(body=mutated(RESPONSES))
def test_responses_fuzz(proxy, answering, body):
    check_answer(requests.post(f"{proxy.url}/v1/responses", json=body, timeout=30), "responses")


@given(body=mutated(PI_STREAM))
def test_pi_stream_fuzz(proxy, answering, body):
    seen = len(answering.requests)
    response = requests.post(f"{proxy.url}/api/stream", json=body, timeout=30)
    check_answer(response, "pi")
    stolen = [r for r in answering.requests[seen:] if "stolen" in json.dumps(r.headers)]
    assert not stolen, "a client's model or headers may never replace the server's credentials"


@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       path=st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens",
                             "/v1/responses", "/api/stream"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_raw_bytes_fuzz(proxy, answering, raw, path, content_type):
    response = requests.post(f"{proxy.url}{path}", data=raw, headers={"content-type": content_type}, timeout=30)
    check_answer(response, error_family(path))
    assert response.status_code < 500


@given(model_id=st.text(max_size=60))
def test_model_lookup_path_fuzz(proxy, model_id):
    response = requests.get(f"{proxy.url}/v1/models/{requests.utils.quote(model_id, safe='')}", timeout=30)
    assert response.status_code in (200, 400, 404), response.text  # 400: a bare id several providers offer
    assert "error" in response.json() or response.json()["object"] == "model"


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_nesting_is_refused_cleanly(proxy, depth):
    body = '{"model": "fake-chat/chat-model", "messages": ' + "[" * depth + "]" * depth + "}"
    response = requests.post(f"{proxy.url}/v1/chat/completions", data=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_huge_string_and_invalid_utf8_are_refused_cleanly(proxy):
    invalid = b'{"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    assert requests.post(f"{proxy.url}/v1/chat/completions", data=invalid, timeout=30).status_code == 400
    huge = json.dumps({"model": "x" * 1_500_000, "messages": [{"role": "user", "content": "x"}]})
    response = requests.post(f"{proxy.url}/v1/chat/completions", data=huge, timeout=30)
    assert response.status_code == 404 and len(response.content) < 10_000, "errors do not echo huge input"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "GET"])
def test_wrong_methods_are_405_in_api_shape(proxy, method):
    for path in ("/v1/chat/completions", "/v1/messages"):
        response = requests.request(method, f"{proxy.url}{path}", timeout=30)
        response_error(response, 405, error_family(path))


def test_no_bridge_is_left_after_fuzzing(proxy):
    assert proxy.wait_no_bridges(timeout=5)
