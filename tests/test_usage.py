"""Seeing what goes through: a log line per request (no content, no secrets), request ids in headers,
logs and error bodies, and GET /usage."""

import json
import time

import anthropic
import openai
import pytest
import requests

from tests.fake_upstream import Reply
from tests.helpers import running_proxy, sse_events
from tests.secret_scan import LEAK_WATCH

TOKEN = "proxy-usage-SECRET-4242"
LEAK_WATCH.add(TOKEN)
SPOKEN = "the-words-of-the-conversation"  # message text: never in a log
HI = [{"role": "user", "content": SPOKEN}]


@pytest.fixture(scope="module")
def watched(agent_dir, tmp_path_factory):
    """A proxy of its own (its /usage counts only this module's requests), logging JSON lines."""
    with running_proxy(agent_dir, tmp_path_factory.mktemp("usage") / "proxy.log",
                       {"PI_PROXY_LOG_FORMAT": "json", "PI_PROXY_AUTH_TOKEN": TOKEN}) as running:
        yield running


def records(proxy) -> list[dict]:
    lines = [json.loads(line) for line in proxy.log_path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if "endpoint" in line]


def record_of(proxy, request_id: str, timeout: float = 5.0) -> dict:
    """The log record of a request: written when its response has ended, so wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [record for record in records(proxy) if record["id"] == request_id]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


def openai_client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0)


def test_a_stream_logs_one_json_line_with_usage_cost_and_timings(watched, fake):
    fake.push(Reply(text="four words of answer", usage={"input": 1000, "output": 200, "cached": 50}))
    stream = openai_client(watched).chat.completions.with_raw_response.create(
        model="fake-chat/chat-model", messages=HI, stream=True, stream_options={"include_usage": True})
    request_id = stream.headers["x-request-id"]
    list(stream.parse())
    record = record_of(watched, request_id)
    assert {key: record[key] for key in ("endpoint", "model", "resolved", "api", "stream", "status", "outcome")} == {
        "endpoint": "chat", "model": "fake-chat/chat-model", "resolved": "fake-chat/chat-model",
        "api": "openai-completions", "stream": True, "status": 200, "outcome": "stop"}
    assert (record["input"], record["output"], record["cache_read"], record["cache_write"]) == (1000, 200, 50, 0)
    # models.json's prices per million: input 3, output 15, cache read 0.3
    assert record["cost_usd"] == pytest.approx((1000 * 3 + 200 * 15 + 50 * 0.3) / 1e6)
    assert 0 <= record["ttft_ms"] <= record["total_ms"]
    assert record["level"] == "INFO" and record["time"].endswith("Z")
    log = watched.log_path.read_text()
    assert SPOKEN not in log and "four words" not in log and TOKEN not in log


def test_human_readable_line_by_default(proxy, client, fake):
    fake.push(Reply(text="hello", usage={"input": 7, "output": 3}))
    reply = client.chat.completions.with_raw_response.create(
        model="fake-anthropic/claude-test", messages=HI)
    request_id = reply.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and f"request {request_id} " not in proxy.log_path.read_text():
        time.sleep(0.05)
    line = next(line for line in proxy.log_path.read_text().splitlines() if f"request {request_id} " in line)
    assert " INFO pi-proxy: request " in line
    assert ("chat fake-anthropic/claude-test -> fake-anthropic/claude-test (anthropic-messages) whole 200 stop"
            " in=7 out=3 cache_read=0 cache_write=0 cost=$0.000066 ttft=") in line
    assert line.endswith("ms") and SPOKEN not in line


def test_a_sane_incoming_request_id_is_reused_an_insane_one_replaced(watched, fake):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "fake-chat/chat-model", "messages": HI}
    reused = requests.post(f"{watched.url}/v1/chat/completions", json=body,
                           headers={**headers, "x-request-id": "trace-0123456789abcdef"}, timeout=30)
    assert reused.headers["x-request-id"] == "trace-0123456789abcdef"
    assert record_of(watched, "trace-0123456789abcdef")["status"] == 200
    for insane in ("has spaces in it", "x" * 129, "short", "<script>alert(1)</script>"):
        minted = requests.post(f"{watched.url}/v1/chat/completions", json=body,
                               headers={**headers, "x-request-id": insane}, timeout=30)
        assert minted.headers["x-request-id"].startswith("req_") and len(minted.headers["x-request-id"]) == 28


def test_anthropic_clients_get_request_id_and_errors_name_it(watched, fake):
    client = anthropic.Anthropic(base_url=watched.url, api_key=TOKEN, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=10, messages=HI)
    headers = caught.value.response.headers
    assert headers["request-id"] == headers["x-request-id"] == caught.value.body["request_id"]
    assert caught.value.request_id == headers["request-id"]  # the SDK's own field
    record = record_of(watched, headers["request-id"])
    assert (record["endpoint"], record["status"], record["outcome"], record["resolved"]) == (
        "messages", 404, "not_found_error", None)
    unauthenticated = requests.post(f"{watched.url}/v1/chat/completions", json={}, timeout=10)
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["request_id"] == unauthenticated.headers["x-request-id"]


def test_an_error_inside_a_stream_names_the_request_and_is_the_outcome(watched, fake):
    fake.push(Reply(text="partial answer", stream_error="upstream exploded"))
    response = requests.post(f"{watched.url}/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                             json={"model": "fake-chat/chat-model", "messages": HI, "stream": True}, timeout=30)
    request_id = response.headers["x-request-id"]
    errors = [json.loads(data) for _, data in sse_events(response.text)
              if data.startswith("{") and '"error"' in data]
    assert errors and errors[0]["request_id"] == request_id
    record = record_of(watched, request_id)
    assert (record["status"], record["outcome"]) == (200, "api_error")


def test_a_client_that_goes_away_is_client_gone(watched, fake):
    fake.push(Reply(text="one two three four", hang_after=3))
    with requests.post(f"{watched.url}/v1/messages", stream=True, timeout=30,
                       headers={"x-api-key": TOKEN, "x-request-id": "going-away-000001"},
                       json={"model": "fake-anthropic/claude-test", "max_tokens": 50, "messages": HI,
                             "stream": True}) as response:
        next(response.iter_content(64))
    record = record_of(watched, "going-away-000001")
    assert (record["endpoint"], record["status"], record["outcome"]) == ("messages", 200, "client_gone")
    assert record["ttft_ms"] is not None


def test_usage_totals_models_minutes_and_the_last_100_records(watched, fake):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{watched.url}/usage", timeout=10).status_code == 401
    before = requests.get(f"{watched.url}/usage", headers=headers, timeout=10).json()
    fake.push(Reply(text="answer", usage={"input": 100, "output": 10}))
    openai_client(watched).chat.completions.create(model="fake-responses/gpt-test", messages=HI)
    count = {"model": "fake-anthropic/claude-test", "messages": HI}
    session = requests.Session()
    for _ in range(105):  # no bridge: fast
        assert session.post(f"{watched.url}/v1/messages/count_tokens", json=count, headers=headers).ok
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        usage = session.get(f"{watched.url}/usage", headers=headers, timeout=10).json()
        if usage["totals"]["requests"] == before["totals"]["requests"] + 106:
            break
        time.sleep(0.05)
    assert usage["totals"]["requests"] == before["totals"]["requests"] + 106
    assert usage["totals"]["tokens"]["input"] == before["totals"]["tokens"]["input"] + 100
    gpt = usage["models"]["fake-responses/gpt-test"]
    assert gpt["requests"] >= 1 and gpt["tokens"]["output"] >= 10 and gpt["cost_usd"] > 0
    assert gpt["ttft_ms"]["p50"] is not None and gpt["ttft_ms"]["p90"] >= gpt["ttft_ms"]["p50"]
    assert len(usage["minutes"]) == 60 and usage["minutes"][-1]["requests"] >= 1
    assert sum(minute["requests"] for minute in usage["minutes"]) == usage["totals"]["requests"]
    assert len(usage["recent"]) == 100 and usage["recent"][-1]["endpoint"] == "count_tokens"
    assert SPOKEN not in json.dumps(usage)


def test_a_pi_stream_is_logged_with_its_provider_and_id(watched, fake):
    body = {"model": {"provider": "fake-chat", "id": "chat-model"}, "options": {},
            "context": {"messages": [{"role": "user", "content": SPOKEN, "timestamp": 0}]}}
    response = requests.post(f"{watched.url}/api/stream", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=30)
    assert response.status_code == 200
    record = record_of(watched, response.headers["x-request-id"])
    assert (record["endpoint"], record["model"], record["resolved"], record["stream"], record["outcome"]) == (
        "api/stream", "fake-chat/chat-model", "fake-chat/chat-model", True, "stop")
