"""Unit tests of proxy.py's pure functions: configuration, model registry, translation."""

import base64
import functools
import json
from pathlib import Path

import pytest

import proxy
from proxy import ApiError

CATALOG = [
    {"id": "openai", "envKey": "OPENAI_API_KEY", "models": [
        {"id": "gpt-4o", "name": "GPT-4o", "api": "openai-responses", "provider": "openai",
         "baseUrl": "https://api.openai.com/v1", "reasoning": False, "input": ["text", "image"],
         "cost": {"input": 2.5, "output": 10, "cacheRead": 1.25, "cacheWrite": 0}, "contextWindow": 128000,
         "maxTokens": 16384, "compat": {"sendSessionIdHeader": True}},
        {"id": "gpt-5", "name": "GPT-5", "api": "openai-responses", "provider": "openai",
         "baseUrl": "https://api.openai.com/v1", "reasoning": True, "input": ["text"],
         "cost": {"input": 1, "output": 8, "cacheRead": 0.1, "cacheWrite": 0}, "contextWindow": 400000,
         "maxTokens": 128000}]},
    {"id": "anthropic", "envKey": None, "models": []},
]


# --- pi's config files --------------------------------------------------------------------------


def test_jsonc_allows_line_comments_and_trailing_commas_but_keeps_strings():
    text = '{\n // note\n "url": "http://a//b", "list": [1, 2,], // tail\n "s": "x,]"\n}'
    assert proxy.parse_jsonc(text) == {"url": "http://a//b", "list": [1, 2], "s": "x,]"}


def test_jsonc_rejects_block_comments_like_pi():
    with pytest.raises(ValueError):
        proxy.parse_jsonc('{/* no */ "a": 1}')


def test_config_value_resolution(monkeypatch):
    monkeypatch.setenv("MY_KEY_VAR", "from-env")
    assert proxy.resolve_config_value("MY_KEY_VAR") == "from-env"
    assert proxy.resolve_config_value("literal-key") == "literal-key"
    assert proxy.resolve_config_value("!echo '  from command  '") == "from command"
    assert proxy.resolve_config_value("!exit 3") is None


def test_load_config_flags_win_over_env(tmp_path):
    env = {"PI_PROXY_HOST": "0.0.0.0", "PI_PROXY_PORT": "5000", "PI_PROXY_MAX_BODY_SIZE": "10",
           "PI_PROXY_UPSTREAM_TIMEOUT_MS": "99", "PI_CODING_AGENT_DIR": str(tmp_path)}
    config = proxy.load_config(proxy.parse_command_line(["--port", "6000"]), env)
    assert (config.host, config.port, config.max_body_size, config.upstream_timeout_ms) == ("0.0.0.0", 6000, 10, 99)
    assert config.agent_dir == tmp_path and config.auth_token is None
    flag_over_env = proxy.load_config(proxy.parse_command_line(["--auth-token", "t"]), {"PI_PROXY_AUTH_TOKEN": "e"})
    assert flag_over_env.auth_token == "t"
    assert proxy.parse_command_line(["login"]).provider == "github-copilot"
    default = proxy.load_config(proxy.parse_command_line([]), {})
    assert (default.host, default.port) == ("127.0.0.1", 4141)
    assert default.agent_dir.name == "agent" and default.agent_dir.parent.name == ".pi"


# --- model registry ------------------------------------------------------------------------------


def test_builtin_provider_redirect_and_overrides():
    registry = proxy.build_registry(CATALOG, {"providers": {"openai": {
        "baseUrl": "http://local/v1", "compat": {"supportsLongCacheRetention": True},
        "headers": {"X-Team": "blue"},
        "modelOverrides": {"gpt-5": {"name": "Five", "cost": {"input": 9}, "headers": {"X-Model": "5"}}}}}})
    gpt4o, gpt5 = registry.models["openai/gpt-4o"], registry.models["openai/gpt-5"]
    assert gpt4o["baseUrl"] == gpt5["baseUrl"] == "http://local/v1"
    assert gpt4o["compat"] == {"sendSessionIdHeader": True, "supportsLongCacheRetention": True}
    assert gpt5["name"] == "Five" and gpt5["cost"] == {"input": 9, "output": 8, "cacheRead": 0.1, "cacheWrite": 0}
    assert registry.settings["openai"].headers == {"X-Team": "blue"}
    assert registry.model_headers["openai/gpt-5"] == {"X-Model": "5"}


def test_custom_model_replaces_builtin_whole_and_new_ones_get_defaults():
    registry = proxy.build_registry(CATALOG, {"providers": {
        "openai": {"models": [{"id": "gpt-4o", "name": "mine"}]},
        "local": {"baseUrl": "http://x/v1", "api": "openai-completions", "apiKey": "k",
                  "models": [{"id": "llama", "reasoning": True}, {"id": "other", "api": "anthropic-messages"}]}}})
    replaced = registry.models["openai/gpt-4o"]
    assert replaced["name"] == "mine" and replaced["input"] == ["text"] and replaced["cost"]["input"] == 0
    assert replaced["api"] == "openai-responses", "api defaults to the provider's first built-in model's"
    llama = registry.models["local/llama"]
    assert llama["reasoning"] is True and llama["contextWindow"] == 128000 and llama["maxTokens"] == 16384
    assert llama["provider"] == "local" and llama["baseUrl"] == "http://x/v1" and llama["api"] == "openai-completions"
    assert registry.models["local/other"]["api"] == "anthropic-messages"
    assert "openai/gpt-5" in registry.models
    assert registry.settings["local"].api_key == "k"


@pytest.mark.parametrize("config,problem", [
    ([], "providers"),
    ({"providers": {"x": {"baseUrl": "u", "api": "openai-completions", "models": [{"id": "m"}]}}}, "apiKey"),
    ({"providers": {"x": {"apiKey": "k", "api": "openai-completions", "models": [{"id": "m"}]}}}, "baseUrl"),
    ({"providers": {"x": {"baseUrl": "u", "apiKey": "k", "models": [{"id": "m"}]}}}, "api"),
    ({"providers": {"x": {"apiKey": "k"}}}, "must specify"),
    ({"providers": {"openai": {"models": [{"name": "no id"}]}}}, "id"),
    ({"providers": {"openai": {"models": [{"id": "m", "maxTokens": 0}]}}}, "maxTokens"),
])
def test_models_json_validation(config, problem):
    with pytest.raises(proxy.ModelsJsonError, match=problem):
        proxy.check_models_json(config, {"openai", "anthropic"})


def test_malformed_models_json_is_reported_and_builtins_survive(tmp_path):
    (tmp_path / "models.json").write_text('{"providers": {"x": ')
    data, problem = proxy.read_models_json(tmp_path, {"openai"})
    assert data is None and "models.json was not loaded" in problem and "Built-in models" in problem
    assert "openai/gpt-4o" in proxy.build_registry(CATALOG, data).models


def test_credentials_order_auth_json_then_env_then_models_json(tmp_path, monkeypatch):
    auth = proxy.AuthFile(tmp_path / "auth.json")
    credentials = proxy.Credentials(auth, {"openai": "OPENAI_API_KEY", "local": None}, {"local": "LOCAL_KEY_VAR"},
                                    refresh=None)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert credentials.for_provider("openai") is None
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    assert (credentials.for_provider("openai").key, credentials.for_provider("openai").source) == \
        ("env-key", "env:OPENAI_API_KEY")
    (tmp_path / "auth.json").write_text(json.dumps({"openai": {"type": "api_key", "key": "file-key"}}))
    assert credentials.for_provider("openai").key == "file-key"
    assert credentials.for_provider("local").key == "LOCAL_KEY_VAR", "an unset variable name is a literal"
    monkeypatch.setenv("LOCAL_KEY_VAR", "local-secret")
    assert credentials.for_provider("local").source == "models.json"
    assert credentials.for_provider("local").key == "local-secret"


def test_model_resolution():
    models = proxy.build_registry(CATALOG, {"providers": {"local": {
        "baseUrl": "u", "api": "openai-completions", "apiKey": "k",
        "models": [{"id": "gpt-5"}, {"id": "solo"}]}}}).models
    available = lambda provider: provider in ("openai", "local")  # noqa: E731
    assert proxy.resolve_model("openai/gpt-5", models, available)["provider"] == "openai"
    assert proxy.resolve_model("solo", models, available)["provider"] == "local"
    with pytest.raises(ApiError) as ambiguous:
        proxy.resolve_model("gpt-5", models, available)
    assert ambiguous.value.status == 400 and "local/gpt-5" in ambiguous.value.message
    assert proxy.resolve_model("gpt-5", models, lambda p: p == "local")["provider"] == "local"
    with pytest.raises(ApiError) as unknown:
        proxy.resolve_model("nope", models, available)
    assert unknown.value.status == 404


# --- requests -> pi -----------------------------------------------------------------------------------

MODEL = {"id": "m", "api": "openai-completions", "provider": "p", "input": ["text", "image"]}
KEY = b"this installation's envelope key"


def test_validation_names_nested_fields_and_drops_nulls():
    body = proxy.validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": None},
                          proxy.CHAT_VALIDATOR)
    assert "stop" not in body
    with pytest.raises(ApiError) as caught:
        proxy.validate({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, proxy.CHAT_VALIDATOR)
    assert caught.value.param == "messages[0].tool_call_id"


def test_chat_to_context_full_conversation():
    body = {"messages": [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "r2"}]},
        {"role": "developer", "content": "S2"},
    ], "tools": [{"type": "function", "function": {"name": "f"}}]}
    context = proxy.chat_to_context(body, MODEL)
    assert context["systemPrompt"] == "S1\n\nS2"
    user, assistant, result1, result2 = context["messages"]
    assert user["content"][1] == {"type": "image", "data": "AAAA", "mimeType": "image/png"}
    assert [b["arguments"] for b in assistant["content"]] == [{"a": 1}, {}]
    assert (assistant["provider"], assistant["model"], assistant["stopReason"]) == ("p", "m", "toolUse")
    assert (result1["toolCallId"], result1["toolName"], result1["content"][0]["text"]) == ("c1", "f", "r1")
    assert result2["toolName"] == "g" and result2["content"][0]["text"] == "r2"
    assert context["tools"] == [{"name": "f", "description": "", "parameters": {"type": "object", "properties": {}}}]


def test_image_urls_are_named_for_fetching_later():
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}
    block = proxy.chat_to_context(body, MODEL)["messages"][0]["content"][0]
    assert block == {"type": "image", "url": "https://x/y.png", "param": "messages[0].content[0].image_url.url"}


@pytest.mark.parametrize("url,code", [("ftp://x/y.png", "unsupported_image_url"),
                                      ("data:image/png;base64,@@@", "invalid_image")])
def test_bad_images_are_400(url, code):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    with pytest.raises(ApiError) as caught:
        proxy.chat_to_context(body, MODEL)
    assert caught.value.code == code


def test_bad_tool_arguments_are_400():
    body = {"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}
    with pytest.raises(ApiError) as caught:
        proxy.chat_to_context(body, MODEL)
    assert caught.value.param == "messages[0].tool_calls[0].function.arguments"


def test_chat_options():
    assert proxy.chat_options({"temperature": 0.5, "max_tokens": 10, "reasoning_effort": "high", "user": "u"}) == \
        {"temperature": 0.5, "maxTokens": 10, "reasoning": "high", "metadata": {"user_id": "u"}}
    assert proxy.chat_options({"max_tokens": 10, "max_completion_tokens": 20, "reasoning_effort": "none"}) == \
        {"maxTokens": 20}


def test_upstream_payload_per_api():
    body = {"top_p": 0.5, "stop": "X", "seed": 1, "tool_choice": "required", "parallel_tool_calls": False,
            "response_format": {"type": "json_object"}}
    extras = proxy.chat_extras(body)
    assert proxy.upstream_payload(extras, "openai-completions") == body
    assert proxy.upstream_payload(extras, "anthropic-messages") == {
        "top_p": 0.5, "stop_sequences": ["X"], "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}
    assert proxy.upstream_payload(extras, "openai-responses") == {
        "top_p": 0.5, "parallel_tool_calls": False, "tool_choice": "required",
        "text": {"format": {"type": "json_object"}}}
    assert proxy.upstream_payload(extras, "google-generative-ai") == {}


def test_named_tool_choice_per_api():
    extras = proxy.chat_extras({"tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert proxy.upstream_payload(extras, "openai-completions") == {
        "tool_choice": {"type": "function", "function": {"name": "f"}}}
    assert proxy.upstream_payload(extras, "openai-responses") == {"tool_choice": {"type": "function", "name": "f"}}
    assert proxy.upstream_payload(extras, "anthropic-messages") == {"tool_choice": {"type": "tool", "name": "f"}}


# --- pi events -> OpenAI ------------------------------------------------------------------------------

USAGE = {"input": 10, "output": 5, "cacheRead": 3, "cacheWrite": 0, "totalTokens": 18, "cost": {"total": 0.25}}


def test_chunks_for_text_thinking_and_tools():
    chunks = proxy.ChatChunks("id1", "m", 1, include_usage=True)
    message = {"content": [{"type": "toolCall", "id": "t1", "name": "f", "arguments": {"a": 1}}], "usage": USAGE}
    events = [
        {"type": "start"},
        {"type": "thinking_start", "contentIndex": 0}, {"type": "thinking_delta", "contentIndex": 0, "delta": "hm"},
        {"type": "text_start", "contentIndex": 1}, {"type": "text_delta", "contentIndex": 1, "delta": "Hi"},
        {"type": "toolcall_start", "contentIndex": 2, "id": "t1", "toolName": "f"},
        {"type": "toolcall_delta", "contentIndex": 2, "delta": '{"a":'},
        {"type": "toolcall_delta", "contentIndex": 2, "delta": "1}"},
        {"type": "toolcall_end", "contentIndex": 2, "toolCall": message["content"][0]},
        {"type": "toolcall_start", "contentIndex": 3, "id": "t2", "toolName": "g"},
        {"type": "toolcall_end", "contentIndex": 3, "toolCall": {"arguments": {"b": 2}}},
        {"type": "done", "reason": "stop", "message": message},
    ]
    out = [c for e in proxy.pi_events(events) for c in chunks.translate(e)]
    deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"reasoning_content": "hm"} and deltas[2] == {"content": "Hi"}
    assert deltas[3]["tool_calls"][0] == {"index": 0, "id": "t1", "type": "function",
                                          "function": {"name": "f", "arguments": ""}}
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas[4:6]] == ['{"a":', "1}"]
    assert deltas[6]["tool_calls"][0]["index"] == 1
    assert deltas[7]["tool_calls"][0] == {"index": 1, "function": {"arguments": '{"b": 2}'}}, \
        "a call delivered whole still sends its arguments"
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls", "tool calls win over the upstream's 'stop'"
    assert out[-1]["choices"] == [] and out[-1]["usage"]["prompt_tokens"] == 13
    assert all(c["id"] == "id1" and c["object"] == "chat.completion.chunk" for c in out)


def test_chat_completion_object():
    message = {"content": [{"type": "thinking", "thinking": "t"}, {"type": "text", "text": "a"},
                           {"type": "text", "text": "b"}], "usage": USAGE}
    chunks = proxy.ChatChunks("id", "m", 5, include_usage=True)
    completion = proxy.completion_of(proxy.replayed(chunks, {"type": "done", "reason": "length", "message": message}))
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": "ab", "reasoning_content": "t"}
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"] == {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18,
                                   "prompt_tokens_details": {"cached_tokens": 3}, "cost": 0.25}


# --- upstream errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("event,status,type_", [
    ({"status": 429, "retryAfter": "7", "message": {"errorMessage": "429 slow down"}}, 429, "rate_limit_error"),
    ({"message": {"errorMessage": "401 Incorrect API key"}}, 401, "authentication_error"),
    ({"message": {"errorMessage": "403 status code (no body)"}}, 403, "permission_error"),
    ({"message": {"errorMessage": "529 overloaded"}}, 529, "overloaded_error"),
    ({"message": {"errorMessage": "503 unavailable"}}, 503, "api_error"),
    ({"status": 408, "message": {"errorMessage": "408 timeout"}}, 504, "timeout_error"),
    ({"message": {"errorMessage": "Connection error."}}, 502, "api_error"),
    ({"message": {"errorMessage": "Request timed out."}}, 504, "timeout_error"),
    ({"timeout": True, "message": {"errorMessage": "silence"}}, 504, "timeout_error"),
    ({"status": 400, "overflow": True, "message": {"errorMessage": "prompt is too long"}}, 400,
     "invalid_request_error"),
])
def test_upstream_error_mapping(event, status, type_):
    error = proxy.upstream_error({"type": "error", "reason": "error", **event})
    assert (error.status, error.type) == (status, type_)
    assert error.retry_after == event.get("retryAfter")


def test_a_failure_of_the_bridge_is_not_blamed_on_the_upstream():
    crash = proxy.Bridge._failure("the proxy's bridge exited unexpectedly (status 1): fetch timed out")
    error = proxy.upstream_error(crash)
    assert (error.status, error.type, error.message) == (
        502, "api_error", "the proxy's bridge exited unexpectedly (status 1): fetch timed out")
    shutdown = proxy.upstream_error(proxy.Bridge._failure("the proxy is shutting down", status=503))
    assert (shutdown.status, shutdown.message) == (503, "the proxy is shutting down")


def test_upstream_error_redacts_secrets():
    error = proxy.upstream_error({"message": {"errorMessage": "401 bad key sk-abcdef123456"}}, ["sk-abcdef123456"])
    assert "sk-abcdef123456" not in error.message and "[redacted]" in error.message


@pytest.mark.parametrize("text,status,message", [
    ('401 {"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"},"request_id":"r"}',
     401, "invalid x-api-key"),
    ('{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', 529, "Overloaded"),
    ("429 Rate limit reached. Please try again in 7s.", 429, "Rate limit reached. Please try again in 7s."),
    ("500 status code (no body)", 500, "status code (no body)"),
    ("502 <html><body>Bad Gateway</body></html>", 502, "<html><body>Bad Gateway</body></html>"),
    ("terminated", None, "terminated"),
])
def test_parse_upstream_message(text, status, message):
    assert proxy.parse_upstream_message(text) == (status, message)


# --- token estimate -----------------------------------------------------------------------------------

REFERENCE = json.loads((Path(__file__).parent / "token_reference.json").read_text())


@pytest.mark.parametrize("sample", [s for s in REFERENCE if s["category"] != "anthropic-docs"],
                         ids=lambda s: s["name"])
def test_text_estimate_within_15_percent_of_the_claude_tokenizer(sample):
    """Reference counts from the legacy Claude tokenizer (see README: count_tokens)."""
    estimate = proxy.estimate_text_tokens(sample["text"])
    assert abs(estimate - sample["claude_tokens"]) <= 0.15 * sample["claude_tokens"]


def test_text_estimate_grows_with_input_and_handles_odd_text():
    assert proxy.estimate_text_tokens("") == 0
    sizes = [proxy.estimate_text_tokens("word " * n) for n in (1, 10, 100, 1000)]
    assert sizes == sorted(sizes) and sizes[-1] > 900
    assert proxy.estimate_text_tokens("a" * 6000) >= 1000, "separator-free text still counts"


def test_image_estimate_reads_the_size_from_the_header():
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + (1000).to_bytes(4, "big") + (1000).to_bytes(4, "big")
    assert proxy.estimate_image_tokens(base64.b64encode(png + b"\0" * 20).decode()) == 1334  # 1000*1000/750
    assert proxy.estimate_image_tokens("not an image") == proxy.IMAGE_FALLBACK_TOKENS


# --- Anthropic ----------------------------------------------------------------------------------------

from tests.sse_grammar import check_anthropic_stream  # noqa: E402


def frames_text(frames) -> str:
    return "".join(proxy.sse_event(name, data).decode() for name, data in frames)


def test_interleaved_pi_blocks_become_one_open_block_at_a_time():
    """openai-completions keeps blocks open together and ends them all at the end."""
    events = proxy.AnthropicEvents("msg_1", "m", 42, str)
    message = {"content": [{"type": "text", "text": "ab"}, {"type": "toolCall", "id": "call|x", "name": "f",
                                                            "arguments": {"q": 1}}], "usage": USAGE}
    pi_events = [
        {"type": "start"},
        {"type": "thinking_start", "contentIndex": 0}, {"type": "thinking_delta", "contentIndex": 0, "delta": "t"},
        {"type": "text_start", "contentIndex": 1}, {"type": "text_delta", "contentIndex": 1, "delta": "a"},
        {"type": "toolcall_start", "contentIndex": 2, "id": "call|x", "toolName": "f"},
        {"type": "heartbeat"},
        {"type": "text_delta", "contentIndex": 1, "delta": "b"},
        {"type": "toolcall_delta", "contentIndex": 2, "delta": '{"q": 1}'},
        {"type": "thinking_end", "contentIndex": 0, "contentSignature": "reasoning_content"},
        {"type": "text_end", "contentIndex": 1},
        {"type": "toolcall_end", "contentIndex": 2, "toolCall": message["content"][1]},
        {"type": "done", "reason": "stop", "message": message},
    ]
    frames = check_anthropic_stream(frames_text(f for e in pi_events for f in events.translate(e)))
    starts = [d["content_block"] for n, d in frames if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use", "text"], \
        "text arriving during a tool call is held back, never splitting the call"
    assert proxy.pi_tool_id(starts[2]["id"]) == "call|x"
    deltas = [d["delta"] for n, d in frames if n == "content_block_delta"]
    assert [d.get("text") for d in deltas if d["type"] == "text_delta"] == ["a", "b"]
    message_delta = next(d for n, d in frames if n == "message_delta")
    assert message_delta["delta"]["stop_reason"] == "tool_use"
    assert message_delta["usage"] == {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3,
                                      "cache_creation_input_tokens": 0}
    assert ("ping", {"type": "ping"}) in frames


def test_signature_and_whole_tool_arguments_are_sent_before_block_stop():
    events = proxy.AnthropicEvents("msg_2", "m", 1, str)
    pi_events = [
        {"type": "start"},
        {"type": "thinking_start", "contentIndex": 0}, {"type": "thinking_delta", "contentIndex": 0, "delta": "t"},
        {"type": "thinking_end", "contentIndex": 0, "contentSignature": "sig"},
        {"type": "toolcall_start", "contentIndex": 1, "id": "toolu_1", "toolName": "g"},
        {"type": "toolcall_end", "contentIndex": 1, "toolCall": {"arguments": {}}},
        {"type": "done", "reason": "length", "message": {"content": [], "usage": USAGE}},
    ]
    frames = check_anthropic_stream(frames_text(f for e in proxy.pi_events(pi_events) for f in events.translate(e)))
    deltas = [d["delta"] for n, d in frames if n == "content_block_delta"]
    assert deltas[1] == {"type": "signature_delta", "signature": "sig"}
    assert deltas[2] == {"type": "input_json_delta", "partial_json": "{}"}
    assert next(d for n, d in frames if n == "message_delta")["delta"]["stop_reason"] == "max_tokens"


def test_a_whole_messages_reply_is_its_stream_put_together():
    message = {"content": [
        {"type": "thinking", "thinking": "hm", "thinkingSignature": "sig"},
        {"type": "thinking", "thinking": "[Reasoning redacted]", "thinkingSignature": "opaque", "redacted": True},
        {"type": "text", "text": "Hi"},
        {"type": "toolCall", "id": "call|x", "name": "f", "arguments": {"q": 1}}], "usage": USAGE}
    done = {"type": "done", "reason": "toolUse", "message": message}
    reply = proxy.message_of(proxy.replayed(proxy.AnthropicEvents("msg_1", "m", 42, str.upper), done))
    assert reply == {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [
        {"type": "thinking", "thinking": "hm", "signature": "SIG"},
        {"type": "redacted_thinking", "data": "OPAQUE"},
        {"type": "text", "text": "Hi"},
        {"type": "tool_use", "id": proxy.client_tool_id("call|x"), "name": "f", "input": {"q": 1}}],
        "stop_reason": "tool_use", "stop_sequence": None, "usage": {
            "input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 0}}


def test_every_thinking_block_is_signed_before_it_stops_also_when_it_closes_early():
    """openai-completions ends its blocks only when the stream ends: the thinking block closes
    when the text starts, and its signature (known at its start) goes out then."""
    seal = functools.partial(proxy.signature_out, MODEL, key=KEY)
    events = proxy.AnthropicEvents("msg_3", "m", 1, seal)
    pi_events = [
        {"type": "start"},
        {"type": "thinking_start", "contentIndex": 0, "contentSignature": "reasoning_content"},
        {"type": "thinking_delta", "contentIndex": 0, "delta": "hm"},
        {"type": "text_start", "contentIndex": 1}, {"type": "text_delta", "contentIndex": 1, "delta": "Hi"},
        {"type": "thinking_end", "contentIndex": 0, "content": "hm", "contentSignature": "reasoning_content"},
        {"type": "text_end", "contentIndex": 1, "content": "Hi"},
        {"type": "done", "reason": "stop", "message": {"content": [], "usage": USAGE}},
    ]
    frames = check_anthropic_stream(frames_text(f for e in pi_events for f in events.translate(e)))
    names = [(n, d.get("delta", {}).get("type")) for n, d in frames if n.startswith("content_block")]
    assert names == [("content_block_start", None), ("content_block_delta", "thinking_delta"),
                     ("content_block_delta", "signature_delta"), ("content_block_stop", None),
                     ("content_block_start", None), ("content_block_delta", "text_delta"), ("content_block_stop", None)]
    signature = next(d["delta"]["signature"] for n, d in frames if d.get("delta", {}).get("type") == "signature_delta")
    assert proxy.signature_in(MODEL, signature, KEY) == "reasoning_content", "the same signature as non-streamed"


def test_redacted_thinking_streams_as_a_redacted_thinking_block():
    events = proxy.AnthropicEvents("msg_4", "m", 1, str)
    pi_events = [
        {"type": "start"},
        {"type": "thinking_start", "contentIndex": 0, "contentSignature": "opaque==", "redacted": True},
        {"type": "thinking_end", "contentIndex": 0, "content": "[Reasoning redacted]", "contentSignature": "opaque=="},
        {"type": "thinking_start", "contentIndex": 1}, {"type": "thinking_delta", "contentIndex": 1, "delta": "t"},
        {"type": "thinking_end", "contentIndex": 1, "content": "t", "contentSignature": "sig"},
        {"type": "done", "reason": "stop", "message": {"content": [], "usage": USAGE}},
    ]
    frames = check_anthropic_stream(frames_text(f for e in pi_events for f in events.translate(e)))
    starts = [d["content_block"] for n, d in frames if n == "content_block_start"]
    assert starts == [{"type": "redacted_thinking", "data": "opaque=="},
                      {"type": "thinking", "thinking": "", "signature": ""}]
    assert [d["delta"] for n, d in frames if n == "content_block_delta"] == [
        {"type": "thinking_delta", "thinking": "t"}, {"type": "signature_delta", "signature": "sig"}]


@pytest.mark.parametrize("pi_id", ["toolu_01ABC", "call_1|fc_2", "weird id/with:chars", "toolu_pi_looks_wrapped"])
def test_tool_ids_are_safe_and_reversible(pi_id):
    client_id = proxy.client_tool_id(pi_id)
    assert proxy._SAFE_TOOL_ID.match(client_id)
    assert proxy.pi_tool_id(client_id) == pi_id


def test_anthropic_to_context():
    body = {"system": [{"type": "text", "text": "S"}], "tools": [
        {"name": "f", "input_schema": {"type": "object"}},
        {"type": "tool_search_tool_bm25_20251119", "name": "tool_search_tool_bm25"}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s1"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": "boom"},
                {"type": "text", "text": "reminder"}]},
            {"role": "system", "content": "late"}]}
    context = proxy.anthropic_to_context(body, {**MODEL, "api": "anthropic-messages"}, KEY)
    assert context["systemPrompt"] == "S\n\nlate"
    assert [t["name"] for t in context["tools"]] == ["f"], "tool search goes: every tool is sent whole"
    user, assistant, result, reminder = context["messages"]
    assert assistant["content"][0] == {"type": "thinking", "thinking": "hm", "thinkingSignature": "s1"}
    assert assistant["content"][1]["redacted"] is True
    assert assistant["provider"] == "p" and assistant["stopReason"] == "toolUse"
    assert (result["role"], result["toolName"], result["isError"]) == ("toolResult", "f", True)
    assert reminder == {"role": "user", "content": [{"type": "text", "text": "reminder"}], "timestamp": 0}
    # Another API's signatures are pi-ai's own data: only envelopes this installation made pass.
    thinking, _ = proxy.anthropic_to_context(body, MODEL, KEY)["messages"][1]["content"]
    assert thinking["thinkingSignature"] is None, "a foreign signature is dropped, and the redacted block"
    body["messages"][1]["content"][0]["signature"] = proxy.signature_out(MODEL, "s1", KEY)
    assert proxy.anthropic_to_context(body, MODEL, KEY)["messages"][1]["content"][0]["thinkingSignature"] == "s1"
    assert proxy.anthropic_to_context(body, MODEL, b"another key")["messages"][1]["content"][0][
        "thinkingSignature"] is None


@pytest.mark.parametrize("budget,level", [(1024, "minimal"), (1500, "low"), (8192, "medium"), (30000, "high")])
def test_thinking_budget_maps_to_level_and_is_honoured(budget, level):
    options = proxy.anthropic_options({"max_tokens": 100, "thinking": {"type": "enabled", "budget_tokens": budget}})
    assert options["reasoning"] == level and options["thinkingBudgets"] == {level: budget}
    adaptive = proxy.anthropic_options({"max_tokens": 1, "thinking": {"type": "adaptive"},
                                        "output_config": {"effort": "max"}})
    assert adaptive["reasoning"] == "xhigh"


def test_claude_names():
    assert proxy.claude_key("claude-sonnet-4-5-20250929") == proxy.claude_key("claude-sonnet-4.5") \
        == proxy.claude_key("claude-sonnet-4-5[1m]") == "claude-sonnet-4-5"
    assert proxy.claude_key("claude-3-5-haiku-latest") == "claude-3-5-haiku"
    models = {"c/claude-sonnet-4.5": {"id": "claude-sonnet-4.5", "provider": "c"},
              "c/claude-sonnet-4": {"id": "claude-sonnet-4", "provider": "c"}}
    assert proxy.resolve_claude_model("claude-sonnet-4-20250514", models, lambda p: True)["id"] == "claude-sonnet-4"
    with pytest.raises(ApiError) as caught:
        proxy.resolve_claude_model("claude-sonnet-4-6", models, lambda p: True)
    assert caught.value.status == 404 and "c/claude-sonnet-4.5" in caught.value.message


def test_overflow_message_uses_anthropic_wording():
    error = ApiError(400, "prompt token count of 12345 exceeds the limit of 9999", code="context_length_exceeded")
    assert proxy.anthropic_overflow(error, 1, {"contextWindow": 5}).message == \
        "prompt is too long: 12345 tokens > 9999 maximum"
    vague = ApiError(400, "context_length_exceeded", code="context_length_exceeded")
    assert proxy.anthropic_overflow(vague, 777, {"contextWindow": 500}).message == \
        "prompt is too long: 777 tokens > 500 maximum"


# --- events ----------------------------------------------------------------------------------------


def test_trailing_whitespace_waits_until_the_final_text_decides():
    def settled(*events):
        return [(e["type"], e.get("delta")) for e in proxy.pi_events(iter(events))]

    def deltas(kind, index, *pieces):
        return [{"type": kind, "contentIndex": index, "delta": piece} for piece in pieces]

    # openai-responses: "\n\n" streamed after each reasoning part, the last one dropped at the end
    assert settled(*deltas("thinking_delta", 0, "part one", "\n\n", "part two", "\n\n"),
                   {"type": "thinking_end", "contentIndex": 0, "content": "part one\n\npart two"}) == [
        ("thinking_delta", "part one"), ("thinking_delta", "\n\npart two"), ("thinking_end", None)]
    # a final text that keeps its trailing whitespace gets it before the end
    assert settled(*deltas("text_delta", 1, "code ", "block\n"),
                   {"type": "text_end", "contentIndex": 1, "content": "code block\n"}) == [
        ("text_delta", "code"), ("text_delta", " block"), ("text_delta", "\n"), ("text_end", None)]
    # blocks are held apart; other events pass as they are; an end without its text sends what was held
    assert settled(*deltas("text_delta", 0, "a "), *deltas("thinking_delta", 1, "b "), {"type": "heartbeat"},
                   {"type": "text_end", "contentIndex": 0},
                   {"type": "thinking_end", "contentIndex": 1, "content": "b"}) == [
        ("text_delta", "a"), ("thinking_delta", "b"), ("heartbeat", None), ("text_delta", " "), ("text_end", None),
        ("thinking_end", None)]
