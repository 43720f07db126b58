"""The shared test helpers themselves: the SSE parser, the error-shape checks, a running proxy."""

import pytest
import requests

from tests.helpers import alive, api_error, error_family, running_proxy, sse_events, sse_json, wait_for

# --- sse_events --------------------------------------------------------------------------------------


def test_sse_events_reads_names_data_and_the_end_of_each_event():
    raw = 'event: message_start\ndata: {"a": 1}\n\n: keep-alive comment\n\ndata: [DONE]\n\n'
    assert list(sse_events(raw)) == [("message_start", '{"a": 1}'), (None, "[DONE]")]


def test_sse_events_reads_bytes_crlf_lines_and_joins_data_lines():
    raw = b"event: e\r\ndata: one\r\ndata: two\r\nid: 7\r\n\r\n"
    assert list(sse_events(raw)) == [("e", "one\ntwo")]
    assert list(sse_events(["data: x", "", "data: y", ""])) == [(None, "x"), (None, "y")]


def test_sse_events_keeps_an_event_cut_off_by_the_end_of_the_stream():
    assert list(sse_events("data: whole\n\ndata: cut")) == [(None, "whole"), (None, "cut")]


@pytest.mark.parametrize("raw", ["event: a\nevent: b\ndata: {}\n\n", "data:{}\n\n", "event:a\ndata: {}\n\n"])
def test_sse_events_refuses_what_the_proxy_never_sends(raw):
    with pytest.raises(AssertionError):
        list(sse_events(raw))


def test_sse_json_decodes_each_event():
    assert sse_json('event: ping\ndata: {"type": "ping"}\n\n') == [("ping", {"type": "ping"})]


# --- api_error ---------------------------------------------------------------------------------------

OPENAI = {"error": {"message": "bad", "type": "invalid_request_error", "param": "model", "code": None}}
ANTHROPIC = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
PI = {"error": "bad"}


@pytest.mark.parametrize("body,family", [(OPENAI, "openai"), (ANTHROPIC, "anthropic"), (PI, "pi")])
def test_api_error_accepts_each_apis_shape_and_returns_the_error(body, family):
    assert api_error(body, family)["message"] == "bad"


@pytest.mark.parametrize("body,family", [
    (ANTHROPIC, "openai"), (PI, "openai"), (OPENAI, "anthropic"), (PI, "anthropic"), (OPENAI, "pi"),
    ({"error": {"message": "bad"}}, "openai"), ({"error": {"type": "x", "message": ""}}, "openai"),
    ({"type": "error", "error": {"type": "x"}}, "anthropic"), ({"error": ""}, "pi"), ({"detail": "bad"}, "openai"),
])
def test_api_error_refuses_another_shape(body, family):
    with pytest.raises(AssertionError):
        api_error(body, family)


# --- processes and a running proxy -------------------------------------------------------------------


def test_wait_for_returns_the_first_true_value_or_the_last_one():
    values = iter([0, None, "ready", "later"])
    assert wait_for(lambda: next(values)) == "ready"
    assert wait_for(lambda: [], timeout=0.1) == []


def test_running_proxy_is_healthy_inside_and_gone_after(agent_dir, tmp_path):
    with running_proxy(agent_dir, tmp_path / "proxy.log", {"PI_PROXY_BRIDGE_POOL": "0"}) as proxy:
        assert requests.get(f"{proxy.url}/healthz", timeout=5).status_code == 200
        pid = proxy.proc.pid
    assert not alive(pid) and proxy.proc.returncode is not None
    assert proxy.log_path.read_text(), "the proxy's output went to its log"


def test_start_proxy_numbers_the_logs_of_proxies_with_one_name(start_proxy):
    first, second = start_proxy({"PI_PROXY_BRIDGE_POOL": "0"}), start_proxy({"PI_PROXY_BRIDGE_POOL": "0"})
    assert first.port != second.port and first.log_path != second.log_path


def test_error_family_follows_the_path():
    assert [error_family(path) for path in ("/v1/messages", "/v1/messages/count_tokens", "/api/stream",
                                            "/v1/chat/completions", "/v1/responses", "/v1/models")] == \
        ["anthropic", "anthropic", "pi", "openai", "openai", "openai"]
