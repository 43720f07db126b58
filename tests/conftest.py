"""Shared fixtures: a fake upstream speaking three provider protocols, and a real proxy process
(proxy.py + bridge.mjs + pi-ai) configured through a temporary PI_CODING_AGENT_DIR."""

import json
import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import requests

from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent

# Test secrets: none of them may ever appear in a response or a log line.
SECRETS = {
    "fake-chat": "sk-chat-SECRET-aaaa1111",
    "fake-anthropic": "sk-ant-SECRET-bbbb2222",
    "fake-responses": "sk-resp-SECRET-cccc3333",
    "openai": "sk-openai-env-SECRET-dddd4444",
    "fake-copilot": "sk-copilot-SECRET-eeee5555",
}


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


# Every secret the tests use, and everything the tests receive from a proxy or its processes: at the
# end of the run none of the secrets may appear in any of it. What is recorded, session-wide:
# - every response (headers and body) read through `requests`, also stream=True ones, as they are read;
# - every response read through httpx2 (the openai and anthropic SDKs, plain httpx clients);
# - every byte received on a socket opened with socket.create_connection to a proxy (raw requests);
# - every proxy process's log file (LOGS) and the output of `proxy.py` commands run with subprocess.run.
LEAK_WATCH = set(SECRETS.values())
LOGS: list[Path] = []
RESPONSES: list[bytearray] = []
PROXY_PORTS: set[int] = set()


def recorded(head: bytes = b"") -> bytearray:
    """A new entry in RESPONSES, filled as its bytes arrive."""
    entry = bytearray(head)
    RESPONSES.append(entry)
    return entry


def find_leaks(seen, watch) -> list[tuple[str, str]]:
    """(where, secret) for each secret in `watch` found in the (where, bytes) pairs of `seen`."""
    return [(where, secret) for where, data in seen for secret in watch if secret.encode() in data]


def everything_seen() -> list[tuple[str, bytes]]:
    seen = [(str(path), path.read_bytes()) for path in LOGS if path.exists()]
    return seen + [(f"response {i}: {bytes(data[:80])!r}", bytes(data)) for i, data in enumerate(RESPONSES)]


def record_requests_responses():
    """Patch requests so that every response's headers, and its body as it is read (whichever way:
    .content, .text, .json(), iter_content, iter_lines), land in RESPONSES."""
    build_response = requests.adapters.HTTPAdapter.build_response
    iter_content = requests.models.Response.iter_content

    def recording_build_response(self, req, resp):
        response = build_response(self, req, resp)
        response._recorded = recorded(f"{response.status_code} {dict(response.headers)}\n".encode())
        return response

    def recording_iter_content(self, *args, **kwargs):
        entry = getattr(self, "_recorded", None)
        if entry is None:
            entry = self._recorded = recorded()
        for chunk in iter_content(self, *args, **kwargs):
            entry += chunk.encode() if isinstance(chunk, str) else chunk
            yield chunk

    requests.adapters.HTTPAdapter.build_response = recording_build_response
    requests.models.Response.iter_content = recording_iter_content


def record_httpx_responses():
    """Patch httpx2 so that every response's headers and raw body bytes land in RESPONSES."""
    iter_raw, aiter_raw = httpx.Response.iter_raw, httpx.Response.aiter_raw

    def recording_iter_raw(self, *args, **kwargs):
        entry = recorded(f"{self.status_code} {dict(self.headers)}\n".encode())
        for chunk in iter_raw(self, *args, **kwargs):
            entry += chunk
            yield chunk

    async def recording_aiter_raw(self, *args, **kwargs):
        entry = recorded(f"{self.status_code} {dict(self.headers)}\n".encode())
        async for chunk in aiter_raw(self, *args, **kwargs):
            entry += chunk
            yield chunk

    httpx.Response.iter_raw, httpx.Response.aiter_raw = recording_iter_raw, recording_aiter_raw


class RecordingSocket(socket.socket):
    """A client socket to a proxy whose received bytes land in RESPONSES, one entry per socket
    (so that a secret split between two reads is still found)."""

    __slots__ = ()
    entries: "weakref.WeakKeyDictionary[socket.socket, bytearray]" = weakref.WeakKeyDictionary()

    def _entry(self) -> bytearray:
        if self not in self.entries:
            self.entries[self] = recorded()
        return self.entries[self]

    def recv(self, *args, **kwargs):
        data = super().recv(*args, **kwargs)
        self._entry().extend(data)
        return data

    def recv_into(self, buffer, nbytes=0, *args):
        count = super().recv_into(buffer, nbytes, *args)
        self._entry().extend(memoryview(buffer)[:count])
        return count


def record_raw_sockets():
    create_connection = socket.create_connection

    def recording_create_connection(address, *args, **kwargs):
        sock = create_connection(address, *args, **kwargs)
        if address[1] in PROXY_PORTS:
            sock.__class__ = RecordingSocket
        return sock

    socket.create_connection = recording_create_connection


def record_proxy_commands():
    """`proxy.py login/logout/models ...` run by tests: their output is a proxy process's log too."""
    run = subprocess.run

    def recording_run(args, *rest, **kwargs):
        result = run(args, *rest, **kwargs)
        if any("proxy.py" in str(arg) for arg in (args if isinstance(args, (list, tuple)) else [args])):
            for output in (result.stdout, result.stderr):
                if output:
                    RESPONSES.append(bytearray(output.encode() if isinstance(output, str) else output))
        return result

    subprocess.run = recording_run


def record_response(response):
    """An httpx2 response hook: make sure the body is read (and so recorded by the iter_raw patch)."""
    response.read()


@pytest.fixture(scope="session", autouse=True)
def no_secret_leaks():
    record_requests_responses()
    record_httpx_responses()
    record_raw_sockets()
    record_proxy_commands()
    yield
    seen = everything_seen()
    leaks = find_leaks(seen, LEAK_WATCH)
    print(f"\nsecret scan: {len(seen)} logs and responses, {sum(len(data) for _, data in seen)} bytes, "
          f"{len(LEAK_WATCH)} secrets, {len(leaks)} leaks")
    assert not leaks, f"secrets leaked: {leaks[:5]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


class RunningProxy:
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
                raise RuntimeError(f"proxy exited: {log_path.read_text()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("proxy did not become healthy")

    def bridges(self, serving: bool = True) -> list[int]:
        return bridge_pids(self.proc.pid, serving)

    def wait_no_bridges(self, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.bridges():
                return True
            time.sleep(0.05)
        return not self.bridges()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def output_limits(models: dict) -> dict:
    """{model id: maxTokens} of a models.json's models (pi's default 16384 where none is given)."""
    return {m["id"]: m.get("maxTokens", 16384) for spec in models["providers"].values() for m in spec.get("models", [])}


@pytest.fixture(scope="session")
def fake():
    upstream = FakeUpstream()
    upstream.start()
    upstream.output_limits = output_limits(models_json(upstream.base_url))
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def agent_dir(tmp_path_factory, fake):
    directory = tmp_path_factory.mktemp("home") / "agent"
    directory.mkdir()
    (directory / "models.json").write_text(json.dumps(models_json(fake.base_url), indent=2))
    return directory


@pytest.fixture(scope="session")
def proxy(agent_dir, tmp_path_factory):
    running = RunningProxy(agent_dir, tmp_path_factory.mktemp("logs") / "proxy.log")
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def fresh_fake(request):
    """Each test starts with an empty script and request log on the shared fake upstream."""
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()
    yield


@pytest.fixture
def client(proxy):
    http = httpx.Client(timeout=30, event_hooks={"response": [record_response]})
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, http_client=http)
