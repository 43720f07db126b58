"""What the tests share (tests/test_helpers.py tests it): a running proxy, the models and request
bodies of the fake upstream, process inspection, one SSE parser, and one check per API error shape.

No test module imports another; what two of them need lives here. Fixtures live in conftest.py,
the secret scanner in secret_scan.py.

API::

    with running_proxy(agent_dir, log_path, {"PI_PROXY_BRIDGE_POOL": "0"}) as proxy:  # or the
        proxy.url, proxy.port, proxy.log_path, proxy.proc, proxy.bridges()     # start_proxy fixture
    for event, data in sse_events(response):    # a requests.Response, str, bytes or lines
        ...
    error = api_error(response.json(), "anthropic")   # asserts the shape; {"type", "message", ...}
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest
import requests

from tests.fake_github import COPILOT_HOST, GITHUB_TOKEN, copilot_token
from tests.secret_scan import LOGS, PROXY_PORTS, SECRETS

ROOT = Path(__file__).resolve().parent.parent


# --- the fake upstream's models ---------------------------------------------------------------------

def models_json(fake_url: str) -> dict:
    """Three custom providers, one per upstream API, plus built-in `openai` redirected to the fake."""
    rich = {"reasoning": True, "input": ["text", "image"], "contextWindow": 200000, "maxTokens": 8192,
            "cost": {"input": 3, "output": 15, "cacheRead": 0.3, "cacheWrite": 3.75}}
    return {
        "providers": {
            "fake-chat": {"baseUrl": f"{fake_url}/v1", "api": "openai-completions", "apiKey": SECRETS["fake-chat"],
                          "models": [{"id": "chat-model", **rich}, {"id": "shared-model"}]},
            "fake-anthropic": {"baseUrl": fake_url, "api": "anthropic-messages", "apiKey": "FAKE_ANTHROPIC_KEY",
                               "models": [{"id": "claude-test", **rich}, {"id": "shared-model"}]},
            "fake-responses": {"baseUrl": f"{fake_url}/v1", "api": "openai-responses",
                               "apiKey": SECRETS["fake-responses"], "models": [{"id": "gpt-test", **rich}]},
            "fake-dead": {"baseUrl": "http://127.0.0.1:9/v1", "api": "openai-completions", "apiKey": "sk-dead-key-0000",
                          "models": [{"id": "dead-model"}]},
            "fake-copilot": {"baseUrl": fake_url, "api": "anthropic-messages", "apiKey": "sk-copilot-SECRET-eeee5555",
                             "models": [{"id": "claude-sonnet-4.5", **rich}, {"id": "claude-opus-4.6", **rich},
                                        {"id": "claude-haiku-4.5"}]},
            "openai": {"baseUrl": f"{fake_url}/v1"},
            "groq": {"baseUrl": f"{fake_url}/v1"},  # built-in, no key: usable only with a client's own key
        }
    }


# One model per upstream wire protocol, and the path the fake sees for it.
MODELS = {
    "fake-chat/chat-model": "/v1/chat/completions",
    "fake-anthropic/claude-test": "/v1/messages",
    "fake-responses/gpt-test": "/v1/responses",
}
ALL_APIS = pytest.mark.parametrize("model", list(MODELS))
PIXEL = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")).decode()


def last_request(fake, model):
    """The last request the fake upstream saw for `model` (one of MODELS)."""
    matching = [r for r in fake.requests if r.path == MODELS[model]]
    assert matching, f"the fake saw no request on {MODELS[model]}"
    return matching[-1]


# --- Copilot through the fake GitHub ---------------------------------------------------------------

def pi_via_proxy(proxy, messages: list, api: str = "openai-completions") -> dict:
    """pi-ai's own client for `api` (as pi uses it with the proxy as a custom provider), asking
    fake-chat/chat-model with a weather tool and reasoning on: its final message."""
    model = {"id": "fake-chat/chat-model", "name": "c", "api": api, "provider": "pi-proxy",
             "baseUrl": proxy.url if api == "anthropic-messages" else f"{proxy.url}/v1", "reasoning": True,
             "input": ["text"], "contextWindow": 200000, "maxTokens": 8192,
             "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
             "compat": {"supportsReasoningEffort": True}}
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    request = {"model": model, "context": {"messages": messages, "tools": [
                   {"name": "get_weather", "description": "Weather", "parameters": weather}]},
               "options": {"apiKey": "unused", "maxRetries": 0, "reasoning": "low"}}
    done = subprocess.run(["node", str(ROOT / "tests" / "pi_direct.mjs")], input=json.dumps(request),
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["type"] == "done", last
    return last["message"]


def redirect_env(fake, github) -> dict:
    """A proxy's environment that sends GitHub's and Copilot's hosts to the fakes."""
    return {"PI_PROXY_TEST_REDIRECTS": json.dumps({"https://github.com": github.url,
                                                   "https://api.github.com": github.url,
                                                   f"https://api.{COPILOT_HOST}": fake.base_url})}


def agent_with_auth(tmp_path, entries: dict):
    agent = tmp_path / "agent"
    agent.mkdir(mode=0o700)
    (agent / "auth.json").write_text(json.dumps(entries))
    os.chmod(agent / "auth.json", 0o600)
    return agent


def stored_copilot(expires_in: float, serial: str = "1") -> dict:
    access, expires = copilot_token(serial, expires_in)
    return {"type": "oauth", "refresh": GITHUB_TOKEN, "access": access, "expires": expires}


# --- processes ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float = 10.0):
    """condition()'s first true value within `timeout` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


def proc_state(pid: int) -> str:
    """The one-letter state in /proc/<pid>/stat ("Z": exited, not reaped yet); OSError when gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    try:
        return proc_state(pid) != "Z"
    except OSError:
        return False


def zombie(pid: int) -> bool:
    """An exited child not reaped yet (it has no memory left to count)."""
    return proc_state(pid) == "Z"


def proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def children(parent: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of the processes whose parent is `parent` (zombies too: not reaped yet)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append((int(entry.name), cmdline))
    return found


def bridge_pids(proxy_pid: int, serving: bool = True) -> list[int]:
    """PIDs of a proxy's bridge processes serving a request (a bridge retitles itself
    `pi-proxy bridge: serving` when its request arrives), or with serving=False its idle pooled ones."""
    return [pid for pid, cmdline in children(proxy_pid)
            if cmdline.startswith(b"pi-proxy bridge") == serving and (serving or b"bridge.mjs" in cmdline)]


# --- a running proxy ---------------------------------------------------------------------------------

def proxy_env(agent_dir: Path, port: int, extra_env: dict | None = None) -> dict:
    """The environment of a test proxy on `port` reading `agent_dir` (also that of a pi whose
    /proxy start runs one)."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(agent_dir.parent),
        "PI_CODING_AGENT_DIR": str(agent_dir),
        "PI_PROXY_PORT": str(port),
        "PI_PROXY_UPSTREAM_TIMEOUT_MS": "4000",
        "PI_PROXY_MAX_BODY_SIZE": "2000000",
        "PI_PROXY_LOG_LEVEL": "DEBUG",
        "FAKE_ANTHROPIC_KEY": SECRETS["fake-anthropic"],
        "OPENAI_API_KEY": SECRETS["openai"],
        **(extra_env or {}),
    }


class RunningProxy:
    """A `python proxy.py` process on a free port, healthy once constructed; its log (a file the
    secret scanner reads) at `log_path`. Start one with running_proxy() or the start_proxy fixture."""

    def __init__(self, agent_dir: Path, log_path: Path, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        PROXY_PORTS.add(self.port)
        self.log_path = log_path
        env = proxy_env(agent_dir, self.port, extra_env)
        self.log = open(log_path, "ab")
        LOGS.append(log_path)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "proxy.py")], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"proxy exited: {log_path.read_text()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("proxy did not become healthy")

    def bridges(self, serving: bool = True) -> list[int]:
        return bridge_pids(self.proc.pid, serving)

    def wait_no_bridges(self, timeout: float = 2.0) -> bool:
        return wait_for(lambda: not self.bridges(), timeout)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextmanager
def running_proxy(agent_dir: Path, log_path: Path, env: dict | None = None) -> Iterator[RunningProxy]:
    """A proxy reading `agent_dir`, with `env` over the test defaults (proxy_env), stopped on exit."""
    proxy = RunningProxy(agent_dir, log_path, env)
    try:
        yield proxy
    finally:
        proxy.stop()


# --- a browser ---------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_dom(url: str, profile) -> str:
    """The page's DOM once its scripts ran: Chromium waits for pending fetches within the virtual
    time budget before dumping it."""
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# --- server-sent events ------------------------------------------------------------------------------

def sse_events(source) -> Iterator[tuple[str | None, str]]:
    """(event name or None, data) of each event of an SSE stream, as its lines arrive. `source`: a
    requests.Response (read as a stream), the body as str or bytes, or its lines. Data lines of one
    event are joined with "\\n"; comments and other fields are skipped; an event cut off by the end
    of the stream (no blank line after it) is still yielded. Strict where the proxy must be: an
    event has at most one `event:` line, and every field line has its space after the colon."""
    if isinstance(source, requests.Response):
        lines = source.iter_lines(decode_unicode=True)
    elif isinstance(source, (str, bytes)):
        lines = (source.decode() if isinstance(source, bytes) else source).replace("\r\n", "\n").split("\n")
    else:
        lines = source
    name, data = None, []
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith("event: "):
            assert name is None, f"two event lines in one event: {name!r}, {line!r}"
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        else:
            assert line.startswith(":") or not line.startswith(("event:", "data:")), f"malformed SSE line {line!r}"
    if data:
        yield name, "\n".join(data)


def sse_json(source) -> list[tuple[str | None, dict]]:
    """The events of a stream whose data are JSON (no `[DONE]`), decoded."""
    return [(name, json.loads(data)) for name, data in sse_events(source)]


class RecordingTransport(httpx.HTTPTransport):
    """An SDK's transport that keeps the raw bytes of every event stream, for the grammar checkers."""

    def __init__(self):
        super().__init__()
        self.streams = []

    def handle_request(self, request):
        response = super().handle_request(request)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            chunks = []
            self.streams.append(chunks)
            inner = response.stream

            class Tee(httpx.SyncByteStream):
                def __iter__(self):
                    for chunk in inner:
                        chunks.append(chunk)
                        yield chunk

                def close(self):
                    inner.close()
            response.stream = Tee()
        return response


# --- error shapes ------------------------------------------------------------------------------------

def api_error(body: dict, family: str) -> dict:
    """The error of an error response body, asserting `family`'s shape:
    - "openai" (Chat Completions, Responses, models): {"error": {"message", "type", ...}};
    - "anthropic" (Messages): {"type": "error", "error": {"type", "message"}};
    - "pi" (streamProxy's /api/stream, which reads only this string): {"error": "<message>"}.
    Returns the inner error; pi's string comes back as {"message": it}."""
    assert isinstance(body, dict) and "error" in body, body
    if family == "pi":
        assert isinstance(body["error"], str) and body["error"], body
        return {"message": body["error"]}
    error = body["error"]
    assert isinstance(error, dict), body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert isinstance(error.get("type"), str) and error["type"], body
    if family == "anthropic":
        assert body.get("type") == "error", body
    else:
        assert family == "openai", f"unknown error family {family!r}"
        assert body.get("type") != "error", f"an OpenAI error has no top-level type: {body}"
    return error


def error_family(path: str) -> str:
    """The error shape of the endpoint at `path`: Anthropic's under /v1/messages, pi's on
    /api/stream, OpenAI's everywhere else."""
    return "anthropic" if path.startswith("/v1/messages") else "pi" if path == "/api/stream" else "openai"


def response_error(response, status: int, family: str) -> dict:
    """api_error() of a requests.Response that must have `status`."""
    assert response.status_code == status, response.text
    return api_error(response.json(), family)


# --- one streamed request per client API, and what its client saw ---------------------------------

CLIENT_APIS = ["chat", "messages", "responses", "pi"]  # Chat Completions, Messages, Responses, streamProxy
ERROR_FAMILY = {"chat": "openai", "messages": "anthropic", "responses": "openai", "pi": "pi"}
WORDS = " ".join(f"word{i}" for i in range(30))  # a reply long enough to fail in the middle of


@dataclass
class Outcome:
    """What a client saw: the HTTP status, the text streamed, the error (message) if any, and
    whether the stream ended with its protocol's terminal event."""
    status: int
    text: str = ""
    error: str | None = None
    terminated: bool = False
    events: list = field(default_factory=list)


def request_body(endpoint: str, model: str) -> tuple[str, dict]:
    messages = [{"role": "user", "content": "hi"}]
    if endpoint == "chat":
        return "/v1/chat/completions", {"model": model, "messages": messages, "stream": True}
    if endpoint == "messages":
        return "/v1/messages", {"model": model, "max_tokens": 100, "messages": messages, "stream": True}
    if endpoint == "responses":
        return "/v1/responses", {"model": model, "input": "hi", "stream": True}
    provider, model_id = model.split("/", 1)
    return "/api/stream", {"model": {"provider": provider, "id": model_id}, "context": {"messages": messages},
                           "options": {}}


def outcome(response: requests.Response, endpoint: str, lines=None) -> Outcome:
    """`lines`: the body's lines, when the test read some of them itself."""
    if response.status_code != 200:
        message = api_error(response.json(), ERROR_FAMILY[endpoint])["message"]
        return Outcome(response.status_code, error=message, terminated=True)
    events = list(sse_events(response if lines is None else lines))
    seen = Outcome(200, events=events)
    for name, data in events:
        if data == "[DONE]":
            seen.terminated = endpoint == "chat"
            continue
        payload = json.loads(data)
        if endpoint == "chat":
            if "error" in payload:
                seen.error = payload["error"]["message"]
            for choice in payload.get("choices", []):
                seen.text += choice["delta"].get("content") or ""
        elif endpoint == "messages":
            if name == "error":
                seen.error, seen.terminated = payload["error"]["message"], True
            elif name == "content_block_delta" and payload["delta"]["type"] == "text_delta":
                seen.text += payload["delta"]["text"]
            seen.terminated = seen.terminated or name == "message_stop"
        elif endpoint == "responses":
            if name == "response.output_text.delta":
                seen.text += payload["delta"]
            if name == "response.failed":
                seen.error = payload["response"]["error"]["message"]
            seen.terminated = name in ("response.completed", "response.incomplete", "response.failed")
        else:
            if payload["type"] == "text_delta":
                seen.text += payload["delta"]
            if payload["type"] == "error":
                seen.error = payload["errorMessage"]
            seen.terminated = payload["type"] in ("done", "error")
    return seen


def call(proxy, endpoint: str, model: str, timeout: float = 30) -> Outcome:
    path, body = request_body(endpoint, model)
    with requests.post(f"{proxy.url}{path}", json=body, stream=True, timeout=timeout) as response:
        return outcome(response, endpoint)


def assert_failed_before_content(seen: Outcome, endpoint: str, status: int, fragment: str):
    """Before any content a failure is an HTTP error; /api/stream reports it, as pi-ai would,
    as the stream's only event."""
    if endpoint == "pi":
        assert seen.status == 200 and [json.loads(d)["type"] for _, d in seen.events] == ["error"], seen
    else:
        assert seen.status == status, seen
    assert fragment.lower() in seen.error.lower(), seen


def assert_failed_mid_stream(seen: Outcome, fragment: str):
    assert seen.status == 200 and seen.text.startswith("word0"), seen
    assert seen.error and fragment.lower() in seen.error.lower(), seen
    assert seen.terminated, "the stream ends with its protocol's terminal event"


def open_stream(proxy, endpoint: str, model: str = "fake-chat/chat-model", until: str = "word0"):
    """A streaming request read up to the line holding `until`: the response, the lines read and
    the iterator of the rest."""
    path, body = request_body(endpoint, model)
    response = requests.post(f"{proxy.url}{path}", json=body, stream=True, timeout=30)
    lines = response.iter_lines(decode_unicode=True)
    read = []
    for line in lines:
        read.append(line)
        if until in line:
            break
    return response, read, lines
