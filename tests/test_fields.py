"""The rule: every field a client sends is honoured, translated or knowingly ignored, and at DEBUG
each ignored one is logged with its path, on every endpoint, from the endpoint's request schema
(proxy.ignored, proxy.unused_fields)."""

import json
import logging
import uuid

import pytest
import requests

import proxy
from tests.fake_upstream import Reply

CHAT = proxy.CHAT_VALIDATOR.schema
MESSAGES = proxy.MESSAGES_VALIDATOR.schema
RESPONSES = proxy.RESPONSES_VALIDATOR.schema
STREAM = proxy.PI_STREAM_VALIDATOR.schema
STORE = "nothing is stored"


def unused(body, schema) -> dict:
    proxy.validate(body, proxy.Draft202012Validator(schema))  # the walk assumes a valid body
    return dict(proxy.unused_fields(body, schema))


# --- unit: the walk -------------------------------------------------------------------------------


def test_unknown_and_ignored_fields_are_found_at_every_depth():
    body = {"model": "m", "thread": {"type": "create"}, "store": True, "messages": [
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": None, "reasoning_content": "because", "reasoning_details": [],
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}", "extra": 1}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "r", "odd": True}]}]}
    assert unused(body, CHAT) == {
        "thread": None, "store": proxy.CHAT_SCHEMA["properties"]["store"][proxy.IGNORED],
        "messages[0].name": "pi-ai's messages name no author",
        "messages[1].reasoning_details": None,
        "messages[1].tool_calls[0].function.extra": None,
        "messages[2].content[0].odd": None}


def test_what_a_schema_takes_whole_is_not_walked_and_nulls_are_unset():
    body = {"model": "m", "messages": [{"role": "assistant", "content": "x", "refusal": None, "audio": None}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"a": {"type": "string", "x-anything": 1}}}}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"zz": 1}}}}
    assert unused(body, CHAT) == {}


def test_the_rules_of_a_block_type_describe_its_fields():
    """A field one block type has (tool_use.input) is unknown on another (text.input)."""
    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": 1}},
                                          {"type": "text", "text": "x", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "content": [{"type": "text", "text": "r", "cache_control": {"type": "ephemeral"},
                                                   "citations": []}]}]}]}
    assert unused(body, MESSAGES) == {
        "messages[0].content[1].input": None,
        "messages[1].content[0].content[0].cache_control": "pi-ai sets its own cache breakpoints (cacheRetention)",
        "messages[1].content[0].content[0].citations": None}


def test_a_field_some_rule_uses_is_not_reported_as_ignored():
    schema = {"type": "object", "properties": {"id": proxy.ignored("why")},
              "allOf": [{"if": {"properties": {"type": {"const": "ref"}}}, "then": {"properties": {"id": {}}}}]}
    assert dict(proxy.unused_fields({"type": "msg", "id": "a"}, schema)) == {"type": None, "id": "why"}
    assert dict(proxy.unused_fields({"type": "ref", "id": "a"}, schema)) == {"type": None}


def test_stream_proxy_context_is_pi_ais_own_but_the_model_is_the_proxys():
    body = {"model": {"provider": "p", "id": "i", "baseUrl": "http://elsewhere", "api": "x"},
            "context": {"messages": [{"role": "assistant", "api": "a", "usage": {}, "responseId": "r",
                                      "content": [{"type": "toolCall", "id": "c", "name": "n", "arguments": {},
                                                   "thoughtSignature": "sig"}]}]},
            "options": {"transport": "sse", "maxTokens": 5, "whatever": 1}}
    why = "the model is this proxy's: only its provider and id are read"
    assert unused(body, STREAM) == {"model.baseUrl": why, "model.api": why,
                                     "options.transport": "the proxy makes the upstream connections",
                                     "options.whatever": None}


def test_responses_items_by_type():
    body = {"model": "m", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}], "id": "msg_1"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "status": "completed", "foo": 1}]}
    assert unused(body, RESPONSES) == {"input[0].id": "the id of a replayed output item",
                                       "input[1].status": "the status of a replayed output item",
                                       "input[1].foo": None}


def test_a_clients_field_names_are_quoted_and_escaped_in_paths():
    body = {"model": "m", "messages": [{"role": "user", "content": "x", "a.b\n2026 FORGED": 1}],
            "x" * 500: 1}
    paths = list(unused(body, CHAT))
    assert paths[0] == '["' + "x" * 64 + '..."]'
    assert paths[1] == 'messages[0]["a.b\\n2026 FORGED"]'
    assert not any("\n" in path for path in paths)


def test_the_log_is_bounded_and_grouped_by_reason(caplog):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": {"k": 1},
            **{f"field{i}": i for i in range(10_000)}}
    with caplog.at_level(logging.DEBUG, logger="pi-proxy"):
        proxy.validate(body, proxy.CHAT_VALIDATOR)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("chat completions request: ignored (metadata of stored completions") \
        and lines[0].endswith(": metadata")
    assert lines[1].startswith("chat completions request: ignored (unknown to this proxy): field0, field1, ")
    assert lines[1].endswith(", field18")  # 20 paths in all, metadata among them
    assert lines[2] == "chat completions request: more fields ignored; only the first 20 are logged"
    assert len(lines) == 3


def test_nothing_is_walked_below_debug(caplog, monkeypatch):
    walked = []
    monkeypatch.setattr(proxy, "unused_fields", lambda *args: walked.append(args) or iter(()))
    with caplog.at_level(logging.INFO, logger="pi-proxy"):
        proxy.validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "zz": 1}, proxy.CHAT_VALIDATOR)
    assert not walked


# --- end to end: every endpoint logs at DEBUG -------------------------------------------------------


def log_lines(proxy_, mark: str) -> str:
    """The proxy's log lines that name `mark` (a field name unique to one test)."""
    return "\n".join(line for line in proxy_.log_path.read_text().splitlines() if mark in line)


def requests_for(mark: str) -> list:
    """(endpoint, body, the line expected) for each endpoint: each body carries an unknown field
    `mark` deep inside."""
    pi_model = {"provider": "fake-chat", "id": "chat-model", "baseUrl": "http://127.0.0.1:9"}
    return [
        ("/v1/chat/completions",
         {"model": "fake-chat/chat-model",
          "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", mark: 1}]}]},
         f"chat completions request: ignored (unknown to this proxy): messages[0].content[0].{mark}"),
        ("/v1/messages",
         {"model": "fake-anthropic/claude-test", "max_tokens": 10,
          "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", mark: 1}]}]},
         f"messages request: ignored (unknown to this proxy): messages[0].content[0].{mark}"),
        ("/v1/messages/count_tokens",
         {"model": "fake-anthropic/claude-test", "tools": [{"name": "f", "input_schema": {}, mark: 1}],
          "messages": [{"role": "user", "content": "hi"}]},
         f"count_tokens request: ignored (unknown to this proxy): tools[0].{mark}"),
        ("/v1/responses",
         {"model": "fake-responses/gpt-test", "input": [{"role": "user", "content": "hi", mark: 1}]},
         f"responses request: ignored (unknown to this proxy): input[0].{mark}"),
        ("/api/stream",
         {"model": pi_model, "context": {"messages": [{"role": "user", "content": "hi"}]},
          "options": {"maxTokens": 10, mark: 1}},
         f"streamProxy request: ignored (unknown to this proxy): options.{mark}"),
    ]


@pytest.mark.parametrize("index", range(5), ids=["chat", "messages", "count_tokens", "responses", "stream"])
def test_every_endpoint_logs_its_ignored_fields_with_their_path(proxy, fake, index):
    mark = f"unheard_{uuid.uuid4().hex[:8]}"
    path, body, expected = requests_for(mark)[index]
    fake.push(Reply(text="ok"))
    response = requests.post(proxy.url + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert expected in log_lines(proxy, mark)
    if path != "/v1/messages/count_tokens":
        assert fake.requests and mark not in json.dumps(fake.requests[-1].body), "an unknown field went upstream"


def test_an_anyof_branch_is_told_apart_by_validating_it_when_its_type_does_not_tell():
    schema = {"type": "object", "properties": {"spec": {"anyOf": [
        {"type": "object", "required": ["a"], "properties": {"a": {}, "x": proxy.ignored("why a")}},
        {"type": "object", "required": ["b"], "properties": {"b": {}, "x": {}}},
        {"type": "string"}]}}}
    assert dict(proxy.unused_fields({"spec": {"a": 1, "x": 2}}, schema)) == {"spec.x": "why a"}
    assert dict(proxy.unused_fields({"spec": {"b": 1, "x": 2}}, schema)) == {}
    assert dict(proxy.unused_fields({"spec": "text"}, schema)) == {}
