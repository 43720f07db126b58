"""End to end: the official openai SDK's Responses API -> /v1/responses -> bridge.mjs -> pi-ai -> fake
upstreams. Every stream the SDK reads here also goes through the strict grammar checker."""

import base64
import json

import httpx2 as httpx
import openai
import pytest
import requests

from tests.fake_upstream import Reply
from tests.helpers import ALL_APIS, PIXEL, RecordingTransport, last_request, sse_events
from tests.responses_grammar import check_responses_stream
from tests.secret_scan import record_response
from tests.sse_grammar import check_anthropic_stream

KEY = b"this installation's envelope key"

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PATCH_GRAMMAR = 'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF'
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch",
               "format": {"type": "grammar", "syntax": "lark", "definition": PATCH_GRAMMAR}}


@pytest.fixture
def client(proxy):
    transport = RecordingTransport()
    yield openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0,
                        http_client=httpx.Client(transport=transport, timeout=30,
                                                 event_hooks={"response": [record_response]}))
    for chunks in transport.streams:
        check_responses_stream(b"".join(chunks).decode())


def raw_stream(proxy, body: dict) -> list[dict]:
    response = requests.post(f"{proxy.url}/v1/responses", json={**body, "stream": True}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return check_responses_stream(response.text)


def sent_text(fake, model) -> str:
    return json.dumps(last_request(fake, model).body)


def as_input(items) -> list[dict]:
    """Output items as a client sends them back (SDK models -> plain JSON)."""
    return [item.model_dump(exclude_none=True) for item in items]


# --- text --------------------------------------------------------------------------------------------


@ALL_APIS
def test_text(client, fake, model):
    fake.push(Reply(text="Hello from upstream.", usage=dict(input=12, output=6, cached=30)))
    response = client.responses.create(model=model, input="hi")
    assert response.status == "completed" and response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == "Hello from upstream." and response.model == model
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert response.usage.input_tokens == 42, "input_tokens counts cached tokens, as OpenAI does"
    assert response.usage.input_tokens_details.cached_tokens == 30
    assert (response.usage.output_tokens, response.usage.total_tokens) == (6, 48)


@ALL_APIS
def test_streamed_text(client, fake, model):
    fake.push(Reply(text="Streaming works fine today.", usage=dict(input=9, output=5)))
    with client.responses.stream(model=model, input="hi") as stream:
        pieces = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(pieces) == "Streaming works fine today." and len(pieces) >= 3
    assert final.output_text == "Streaming works fine today." and final.status == "completed"
    assert final.usage.output_tokens == 5


@ALL_APIS
def test_instructions_and_system_messages_reach_the_upstream(client, fake, model):
    fake.push(Reply(text="ok"))
    client.responses.create(model=model, instructions="Rule one.", input=[
        {"role": "developer", "content": "Rule two."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "question"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "earlier answer"}]},
        {"role": "system", "content": "Late rule."},
        {"role": "user", "content": "follow-up"}])
    sent = sent_text(fake, model)
    for text in ("Rule one.", "Rule two.", "Late rule.", "question", "earlier answer", "follow-up"):
        assert text in sent


@ALL_APIS
def test_image(client, fake, model):
    fake.push(Reply(text="a tiny image"))
    response = client.responses.create(model=model, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": f"data:image/png;base64,{PIXEL}"}]}])
    assert response.output_text == "a tiny image"
    assert PIXEL in sent_text(fake, model)


def test_parameters_reach_a_responses_upstream(client, fake):
    model = "fake-responses/gpt-test"
    fake.push(Reply(text="{}"))
    client.responses.create(model=model, input="hi", max_output_tokens=77, temperature=0.5, top_p=0.9,
                            reasoning={"effort": "high"}, prompt_cache_key="session-42", tools=[WEATHER],
                            tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
                            text={"format": {"type": "json_schema", "name": "answer",
                                             "schema": {"type": "object", "properties": {}}}})
    body = last_request(fake, model).body
    assert body["max_output_tokens"] == 77 and body["top_p"] == 0.9 and body["reasoning"]["effort"] == "high"
    assert body["prompt_cache_key"] == "session-42", "prompt_cache_key becomes pi-ai's sessionId"
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert body["parallel_tool_calls"] is False
    assert body["text"]["format"]["type"] == "json_schema" and body["text"]["format"]["name"] == "answer"


def test_json_format_becomes_an_instruction_for_anthropic(client, fake):
    model = "fake-anthropic/claude-test"
    fake.push(Reply(text="{}"))
    client.responses.create(model=model, input="hi", text={"format": {"type": "json_object"}})
    assert "Respond only with a valid JSON object." in sent_text(fake, model)


# --- tools -------------------------------------------------------------------------------------------


@ALL_APIS
def test_function_call_and_its_output_round_trip(client, fake, model):
    fake.push(Reply(text="Let me check.", tool_calls=[("call_w1", "get_weather", '{"city": "Paris"}')]))
    with client.responses.stream(model=model, input="weather in Paris?", tools=[WEATHER]) as stream:
        argument_deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        first = stream.get_final_response()
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"] and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert "".join(argument_deltas) == calls[0].arguments
    assert calls[0].call_id.startswith("call_w1") and calls[0].id.startswith("fc_")
    fake.push(Reply(text="It is sunny in Paris."))
    second = client.responses.create(model=model, tools=[WEATHER], input=[
        {"role": "user", "content": "weather in Paris?"}, *as_input(first.output),
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 24C"}])
    assert second.output_text == "It is sunny in Paris."
    sent = last_request(fake, model).body
    assert "sunny, 24C" in json.dumps(sent) and "call_w1" in json.dumps(sent)
    if model.startswith("fake-responses"):
        outputs = [i for i in sent["input"] if i.get("type") == "function_call_output"]
        assert outputs == [{"type": "function_call_output", "call_id": "call_w1", "output": "sunny, 24C"}]


@ALL_APIS
def test_namespace_custom_and_hosted_tools(client, fake, model):
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hello\n*** End Patch\n"
    fake.push(Reply(tool_calls=[("call_n1", "forecast", '{"days": 3}'), ("call_c1", "apply_patch", {"input": patch})]))
    tools = [{"type": "namespace", "name": "weather_ns", "description": "Weather tools",
              "tools": [{"type": "function", "name": "forecast", "parameters": {
                  "type": "object", "properties": {"days": {"type": "integer"}}}}]},
             APPLY_PATCH, {"type": "web_search", "external_web_access": False}]
    with client.responses.stream(model=model, input="do it", tools=tools) as stream:
        first = stream.get_final_response()
    upstream_tools = json.dumps(last_request(fake, model).body.get("tools"))
    assert "forecast" in upstream_tools and "apply_patch" in upstream_tools
    assert "begin_patch" in upstream_tools, "the custom tool's grammar goes into its description"
    assert "web_search" not in upstream_tools, "hosted tools are dropped"
    function_call, custom_call = first.output
    assert (function_call.type, function_call.name, function_call.namespace) == \
        ("function_call", "forecast", "weather_ns")
    assert (custom_call.type, custom_call.name, custom_call.input) == ("custom_tool_call", "apply_patch", patch)
    fake.push(Reply(text="done"))
    client.responses.create(model=model, tools=tools, input=[
        {"role": "user", "content": "do it"}, *as_input(first.output),
        {"type": "function_call_output", "call_id": function_call.call_id, "output": "rainy"},
        {"type": "custom_tool_call_output", "call_id": custom_call.call_id, "output": "patch applied"}])
    sent = sent_text(fake, model)
    assert "rainy" in sent and "patch applied" in sent and "a.txt" in sent


SHELL_ACTION = {"command": ["ls", "-la"], "working_directory": "/tmp", "timeout_ms": 5000}


@ALL_APIS
def test_local_shell_is_a_function_upstream_and_a_local_shell_call_here(proxy, fake, model):
    fake.push(Reply(tool_calls=[("call_s1", "local_shell", SHELL_ACTION)]))
    events = raw_stream(proxy, {"model": model, "input": "list files", "tools": [{"type": "local_shell"}]})
    [call] = events[-1]["response"]["output"]
    assert call["type"] == "local_shell_call" and call["id"].startswith("lsh_") and call["status"] == "completed"
    assert call["action"] == {"type": "exec", "env": {}, **SHELL_ACTION} and call["call_id"].startswith("call_s1")
    upstream_tools = json.dumps(last_request(fake, model).body["tools"])
    assert "local_shell" in upstream_tools and "working_directory" in upstream_tools
    fake.push(Reply(text="Two files."))
    response = requests.post(f"{proxy.url}/v1/responses", timeout=30, json={
        "model": model, "tools": [{"type": "local_shell"}], "store": False, "input": [
            {"role": "user", "content": "list files"}, call,
            {"type": "local_shell_call_output", "id": call["call_id"], "output": "a.txt b.txt"}]})
    assert response.status_code == 200 and response.json()["output"][0]["content"][0]["text"] == "Two files."
    sent = sent_text(fake, model)
    assert "a.txt b.txt" in sent and "/tmp" in sent and "call_s1" in sent, "the call and its output went back"


@pytest.mark.parametrize("kind", ["file_search", "code_interpreter", "computer_use_preview", "image_generation", "mcp"])
def test_hosted_tools_the_proxy_cannot_provide_are_400(proxy, fake, kind):
    response = requests.post(f"{proxy.url}/v1/responses", timeout=10, json={
        "model": "fake-chat/chat-model", "input": "hi", "tools": [WEATHER, {"type": "web_search"}, {"type": kind}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == \
        ("invalid_request_error", "tools[2].type", "unsupported_tool")
    assert repr(kind) in error["message"] and fake.requests == []


def test_output_for_an_unknown_call_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="fake-chat/chat-model", input=[
            {"type": "function_call_output", "call_id": "nope", "output": "x"}])
    assert caught.value.body["param"] == "input[0].call_id"


def test_unknown_input_items_are_kept_as_text(client, fake):
    model = "fake-chat/chat-model"
    fake.push(Reply(text="ok"))
    client.responses.create(model=model, input=[
        {"role": "user", "content": "hi"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "mystery_item", "text": "remember the mystery text"}])
    assert "remember the mystery text" in sent_text(fake, model)


# --- reasoning -----------------------------------------------------------------------------------------


@ALL_APIS
def test_reasoning_round_trips_to_the_same_model_only(client, fake, model):
    fake.push(Reply(reasoning="Let me think.", reasoning_signature="sig-XYZ-123", text="42"))
    with client.responses.stream(model=model, input="question", reasoning={"effort": "low", "summary": "auto"},
                                 include=["reasoning.encrypted_content"]) as stream:
        summary = "".join(e.delta for e in stream if e.type == "response.reasoning_summary_text.delta")
        first = stream.get_final_response()
    reasoning, message = first.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Let me think."
    assert summary == reasoning.summary[0].text and message.content[0].text == "42"
    history = [{"role": "user", "content": "question"}, *as_input(first.output), {"role": "user", "content": "more"}]
    fake.push(Reply(text="43"))
    client.responses.create(model=model, input=history, reasoning={"effort": "low"})
    sent = sent_text(fake, model)
    if model.startswith("fake-chat"):
        assert "Let me think." in sent, "the reasoning goes back to the same model"
    else:
        assert reasoning.encrypted_content, "the signature travels in encrypted_content"
        assert "sig-XYZ-123" in sent, "the signature goes back to the same model"
    other = "fake-chat/chat-model" if model != "fake-chat/chat-model" else "fake-anthropic/claude-test"
    fake.push(Reply(text="44"))
    assert client.responses.create(model=other, input=history).output_text == "44"
    sent_elsewhere = sent_text(fake, other)
    assert "sig-XYZ-123" not in sent_elsewhere and "Let me think." not in sent_elsewhere, \
        "reasoning made for another model is dropped"


def streamed_and_final_reasoning(proxy, endpoint: str, body: dict) -> tuple[str, str]:
    """The reasoning text an endpoint streams, and the one its whole reply carries."""
    url = f"{proxy.url}{endpoint}"
    streamed = requests.post(url, json={**body, "stream": True}, timeout=30)
    whole = requests.post(url, json=body, timeout=30).json()
    assert streamed.status_code == 200, streamed.text
    if endpoint == "/v1/messages":
        frames = check_anthropic_stream(streamed.text)
        deltas = [data["delta"] for _, data in frames if data["type"] == "content_block_delta"]
        return "".join(d["thinking"] for d in deltas if d["type"] == "thinking_delta"), whole["content"][0]["thinking"]
    if endpoint == "/v1/chat/completions":
        chunks = [json.loads(data) for _, data in sse_events(streamed.text) if data != "[DONE]"]
        return ("".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"]),
                whole["choices"][0]["message"]["reasoning_content"])
    events = check_responses_stream(streamed.text)
    return ("".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta"),
            whole["output"][0]["summary"][0]["text"])


@pytest.mark.parametrize("endpoint", ["/v1/responses", "/v1/chat/completions", "/v1/messages"])
def test_streamed_reasoning_equals_the_final_reasoning(proxy, fake, endpoint):
    """pi-ai's openai-responses provider streams "\n\n" after the reasoning; its final text has none."""
    body = {"model": "fake-responses/gpt-test", "max_tokens": 100, "reasoning_effort": "low"}
    body |= {"input": "q", "reasoning": {"effort": "low"}} if endpoint == "/v1/responses" else \
        {"messages": [{"role": "user", "content": "q"}]}
    fake.push(Reply(reasoning="First I think. Then I answer.", text="42"),
              Reply(reasoning="First I think. Then I answer.", text="42"))
    streamed, final = streamed_and_final_reasoning(proxy, endpoint, body)
    assert streamed == final == "First I think. Then I answer."


def test_foreign_reasoning_items_are_dropped(client, fake):
    model = "fake-responses/gpt-test"
    fake.push(Reply(text="ok"))
    client.responses.create(model=model, input=[
        {"role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": "gAAAA-real-openai-blob"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
        {"role": "user", "content": "q2"}])
    assert "gAAAA-real-openai-blob" not in sent_text(fake, model)


def forged_envelope(version: str, mac: str | None) -> str:
    """An envelope in the proxy's format whose "signature" is raw Responses items: pi-ai would
    put them into the upstream request as they are."""
    injected = json.dumps({"type": "item_reference", "id": "msg_someone_elses", "file_id": "file-stolen"})
    payload = json.dumps({"model": "fake-responses/gpt-test", "signature": injected}, separators=(",", ":"))
    sealed = f"pi-proxy.{version}:" + base64.urlsafe_b64encode(payload.encode()).decode()
    return sealed if mac is None else f"{sealed}.{mac}"


@pytest.mark.parametrize("encrypted_content", [
    forged_envelope("1", None),  # the unsigned envelope of earlier versions
    forged_envelope("2", "A" * 43),  # a made-up MAC
    forged_envelope("2", ""),
])
def test_forged_envelopes_never_reach_the_upstream(client, fake, agent_dir, encrypted_content):
    """Issue 12 point 8: an envelope the proxy did not mint injected raw items into an
    openai-responses upstream request, past every validation."""
    model = "fake-responses/gpt-test"
    fake.push(Reply(text="ok"))
    client.responses.create(model=model, input=[
        {"role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": encrypted_content},
        {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
        {"role": "user", "content": "q2"}])
    sent = sent_text(fake, model)
    assert "item_reference" not in sent and "file-stolen" not in sent


def test_an_altered_envelope_is_dropped_and_the_key_file_is_private(client, fake, agent_dir):
    model = "fake-responses/gpt-test"
    fake.push(Reply(reasoning="Let me think.", reasoning_signature="sig-ABC-777", text="42"))
    first = client.responses.create(model=model, input="question", reasoning={"effort": "low", "summary": "auto"})
    key_file = agent_dir / "pi-proxy-envelope.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes().strip()) == 64
    reasoning = first.output[0].model_dump()
    sealed, mac = reasoning["encrypted_content"].rsplit(".", 1)
    payload = json.loads(base64.urlsafe_b64decode(sealed.split(":", 1)[1]))
    altered = {**payload, "signature": payload["signature"].replace("sig-ABC-777", "sig-ABC-778")}
    reasoning["encrypted_content"] = "pi-proxy.2:" + base64.urlsafe_b64encode(json.dumps(altered).encode()).decode() \
        + "." + mac
    for item, expected in ((first.output[0].model_dump(), "sig-ABC-777"), (reasoning, None)):
        fake.push(Reply(text="43"))
        client.responses.create(model=model, input=[{"role": "user", "content": "question"}, item,
                                                    {"role": "user", "content": "more"}])
        sent = sent_text(fake, model)
        assert ("sig-ABC-777" in sent) == (expected is not None) and "sig-ABC-778" not in sent


# --- stops and failures ---------------------------------------------------------------------------------


@ALL_APIS
def test_max_tokens_is_incomplete(client, proxy, fake, model):
    fake.push(Reply(text="cut short", stop="length", usage=dict(input=7, output=3)))
    response = client.responses.create(model=model, input="hi", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "cut short"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 3), "usage survives the stop"
    fake.push(Reply(text="cut short", stop="length"))
    events = raw_stream(proxy, {"model": model, "input": "hi", "max_output_tokens": 3})
    assert events[-1]["type"] == "response.incomplete"


def test_max_tokens_from_a_responses_upstream_is_length_for_chat_clients(proxy, fake):
    fake.push(Reply(text="cut short", stop="length"))
    chat = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
    completion = chat.chat.completions.create(model="fake-responses/gpt-test", max_tokens=3,
                                              messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 20


@pytest.mark.parametrize("status, error", [(401, openai.AuthenticationError), (403, openai.PermissionDeniedError),
                                           (404, openai.NotFoundError), (429, openai.RateLimitError),
                                           (500, openai.InternalServerError), (503, openai.InternalServerError)])
@ALL_APIS
def test_upstream_errors_keep_their_status(client, fake, model, status, error):
    fake.push(Reply(status=status, headers={"retry-after": "7"} if status == 429 else {}))
    with pytest.raises(error) as caught:
        client.responses.create(model=model, input="hi", stream=True)
    assert caught.value.status_code == status
    assert set(caught.value.body) >= {"message", "type", "code"}
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "7"


@ALL_APIS
def test_truncated_upstream_is_response_failed(proxy, fake, model):
    fake.push(Reply(text="one two three four five six seven", cut_after=5))
    events = raw_stream(proxy, {"model": model, "input": "hi"})
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"], "what streamed before the cut is kept"
    assert proxy.wait_no_bridges()


@ALL_APIS
def test_in_stream_error_is_response_failed(client, fake, model):
    fake.push(Reply(text="partial answer here", stream_error="upstream exploded"))
    with client.responses.stream(model=model, input="hi") as stream:
        events = list(stream)
    assert events[-1].type == "response.failed"
    assert "upstream exploded" in events[-1].response.error.message


def test_upstream_error_after_headers_in_non_streaming_mode_is_an_http_error(client, fake):
    fake.push(Reply(text="partial answer here", stream_error="upstream exploded"))
    with pytest.raises(openai.APIStatusError) as caught:
        client.responses.create(model="fake-chat/chat-model", input="hi")
    assert "upstream exploded" in caught.value.message


def test_secrets_never_leak(client, fake):
    fake.push(Reply(status=401, error_body={"error": {"message": "bad key sk-resp-SECRET-cccc3333",
                                                      "type": "invalid_request_error"}}))
    with pytest.raises(openai.AuthenticationError) as caught:
        client.responses.create(model="fake-responses/gpt-test", input="hi")
    assert "SECRET" not in json.dumps(caught.value.body)


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"input": "hi"}, "model"),
    ({"model": "fake-chat/chat-model"}, "input"),
    ({"model": "fake-chat/chat-model", "input": 5}, "input"),
    ({"model": "fake-chat/chat-model", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "fake-chat/chat-model", "input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
    ({"model": "fake-chat/chat-model", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "fake-chat/chat-model", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "fake-chat/chat-model", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]}, "input[0].content[0].image_url"),
])
def test_bad_requests_are_400_in_openai_shape(proxy, body, param):
    response = requests.post(f"{proxy.url}/v1/responses", json=body, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="nope/nothing", input="hi")
    assert caught.value.body["code"] == "model_not_found"


# --- pure translation ------------------------------------------------------------------------------


def test_interleaved_pi_blocks_stream_one_item_at_a_time():
    import proxy as module
    tools = {"apply_patch": module.ClientTool("apply_patch", kind="custom"),
             "forecast": module.ClientTool("forecast", namespace="weather_ns")}
    frames = module.ResponsesEvents(module.response_object({"model": "m", "input": "x"}, "resp_1", 0), "p/m", tools,
                                    KEY)
    pi_events = [
        {"type": "start"},
        {"type": "thinking_start", "contentIndex": 0, "contentSignature": "reasoning_content"},
        {"type": "thinking_delta", "contentIndex": 0, "delta": "hmm"},
        {"type": "text_start", "contentIndex": 1},
        {"type": "text_delta", "contentIndex": 1, "delta": "Hi"},
        {"type": "toolcall_start", "contentIndex": 2, "id": "c1", "toolName": "forecast"},
        {"type": "toolcall_delta", "contentIndex": 2, "delta": '{"days":'},
        {"type": "text_delta", "contentIndex": 1, "delta": " again"},  # a late delta: a new item
        {"type": "toolcall_start", "contentIndex": 3, "id": "c2", "toolName": "apply_patch"},
        {"type": "toolcall_delta", "contentIndex": 3, "delta": '{"input": "*** Begin"}'},
        {"type": "thinking_end", "contentIndex": 0}, {"type": "text_end", "contentIndex": 1},
        {"type": "toolcall_end", "contentIndex": 3, "toolCall": {"arguments": {"input": "*** Begin"}}},
        {"type": "done", "reason": "toolUse", "message": {"usage": {"input": 3, "output": 4}}},
    ]
    raw = "".join(module.sse_event(f["type"], f).decode() for e in pi_events for f in frames.translate(e))
    events = check_responses_stream(raw)
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "message", "function_call", "message",
                                                 "custom_tool_call"]
    assert output[1]["content"][0]["text"] == "Hi" and output[3]["content"][0]["text"] == " again"
    assert output[2]["namespace"] == "weather_ns" and output[2]["arguments"] == '{"days":'
    assert output[2]["status"] == "incomplete", "a call cut short by another block says so"
    assert output[4]["input"] == "*** Begin" and output[4]["call_id"] == "c2"
    sealed = output[0]["encrypted_content"]
    assert module.open_reasoning(sealed, {"provider": "p", "id": "m"}, KEY) == \
        {"thinkingSignature": "reasoning_content"}
    assert module.open_reasoning(sealed, {"provider": "p", "id": "other"}, KEY) is None
    assert module.open_reasoning("gAAAA-not-ours", {"provider": "p", "id": "m"}, KEY) is None
    assert module.open_reasoning(sealed, {"provider": "p", "id": "m"}, b"another installation") is None


@pytest.mark.parametrize("arguments, action", [
    ('{"command": ["ls"], "env": {"A": "1"}, "user": null, "extra": 1}',
     {"type": "exec", "command": ["ls"], "env": {"A": "1"}}),
    ('{"command": []}', None), ('{"command": "ls -la"}', None), ('{"command": ["ls", 5]}', None), ('{"comm', None),
    ('["ls"]', None)])
def test_local_shell_action_needs_a_command(arguments, action):
    import proxy as module
    assert module.local_shell_action(arguments) == action


def test_a_local_shell_call_without_a_command_is_incomplete():
    import proxy as module
    tools = {"local_shell": module.ClientTool("local_shell", kind="local_shell")}
    response = module.response_object({"model": "m", "input": "x"}, "resp_1", 0)
    frames = module.ResponsesEvents(response, "p/m", tools, KEY)
    pi_events = [{"type": "start"},
                 {"type": "toolcall_start", "contentIndex": 0, "id": "c1", "toolName": "local_shell"},
                 {"type": "toolcall_delta", "contentIndex": 0, "delta": '{"cmd": "ls"}'},
                 {"type": "toolcall_end", "contentIndex": 0, "toolCall": {"arguments": {"cmd": "ls"}}},
                 {"type": "done", "reason": "toolUse", "message": {"usage": {}}}]
    raw = "".join(module.sse_event(f["type"], f).decode() for e in pi_events for f in frames.translate(e))
    [call] = check_responses_stream(raw)[-1]["response"]["output"]
    assert (call["type"], call["status"], call["action"]) == ("local_shell_call", "incomplete",
                                                              {"type": "exec", "command": [], "env": {}})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_redacted_thinking_is_an_opaque_reasoning_item_that_goes_back_intact(client, fake, stream):
    """Anthropic's redacted thinking has no text: a reasoning item without a summary, whose
    encrypted_content brings it back to the same model as redacted_thinking again."""
    model = "fake-anthropic/claude-test"
    fake.push(Reply(redacted_thinking="REDACTED-opaque-2==",
                    tool_calls=[("toolu_r2", "get_weather", {"city": "Rome"})]), Reply(text="Warm."))
    request = dict(model=model, tools=[WEATHER], reasoning={"effort": "low"}, include=["reasoning.encrypted_content"])
    if stream:
        with client.responses.stream(input="Rome?", **request) as streamed:
            first = streamed.get_final_response()
    else:
        first = client.responses.create(input="Rome?", **request)
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and reasoning.summary == [] and reasoning.encrypted_content
    assert "REDACTED-opaque-2==" not in json.dumps(first.model_dump()), "sealed, as every reasoning item"
    history = [{"role": "user", "content": "Rome?"}, *as_input(first.output),
               {"type": "function_call_output", "call_id": call.call_id, "output": "25"}]
    assert client.responses.create(input=history, **request).output_text == "Warm."
    assert not fake.refusals, fake.refusals
    sent = last_request(fake, model).body["messages"][1]["content"]
    assert sent[0] == {"type": "redacted_thinking", "data": "REDACTED-opaque-2=="}
