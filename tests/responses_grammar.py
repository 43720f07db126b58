"""A strict checker of OpenAI Responses stream grammar, over raw SSE bytes.

response.created, response.in_progress, then output items one at a time: output_item.added, the
item's own events, output_item.done, with output_index counting from 0 and the item id stable.
Inside an item only its own events, in order:
  message           content_part.added, output_text.delta*, output_text.done, content_part.done
  reasoning         (reasoning_summary_part.added, reasoning_summary_text.delta*,
                     reasoning_summary_text.done, reasoning_summary_part.done)*
  function_call     function_call_arguments.delta*, function_call_arguments.done
  custom_tool_call  custom_tool_call_input.delta*, custom_tool_call_input.done
  local_shell_call  nothing: its `action` comes whole with output_item.done
Each `done` repeats exactly what its deltas added up to. Then exactly one terminal event with no
item open: response.completed / response.incomplete (with usage) or response.failed (with error),
whose response lists every finished item; or an `error` event. sequence_number counts 0, 1, 2, ...
Nothing follows the terminal event, and there is no `data: [DONE]`.
"""

import json

from tests.sse_grammar import parse_frames

TERMINAL = {"response.completed": "completed", "response.incomplete": "incomplete", "response.failed": "failed"}
ITEM_EVENTS = {
    "message": ["response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done"],
    "reasoning": ["response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
                  "response.reasoning_summary_text.done", "response.reasoning_summary_part.done"],
    "function_call": ["response.function_call_arguments.delta", "response.function_call_arguments.done"],
    "custom_tool_call": ["response.custom_tool_call_input.delta", "response.custom_tool_call_input.done"],
    "local_shell_call": [],
}
# Which event may follow which inside an item ("" is the item's start).
NEXT = {
    "message": {"": {"response.content_part.added"},
                "response.content_part.added": {"response.output_text.delta", "response.output_text.done"},
                "response.output_text.delta": {"response.output_text.delta", "response.output_text.done"},
                "response.output_text.done": {"response.content_part.done"},
                "response.content_part.done": {"done"}},
    "reasoning": {"": {"response.reasoning_summary_part.added", "done"},
                  "response.reasoning_summary_part.added": {"response.reasoning_summary_text.delta",
                                                            "response.reasoning_summary_text.done"},
                  "response.reasoning_summary_text.delta": {"response.reasoning_summary_text.delta",
                                                            "response.reasoning_summary_text.done"},
                  "response.reasoning_summary_text.done": {"response.reasoning_summary_part.done"},
                  "response.reasoning_summary_part.done": {"response.reasoning_summary_part.added", "done"}},
    "function_call": {"": {"response.function_call_arguments.delta", "response.function_call_arguments.done"},
                      "response.function_call_arguments.delta": {"response.function_call_arguments.delta",
                                                                 "response.function_call_arguments.done"},
                      "response.function_call_arguments.done": {"done"}},
    "custom_tool_call": {"": {"response.custom_tool_call_input.delta", "response.custom_tool_call_input.done"},
                         "response.custom_tool_call_input.delta": {"response.custom_tool_call_input.delta",
                                                                   "response.custom_tool_call_input.done"},
                         "response.custom_tool_call_input.done": {"done"}},
    "local_shell_call": {"": {"done"}},
}


def check_usage(usage: dict, where: str):
    assert isinstance(usage, dict), f"{where}: usage missing"
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        assert isinstance(usage[name], int) and usage[name] >= 0, f"{where}: usage.{name}"
    assert isinstance(usage["input_tokens_details"]["cached_tokens"], int), f"{where}: cached_tokens"
    assert isinstance(usage["output_tokens_details"]["reasoning_tokens"], int), f"{where}: reasoning_tokens"
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], f"{where}: total_tokens"


def check_responses_stream(raw: str) -> list[dict]:
    """Returns the events; raises AssertionError at the first violation."""
    events = [data for _, data in parse_frames(raw)]  # one event and one data line each, no [DONE]
    finished, seen_ids = [], set()
    item, last, text, response_id = None, None, "", None
    for position, event in enumerate(events):
        kind, where = event["type"], f"event {position} ({event['type']})"
        assert event["sequence_number"] == position, f"{where}: sequence_number {event['sequence_number']}"
        if position == 0:
            assert kind == "response.created", f"{where}: the stream must open with response.created"
            assert event["response"]["status"] == "in_progress" and event["response"]["output"] == []
            response_id = event["response"]["id"]
            assert response_id.startswith("resp_")
            continue
        if position == 1:
            assert kind == "response.in_progress", f"{where}: response.in_progress must follow response.created"
            continue
        assert last != "terminal", f"{where}: nothing may follow the terminal event"
        if kind == "error":
            assert event.get("message"), f"{where}: an error event needs a message"
            last = "terminal"
            continue
        if kind in TERMINAL:
            assert item is None, f"{where}: terminal event while item {item['id']} is open"
            response = event["response"]
            assert response["id"] == response_id and response["object"] == "response"
            assert response["status"] == TERMINAL[kind], f"{where}: status {response['status']}"
            assert response["output"] == finished, f"{where}: output differs from the streamed items"
            if kind == "response.failed":
                assert response["error"]["code"] and response["error"]["message"], f"{where}: error details"
            else:
                check_usage(response["usage"], where)
            if kind == "response.incomplete":
                assert response["incomplete_details"]["reason"], f"{where}: incomplete_details.reason"
            last = "terminal"
            continue
        if kind == "response.output_item.added":
            assert item is None, f"{where}: an item was added while {item and item['id']} is open"
            assert event["output_index"] == len(finished), f"{where}: output_index {event['output_index']}"
            item = event["item"]
            assert item["type"] in ITEM_EVENTS, f"{where}: unknown item type {item['type']}"
            assert item["id"] and item["id"] not in seen_ids, f"{where}: item ids must be unique"
            seen_ids.add(item["id"])
            if item["type"] in ("function_call", "custom_tool_call"):
                assert item["call_id"] and item["name"], f"{where}: a tool call needs call_id and name"
            if item["type"] == "local_shell_call":
                assert item["call_id"] and item["action"]["type"] == "exec", f"{where}: a shell call's call_id, action"
            last, text = "", ""
            continue
        assert item is not None, f"{where}: an item event outside any item"
        assert event["output_index"] == len(finished), f"{where}: output_index {event['output_index']}"
        if kind == "response.output_item.done":
            assert "done" in NEXT[item["type"]][last], f"{where}: item done after {last or 'nothing'}"
            done = event["item"]
            assert done["id"] == item["id"] and done["type"] == item["type"], f"{where}: item changed identity"
            if done["type"] == "message":
                assert done["content"][0]["text"] == text and done["status"] == "completed"
            elif done["type"] == "function_call":
                assert done["arguments"] == text, f"{where}: arguments differ from the deltas"
                if done["status"] == "completed":
                    assert isinstance(json.loads(text), dict), f"{where}: arguments are not a JSON object"
            elif done["type"] == "custom_tool_call":
                assert done["input"] == text, f"{where}: custom tool input"
            elif done["type"] == "local_shell_call":
                command = done["action"]["command"]
                assert isinstance(done["action"]["env"], dict) and all(isinstance(word, str) for word in command)
                assert bool(command) == (done["status"] == "completed"), f"{where}: a completed call has a command"
            elif done["summary"]:
                assert "".join(part["text"] for part in done["summary"]) == text, f"{where}: summary"
            finished.append(done)
            item = None
            continue
        assert kind in NEXT[item["type"]][last], \
            f"{where}: not allowed in a {item['type']} item after {last or 'its start'}"
        assert event["item_id"] == item["id"], f"{where}: item_id {event['item_id']}, open is {item['id']}"
        if kind.endswith(".added"):
            part = event["part"]
            assert part["text"] == "", f"{where}: a part starts empty"
            if kind == "response.reasoning_summary_part.added":
                text = ""
        elif kind.endswith(".delta"):
            assert isinstance(event["delta"], str)
            text += event["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_summary_text.done"):
            assert event["text"] == text, f"{where}: done text differs from the deltas"
        elif kind == "response.function_call_arguments.done":
            assert event["arguments"] == text, f"{where}: done arguments differ from the deltas"
        elif kind == "response.custom_tool_call_input.done":
            assert event["input"] == text, f"{where}: done input differs from the deltas"
        elif kind.endswith("part.done"):
            assert event["part"]["text"] == text, f"{where}: part text differs from the deltas"
        last = kind
    assert last == "terminal", "the stream ended without a terminal event"
    return events
