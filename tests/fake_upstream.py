"""Scriptable fake LLM provider for tests (pure stdlib, no gevent/flask).

Speaks the real streaming wire protocols, byte-compatible with what the
official ``openai`` / ``@anthropic-ai/sdk`` SDKs (as used by pi-ai) parse:

    POST /v1/chat/completions   OpenAI Chat Completions  (``data: {chunk}`` ... ``data: [DONE]``)
    POST /v1/messages           Anthropic Messages       (``event: X`` / ``data: {...}``)
    POST /v1/responses          OpenAI Responses         (``event: X`` / ``data: {..., sequence_number}``)
    POST .../models/M:streamGenerateContent   Google Generative AI   (``data: {GenerateContentResponse}``;
                                :generateContent answers whole). Strict as Gemini 3 is: in the current
                                turn, a model step's first functionCall must carry its thoughtSignature
                                (400 INVALID_ARGUMENT otherwise). Tool calls carry their ids, and the
                                first one of a step the signature (reasoning_signature, else generated).

Any other path -> 404 (OpenAI error shape); it is still recorded but does not consume a reply.
Streams use HTTP/1.1 chunked transfer encoding (keep-alive), like the real APIs.

baseUrl to give pi-ai for each model ``api`` (the SDKs append the path):
    "openai-completions"  -> fake.base_url + "/v1"   (openai SDK appends /chat/completions)
    "openai-responses"    -> fake.base_url + "/v1"   (openai SDK appends /responses)
    "anthropic-messages"  -> fake.base_url           (anthropic SDK appends /v1/messages;
                                                       with "/v1" you get /v1/v1/messages -> 404)
    "google-generative-ai" -> fake.base_url + "/v1beta"

API::

    from tests.fake_upstream import FakeUpstream, Reply
    fake = FakeUpstream(); fake.start()      # or: with FakeUpstream() as fake: ...
    fake.base_url                            # "http://127.0.0.1:PORT"
    fake.push(Reply(...), Reply(...))        # FIFO, one reply consumed per request
    fake.default = Reply(text="Hello from fake")   # used when the queue is empty
    fake.requests                            # [Recorded(path, headers, body, time)] headers lowercased,
                                             #   body = parsed JSON (raw str if not JSON)
    fake.disconnects                         # [Recorded] of requests whose client went away mid-reply;
                                             #   .time = time.monotonic() when the fake noticed
    fake.wait_for_disconnect(timeout=2.0, count=1) -> bool
    fake.wait_for_requests(count=1, timeout=2.0) -> bool
    fake.reset()                             # clear queue, requests, disconnects, refusals; default back to Hello
    fake.output_limits                       # {model id: max output tokens}: as the real APIs, a request
                                             #   asking more (max_tokens, max_completion_tokens,
                                             #   max_output_tokens) is a 400 in the API's shape; it is
                                             #   recorded but consumes no reply
    fake.refusals                            # [message] of the requests refused with a 400 as the real API
                                             #   would refuse them (output_limits, _REFUSALS, _missing_reasoning);
                                             #   none consumes a reply
    fake.issued                              # thinking signatures and redacted data sent out (never reset):
                                             #   the Anthropic fake accepts only these back
    fake.pending                             # number of queued replies not yet consumed
    fake.port
    fake.stop()                              # fast; also drops open connections

Reply fields (all optional):
    text                str, streamed as several deltas (split after whitespace, i.e. by words)
    chunks              int, split ``text`` into exactly this many deltas instead (near-equal
                        lengths; ValueError if text is shorter). For benchmarks, e.g.
                        Reply(text="x " * 8000, chunks=16000). Deltas are generated from a
                        pre-serialised template, so 16k deltas cost ~tens of ms.
    reasoning           str, streamed first as reasoning: chat ``delta.reasoning_content``,
                        anthropic ``thinking`` block, responses ``reasoning`` item (summary text)
    reasoning_signature str, anthropic ``signature_delta`` / responses ``encrypted_content``
                        (default: a generated "fakesig-..." value when reasoning is set)
    redacted_thinking   str, anthropic only: a ``redacted_thinking`` block with this ``data`` first
    tool_calls          [(id, name, arguments_json_str_or_dict)], arguments streamed in ~3 fragments.
                        chat: tool_calls[].id; anthropic: tool_use.id; responses: call_id
                        (pi-ai then reports the id as "<call_id>|fc_<...>").
    whole_tool_calls    bool, responses only: a call's arguments arrive only whole, in
                        ``response.output_item.done`` (no argument delta/done events), as some
                        servers send them; pi-ai then emits no ``toolcall_delta`` for the call.
    stop                "stop" | "length" | "tool_calls" | "stop_sequence";
                        default "tool_calls" if tool_calls else "stop". Mapping:
                          chat:      stop / length / tool_calls / stop
                          anthropic: end_turn / max_tokens / tool_use / stop_sequence (+stop_sequence "STOP")
                          responses: response.completed / response.incomplete
                                     (incomplete_details.reason "max_output_tokens") / completed / completed
                        Other strings are sent verbatim as chat finish_reason / anthropic stop_reason
                        (ValueError for responses).
    usage               dict(input=10, output=20, cached=0, cache_write=0, reasoning=0), in pi-ai
                        terms: ``input`` = NON-cached input tokens, so pi-ai's usage.input == input
                        for all three APIs. Wire: chat prompt_tokens = input+cached,
                        prompt_tokens_details.cached_tokens = cached, completion_tokens = output;
                        anthropic input_tokens = input, cache_read_input_tokens = cached,
                        cache_creation_input_tokens = cache_write, output_tokens = output;
                        responses input_tokens = input+cached, cached_tokens = cached,
                        output_tokens = output, reasoning_tokens = reasoning. (The chat usage
                        chunk is only sent if the request asked stream_options.include_usage.)
    status              int (default 200). != 200 -> JSON error reply instead of a stream, in the
                        API's own error shape: OpenAI {"error":{"message","type","param","code"}},
                        Anthropic {"type":"error","error":{"type","message"},"request_id"}.
    error_body          dict (sent as JSON) or str/bytes (sent verbatim as text/plain, or text/html
                        if it starts with "<"), replaces the default error body.
    headers             dict, extra response headers (error or stream), e.g. {"retry-after": "7"}.
    delay               float seconds between SSE events (0 -> events are batched into big writes;
                        non-streaming JSON: waited once before the body).
    first_byte_delay    float seconds to wait before sending the status line/headers.
    hang_after_headers  bool, send 200 + headers, then nothing until the client disconnects
                        (or fake.stop()).
    stall               (N, seconds): after the first N SSE events, go silent for that long once,
                        then send the rest
    hang_after          int, send the first N SSE events (counted like cut_after), then go silent
                        with the connection open until the client disconnects (or fake.stop()).
    cut_after           int, send only the first N SSE events (every event counts, incl.
                        anthropic ping and the chat role chunk), then close the socket without
                        the terminating zero-length chunk (client sees a truncated body).
    cut_clean           bool, with cut_after: end the HTTP body properly (zero-length chunk, the
                        connection stays usable) - the SSE stream just lacks its terminal events.
    malformed_after     int, the SSE event after the first N (counted like cut_after) is sent with
                        its ``data:`` JSON cut in half (its ``event:`` line kept), then the rest
                        follows normally: a malformed SSE line in an otherwise healthy stream.
    stream_error        str, after the content send the API's in-stream error event instead of the
                        normal ending: chat ``data: {"error":{...}}``; anthropic ``event: error``
                        (overloaded_error); responses ``response.failed`` (code server_error).
    raw                 bytes, sent verbatim as the whole response (e.g. not HTTP), then close.
    json_response       bool, reply with a non-streaming JSON body (also done automatically when
                        the request body does not have ``"stream": true``).
    model               str, model name to report (default: echo the request's "model").

Strict where the real APIs are (a fake that accepts what they reject hides bugs):
    responses: a ``function_call`` input item whose id this fake made together with a reasoning item
               is refused (400, OpenAI's wording) unless that reasoning item (by id) is in the input
               too: OpenAI's rule for replayed reasoning models' tool calls.

Observed pi-ai 0.73.1 behaviour (see tests/test_fake_upstream.py): HTTP errors read
"<status> <error.message>" for the OpenAI APIs but "<status> <whole JSON body>" for Anthropic;
refused/garbage -> "Connection error."; abrupt cut -> "terminated"; a *clean* early end is an error
only for Anthropic ("Anthropic stream ended before message_stop") - the OpenAI APIs report a normal
stop; openai-responses ignores ``response.incomplete`` (max_output_tokens) -> stopReason "stop", usage 0.

Disconnect detection: while sleeping (first_byte_delay, delay, hang) the socket is polled every
50 ms with select() + recv(MSG_PEEK) == b""; while writing, BrokenPipe/ConnectionReset count too.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import itertools
import json
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

__all__ = ["FakeUpstream", "Reply", "Recorded"]

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
RESPONSES_PATH = "/v1/responses"

_DEFAULT_USAGE = {"input": 10, "output": 20, "cached": 0, "cache_write": 0, "reasoning": 0}
_POLL = 0.05
_BATCH_BYTES = 64 * 1024


@dataclass
class Reply:
    text: str = ""
    reasoning: str = ""
    reasoning_signature: str | None = None
    redacted_thinking: str | None = None
    tool_calls: list = field(default_factory=list)
    stop: str | None = None
    usage: dict | None = None
    status: int = 200
    error_body: dict | str | bytes | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    first_byte_delay: float = 0.0
    hang_after_headers: bool = False
    hang_after: int | None = None
    stall: tuple | None = None
    cut_after: int | None = None
    cut_clean: bool = False
    malformed_after: int | None = None
    stream_error: str | None = None
    raw: bytes | None = None
    json_response: bool = False
    chunks: int | None = None
    model: str | None = None
    whole_tool_calls: bool = False


@dataclass
class Recorded:
    path: str
    headers: dict
    body: Any
    time: float = 0.0
    method: str = "POST"


# --------------------------------------------------------------------------- helpers

_SENTINEL = "__FAKE_UPSTREAM_DELTA__"


class _Template:
    """Pre-serialised JSON with one string slot: fast per-delta framing."""

    def __init__(self, head: bytes, obj: Any):
        s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        pre, post = s.split(json.dumps(_SENTINEL), 1)
        self.pre = head + pre.encode()
        self.post = post.encode() + b"\n\n"

    def __call__(self, value: str) -> bytes:
        return self.pre + json.dumps(value, ensure_ascii=False).encode() + self.post


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(event: str | None, obj: Any) -> bytes:
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + _dumps(obj) + b"\n\n"


def _malformed(event: bytes) -> bytes:
    """The same SSE event with its data's JSON cut in half."""
    head, _, data = event.rstrip(b"\n").partition(b"data: ")
    return head + b"data: " + data[: len(data) // 2] + b"\n\n"


def _split_words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text) if text else []


def _split_n(text: str, n: int) -> list[str]:
    if n <= 0:
        raise ValueError("chunks must be >= 1")
    if len(text) < n:
        raise ValueError(f"text has {len(text)} characters, fewer than chunks={n}")
    L = len(text)
    return [text[i * L // n:(i + 1) * L // n] for i in range(n)]


def _split_args(args: str, parts: int = 3) -> list[str]:
    if len(args) <= 1:
        return [args]
    parts = min(parts, len(args))
    return _split_n(args, parts)


def _hex(seed: str, n: int = 24) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()[:n]


class _Plan:
    """A Reply resolved for one request."""

    def __init__(self, reply: Reply, body: Any, seq: int, reasoning_of: dict | None = None):
        self.r = reply
        self.reasoning_of = {} if reasoning_of is None else reasoning_of  # filled with the calls made
        self.body = body if isinstance(body, dict) else {}
        self.model = reply.model or self.body.get("model") or "fake-model"
        self.seed = f"{seq}-{time.time_ns()}"
        self.created = int(time.time())
        self.text_pieces = _split_n(reply.text, reply.chunks) if reply.chunks else _split_words(reply.text)
        self.reasoning_pieces = _split_words(reply.reasoning)
        self.signature = reply.reasoning_signature
        if self.signature is None and reply.reasoning:
            self.signature = "fakesig-" + _hex(self.seed + "sig", 32)
        self.tools = [(str(i), str(n), a if isinstance(a, str) else json.dumps(a)) for i, n, a in reply.tool_calls]
        self.stop = reply.stop or ("tool_calls" if self.tools else "stop")
        u = dict(_DEFAULT_USAGE)
        u.update(reply.usage or {})
        self.usage = u

    # ---------------------------------------------------------------- chat completions

    def _chat_finish(self) -> str:
        return {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "stop_sequence": "stop"}.get(
            self.stop, self.stop)

    def _chat_usage(self) -> dict:
        u = self.usage
        prompt = u["input"] + u["cached"]
        return {
            "prompt_tokens": prompt,
            "completion_tokens": u["output"],
            "total_tokens": prompt + u["output"],
            "prompt_tokens_details": {"cached_tokens": u["cached"], "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": u["reasoning"], "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }

    def chat_events(self) -> Iterator[bytes]:
        include_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        base = {"id": "chatcmpl-" + _hex(self.seed), "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "service_tier": "default", "system_fingerprint": "fp_fake"}

        def chunk(delta: dict, finish=None) -> dict:
            c = dict(base)
            c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if include_usage:
                c["usage"] = None
            return c

        yield _sse(None, chunk({"role": "assistant", "content": "", "refusal": None}))
        if self.reasoning_pieces:
            t = _Template(b"data: ", chunk({"reasoning_content": _SENTINEL}))
            for p in self.reasoning_pieces:
                yield t(p)
        if self.text_pieces:
            t = _Template(b"data: ", chunk({"content": _SENTINEL}))
            for p in self.text_pieces:
                yield t(p)
        for i, (tid, name, args) in enumerate(self.tools):
            yield _sse(None, chunk({"tool_calls": [{"index": i, "id": tid, "type": "function",
                                                    "function": {"name": name, "arguments": ""}}]}))
            for frag in _split_args(args):
                if frag:
                    yield _sse(None, chunk({"tool_calls": [{"index": i, "function": {"arguments": frag}}]}))
        if self.r.stream_error is not None:
            yield _sse(None, {"error": {"message": self.r.stream_error, "type": "server_error",
                                        "param": None, "code": None}})
            return
        yield _sse(None, chunk({}, self._chat_finish()))
        if include_usage:
            c = dict(base)
            c["choices"] = []
            c["usage"] = self._chat_usage()
            yield _sse(None, c)
        yield b"data: [DONE]\n\n"

    def chat_json(self) -> dict:
        msg: dict = {"role": "assistant", "content": self.r.text or None, "refusal": None, "annotations": []}
        if self.r.reasoning:
            msg["reasoning_content"] = self.r.reasoning
        if self.tools:
            msg["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                 for i, n, a in self.tools]
        return {"id": "chatcmpl-" + _hex(self.seed), "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "message": msg, "logprobs": None,
                                                  "finish_reason": self._chat_finish()}],
                "usage": self._chat_usage(), "service_tier": "default", "system_fingerprint": "fp_fake"}

    # ---------------------------------------------------------------- anthropic messages

    def _anth_stop(self) -> tuple[str, str | None]:
        m = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "stop_sequence": "stop_sequence"}
        sr = m.get(self.stop, self.stop)
        return sr, ("STOP" if sr == "stop_sequence" else None)

    def _anth_msg(self, content: list, stop_reason, stop_sequence, output_tokens) -> dict:
        u = self.usage
        return {"id": "msg_" + _hex(self.seed), "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": u["input"], "cache_creation_input_tokens": u["cache_write"],
                          "cache_read_input_tokens": u["cached"], "output_tokens": output_tokens,
                          "service_tier": "standard"}}

    def _anth_block(self, idx: int, content_block: dict, deltas) -> Iterator[bytes]:
        yield _sse("content_block_start", {"type": "content_block_start", "index": idx, "content_block": content_block})
        if idx == 0:
            yield _sse("ping", {"type": "ping"})  # where Anthropic sends it: after the first block starts
        yield from deltas
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": idx})

    @staticmethod
    def _anth_deltas(idx: int, delta_type: str, field: str, pieces) -> Iterator[bytes]:
        t = _Template(b"event: content_block_delta\ndata: ",
                      {"type": "content_block_delta", "index": idx, "delta": {"type": delta_type, field: _SENTINEL}})
        return (t(p) for p in pieces)

    def anthropic_events(self) -> Iterator[bytes]:
        yield _sse("message_start", {"type": "message_start", "message": self._anth_msg([], None, None, 1)})
        idx = 0
        if self.r.redacted_thinking:
            yield from self._anth_block(idx, {"type": "redacted_thinking", "data": self.r.redacted_thinking}, [])
            idx += 1
        if self.r.reasoning:
            signature = _sse("content_block_delta", {"type": "content_block_delta", "index": idx,
                                                     "delta": {"type": "signature_delta", "signature": self.signature}})
            yield from self._anth_block(idx, {"type": "thinking", "thinking": "", "signature": ""}, itertools.chain(
                self._anth_deltas(idx, "thinking_delta", "thinking", self.reasoning_pieces), [signature]))
            idx += 1
        if self.text_pieces:
            yield from self._anth_block(idx, {"type": "text", "text": ""},
                                        self._anth_deltas(idx, "text_delta", "text", self.text_pieces))
            idx += 1
        for tid, name, args in self.tools:
            yield from self._anth_block(idx, {"type": "tool_use", "id": tid, "name": name, "input": {}}, (
                _sse("content_block_delta", {"type": "content_block_delta", "index": idx,
                                             "delta": {"type": "input_json_delta", "partial_json": frag}})
                for frag in [""] + _split_args(args)))
            idx += 1
        if idx == 0:
            yield _sse("ping", {"type": "ping"})
        if self.r.stream_error is not None:
            yield _sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": self.r.stream_error}})
            return
        sr, ss = self._anth_stop()
        yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": sr, "stop_sequence": ss},
                                     "usage": {"output_tokens": self.usage["output"]}})
        yield _sse("message_stop", {"type": "message_stop"})

    def anthropic_json(self) -> dict:
        content: list = []
        if self.r.redacted_thinking:
            content.append({"type": "redacted_thinking", "data": self.r.redacted_thinking})
        if self.r.reasoning:
            content.append({"type": "thinking", "thinking": self.r.reasoning, "signature": self.signature})
        if self.r.text:
            content.append({"type": "text", "text": self.r.text})
        for tid, name, args in self.tools:
            try:
                inp = json.loads(args) if args else {}
            except ValueError:
                inp = {}
            content.append({"type": "tool_use", "id": tid, "name": name, "input": inp})
        sr, ss = self._anth_stop()
        return self._anth_msg(content, sr, ss, self.usage["output"])

    # ---------------------------------------------------------------- openai responses

    def _resp_status(self) -> str:
        m = {"stop": "completed", "stop_sequence": "completed", "tool_calls": "completed",
             "length": "incomplete", "incomplete": "incomplete"}
        if self.stop not in m:
            raise ValueError(f"stop={self.stop!r} is not supported for the responses API")
        return m[self.stop]

    def _resp_usage(self) -> dict:
        u = self.usage
        inp = u["input"] + u["cached"]
        return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": u["cached"]},
                "output_tokens": u["output"], "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
                "total_tokens": inp + u["output"]}

    def _resp_obj(self, status: str, output: list, usage: dict | None) -> dict:
        b = self.body
        return {"id": "resp_" + _hex(self.seed, 32), "object": "response", "created_at": self.created,
                "status": status, "background": False, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
                "model": self.model, "output": output, "parallel_tool_calls": True,
                "previous_response_id": None, "reasoning": b.get("reasoning") or {"effort": None, "summary": None},
                "service_tier": "default", "store": bool(b.get("store", False)),
                "temperature": b.get("temperature", 1.0), "text": {"format": {"type": "text"}, "verbosity": "medium"},
                "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [], "top_p": 1.0,
                "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}

    def _resp_items(self, final_status: str) -> list[dict]:
        items = []
        if self.r.reasoning:
            items.append({"id": "rs_" + _hex(self.seed + "rs", 32), "type": "reasoning",
                          "encrypted_content": self.signature,
                          "summary": [{"type": "summary_text", "text": self.r.reasoning}]})
        if self.r.text:
            items.append({"id": "msg_" + _hex(self.seed + "msg", 32), "type": "message",
                          "status": "completed", "role": "assistant",
                          "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                                       "text": self.r.text}]})
        for k, (tid, name, args) in enumerate(self.tools):
            items.append({"id": "fc_" + _hex(self.seed + f"fc{k}", 32), "type": "function_call",
                          "status": "completed", "arguments": args, "call_id": tid, "name": name})
            if self.r.reasoning:
                self.reasoning_of[items[-1]["id"]] = items[0]["id"]
        if final_status == "incomplete" and items and "status" in items[-1]:
            items[-1]["status"] = "incomplete"
        return items

    def responses_events(self) -> Iterator[bytes]:
        status = self._resp_status()
        items = self._resp_items(status)
        seq = 0

        def ev(obj: dict) -> bytes:
            nonlocal seq
            obj["sequence_number"] = seq
            seq += 1
            return _sse(obj["type"], obj)

        def templ(obj: dict) -> _Template:
            obj = dict(obj)
            obj["sequence_number"] = -1
            head = b"event: " + obj["type"].encode() + b"\ndata: "
            s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
            pre, post = s.split(json.dumps(_SENTINEL), 1)
            pre_b, post_b = pre.encode(), post.encode()
            mid_pre, mid_post = post_b.split(b'"sequence_number":-1', 1)

            def f(value: str) -> bytes:
                nonlocal seq
                out = (head + pre_b + json.dumps(value, ensure_ascii=False).encode() + mid_pre
                       + b'"sequence_number":' + str(seq).encode() + mid_post + b"\n\n")
                seq += 1
                return out
            return f  # type: ignore[return-value]

        yield ev({"type": "response.created", "response": self._resp_obj("in_progress", [], None)})
        yield ev({"type": "response.in_progress", "response": self._resp_obj("in_progress", [], None)})
        for oi, item in enumerate(items):
            iid = item["id"]
            if item["type"] == "reasoning":
                yield ev({"type": "response.output_item.added", "output_index": oi,
                          "item": {"id": iid, "type": "reasoning", "summary": []}})
                part0 = {"type": "summary_text", "text": ""}
                yield ev({"type": "response.reasoning_summary_part.added", "item_id": iid, "output_index": oi,
                          "summary_index": 0, "part": part0})
                t = templ({"type": "response.reasoning_summary_text.delta", "item_id": iid, "output_index": oi,
                           "summary_index": 0, "delta": _SENTINEL})
                for p in self.reasoning_pieces:
                    yield t(p)
                full = self.r.reasoning
                yield ev({"type": "response.reasoning_summary_text.done", "item_id": iid, "output_index": oi,
                          "summary_index": 0, "text": full})
                yield ev({"type": "response.reasoning_summary_part.done", "item_id": iid, "output_index": oi,
                          "summary_index": 0, "part": {"type": "summary_text", "text": full}})
                yield ev({"type": "response.output_item.done", "output_index": oi, "item": item})
            elif item["type"] == "message":
                yield ev({"type": "response.output_item.added", "output_index": oi,
                          "item": {"id": iid, "type": "message", "status": "in_progress", "content": [],
                                   "role": "assistant"}})
                yield ev({"type": "response.content_part.added", "item_id": iid, "output_index": oi,
                          "content_index": 0,
                          "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}})
                t = templ({"type": "response.output_text.delta", "item_id": iid, "output_index": oi,
                           "content_index": 0, "delta": _SENTINEL, "logprobs": []})
                for p in self.text_pieces:
                    yield t(p)
                full = self.r.text
                yield ev({"type": "response.output_text.done", "item_id": iid, "output_index": oi,
                          "content_index": 0, "text": full, "logprobs": []})
                yield ev({"type": "response.content_part.done", "item_id": iid, "output_index": oi,
                          "content_index": 0, "part": item["content"][0]})
                yield ev({"type": "response.output_item.done", "output_index": oi, "item": item})
            else:
                yield ev({"type": "response.output_item.added", "output_index": oi,
                          "item": {"id": iid, "type": "function_call", "status": "in_progress", "arguments": "",
                                   "call_id": item["call_id"], "name": item["name"]}})
                for frag in [] if self.r.whole_tool_calls else _split_args(item["arguments"]):
                    if frag:
                        yield ev({"type": "response.function_call_arguments.delta", "item_id": iid,
                                  "output_index": oi, "delta": frag})
                if not self.r.whole_tool_calls:
                    yield ev({"type": "response.function_call_arguments.done", "item_id": iid,
                              "output_index": oi, "name": item["name"], "arguments": item["arguments"]})
                yield ev({"type": "response.output_item.done", "output_index": oi, "item": item})
        if self.r.stream_error is not None:
            resp = self._resp_obj("failed", items, None)
            resp["error"] = {"code": "server_error", "message": self.r.stream_error}
            yield ev({"type": "response.failed", "response": resp})
            return
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield ev({"type": kind, "response": self._resp_obj(status, items, self._resp_usage())})

    def responses_json(self) -> dict:
        status = self._resp_status()
        return self._resp_obj(status, self._resp_items(status), self._resp_usage())

    # ---------------------------------------------------------------- google generative ai

    def _google_parts(self) -> list[dict]:
        parts = [{"text": piece, "thought": True} for piece in self.reasoning_pieces]
        parts += [{"text": piece} for piece in self.text_pieces]
        generated = base64.b64encode(f"fakesig-{_hex(self.seed + 'ts')}".encode()).decode()
        signature = self.r.reasoning_signature or generated
        for k, (tid, name, args) in enumerate(self.tools):
            part = {"functionCall": {"id": tid, "name": name, "args": json.loads(args or "{}")}}
            parts.append({**part, "thoughtSignature": signature} if k == 0 else part)
        return parts

    def _google_response(self, parts: list[dict], last: bool) -> dict:
        u = self.usage
        candidate = {"content": {"parts": parts, "role": "model"}, "index": 0}
        response = {"candidates": [candidate], "modelVersion": self.model, "responseId": "gresp-" + _hex(self.seed, 20)}
        if last:
            candidate["finishReason"] = "MAX_TOKENS" if self.stop == "length" else "STOP"
            prompt = u["input"] + u["cached"]
            response["usageMetadata"] = {"promptTokenCount": prompt, "candidatesTokenCount": u["output"],
                                         "cachedContentTokenCount": u["cached"], "thoughtsTokenCount": u["reasoning"],
                                         "totalTokenCount": prompt + u["output"] + u["reasoning"]}
        return response

    def google_events(self) -> Iterator[bytes]:
        parts = self._google_parts()
        for k, part in enumerate(parts):
            yield _sse(None, self._google_response([part], k == len(parts) - 1))
        if not parts:
            yield _sse(None, self._google_response([], True))

    def google_json(self) -> dict:
        return self._google_response(self._google_parts(), True)


_GOOGLE_PATH = re.compile(r"/models/([^/:]+):(streamGenerateContent|generateContent)$")


def _missing_thought_signature(body: dict) -> str | None:
    """Gemini 3's 400 for a function call of the current turn (since the last user text) whose step
    lost its thoughtSignature: only the first functionCall of a step carries one."""
    if not body.get("model", "").startswith("gemini-3"):
        return None
    contents = body.get("contents") or []
    starts = [i for i, c in enumerate(contents)
              if c.get("role") == "user" and any("text" in p for p in c.get("parts", []))]
    for position, content in enumerate(contents[starts[-1] if starts else 0:]):
        calls = [p for p in content.get("parts", []) if "functionCall" in p] if content.get("role") == "model" else []
        if calls and not calls[0].get("thoughtSignature"):
            name = calls[0]["functionCall"].get("name")
            return (f"Function call is missing a thought_signature in functionCall parts. This is required for tools "
                    f"to work correctly. Additional data, function call `default_api:{name}`, position {position + 1}.")
    return None


# --------------------------------------------------------------------------- strictness


def _anthropic_refusal(body: dict, issued: set) -> dict | None:
    message = _anthropic_history_error(body, issued)
    return message and {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


def _anthropic_history_error(body: dict, issued: set) -> str | None:
    """The message of the real Messages API's 400 for a history it rejects, or None: a
    `tool_result` not answering a `tool_use` of the message just before it, a `tool_use` left
    unanswered by the next message, a thinking block without a signature or with one this fake
    did not issue (Anthropic checks its signatures), and, when thinking is on, a tool loop whose
    assistant turn does not start with its thinking block."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    blocks = [m["content"] if isinstance(m.get("content"), list) else [] for m in messages]
    for i, content in enumerate(blocks):
        uses = [b.get("id") for b in blocks[i - 1] if b.get("type") == "tool_use"] if i else []
        answered = {b.get("tool_use_id") for b in content if b.get("type") == "tool_result"}
        unanswered = [use for use in uses if use not in answered]
        if unanswered:
            return (f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(unanswered)}. Each `tool_use` block must have a corresponding `tool_result` block "
                    "in the next message.")
        for j, block in enumerate(content):
            kind, where = block.get("type"), f"messages.{i}.content.{j}"
            if kind == "tool_result" and block.get("tool_use_id") not in uses:
                return (f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {block.get('tool_use_id')}. "
                        "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")
            if kind == "thinking" and not block.get("signature"):
                return f"{where}.thinking.signature: Field required"
            if kind == "thinking" and block["signature"] not in issued:
                return f"{where}: Invalid `signature` in `thinking` block"
            if kind == "redacted_thinking" and block.get("data") not in issued:
                return f"{where}: Invalid `data` in `redacted_thinking` block"
    thinking = (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    if thinking and len(messages) >= 2 and any(b.get("type") == "tool_result" for b in blocks[-1]):
        first = (blocks[-2] or [{"type": "text"}])[0].get("type")
        if first not in ("thinking", "redacted_thinking"):
            return (f"messages.{len(messages) - 2}.content.0.type: Expected `thinking` or `redacted_thinking`, but "
                    f"found `{first}`. When `thinking` is enabled, a final `assistant` message must start with a "
                    "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks). We recommend "
                    "you include thinking blocks from previous turns. To avoid this requirement, disable `thinking`.")
    return None


def _google_refusal(body: dict, issued: set) -> dict | None:
    message = _missing_thought_signature(body)
    return message and _google_error(400, message)


# What each API's real server refuses before answering: api -> (body, signatures issued) -> its 400 body | None.
_REFUSALS = {"anthropic": _anthropic_refusal, "google": _google_refusal}


# GitHub Copilot serves the OpenAI APIs without the /v1 prefix.
_APIS = {CHAT_PATH: "chat", MESSAGES_PATH: "anthropic", RESPONSES_PATH: "responses",
         "/chat/completions": "chat", "/responses": "responses"}

_OPENAI_ERRORS = {
    400: ("invalid_request_error", "invalid_request", "Invalid request (fake upstream)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: sk-fake. You can find your "
          "API key at https://platform.openai.com/account/api-keys."),
    403: ("invalid_request_error", "unsupported_country_region_territory",
          "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found",
          "The model `{model}` does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for {model} in organization org-fake on "
          "requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 7s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
    529: ("server_error", "overloaded", "The server is overloaded, please try again later."),
}
_ANTHROPIC_ERRORS = {
    400: ("invalid_request_error", "Invalid request (fake upstream)."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "model: {model}"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "This request would exceed the rate limit for your organization of 50 "
          "input tokens per minute. Please try again later."),
    500: ("api_error", "Internal server error"),
    503: ("api_error", "Service unavailable"),
    529: ("overloaded_error", "Overloaded"),
}


_OUTPUT_FIELDS = {"chat": ("max_completion_tokens", "max_tokens"), "anthropic": ("max_tokens",),
                  "responses": ("max_output_tokens",), "google": ("maxOutputTokens",)}


def _over_output_limit(api: str, body: Any, limits: dict) -> dict | None:
    """The real API's 400 body for a request asking more output tokens than its model can give."""
    if not isinstance(body, dict) or body.get("model") not in limits:
        return None
    model, limit = body["model"], limits[body["model"]]
    asking = body.get("generationConfig") or {} if api == "google" else body
    for name in _OUTPUT_FIELDS[api]:
        asked = asking.get(name)
        if isinstance(asked, int) and asked > limit:
            if api == "google":
                return _google_error(400, f"The maximum number of output tokens ({name}) is {limit}; {asked} asked.")
            if api == "anthropic":
                return {"type": "error", "error": {"type": "invalid_request_error", "message": (
                    f"max_tokens: {asked} > {limit}, which is the maximum allowed number of output tokens "
                    f"for {model}")}}
            return {"error": {"message": f"{name} is too large: {asked}. This model supports at most {limit} "
                                         f"completion tokens, whereas you provided {asked}.",
                              "type": "invalid_request_error", "param": name, "code": "invalid_value"}}
    return None


def _google_error(status: int, message: str) -> dict:
    names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
             429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
    return {"error": {"code": status, "message": message, "status": names.get(status, "INTERNAL")}}


def _error_body(api: str, status: int, model: str) -> dict:
    if api == "google":
        return _google_error(status, f"Fake upstream error {status}")
    if api == "anthropic":
        typ, msg = _ANTHROPIC_ERRORS.get(status, ("api_error", f"Fake upstream error {status}"))
        return {"type": "error", "error": {"type": typ, "message": msg.format(model=model)},
                "request_id": "req_fake" + _hex(str(time.time_ns()), 16)}
    typ, code, msg = _OPENAI_ERRORS.get(status, ("server_error", None, f"Fake upstream error {status}"))
    return {"error": {"message": msg.format(model=model), "type": typ, "param": None, "code": code}}


# --------------------------------------------------------------------------- server


class _Gone(Exception):
    """The client went away (or the fake is stopping)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 512
    owner: "FakeUpstream"

    def handle_error(self, request, client_address):  # quiet: clients vanish all the time in tests
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, _Gone)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-upstream/1.0"
    sys_version = ""
    server: _Server

    def log_message(self, format, *args):  # noqa: A002
        pass

    def setup(self):
        super().setup()
        # As real API servers do: else a kept-alive connection's small writes wait for the
        # client's delayed ACK (40 ms) behind Nagle's algorithm.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def do_POST(self):
        self.server.owner._serve(self)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST


class _Conn:
    """Per-request I/O with disconnect detection."""

    def __init__(self, owner: "FakeUpstream", h: _Handler, rec: Recorded):
        self.owner, self.h, self.rec = owner, h, rec
        self.sock: socket.socket = h.connection
        self.gone = False

    def _mark_gone(self):
        if not self.gone:
            self.gone = True
            self.h.close_connection = True
            self.owner._record_disconnect(self.rec)

    def peer_closed(self) -> bool:
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds` (may be inf); raise _Gone if the peer closes or the fake stops."""
        end = time.monotonic() + seconds
        while True:
            if self.owner._stopping.is_set():
                self.h.close_connection = True
                raise _Gone()
            rem = end - time.monotonic()
            if rem <= 0:
                return
            try:
                r, _, _ = select.select([self.sock], [], [], min(rem, _POLL))
                data = self.sock.recv(1, socket.MSG_PEEK) if r else None
            except (OSError, ValueError):
                data = b""
            if data == b"":
                self._mark_gone()
                raise _Gone()
            if data:  # client sent more bytes (pipelining?) - do not spin
                time.sleep(min(rem, _POLL))

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
            self._mark_gone()
            raise _Gone() from None

    def send_head(self, status: int, headers: dict) -> None:
        h = self.h
        try:
            h.send_response_only(status)
            h.send_header("Date", h.date_time_string())
            for k, v in headers.items():
                h.send_header(k, str(v))
            h.end_headers()
        except OSError:
            self._mark_gone()
            raise _Gone() from None


class FakeUpstream:
    """Fake OpenAI / Anthropic / OpenAI-Responses upstream. See module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._host, self._port = host, port
        self.connections = 0  # connections accepted since start: how many a client opened
        self._queue: collections.deque[Reply] = collections.deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._seq = 0
        self.default = Reply(text="Hello from fake")
        self.requests: list[Recorded] = []
        self.refusals: list[str] = []  # what the fake refused, as the real API would have (_REFUSALS)
        self.issued: set[str] = set()  # thinking signatures and redacted data this fake sent out
        self.disconnects: list[Recorded] = []
        self.output_limits: dict[str, int] = {}
        self.reasoning_of: dict[str, str] = {}  # responses: function_call id -> its reasoning item's id
        self.base_url = ""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "FakeUpstream":
        if self._server is not None:
            return self
        self._stopping.clear()
        srv = _Server((self._host, self._port), _Handler)
        srv.owner = self
        self._server = srv
        self.port = srv.server_address[1]
        self.base_url = f"http://{self._host}:{self.port}"
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": _POLL},
                                         name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        srv = self._server
        if srv is None:
            return
        self._stopping.set()
        srv.shutdown()
        srv.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread:
            self._thread.join(timeout=2)
        self._server = None
        self._thread = None

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- scripting

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.disconnects.clear()
            self.refusals.clear()
            self.reasoning_of.clear()
            self.default = Reply(text="Hello from fake")

    @property
    def pending(self) -> int:
        """Number of queued replies not yet consumed."""
        with self._lock:
            return len(self._queue)

    def wait_for_disconnect(self, timeout: float = 2.0, count: int = 1) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.disconnects) >= count, timeout)

    def wait_for_requests(self, count: int = 1, timeout: float = 2.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= count, timeout)

    # ---------------------------------------------------------------- internals

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(sock)
            self.connections += add

    def _record_disconnect(self, rec: Recorded) -> None:
        with self._cond:
            self.disconnects.append(dataclasses.replace(rec, time=time.monotonic()))
            self._cond.notify_all()

    def _read_body(self, h: _Handler) -> bytes:
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            out = []
            while True:
                line = h.rfile.readline()
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out.append(h.rfile.read(n))
                h.rfile.readline()
            return b"".join(out)
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _serve(self, h: _Handler) -> None:
        raw_body = self._read_body(h)
        path = h.path.split("?", 1)[0]
        try:
            body: Any = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body.decode("utf-8", "replace")
        rec = Recorded(path=path, headers={k.lower(): v for k, v in h.headers.items()}, body=body,
                       time=time.monotonic(), method=h.command)
        api = _APIS.get(path) if h.command == "POST" else None
        google = _GOOGLE_PATH.search(path) if h.command == "POST" and isinstance(body, dict) else None
        if google:  # the model and whether to stream are in the path
            streaming = google.group(2) == "streamGenerateContent"
            api, body = "google", {**body, "model": google.group(1), "stream": streaming}
        refusal = api and (_over_output_limit(api, body, self.output_limits) or self._missing_reasoning(api, body)
                           or (api in _REFUSALS and isinstance(body, dict) and _REFUSALS[api](body, self.issued)))
        with self._cond:
            self.requests.append(rec)
            self._seq += 1
            seq = self._seq
            reply = None
            if api is not None and not refusal:  # a refused request consumes no reply
                reply = self._queue.popleft() if self._queue else self.default
            self._cond.notify_all()
        conn = _Conn(self, h, rec)
        try:
            if refusal:
                self.refusals.append(refusal["error"]["message"])
                self._send_json(conn, 400, refusal, {})
                return
            if reply is None:
                self._send_json(conn, 404, {"error": {"message": f"fake upstream: unknown path {h.command} {path}",
                                                      "type": "invalid_request_error", "param": None,
                                                      "code": "unknown_url"}}, {})
                return
            self._reply(conn, api, reply, body, seq)
        except _Gone:
            h.close_connection = True

    def _missing_reasoning(self, api: str, body: Any) -> dict | None:
        """OpenAI's 400 body for a function_call sent back without the reasoning item it came with."""
        if api != "responses" or not isinstance(body, dict) or not isinstance(body.get("input"), list):
            return None
        ids = {item.get("id") for item in body["input"] if isinstance(item, dict)}
        for item in body["input"]:
            if isinstance(item, dict) and item.get("type") == "function_call" and item.get("id") in self.reasoning_of:
                reasoning = self.reasoning_of[item["id"]]
                if reasoning not in ids:
                    return {"error": {"message": f"Item '{item['id']}' of type 'function_call' was provided without "
                                                 f"its required 'reasoning' item: '{reasoning}'.",
                                      "type": "invalid_request_error", "param": "input", "code": None}}
        return None

    def _send_json(self, conn: _Conn, status: int, obj: Any, extra: dict) -> None:
        data = _dumps(obj)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        headers.update(extra)
        conn.send_head(status, headers)
        conn.send(data)

    def _reply(self, conn: _Conn, api: str, r: Reply, body: Any, seq: int) -> None:
        h = conn.h
        if r.first_byte_delay:
            conn.wait(r.first_byte_delay)
        if r.raw is not None:
            conn.send(r.raw)
            h.close_connection = True
            return
        try:
            plan = _Plan(r, body, seq, self.reasoning_of)
            self.issued.update(filter(None, (plan.signature, r.redacted_thinking)))
        except ValueError as e:
            self._send_json(conn, 500, {"error": {"message": f"fake upstream: bad Reply: {e}",
                                                  "type": "server_error", "param": None, "code": None}}, {})
            return
        req_id = ("req_" if api == "anthropic" else "req-") + _hex(plan.seed, 24)
        id_header = {"request-id": req_id} if api == "anthropic" else {"x-request-id": req_id}
        if r.status != 200:
            err = r.error_body if r.error_body is not None else _error_body(api, r.status, plan.model)
            if isinstance(err, (str, bytes)):
                data = err.encode() if isinstance(err, str) else err
                ctype = "text/html" if data.lstrip().startswith(b"<") else "text/plain"
                conn.send_head(r.status, {"Content-Type": ctype, "Content-Length": str(len(data)),
                                          **id_header, **r.headers})
                conn.send(data)
                return
            self._send_json(conn, r.status, err, {**id_header, **r.headers})
            return
        streaming = isinstance(body, dict) and body.get("stream") is True and not r.json_response
        if not streaming and not r.hang_after_headers:
            try:
                obj = {"chat": plan.chat_json, "anthropic": plan.anthropic_json,
                       "responses": plan.responses_json, "google": plan.google_json}[api]()
            except ValueError as e:
                obj = {"error": {"message": f"fake upstream: bad Reply: {e}", "type": "server_error"}}
                self._send_json(conn, 500, obj, id_header)
                return
            if r.delay:
                conn.wait(r.delay)
            self._send_json(conn, 200, obj, {**id_header, **r.headers})
            return
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                   "Transfer-Encoding": "chunked", **id_header, **r.headers}
        if api == "responses":
            try:
                plan._resp_status()
            except ValueError as e:
                self._send_json(conn, 500, {"error": {"message": f"fake upstream: bad Reply: {e}",
                                                      "type": "server_error"}}, id_header)
                return
        conn.send_head(200, headers)
        if r.hang_after_headers:
            conn.wait(float("inf"))
            return  # not reached: wait(inf) only ends by raising _Gone
        events = {"chat": plan.chat_events, "anthropic": plan.anthropic_events,
                  "responses": plan.responses_events, "google": plan.google_events}[api]()
        limit = r.cut_after
        sent = 0
        buf: list[bytes] = []
        size = 0

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data)

        for data in events:
            if limit is not None and sent >= limit:
                break
            if r.hang_after is not None and sent >= r.hang_after:
                if buf:
                    conn.send(frame(b"".join(buf)))
                conn.wait(float("inf"))  # only ends by raising _Gone
            if r.delay and sent:
                conn.wait(r.delay)
            if r.stall and sent == r.stall[0]:
                if buf:
                    conn.send(frame(b"".join(buf)))
                    buf, size = [], 0
                conn.wait(r.stall[1])
            if sent == r.malformed_after:
                data = _malformed(data)
            sent += 1
            if r.delay:
                conn.send(frame(data))
            else:
                buf.append(data)
                size += len(data)
                if size >= _BATCH_BYTES:
                    conn.send(frame(b"".join(buf)))
                    buf, size = [], 0
        if buf:
            conn.send(frame(b"".join(buf)))
        if limit is not None and sent >= limit and not r.cut_clean:
            # abrupt end: no zero-length terminating chunk, just close the socket
            h.close_connection = True
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        conn.send(b"0\r\n\r\n")
