"""bridge.mjs on its own: the protocol, and that it never outlives its request."""

import json
import signal
import subprocess
import time

import pytest

from tests.fake_upstream import Reply
from tests.helpers import ROOT


def start_bridge(fake, reply: Reply) -> subprocess.Popen:
    fake.push(reply)
    model = {"id": "m", "name": "m", "api": "openai-completions", "provider": "fake", "baseUrl": f"{fake.base_url}/v1",
             "reasoning": False, "input": ["text"], "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
             "contextWindow": 1000, "maxTokens": 100}
    request = {"op": "stream", "model": model, "options": {"apiKey": "k"}, "payload": {"seed": 42},
               "context": {"messages": [{"role": "user", "content": "hi", "timestamp": 0}]}}
    proc = subprocess.Popen(["node", "bridge.mjs"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write(json.dumps(request).encode() + b"\n")
    proc.stdin.flush()
    return proc


def test_stream_prints_reduced_events_and_the_final_message_once(fake):
    proc = start_bridge(fake, Reply(text="one two three"))
    events = [json.loads(line) for line in proc.stdout]  # stdin stays open: its end would mean "abort"
    assert proc.wait(timeout=10) == 0
    proc.stdin.close()
    assert all("partial" not in e for e in events)
    assert events[0] == {"type": "start"}
    assert "".join(e["delta"] for e in events if e["type"] == "text_delta") == "one two three"
    assert events[-1]["type"] == "done" and events[-1]["message"]["content"][0]["text"] == "one two three"
    assert fake.requests[-1].body["seed"] == 42, "payload fields are merged into the upstream body"


@pytest.mark.parametrize("stop", ["close stdin", "SIGTERM"])
def test_bridge_aborts_the_upstream_and_exits_promptly(fake, stop):
    proc = start_bridge(fake, Reply(hang_after_headers=True))
    assert fake.wait_for_requests(1, timeout=5)
    time.sleep(0.2)
    stopped = time.monotonic()
    if stop == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        proc.stdin.close()
    proc.wait(timeout=3)
    assert time.monotonic() - stopped < 1.5
    assert fake.wait_for_disconnect(timeout=2)
    events = [json.loads(line) for line in proc.stdout.read().splitlines()]
    assert events[-1]["type"] == "error" and events[-1]["reason"] == "aborted"


def test_catalog_lists_builtin_providers():
    result = subprocess.run(["node", "bridge.mjs"], cwd=ROOT, input=b'{"op":"catalog"}\n', capture_output=True,
                            timeout=30, env={"PATH": subprocess.os.environ["PATH"], "OPENAI_API_KEY": "x"})
    (catalog,) = [json.loads(line) for line in result.stdout.splitlines()]
    providers = {p["id"]: p for p in catalog["providers"]}
    assert {"github-copilot", "anthropic", "openai"} <= set(providers)
    assert providers["openai"]["envKey"] == "OPENAI_API_KEY" and providers["anthropic"]["envKey"] is None
    copilot = {m["id"]: m for m in providers["github-copilot"]["models"]}
    assert copilot["claude-sonnet-4.5"]["api"] == "anthropic-messages"


def test_unknown_op_is_an_error_event():
    result = subprocess.run(["node", "bridge.mjs"], cwd=ROOT, input=b'{"op":"dance"}\n', capture_output=True,
                            timeout=30)
    (event,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert event["type"] == "error" and "unknown op" in event["message"]["errorMessage"]


def all_apis() -> list:
    """Every API of pi-ai's built-in models."""
    result = subprocess.run(["node", "bridge.mjs"], cwd=ROOT, input=b'{"op":"catalog"}\n', capture_output=True,
                            timeout=30)
    (catalog,) = [json.loads(line) for line in result.stdout.splitlines()]
    return sorted({model["api"] for provider in catalog["providers"] for model in provider["models"]})


@pytest.mark.parametrize("api", ["openai-completions", "anthropic-messages", "openai-responses"])
def test_the_bundle_streams_without_loading_undici(fake, api):
    """Node's fetch (undici) compiles WebAssembly in every process that touches fetch, Headers,
    Request or Response; the bridge's own stand-ins keep it from ever loading, with every
    provider module loaded and warmed up, through a real stream."""
    fake.push(Reply(text="no undici here"))
    base_url = f"{fake.base_url}/v1" if api.startswith("openai") else fake.base_url
    model = {"id": "m", "name": "m", "api": api, "provider": "fake", "baseUrl": base_url, "reasoning": False,
             "input": ["text"], "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
             "contextWindow": 1000, "maxTokens": 100}
    request = {"op": "stream", "model": model, "options": {"apiKey": "k"},
               "context": {"messages": [{"role": "user", "content": "hi", "timestamp": 0}]}}
    proc = subprocess.Popen(["node", "--import", "./tests/loaded_modules.mjs", "build/bridge.mjs", "--warm-up",
                             *all_apis()],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(json.dumps(request).encode() + b"\n")
    proc.stdin.flush()
    events = [json.loads(line) for line in proc.stdout]  # stdin stays open: its end would mean "abort"
    assert proc.wait(timeout=10) == 0
    proc.stdin.close()
    assert events[-1]["type"] == "done", events[-1]
    assert "".join(e["delta"] for e in events if e["type"] == "text_delta") == "no undici here"
    assert len(fake.requests) == 1, "the warm-up made no request of its own"
    (loaded,) = [json.loads(line[8:]) for line in proc.stderr.read().decode().splitlines()
                 if line.startswith("loaded: ")]
    assert "NativeModule internal/deps/undici/undici" not in loaded
    assert "NativeModule internal/http" in loaded or "NativeModule _http_client" in loaded, "the check sees modules"
