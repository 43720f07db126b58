"""A strict checker of Anthropic Messages stream grammar, over raw SSE bytes.

message_start, then content blocks one at a time (content_block_start, content_block_delta*,
content_block_stop) with indices counting from 0, then message_delta and message_stop; `ping`
anywhere. Or, at any point, an `error` event, which must be the last. Nothing may follow the end.
"""

import json

from tests.helpers import sse_events

DELTAS_FOR_BLOCK = {
    "text": {"text_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
    "tool_use": {"input_json_delta"},
    "redacted_thinking": set(),  # whole in its content_block_start
}
STOP_REASONS = {"end_turn", "max_tokens", "tool_use", "stop_sequence"}


def parse_frames(raw: str) -> list[tuple[str, dict]]:
    """The (event name, JSON data) frames of a stream where each frame has one event and one data line."""
    frames = []
    for name, data in sse_events(raw):
        assert name is not None and "\n" not in data, f"a frame needs one event and one data line: {name!r} {data!r}"
        assert data != "[DONE]", "Anthropic streams never send [DONE]"
        payload = json.loads(data)
        assert payload["type"] == name, f"event name {name} but data type {payload['type']}"
        frames.append((name, payload))
    return frames


def check_anthropic_stream(raw: str) -> list[tuple[str, dict]]:
    """Returns the frames; raises AssertionError at the first violation."""
    frames = parse_frames(raw)
    state = "before"  # before -> message -> in_block -> message -> delta_sent -> done | error
    next_index, open_block, arguments, signed = 0, None, "", False
    for position, (name, data) in enumerate(frames):
        where = f"frame {position} ({name})"
        assert state not in ("done", "error"), f"{where}: nothing may follow the end of the stream"
        if name == "ping":
            continue
        if name == "error":
            assert set(data["error"]) >= {"type", "message"}, f"{where}: error needs type and message"
            state = "error"
            continue
        if state == "before":
            assert name == "message_start", f"{where}: the stream must open with message_start"
            message = data["message"]
            assert message["role"] == "assistant" and message["content"] == [] and message["id"]
            assert message["usage"]["input_tokens"] > 0, f"{where}: message_start needs a real input estimate"
            state = "message"
        elif name == "content_block_start":
            assert state == "message", f"{where}: a block started while another is open ({open_block})"
            assert data["index"] == next_index, f"{where}: index {data['index']}, expected {next_index}"
            open_block = data["content_block"]["type"]
            assert open_block in DELTAS_FOR_BLOCK, f"{where}: unknown block type {open_block}"
            if open_block == "tool_use":
                block = data["content_block"]
                assert block["id"] and block["name"] and block["input"] == {}
                assert all(c.isalnum() or c in "_-" for c in block["id"]), f"{where}: bad tool id {block['id']}"
            if open_block == "redacted_thinking":
                assert data["content_block"]["data"], f"{where}: redacted thinking without its data"
            arguments, signed = "", False
            state = "in_block"
        elif name == "content_block_delta":
            assert state == "in_block", f"{where}: a delta outside any block"
            assert data["index"] == next_index, f"{where}: delta for block {data['index']}, open is {next_index}"
            kind = data["delta"]["type"]
            assert kind in DELTAS_FOR_BLOCK[open_block], f"{where}: {kind} inside a {open_block} block"
            if kind == "signature_delta":
                signed = True
            elif kind == "thinking_delta":
                assert not signed, f"{where}: thinking after the signature"
            elif kind == "input_json_delta":
                arguments += data["delta"]["partial_json"]
        elif name == "content_block_stop":
            assert state == "in_block" and data["index"] == next_index, f"{where}: stop for a block not open"
            if open_block == "tool_use":
                assert isinstance(json.loads(arguments), dict), f"{where}: tool input is not a JSON object"
            if open_block == "thinking":
                assert signed, f"{where}: a thinking block ends without its signature_delta"
            next_index += 1
            open_block = None
            state = "message"
        elif name == "message_delta":
            assert state == "message", f"{where}: message_delta while a block is open"
            assert data["delta"]["stop_reason"] in STOP_REASONS, f"{where}: stop_reason {data['delta']}"
            assert isinstance(data["usage"]["output_tokens"], int)
            state = "delta_sent"
        elif name == "message_stop":
            assert state == "delta_sent", f"{where}: message_stop before message_delta"
            state = "done"
        else:
            raise AssertionError(f"{where}: unknown event")
    assert state in ("done", "error"), f"the stream ended without message_stop or error (state {state})"
    return frames
