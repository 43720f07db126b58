"""End to end: the official anthropic SDK -> /v1/messages -> bridge.mjs -> pi-ai -> fake upstreams.
Every stream the SDK reads here also goes through the strict grammar checker."""

import json
import re
import time
from pathlib import Path

import anthropic
import httpx2 as httpx
import pytest
import requests

from tests.fake_upstream import Reply
from tests.helpers import (
    ALL_APIS,
    MODELS,
    PIXEL,
    RecordingTransport,
    last_request,
    pi_via_proxy,
    response_error,
    running_proxy,
)
from tests.secret_scan import RESPONSES
from tests.sse_grammar import check_anthropic_stream

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(proxy):
    transport = RecordingTransport()
    yield anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0,
                              http_client=httpx.Client(transport=transport, timeout=30))
    for chunks in transport.streams:
        check_anthropic_stream(b"".join(chunks).decode())
        RESPONSES.append(b"".join(chunks))


def raw_stream(proxy, body: dict, **headers) -> list:
    response = requests.post(f"{proxy.url}/v1/messages", json={**body, "stream": True}, headers=headers)
    assert response.status_code == 200, response.text
    return check_anthropic_stream(response.text)


# --- text --------------------------------------------------------------------------------------------


@ALL_APIS
def test_text(client, fake, model):
    fake.push(Reply(text="Hello from upstream.", usage=dict(input=12, output=6, cached=30)))
    message = client.messages.create(model=model, max_tokens=200, messages=HI)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello from upstream."
    assert message.stop_reason == "end_turn" and message.role == "assistant" and message.model == model
    assert message.id.startswith("msg_")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 6)
    assert message.usage.cache_read_input_tokens == 30, "cached tokens are reported apart from input_tokens"


@ALL_APIS
def test_streamed_text(client, fake, model):
    fake.push(Reply(text="Streaming works fine today.", usage=dict(input=9, output=5)))
    with client.messages.stream(model=model, max_tokens=200, messages=HI) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "Streaming works fine today." and len(pieces) >= 3
    assert final.content[0].text == "Streaming works fine today."
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5


def test_message_start_carries_an_input_estimate_that_grows_with_input(proxy, fake):
    small = raw_stream(proxy, {"model": "fake-anthropic/claude-test", "max_tokens": 50, "messages": HI})
    fake.push(Reply(text="ok"))
    large = raw_stream(proxy, {"model": "fake-anthropic/claude-test", "max_tokens": 50,
                               "messages": [{"role": "user", "content": "many words here " * 500}]})
    small_estimate = small[0][1]["message"]["usage"]["input_tokens"]
    large_estimate = large[0][1]["message"]["usage"]["input_tokens"]
    assert 0 < small_estimate < large_estimate


# --- system, images, parameters -------------------------------------------------------------


@ALL_APIS
def test_system_blocks_and_mid_conversation_system_messages(client, fake, model):
    fake.push(Reply(text="ok"))
    client.messages.create(model=model, max_tokens=100,
                           system=[{"type": "text", "text": "Rule one.", "cache_control": {"type": "ephemeral"}},
                                   {"type": "text", "text": "Rule two."}],
                           messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "system", "content": "Late rule."}, {"role": "user", "content": "c"}])
    sent = json.dumps(last_request(fake, model).body)
    assert "Rule one." in sent and "Rule two." in sent and "Late rule." in sent


@ALL_APIS
def test_image(client, fake, model):
    fake.push(Reply(text="a tiny image"))
    message = client.messages.create(model=model, max_tokens=100, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
        {"type": "text", "text": "What is it?"}]}])
    assert message.content[0].text == "a tiny image"
    assert PIXEL in json.dumps(last_request(fake, model).body)


def test_parameters_reach_anthropic_upstream(client, fake):
    fake.push(Reply(text="ok"))
    # This SDK release no longer types the sampling parameters; older clients still send them.
    client.messages.create(model="fake-anthropic/claude-test", max_tokens=3000, messages=HI,
                           extra_body={"temperature": 0.4, "top_p": 0.9, "top_k": 40},
                           stop_sequences=["HALT"], metadata={"user_id": "user-7"},
                           tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True})
    body = fake.requests[-1].body
    assert body["max_tokens"] == 3000 and body["temperature"] == 0.4
    assert body["top_p"] == 0.9 and body["top_k"] == 40 and body["stop_sequences"] == ["HALT"]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["metadata"] == {"user_id": "user-7"}


def test_parameters_reach_openai_completions_upstream(client, fake):
    fake.push(Reply(text="ok"))
    client.messages.create(model="fake-chat/chat-model", max_tokens=300, messages=HI,
                           extra_body={"top_p": 0.5, "top_k": 5}, stop_sequences=["END"], tools=[WEATHER],
                           tool_choice={"type": "tool", "name": "get_weather"})
    body = fake.requests[-1].body
    assert body["top_p"] == 0.5 and body["stop"] == ["END"] and "top_k" not in body
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_thinking_budget_is_honoured(client, fake):
    fake.push(Reply(text="ok"))
    client.messages.create(model="fake-anthropic/claude-test", max_tokens=6000, messages=HI,
                           thinking={"type": "enabled", "budget_tokens": 5000})
    body = fake.requests[-1].body
    assert body["thinking"]["type"] == "enabled" and body["thinking"]["budget_tokens"] == 5000


def test_accepts_what_claude_code_sends(proxy, fake):
    fake.push(Reply(text="ok"))
    response = requests.post(
        f"{proxy.url}/v1/messages?beta=true",
        headers={"anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14,made-up-beta",
                 "x-api-key": "whatever"},
        json={"model": "fake-anthropic/claude-test", "max_tokens": 1, "unknown_field": True,
              "metadata": {"user_id": "abc"},
              "messages": [{"role": "user", "content": [
                  {"type": "text", "text": "Warmup", "cache_control": {"type": "ephemeral"}}]}]})
    assert response.status_code == 200 and response.json()["type"] == "message"


def test_root_and_telemetry_endpoints(proxy):
    assert requests.head(f"{proxy.url}/").status_code == 200
    assert requests.get(f"{proxy.url}/").status_code == 200
    assert requests.post(f"{proxy.url}/api/event_logging/batch", json={"events": []}).status_code == 200


# --- tools ----------------------------------------------------------------------------------------------


@ALL_APIS
def test_tool_use_and_result_round_trip(client, fake, model):
    fake.push(Reply(text="Checking.", tool_calls=[("call_w1", "get_weather", '{"city": "Lima"}')]))
    messages = [{"role": "user", "content": "Weather in Lima?"}]
    with client.messages.stream(model=model, max_tokens=300, messages=messages, tools=[WEATHER]) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    tool_use = next(b for b in first.content if b.type == "tool_use")
    assert tool_use.name == "get_weather" and tool_use.input == {"city": "Lima"}
    assert re.match(r"^[a-zA-Z0-9_-]+$", tool_use.id)

    fake.push(Reply(text="Lima is foggy."))
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [
                     {"type": "tool_result", "tool_use_id": tool_use.id, "content": [
                         {"type": "text", "text": "fog, 17C"},
                         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}}]},
                     {"type": "text", "text": "<system-reminder>be brief</system-reminder>"}]}]
    second = client.messages.create(model=model, max_tokens=300, messages=messages, tools=[WEATHER])
    assert second.content[0].text == "Lima is foggy."
    sent = json.dumps(last_request(fake, model).body)
    assert "fog, 17C" in sent and "call_w1" in sent and "be brief" in sent
    if model != "fake-chat/chat-model":  # chat completions has no images in tool results; pi-ai moves them
        assert PIXEL in sent


def test_tool_result_error_flag_reaches_anthropic_upstream(client, fake):
    fake.push(Reply(text="sorry"))
    client.messages.create(model="fake-anthropic/claude-test", max_tokens=100, tools=[WEATHER], messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "X"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                      "content": "city not found"}]}])
    results = [block for message in fake.requests[-1].body["messages"] if isinstance(message["content"], list)
               for block in message["content"] if block["type"] == "tool_result"]
    assert results and results[0]["is_error"] is True and results[0]["tool_use_id"] == "toolu_1"


def test_responses_tool_ids_are_made_safe_and_pair_again(client, fake):
    fake.push(Reply(tool_calls=[("call_zz9", "get_weather", '{"city": "Oslo"}')]))
    first = client.messages.create(model="fake-responses/gpt-test", max_tokens=100, messages=HI, tools=[WEATHER])
    tool_use = first.content[-1]
    assert re.match(r"^[a-zA-Z0-9_-]+$", tool_use.id), "pi-ai's 'call|item' id must not reach the client"
    fake.push(Reply(text="done"))
    client.messages.create(model="fake-responses/gpt-test", max_tokens=100, tools=[WEATHER], messages=[
        *HI, {"role": "assistant", "content": [tool_use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "cold"}]}])
    items = fake.requests[-1].body["input"]
    output = next(item for item in items if item.get("type") == "function_call_output")
    assert output["call_id"] == "call_zz9"


@ALL_APIS
def test_tool_call_without_arguments_gives_empty_object(client, fake, model):
    fake.push(Reply(tool_calls=[("call_now", "get_time", "")]))
    with client.messages.stream(model=model, max_tokens=100, messages=HI, tools=[
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}]) as stream:
        final = stream.get_final_message()
    assert final.content[-1].type == "tool_use" and final.content[-1].input == {}


@ALL_APIS
def test_parallel_tool_calls_are_separate_blocks(client, fake, model):
    fake.push(Reply(tool_calls=[("call_a", "get_weather", '{"city": "A"}'),
                                ("call_b", "get_weather", '{"city": "B"}')]))
    with client.messages.stream(model=model, max_tokens=100, messages=HI, tools=[WEATHER]) as stream:
        final = stream.get_final_message()
    assert [b.input["city"] for b in final.content if b.type == "tool_use"] == ["A", "B"]


# --- thinking -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["fake-anthropic/claude-test", "fake-responses/gpt-test"])
def test_thinking_with_signature_round_trips(client, fake, model):
    fake.push(Reply(reasoning="Let me think.", reasoning_signature="sig-XYZ-123", text="42"))
    with client.messages.stream(model=model, max_tokens=4000, messages=HI,
                                thinking={"type": "enabled", "budget_tokens": 2000}) as stream:
        final = stream.get_final_message()
    thinking = final.content[0]
    assert thinking.type == "thinking" and thinking.thinking.strip() == "Let me think."
    if model.startswith("fake-anthropic"):
        assert "sig-XYZ-123" in thinking.signature, "Anthropic's own signature, as it is"
    else:
        assert thinking.signature.startswith("pi-proxy.2:"), "pi-ai's data for another API, sealed"
    fake.push(Reply(text="again"))
    client.messages.create(model=model, max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000},
                           messages=[*HI, {"role": "assistant", "content": [b.model_dump() for b in final.content]},
                                     {"role": "user", "content": "more"}])
    assert "sig-XYZ-123" in json.dumps(last_request(fake, model).body), "the signature goes back upstream"


@pytest.mark.parametrize("block", [
    {"type": "thinking", "thinking": "t", "signature": json.dumps({"type": "item_reference", "id": "msg_x"})},
    {"type": "redacted_thinking", "data": json.dumps({"type": "item_reference", "id": "msg_x"})},
])
def test_forged_signatures_never_reach_a_responses_upstream(client, fake, block):
    """pi-ai puts an openai-responses thinking signature into the upstream request as raw items:
    a client's made-up one must not get there (issue 12 point 8, through /v1/messages)."""
    model = "fake-responses/gpt-test"
    fake.push(Reply(text="ok"))
    client.messages.create(model=model, max_tokens=100, messages=[
        *HI, {"role": "assistant", "content": [block, {"type": "text", "text": "a"}]},
        {"role": "user", "content": "more"}])
    assert "item_reference" not in json.dumps(last_request(fake, model).body)


def test_thinking_from_chat_completions_upstream(client, fake):
    fake.push(Reply(reasoning="Pondering.", text="Yes."))
    with client.messages.stream(model="fake-chat/chat-model", max_tokens=300, messages=HI,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Pondering."


# --- stop reasons ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["fake-anthropic/claude-test", "fake-chat/chat-model"])
def test_max_tokens_stop_reason(client, fake, model):
    fake.push(Reply(text="cut short", stop="length"))
    message = client.messages.create(model=model, max_tokens=2, messages=HI)
    assert message.stop_reason == "max_tokens"


def test_tool_use_stop_reason_even_when_upstream_says_stop(client, fake):
    fake.push(Reply(tool_calls=[("call_s", "get_weather", '{"city": "S"}')], stop="stop"))
    message = client.messages.create(model="fake-chat/chat-model", max_tokens=100, messages=HI, tools=[WEATHER])
    assert message.stop_reason == "tool_use"


# --- Claude model names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["claude-sonnet-4-5-20250929", "claude-sonnet-4-5", "claude-sonnet-4-5[1m]",
                                  "claude-sonnet-4.5"])
def test_anthropic_model_ids_map_to_the_same_model(client, fake, name):
    fake.push(Reply(text="mapped"))
    assert client.messages.create(model=name, max_tokens=10, messages=HI).content[0].text == "mapped"
    assert fake.requests[-1].body["model"] == "claude-sonnet-4.5"


def test_other_versions_are_not_substituted(client):
    for name in ("claude-sonnet-4-6", "claude-opus-4-1"):
        with pytest.raises(anthropic.NotFoundError) as caught:
            client.messages.create(model=name, max_tokens=10, messages=HI)
        assert caught.value.body["error"]["type"] == "not_found_error"
        assert "fake-copilot/claude-sonnet-4.5" in caught.value.body["error"]["message"]


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,fragment", [
    ({"model": "fake-anthropic/claude-test", "messages": HI}, "max_tokens"),
    ({"model": "fake-anthropic/claude-test", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]},
     "messages[0].role"),
    ({"model": "fake-anthropic/claude-test", "max_tokens": 5,
      "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content"),
])
def test_invalid_requests_are_400_in_anthropic_shape(proxy, body, fragment):
    response = requests.post(f"{proxy.url}/v1/messages", json=body)
    error = response_error(response, 400, "anthropic")
    assert error["type"] == "invalid_request_error" and fragment in error["message"]


@pytest.mark.parametrize("status,error_class,error_type", [
    (401, anthropic.AuthenticationError, "authentication_error"),
    (403, anthropic.PermissionDeniedError, "permission_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (500, anthropic.InternalServerError, "api_error"),
    (529, anthropic.InternalServerError, "overloaded_error"),
])
@ALL_APIS
def test_upstream_errors_keep_status_in_anthropic_shape(client, fake, model, status, error_class, error_type):
    fake.push(Reply(status=status, headers={"retry-after": "5"} if status == 429 else {}))
    with pytest.raises(error_class) as caught:
        client.messages.create(model=model, max_tokens=10, messages=HI)
    assert caught.value.status_code == status
    assert caught.value.body["error"]["type"] == error_type
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "5"


def test_context_overflow_reads_like_anthropic(client, fake):
    fake.push(Reply(status=400, error_body={"error": {
        "message": "prompt token count of 250123 exceeds the limit of 200000",
        "code": "model_max_prompt_tokens_exceeded"}}))
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="fake-chat/chat-model", max_tokens=10, messages=HI)
    assert caught.value.body["error"]["message"] == "prompt is too long: 250123 tokens > 200000 maximum"


@ALL_APIS
def test_cut_stream_ends_with_error_event(proxy, fake, model):
    fake.push(Reply(text="a b c d e f g h", cut_after=6))
    frames = raw_stream(proxy, {"model": model, "max_tokens": 100, "messages": HI})
    assert frames[-1][0] == "error"


@ALL_APIS
def test_in_stream_error_reaches_the_sdk(client, fake, model):
    fake.push(Reply(text="some text", stream_error="exploded"))
    with pytest.raises(anthropic.APIStatusError):
        with client.messages.stream(model=model, max_tokens=100, messages=HI) as stream:
            stream.get_final_message()


@pytest.fixture(scope="module")
def patient_proxy(agent_dir, tmp_path_factory):
    with running_proxy(agent_dir, tmp_path_factory.mktemp("logs") / "patient.log",
                       {"PI_PROXY_UPSTREAM_TIMEOUT_MS": "30000"}) as running:
        yield running


def test_ping_while_upstream_is_silent(patient_proxy, fake):
    fake.push(Reply(text="before after", stall=(3, 11)))
    started = time.monotonic()
    frames = raw_stream(patient_proxy, {"model": "fake-anthropic/claude-test", "max_tokens": 100, "messages": HI})
    names = [name for name, _ in frames]
    assert "ping" in names and names[-1] == "message_stop"
    assert time.monotonic() - started < 40


# --- count_tokens ----------------------------------------------------------------------------------


def count(client, **request) -> int:
    return client.messages.count_tokens(model="fake-anthropic/claude-test", **request).input_tokens


def test_count_tokens_grows_with_input_and_counts_everything(client):
    base = count(client, messages=HI)
    longer = count(client, messages=[{"role": "user", "content": "hello there " * 200}])
    with_system = count(client, messages=HI, system="You are a careful assistant. " * 20)
    with_tools = count(client, messages=HI, tools=[WEATHER])
    with_image = count(client, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
        {"type": "text", "text": "hi"}]}])
    with_tool_turns = count(client, tools=[WEATHER], messages=[
        *HI, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather",
                                                "input": {"city": "Quito"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "warm " * 50}]}])
    assert 0 < base < longer
    assert with_system > base and with_tools > base and with_image > base and with_tool_turns > with_tools
    assert count(client, messages=HI) == base, "stable"


def test_count_tokens_needs_no_upstream(client, fake):
    count(client, messages=HI)
    assert fake.requests == []


REFERENCE = json.loads((Path(__file__).parent / "token_reference.json").read_text())


@pytest.mark.parametrize("sample", [s for s in REFERENCE if "request" in s and "<base64" not in json.dumps(s)],
                         ids=lambda s: s["name"])
def test_count_tokens_matches_anthropics_published_counts(client, sample):
    """Anthropic's documented count_tokens examples, counted for a Claude model: within 15%."""
    request = {key: value for key, value in sample["request"].items() if key != "model"}
    counted = client.messages.count_tokens(model="fake-copilot/claude-sonnet-4.5", **request).input_tokens
    assert abs(counted - sample["input_tokens"]) <= 0.15 * sample["input_tokens"], counted


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_stop_reason_names_the_sequence(client, fake, stream):
    fake.push(Reply(text="counting 1 2", stop="stop_sequence"))  # the fake stops on "STOP"
    request = dict(model="fake-anthropic/claude-test", max_tokens=100, messages=HI, stop_sequences=["HALT", "STOP"])
    if stream:
        with client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**request)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "STOP")
    assert message.content[0].text == "counting 1 2"


# --- state on Anthropic's servers: threads, containers, MCP, server tools -----------------------------


@anthropic.beta_tool
def get_weather(city: str) -> str:
    """Weather for a city.

    Args:
        city: The city.
    """
    return f"sunny in {city}"


class Exchanges:
    """Every request an SDK client sent, with its response's status (an httpx2 event hook)."""

    def __init__(self):
        self.seen = []

    def __call__(self, response):
        response.read()
        self.seen.append((json.loads(response.request.content), response.status_code, response.text))


@ALL_APIS
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_runner_keeps_the_whole_conversation(proxy, fake, model, stream):
    """The anthropic SDK's tool_runner asks for a message thread; the proxy's 400 (error_code
    thread_unsupported_request) makes it resend unthreaded, so every turn carries the whole
    history, the reasoning with it (the Anthropic fake refuses a tool loop without its thinking)."""
    exchanges = Exchanges()
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0,
                                 http_client=httpx.Client(timeout=30, event_hooks={"response": [exchanges]}))
    fake.push(Reply(reasoning="I need the weather.", tool_calls=[("toolu_w1", "get_weather", {"city": "Paris"})]),
              Reply(reasoning="Now I know.", text="Sunny in Paris."))
    runner = client.beta.messages.tool_runner(model=model, max_tokens=4000, tools=[get_weather], stream=stream,
                                              thinking={"type": "enabled", "budget_tokens": 1024},
                                              messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert runner.until_done().content[-1].text == "Sunny in Paris."

    (threaded, status, said), *unthreaded = exchanges.seen
    assert threaded["thread"] == {"type": "create"} and status == 400
    assert json.loads(said)["error"]["details"]["error_code"] == "thread_unsupported_request"
    assert [("thread" in body, status) for body, status, _ in unthreaded] == [(False, 200), (False, 200)]
    turns = [r.body for r in fake.requests if r.path == MODELS[model]]
    assert len(turns) == 2 and not fake.refusals, fake.refusals
    second = turns[1]
    if model.startswith("fake-anthropic"):
        question, assistant, result = second["messages"]
        assert [b["type"] for b in assistant["content"]] == ["thinking", "tool_use"]
        assert assistant["content"][0]["thinking"] == "I need the weather."
        assert result["content"][0]["tool_use_id"] == "toolu_w1"
        assert "sunny in Paris" in json.dumps(result["content"][0]["content"])
    elif model.startswith("fake-chat"):
        question, assistant, result = second["messages"]
        assert assistant["reasoning_content"] == "I need the weather.", "the reasoning goes back in its own field"
        assert assistant["tool_calls"][0]["id"] == "toolu_w1"
        assert (result["role"], result["tool_call_id"], result["content"]) == ("tool", "toolu_w1", "sunny in Paris")
    else:
        kinds = [item.get("type", "message") for item in second["input"]]
        assert kinds == ["message", "reasoning", "function_call", "function_call_output"]
        assert second["input"][1]["summary"][0]["text"] == "I need the weather."
        assert second["input"][3]["output"] == "sunny in Paris"


@pytest.mark.parametrize("field,value", [
    ("thread", {"type": "continue", "previous_message_id": "msg_1"}),
    ("container", "container_011"),
    ("mcp_servers", [{"type": "url", "url": "https://mcp.example.com/sse", "name": "x"}]),
    ("compaction", {"type": "compaction"}),
])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_server_state_fields_are_refused_by_name(proxy, fake, field, value, path):
    body = {"model": "fake-anthropic/claude-test", "max_tokens": 50, "messages": HI, field: value}
    response = requests.post(f"{proxy.url}{path}", json=body, headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{field} is not supported")
    assert ("details" in error) == (field == "thread")
    if field == "thread":
        assert error["details"] == {"error_code": "thread_unsupported_request", "unsupported": ["thread"]}
    assert not fake.requests, "a refused request never reaches the upstream"


@pytest.mark.parametrize("tool", [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                                  {"type": "code_execution_20250825", "name": "code_execution"},
                                  {"type": "bash_20250124", "name": "bash"}])
def test_tools_that_anthropic_runs_or_defines_are_refused(client, fake, tool):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="fake-anthropic/claude-test", max_tokens=50, messages=HI,
                               tools=[WEATHER, tool])
    assert caught.value.body["error"]["message"].startswith(f"tools[1]: the '{tool['type']}' tool")
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="fake-anthropic/claude-test", max_tokens=50, messages=HI,
                               tools=[{"name": "no_schema"}])
    assert caught.value.body["error"]["message"] == "tools[0].input_schema: Field required"
    assert not fake.requests


def test_tool_search_and_context_management_are_ignored(client, fake):
    """Claude Code sends context_management on every turn, and a tool-search tool with deferred
    tools: every tool is sent whole and the whole history goes up, which hides nothing."""
    fake.push(Reply(text="ok"))
    client.beta.messages.create(
        model="fake-anthropic/claude-test", max_tokens=50, messages=HI,
        tools=[{"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
               {**WEATHER, "defer_loading": True}],
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]})
    sent = last_request(fake, "fake-anthropic/claude-test").body
    assert [tool["name"] for tool in sent["tools"]] == ["get_weather"]
    assert "context_management" not in sent


# --- redacted thinking -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_redacted_thinking_comes_out_whole_and_goes_back_intact(client, fake, stream):
    model, thinking = "fake-anthropic/claude-test", {"type": "enabled", "budget_tokens": 1024}
    fake.push(Reply(redacted_thinking="REDACTED-opaque-1==", reasoning="and then",
                    tool_calls=[("toolu_r1", "get_weather", {"city": "Oslo"})]), Reply(text="Cold."))
    request = dict(model=model, max_tokens=2000, thinking=thinking, tools=[WEATHER],
                   messages=[{"role": "user", "content": "Oslo?"}])
    if stream:
        with client.messages.stream(**request) as streamed:
            message = streamed.get_final_message()
    else:
        message = client.messages.create(**request)
    assert [b.type for b in message.content] == ["redacted_thinking", "thinking", "tool_use"]
    assert message.content[0].data == "REDACTED-opaque-1==" and message.content[1].signature
    result = {"type": "tool_result", "tool_use_id": message.content[2].id, "content": "-5"}
    request["messages"] += [{"role": "assistant", "content": message.content}, {"role": "user", "content": [result]}]
    assert client.messages.create(**request).content[0].text == "Cold."
    assert not fake.refusals, fake.refusals
    sent = last_request(fake, model).body["messages"][1]["content"]
    assert sent[0] == {"type": "redacted_thinking", "data": "REDACTED-opaque-1=="}
    assert [b["type"] for b in sent] == ["redacted_thinking", "thinking", "tool_use"]


def test_pi_keeps_streamed_reasoning_of_another_api_as_reasoning(proxy, fake):
    """pi's Anthropic client streams from the proxy; the thinking of an openai-completions model
    comes with its (sealed) signature, so pi sends it back as thinking, and the upstream gets it
    back as reasoning_content, not as text the model said."""
    fake.push(Reply(reasoning="Look it up first.", tool_calls=[("call_q1", "get_weather", {"city": "Quito"})]),
              Reply(text="Fresh."))
    question = {"role": "user", "content": "Quito?", "timestamp": 0}
    first = pi_via_proxy(proxy, [question], "anthropic-messages")
    assert [b["type"] for b in first["content"]] == ["thinking", "toolCall"]
    assert first["content"][0]["thinkingSignature"].startswith("pi-proxy."), "the signature streamed, sealed"
    result = {"role": "toolResult", "toolCallId": "call_q1", "toolName": "get_weather",
              "content": [{"type": "text", "text": "14C"}], "isError": False, "timestamp": 0}
    assert pi_via_proxy(proxy, [question, first, result], "anthropic-messages")["content"][-1]["text"] == "Fresh."
    assistant = last_request(fake, "fake-chat/chat-model").body["messages"][1]
    assert assistant["reasoning_content"] == "Look it up first." and not assistant.get("content")
