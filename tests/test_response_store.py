"""Stored responses (issue 15, case 2): `item_reference` and `previous_response_id` resolved from the
proxy's bounded in-memory store; what it cannot resolve is a 400, never a silent drop. End to end with
the Vercel AI SDK's `openai(...)` provider (tests/ai_sdk_client.mjs) and plain HTTP; the store itself
without HTTP."""

import json
import subprocess

import pytest
import requests

import proxy as module
from tests.fake_upstream import Reply
from tests.helpers import ROOT, response_error, running_proxy

AI_SDK_CLIENT = ROOT / "tests" / "ai_sdk_client.mjs"
# One per upstream API; the fakes refuse a tool call sent back without the reasoning it came with.
UPSTREAMS = ["openai/gpt-5", "fake-anthropic/claude-test", "fake-chat/chat-model"]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def run_ai_sdk(proxy, model: str, **options) -> list[dict]:
    result = subprocess.run(["node", str(AI_SDK_CLIENT)], capture_output=True, text=True, timeout=60, input=json.dumps(
        {"baseURL": f"{proxy.url}/v1", "model": model, "prompts": ["Weather in Paris?", "And tomorrow?"], **options}))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def weather_loop(fake):
    fake.push(Reply(reasoning="Check the weather.", tool_calls=[("call_w1", "get_weather", {"city": "Paris"})]),
              Reply(reasoning="It is sunny.", text="It is sunny in Paris."),
              Reply(reasoning="Same again.", text="Sunny tomorrow too."))


def post(proxy, body: dict) -> requests.Response:
    return requests.post(f"{proxy.url}/v1/responses", json=body, timeout=30)


def upstream_text(fake) -> str:
    return json.dumps(fake.requests[-1].body)


# --- the AI SDK --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, stream", [(model, False) for model in UPSTREAMS] + [("openai/gpt-5", True)])
def test_ai_sdk_tool_loop_with_reasoning_keeps_its_history(proxy, fake, model, stream):
    weather_loop(fake)
    first, second = run_ai_sdk(proxy, model, stream=stream)
    assert first["toolCalls"] == [{"name": "get_weather", "input": {"city": "Paris"}}]
    assert first["toolResults"] == ["sunny in Paris"] and first["text"] == "It is sunny in Paris."
    assert first["reasoning"] == "It is sunny." and second["text"] == "Sunny tomorrow too."
    assert "item_reference" in first["sent"][1] and second["sent"][0].count("item_reference") == 3, \
        "the SDK referred to the reasoning and the message by id"
    sent = [request.body for request in fake.requests]
    assert len(sent) == 3 and fake.pending == 0
    history = json.dumps(sent[2])
    for text in ("Weather in Paris?", "Check the weather.", "get_weather", "sunny in Paris", "It is sunny.",
                 "It is sunny in Paris.", "And tomorrow?"):
        assert text in history, f"{text!r} reached the upstream on the second turn"
    if model == "openai/gpt-5":
        assert [item.get("type", "message") for item in sent[2]["input"]] == [
            "message", "reasoning", "function_call", "function_call_output", "reasoning", "message", "message"]


def test_ai_sdk_with_store_false_sends_whole_items(proxy, fake):
    weather_loop(fake)
    first, second = run_ai_sdk(proxy, "openai/gpt-5", store=False)
    assert "item_reference" not in json.dumps([first["sent"], second["sent"]])
    assert second["text"] == "Sunny tomorrow too." and "Check the weather." in upstream_text(fake)
    later = post(proxy, {"model": "openai/gpt-5", "input": "more", "previous_response_id": second["responseIds"][0]})
    assert response_error(later, 400, "openai")["code"] == "previous_response_not_found", \
        "a response made with store: false is not kept"


@pytest.mark.parametrize("store", [None, False], ids=["store", "no-store"])
def test_ai_sdk_runs_local_shell_calls(proxy, fake, store):
    """OpenAI's local_shell tool: a function upstream, a local_shell_call for the SDK, which runs it;
    with its default store the SDK then refers to the call by id."""
    fake.push(Reply(reasoning="List them.", tool_calls=[("call_l1", "local_shell", {"command": ["ls", "-a"]})]),
              Reply(text="Two files."), Reply(text="Still two."))
    first, second = run_ai_sdk(proxy, "openai/gpt-5", localShell=True, **({} if store is None else {"store": store}))
    assert first["toolCalls"] == [{"name": "local_shell", "input": {"action": {"type": "exec", "command": ["ls", "-a"],
                                                                               "env": {}}}}]
    assert first["toolResults"] == [{"output": "ran ls -a"}] and second["text"] == "Still two."
    assert ("item_reference" in first["sent"][1]) == (store is None)
    assert ("local_shell_call" in first["sent"][1]) == (store is False)
    last = fake.requests[-1].body
    assert [item.get("type", "message") for item in last["input"]] == [
        "message", "reasoning", "function_call", "function_call_output", "message", "message"]
    assert "ran ls -a" in json.dumps(last) and '\\"ls\\"' in json.dumps(last)


# --- previous_response_id -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", UPSTREAMS)
def test_previous_response_id_chains_input_and_output(proxy, fake, model):
    fake.push(Reply(reasoning="Look it up.", tool_calls=[("call_c1", "get_weather", {"city": "Oslo"})]),
              Reply(text="Oslo is cold."), Reply(text="Bring a coat."))
    first = post(proxy, {"model": model, "input": "Weather in Oslo?", "instructions": "Be brief.", "tools": [WEATHER],
                         "reasoning": {"effort": "low"}}).json()
    call = first["output"][-1]
    assert call["type"] == "function_call" and first["store"] is True
    second = post(proxy, {"model": model, "previous_response_id": first["id"], "tools": [WEATHER], "input": [
        {"type": "function_call_output", "call_id": call["call_id"], "output": "minus five"}]}).json()
    assert second["output"][0]["content"][0]["text"] == "Oslo is cold."
    assert second["previous_response_id"] == first["id"]
    third = post(proxy, {"model": model, "previous_response_id": second["id"], "input": "What should I wear?"})
    assert third.status_code == 200, third.text
    history = upstream_text(fake)
    for text in ("Weather in Oslo?", "Look it up.", "Oslo", "minus five", "Oslo is cold.", "What should I wear?"):
        assert text in history, f"{text!r} reached the upstream through the chain"
    assert "Be brief." not in history, "instructions are not carried over, as OpenAI documents"


@pytest.mark.parametrize("body", [{"previous_response_id": "resp_never_made"}, {"previous_response_id": "x\n" * 80}])
def test_unknown_previous_response_is_400_like_openai(proxy, fake, body):
    error = response_error(post(proxy, {"model": "fake-chat/chat-model", "input": "hi", **body}), 400, "openai")
    assert error["message"].startswith("Previous response with id '") and " not found." in error["message"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", "previous_response_id", "previous_response_not_found")
    assert fake.requests == [], "nothing reaches the upstream"


def test_unresolvable_item_reference_is_400_naming_its_index(proxy, fake):
    error = response_error(post(proxy, {"model": "fake-chat/chat-model", "input": [
        {"role": "user", "content": "hi"}, {"type": "item_reference", "id": "msg_from_elsewhere"}]}), 400, "openai")
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "input[1]", "item_not_found")
    assert "msg_from_elsewhere" in error["message"] and "store: false" in error["message"]
    assert fake.requests == []


def test_store_false_keeps_nothing(proxy, fake):
    fake.push(Reply(text="not kept"))
    first = post(proxy, {"model": "fake-chat/chat-model", "input": "hi", "store": False}).json()
    assert first["store"] is False
    for body in ({"previous_response_id": first["id"], "input": "more"},
                 {"input": [{"type": "item_reference", "id": first["output"][0]["id"]}]}):
        assert response_error(post(proxy, {"model": "fake-chat/chat-model", **body}), 400, "openai")["code"] in (
            "previous_response_not_found", "item_not_found")


def test_a_restart_forgets_and_a_small_store_evicts(agent_dir, fake, tmp_path):
    """Store limits from the environment; the oldest response goes first; a restart forgets everything."""
    small_store = {"PI_PROXY_RESPONSE_STORE_BYTES": "6000"}
    with running_proxy(agent_dir, tmp_path / "proxy.log", small_store) as small:
        ids = []
        for n in range(4):
            fake.push(Reply(text=f"answer {n} " + "x" * 600))
            ids.append(post(small, {"model": "fake-chat/chat-model", "input": f"question {n}"}).json()["id"])
        status = [post(small, {"model": "fake-chat/chat-model", "input": "?", "previous_response_id": id_}).status_code
                  for id_ in ids[::-1]]
        assert status[:2] == [200, 200] and status[-1] == 400, status
    with running_proxy(agent_dir, tmp_path / "proxy.log", small_store) as restarted:
        response = post(restarted, {"model": "fake-chat/chat-model", "input": "?", "previous_response_id": ids[-1]})
        assert response_error(response, 400, "openai")["param"] == "previous_response_id"


# --- the store, without HTTP ------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(limit: int = 10**6):
    return module.ByteBudget(limit)


def item(id_: str, text: str = "") -> dict:
    return {"id": id_, "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def put(store, id_: str, text: str = ""):
    store.put(("item", id_), item(id_, text))


def get(store, id_: str):
    return store.get(("item", id_), budget())


def test_store_is_bounded_by_bytes_least_recently_used_first():
    entry = len(json.dumps(item("a", "x" * 100), separators=(",", ":"))) + module.ResponseStore.ENTRY_BYTES
    store = module.ResponseStore(3 * entry, 60, Clock())
    for id_ in "abc":
        put(store, id_, "x" * 100)
    assert store.size == 3 * entry
    assert get(store, "a")["id"] == "a"  # used: b is now the least recently used
    put(store, "d", "x" * 100)
    assert [id_ for id_ in "abcd" if get(store, id_)] == ["a", "c", "d"] and store.size <= 3 * entry
    put(store, "huge", "x" * 10 * entry)
    assert get(store, "huge") is None and get(store, "a"), "too large for the store: not kept"


def test_store_forgets_after_its_age():
    clock = Clock()
    store = module.ResponseStore(10**6, 60, clock)
    put(store, "old")
    clock.now += 30
    put(store, "young")
    clock.now += 31
    assert get(store, "old") is None and get(store, "young")["id"] == "young"
    assert store.size == len(json.dumps(item("young"), separators=(",", ":"))) + module.ResponseStore.ENTRY_BYTES
    clock.now += 60
    put(store, "new")
    assert list(store.entries) == [("item", "new")], "expired entries go when a new one comes"


def test_history_chains_previous_responses_and_resolves_references():
    store = module.ResponseStore(10**6, 60, Clock())
    user = {"role": "user", "content": "q1"}
    store.keep({"id": "resp_1", "output": [item("msg_1", "a1")]}, module.json_text([user]), None)
    store.keep({"id": "resp_2", "output": [item("msg_2", "a2")]},
               module.json_text([{"type": "item_reference", "id": "msg_1"}, {"role": "user", "content": "q2"}]),
               "resp_1")
    assert [i.get("id") or i["content"] for i in store.history("resp_2", budget())] == [
        "q1", "msg_1", "msg_1", "q2", "msg_2"]
    items = module.stored_input({"previous_response_id": "resp_2", "input": [
        {"type": "item_reference", "id": "msg_2"}, {"role": "user", "content": "q3"}]}, store, 10**6)
    assert [param for param, _ in items] == ["previous_response_id"] * 5 + ["input[0]", "input[1]"]
    assert items[5][1] == item("msg_2", "a2")
    with pytest.raises(module.ApiError) as caught:
        module.stored_input({"previous_response_id": "resp_2", "input": "q3"}, store, 100)
    assert caught.value.status == 413, "what references expand to is bounded like a request body"
    with pytest.raises(module.ApiError) as caught:
        module.stored_input({"previous_response_id": "msg_1", "input": [{"type": "item_reference", "id": "resp_1"}]},
                            store, 10**6)
    assert caught.value.param == "previous_response_id", "items and responses are not each other"
    store.drop(("item", "msg_1"))
    assert store.history("resp_2", budget()) is None, "a chain with a forgotten link is not answered in part"
    with pytest.raises(module.ApiError) as caught:
        module.stored_input({"input": [{"role": "user", "content": "x"}, {"type": "item_reference", "id": "msg_1"}]},
                            store, 10**6)
    assert (caught.value.status, caught.value.param) == (400, "input[1]")
