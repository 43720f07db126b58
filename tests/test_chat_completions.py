"""End to end: the official openai SDK -> proxy.py -> bridge.mjs -> pi-ai -> fake upstreams."""

import json

import openai
import pytest
import requests

from tests.fake_upstream import Reply
from tests.helpers import ALL_APIS, PIXEL, last_request, pi_via_proxy, sse_events

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# --- models -----------------------------------------------------------------------------------------


def test_models_lists_only_providers_with_credentials(client):
    ids = {m.id for m in client.models.list().data}
    assert {"fake-chat/chat-model", "fake-anthropic/claude-test", "fake-responses/gpt-test"} <= ids
    assert any(i.startswith("openai/") for i in ids), "OPENAI_API_KEY from the environment makes openai available"
    assert not any(i.startswith("anthropic/") for i in ids), "no anthropic credentials were given"
    entry = client.models.list().data[0]
    assert entry.object == "model" and entry.owned_by == entry.id.split("/")[0] and entry.created > 0


@pytest.mark.parametrize("path", ["fake-chat/chat-model", "fake-chat%2Fchat-model"])
def test_model_lookup_accepts_ids_with_slashes(proxy, path):
    response = requests.get(f"{proxy.url}/v1/models/{path}")
    assert response.status_code == 200
    assert response.json()["id"] == "fake-chat/chat-model"


def test_unknown_model_lookup_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("fake-chat/nope")
    assert caught.value.body["type"] == "not_found_error"


def test_bare_model_id_resolves_when_unique(client, fake):
    fake.push(Reply(text="bare works"))
    reply = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "bare works"
    assert fake.requests[-1].path == "/v1/responses"


def test_ambiguous_bare_id_is_400_listing_candidates(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="shared-model", messages=[{"role": "user", "content": "hi"}])
    message = caught.value.body["message"]
    assert "fake-chat/shared-model" in message and "fake-anthropic/shared-model" in message
    assert caught.value.body["code"] == "ambiguous_model"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["param"] == "model"


def test_builtin_provider_redirected_by_models_json_uses_env_key(client, fake):
    fake.push(Reply(text="from builtin"))
    reply = client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "from builtin"
    assert fake.requests[-1].headers["authorization"] == "Bearer sk-openai-env-SECRET-dddd4444"


# --- text ----------------------------------------------------------------------------------------------


@ALL_APIS
def test_text_completion(client, fake, model):
    fake.push(Reply(text="The quick brown fox jumps.", usage=dict(input=11, output=7, cached=4)))
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say it"}])
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "The quick brown fox jumps."
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == model
    assert reply.usage.prompt_tokens == 15 and reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == 22
    assert reply.usage.prompt_tokens_details.cached_tokens == 4
    # pi-ai's cost: 11 input at $3/M + 7 output at $15/M + 4 cached at $0.3/M
    assert reply.usage.model_extra["cost"] == pytest.approx((11 * 3 + 7 * 15 + 4 * 0.3) / 1e6)
    sent = json.dumps(last_request(fake, model).body)
    assert "Be brief." in sent and "Say it" in sent


@ALL_APIS
def test_streamed_text(client, fake, model):
    fake.push(Reply(text="one two three four five", usage=dict(input=5, output=5)))
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "count"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four five"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3, "text arrives in pieces"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 5
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_marker_and_omits_usage_unless_asked(proxy, fake):
    fake.push(Reply(text="hello there"))
    response = requests.post(f"{proxy.url}/v1/chat/completions", stream=True, json={
        "model": "fake-chat/chat-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = list(sse_events(response))
    assert events[-1] == (None, "[DONE]")
    assert not any('"usage"' in data for _, data in events)


def test_content_parts_and_developer_role_and_names(client, fake):
    fake.push(Reply(text="ok"))
    client.chat.completions.create(model="fake-chat/chat-model", messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Dev rules."}]},
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Part one."},
                                                      {"type": "text", "text": "Part two."}]}])
    sent = json.dumps(fake.requests[-1].body)
    assert "Dev rules." in sent and "Part one." in sent and "Part two." in sent


# --- parameters -----------------------------------------------------------------------------------


def test_parameters_reach_openai_completions_upstream(client, fake):
    fake.push(Reply(text="{}"))
    client.chat.completions.create(
        model="fake-chat/chat-model", messages=[{"role": "user", "content": "json please"}],
        temperature=0.3, top_p=0.9, max_completion_tokens=99, stop=["END", "STOP"], seed=7,
        frequency_penalty=0.5, presence_penalty=-0.5, user="u-1",
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False)
    body = fake.requests[-1].body
    assert body["temperature"] == 0.3 and body["top_p"] == 0.9 and body["seed"] == 7
    assert body["stop"] == ["END", "STOP"]
    assert body["frequency_penalty"] == 0.5 and body["presence_penalty"] == -0.5
    assert body["response_format"]["json_schema"]["name"] == "x"
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert 99 in (body.get("max_tokens"), body.get("max_completion_tokens"))
    assert body["tools"][0]["function"]["name"] == "get_weather"


def test_parameters_reach_anthropic_upstream(client, fake):
    fake.push(Reply(text="ok"))
    client.chat.completions.create(
        model="fake-anthropic/claude-test", messages=[{"role": "user", "content": "hi"}],
        temperature=0.2, top_p=0.8, max_tokens=321, stop="HALT",
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, response_format={"type": "json_object"})
    body = fake.requests[-1].body
    assert body["max_tokens"] == 321 and body["temperature"] == 0.2 and body["top_p"] == 0.8
    assert body["stop_sequences"] == ["HALT"]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    assert "JSON" in json.dumps(body["system"]), "Anthropic has no JSON mode: the request becomes an instruction"


def test_parameters_reach_responses_upstream(client, fake):
    fake.push(Reply(text="ok"))
    client.chat.completions.create(
        model="fake-responses/gpt-test", messages=[{"role": "user", "content": "hi"}],
        top_p=0.7, max_tokens=222, tools=[WEATHER_TOOL], tool_choice="none",
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}})
    body = fake.requests[-1].body
    assert body["top_p"] == 0.7 and body["max_output_tokens"] == 222
    assert body["tool_choice"] == "none"
    assert body["text"]["format"]["type"] == "json_schema" and body["text"]["format"]["name"] == "s"


@pytest.mark.parametrize("field,value", [("n", 2), ("logprobs", True), ("top_logprobs", 3),
                                         ("logit_bias", {"50256": -100})])
def test_unsupported_parameters_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-chat/chat-model", messages=[{"role": "user", "content": "x"}],
                                       extra_body={field: value})
    assert caught.value.body["code"] == "unsupported_parameter"
    assert caught.value.body["param"] == field


def test_n_equal_one_and_unknown_fields_are_accepted(client, fake):
    fake.push(Reply(text="fine"))
    reply = client.chat.completions.create(model="fake-chat/chat-model", messages=[{"role": "user", "content": "x"}],
                                           n=1, extra_body={"vendor_extra": {"a": 1}, "stop": None})
    assert reply.choices[0].message.content == "fine"
    assert "vendor_extra" not in fake.requests[-1].body


# --- tools ------------------------------------------------------------------------------------------


@ALL_APIS
def test_tool_call_and_result_round_trip(client, fake, model):
    fake.push(Reply(tool_calls=[("call_abc123", "get_weather", '{"city": "Paris"}')]))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id

    fake.push(Reply(text="It is sunny in Paris."))
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"}]
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    assert final.choices[0].message.content == "It is sunny in Paris."
    sent = json.dumps(last_request(fake, model).body)
    assert "sunny, 24C" in sent and "call_abc123" in sent and "Paris" in sent


@ALL_APIS
def test_streamed_parallel_tool_calls(client, fake, model):
    fake.push(Reply(text="Let me check.", tool_calls=[("call_1", "get_weather", '{"city": "Oslo"}'),
                                                      ("call_2", "get_weather", '{"city": "Rome"}')]))
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "two cities"}],
                                            tools=[WEATHER_TOOL], stream=True)
    calls = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for fragment in choice.delta.tool_calls or []:
            entry = calls.setdefault(fragment.index, {"id": None, "name": None, "arguments": ""})
            if fragment.id:
                assert entry["id"] is None, "id only on the first fragment"
                entry["id"], entry["name"] = fragment.id, fragment.function.name
            entry["arguments"] += fragment.function.arguments or ""
    assert finish == "tool_calls"
    assert sorted(calls) == [0, 1]
    assert [json.loads(calls[i]["arguments"])["city"] for i in (0, 1)] == ["Oslo", "Rome"]
    assert all(calls[i]["id"] and calls[i]["name"] == "get_weather" for i in (0, 1))


def test_tool_result_for_unknown_call_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-chat/chat-model", messages=[
            {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}])
    assert caught.value.body["param"] == "messages[1].tool_call_id"


# --- images and reasoning ----------------------------------------------------------------------


@ALL_APIS
def test_image_reaches_upstream(client, fake, model):
    fake.push(Reply(text="a pixel"))
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]}])
    assert reply.choices[0].message.content == "a pixel"
    assert PIXEL in json.dumps(last_request(fake, model).body)


def test_remote_image_url_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-chat/chat-model", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert caught.value.body["param"] == "messages[0].content[0].image_url.url"


def test_image_for_text_only_model_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-chat/shared-model", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]}])
    assert "does not accept images" in caught.value.body["message"]


@ALL_APIS
def test_reasoning_streams_as_reasoning_content(client, fake, model):
    fake.push(Reply(reasoning="First, think hard.", text="Answer: 4"))
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "2+2"}],
                                            reasoning_effort="high", stream=True)
    reasoning, text = "", ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        text += delta.content or ""
    assert reasoning.strip() == "First, think hard."
    assert text == "Answer: 4"


def test_reasoning_in_non_streamed_reply_and_effort_reaches_upstream(client, fake):
    fake.push(Reply(reasoning="Thinking it over.", text="Done"))
    reply = client.chat.completions.create(model="fake-responses/gpt-test", reasoning_effort="low",
                                           messages=[{"role": "user", "content": "go"}])
    assert reply.choices[0].message.model_extra["reasoning_content"].strip() == "Thinking it over."
    assert fake.requests[-1].body["reasoning"]["effort"] == "low"


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    ({"model": "fake-chat/chat-model"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "fake-chat/chat-model", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
     "temperature"),
    ({"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "x"}], "tool_choice": "maybe"},
     "tool_choice"),
    ({"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"},
     "max_tokens"),
])
def test_invalid_requests_name_the_field(proxy, body, param):
    response = requests.post(f"{proxy.url}/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_bodies_are_400(proxy, data):
    response = requests.post(f"{proxy.url}/v1/chat/completions", data=data,
                             headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413(proxy):
    huge = json.dumps({"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "x" * 2_100_000}]})
    response = requests.post(f"{proxy.url}/v1/chat/completions", data=huge)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413(proxy):
    def pieces():
        yield b'{"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}]}'
    response = requests.post(f"{proxy.url}/v1/chat/completions", data=pieces())
    assert response.status_code == 413


def test_wrong_method_and_unknown_path_answer_in_openai_shape(proxy):
    assert requests.get(f"{proxy.url}/v1/chat/completions").json()["error"]["type"]
    response = requests.get(f"{proxy.url}/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_healthz(proxy):
    response = requests.get(f"{proxy.url}/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# --- reasoning sent back ------------------------------------------------------------------------------


def test_pi_keeps_its_reasoning_across_tool_calls(proxy, fake):
    """pi talking chat completions to the proxy sends its reasoning back in `reasoning_content`:
    an openai-completions upstream gets it there again, as from pi directly."""
    fake.push(Reply(reasoning="I should look it up.", tool_calls=[("call_p1", "get_weather", {"city": "Lima"})]),
              Reply(text="Mild."))
    question = {"role": "user", "content": "Lima?", "timestamp": 0}
    first = pi_via_proxy(proxy, [question])
    assert [b["type"] for b in first["content"]] == ["thinking", "toolCall"]
    result = {"role": "toolResult", "toolCallId": "call_p1", "toolName": "get_weather",
              "content": [{"type": "text", "text": "18C"}], "isError": False, "timestamp": 0}
    assert pi_via_proxy(proxy, [question, first, result])["content"][-1]["text"] == "Mild."
    assistant = last_request(fake, "fake-chat/chat-model").body["messages"][1]
    assert assistant["reasoning_content"] == "I should look it up." and assistant["tool_calls"][0]["id"] == "call_p1"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_sent_back_is_replayed_in_its_own_field(client, fake, field):
    model = "fake-chat/chat-model"
    fake.push(Reply(text="ok"))
    client.chat.completions.create(model=model, messages=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, field: "thinking it over",
         "tool_calls": [{"id": "call_r", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_r", "content": "sunny"}], tools=[WEATHER_TOOL])
    assistant = last_request(fake, model).body["messages"][1]
    assert assistant[field] == "thinking it over"


@pytest.mark.parametrize("model", ["fake-anthropic/claude-test", "fake-responses/gpt-test"])
def test_reasoning_without_a_signature_does_not_reach_other_apis(client, fake, model):
    """Chat carries no signature Anthropic or the Responses API could check (and both drop earlier
    turns' thinking): the reasoning is dropped, never turned into text the model said."""
    fake.push(Reply(text="ok"))
    client.chat.completions.create(model=model, messages=[
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "SECRET-PLAN"},
        {"role": "user", "content": "q2"}])
    sent = json.dumps(last_request(fake, model).body)
    assert "SECRET-PLAN" not in sent and '"a"' in sent.replace(" ", "")
