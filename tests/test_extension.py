"""The pi extension (extensions/proxy.ts) inside the real pi coding agent (@mariozechner/pi-coding-agent
0.73.1, a devDependency) in RPC mode: `/proxy ...` sent as prompts, the notifications and footer
statuses pi emits checked, the proxy it starts serving pi's own model calls through the fake upstream,
and no proxy or bridge left when pi ends, SIGKILL included."""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.fake_upstream import Reply
from tests.helpers import ROOT, bridge_pids, children, free_port, models_json, proxy_env
from tests.secret_scan import LEAK_WATCH, LOGS, recorded

PI = ROOT / "node_modules" / ".bin" / "pi"
EXTENSION = ROOT / "extensions" / "proxy.ts"
TOKEN = "pi-proxy-token-SECRET-ffff6666"
LEAK_WATCH.add(TOKEN)

pytestmark = pytest.mark.skipif(not PI.exists(), reason=f"{PI} is not installed (npm ci installs the "
                                                        "@mariozechner/pi-coding-agent devDependency)")


class Pi:
    """`pi --mode rpc` with the extension loaded; its JSON lines are read on a thread."""

    def __init__(self, home: Path, env: dict, *args: str, extension: Path | None = EXTENSION):
        stderr_path = home / f"pi-stderr-{len(list(home.glob('pi-stderr-*')))}.log"
        LOGS.append(stderr_path)
        self.stderr = open(stderr_path, "wb")
        loaded = ["-e", str(extension)] if extension else []  # None: what `pi install` installed
        self.proc = subprocess.Popen([str(PI), "--mode", "rpc", "--no-session", "--offline", *loaded, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=home,
                                     env={**env, "PI_TELEMETRY": "0"})
        self.lines: queue.Queue = queue.Queue()
        self.ids = iter(range(1, 1_000_000))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        seen = recorded()  # the secret scan reads everything pi printed
        for line in self.proc.stdout:  # binary: split on b"\n" only, as rpc.md requires
            seen.extend(line)
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def send(self, command: dict) -> str:
        command_id = f"t{next(self.ids)}"
        self.proc.stdin.write(json.dumps({"id": command_id, **command}).encode() + b"\n")
        self.proc.stdin.flush()
        return command_id

    def next_event(self, deadline: float) -> dict:
        try:
            event = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("pi said nothing in time") from None
        assert event is not None, "pi exited"
        return event

    def command(self, command: dict, timeout: float = 40) -> tuple[dict, list[dict]]:
        """Send a command; its response and the events pi emitted before it."""
        command_id, deadline, events = self.send(command), time.monotonic() + timeout, []
        while (event := self.next_event(deadline)).get("id") != command_id or event["type"] != "response":
            events.append(event)
        assert event["success"], event
        return event, events

    def startup_footer(self) -> str | None:
        """The footer status the extension sets at session start (a proxy found there, or none)."""
        return status_text(self.wait_for(lambda e: e.get("method") == "setStatus")[-1])

    def slash(self, text: str) -> tuple[list[dict], list[dict]]:
        """A /command as a prompt: (its notifications, its footer status updates), in order."""
        _, events = self.command({"type": "prompt", "message": text})
        return ui(events, "notify"), [status_text(event) for event in ui(events, "setStatus")]

    def wait_for(self, predicate, timeout: float = 40) -> list[dict]:
        """Events up to and including the first that satisfies `predicate`."""
        deadline, events = time.monotonic() + timeout, []
        while not predicate(event := self.next_event(deadline)):
            events.append(event)
        return [*events, event]

    def close(self) -> int:
        """End the session as a client does: close pi's stdin."""
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.stderr.close()

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def ui(events: list[dict], method: str) -> list[dict]:
    return [e for e in events if e["type"] == "extension_ui_request" and e["method"] == method]


def status_text(event: dict) -> str | None:
    assert event["statusKey"] == "proxy"
    return event.get("statusText")


def is_started(event: dict) -> bool:
    return event.get("method") == "notify" and event["message"].startswith("pi-proxy started")


def proxies_of(pi: Pi) -> list[int]:
    return [pid for pid, cmdline in children(pi.proc.pid) if b"proxy.py" in cmdline]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if not gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def model_ids(url: str, token: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return [m["id"] for m in requests.get(f"{url}/v1/models", headers=headers, timeout=5).json()["data"]]


@pytest.fixture
def pi_home(tmp_path, fake):
    """A HOME and PI_CODING_AGENT_DIR for pi, and the port its proxy uses. pi and the proxy it starts
    share the agent dir, as they do for a user: the fake upstream's providers, plus `via-proxy`, which
    is this port's proxy seen as an OpenAI-compatible provider (pi's own model calls go through it)."""
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    port = free_port()
    config = models_json(fake.base_url)
    config["providers"]["via-proxy"] = {"baseUrl": f"http://127.0.0.1:{port}/v1", "api": "openai-completions",
                                        "apiKey": "unused", "models": [{"id": "fake-chat/chat-model"}]}
    (agent_dir / "models.json").write_text(json.dumps(config))
    return tmp_path, proxy_env(agent_dir, port), f"http://127.0.0.1:{port}"


def test_start_status_clients_stop(pi_home, fake):
    home, env, url = pi_home
    pi = Pi(home, env)
    try:
        assert pi.startup_footer() is None
        notes, statuses = pi.slash("/proxy status")
        assert [n["message"] for n in notes] == [f"No proxy answers at {url}. Start one with /proxy start (or run "
                                                 "pi --proxy)."]
        assert statuses == [None]

        notes, statuses = pi.slash("/proxy start")
        [proxy_pid] = proxies_of(pi)
        models = model_ids(url)
        assert statuses == [f"proxy: starting {url}", f"proxy: {url} ({len(models)} models)"]
        assert [n["message"] for n in notes] == [f"pi-proxy started at {url} (pid {proxy_pid}): {len(models)} models "
                                                 "available. It stops when this pi exits."]
        assert b"--watch-stdin" in dict(children(pi.proc.pid))[proxy_pid]

        # pi's own model call goes through the proxy it started, and on to the fake upstream.
        pi.command({"type": "set_model", "provider": "via-proxy", "modelId": "fake-chat/chat-model"})
        fake.push(Reply(text="Hello from the fake, through pi-proxy."))
        pi.send({"type": "prompt", "message": "Say hello."})
        events = pi.wait_for(lambda e: e["type"] == "agent_end")
        [answer] = [e["message"] for e in events if e["type"] == "message_end" and e["message"]["role"] == "assistant"]
        assert answer["stopReason"] == "stop", answer
        assert answer["content"] == [{"type": "text", "text": "Hello from the fake, through pi-proxy."}]
        [upstream] = [r for r in fake.requests if r.path == "/v1/chat/completions"]
        assert upstream.body["model"] == "chat-model" and "Say hello." in json.dumps(upstream.body["messages"])

        # A new session rebinds the extension; the proxy carries on, still this pi's.
        response, _ = pi.command({"type": "new_session"})
        assert response["data"] == {"cancelled": False}
        notes, statuses = pi.slash("/proxy")
        usage = requests.get(f"{url}/usage", timeout=5)
        message = notes[0]["message"]
        assert message.startswith(f"pi-proxy at {url}: started by this session (pid {proxy_pid})\n"
                                  f"{len(models)} models available")
        if usage.status_code == 404:  # GET /usage is not there yet: nothing is said about usage
            assert message.count("\n") == 1
        else:
            assert f"{usage.json()['totals']['requests']:,} requests served" in message
        assert set(statuses) == {f"proxy: {url} ({len(models)} models)"}, "also the new session's footer"

        notes, _ = pi.slash("/proxy clients")
        setup = notes[0]["message"]
        assert f"ANTHROPIC_BASE_URL={url} ANTHROPIC_AUTH_TOKEN=unused claude" in setup
        assert f'base_url = "{url}/v1"' in setup and 'wire_api = "responses"' in setup
        assert f'model = "{models[0]}"' in setup
        assert f'openai.OpenAI(base_url="{url}/v1", api_key="unused")' in setup
        assert f'anthropic.Anthropic(base_url="{url}", api_key="unused")' in setup

        bridges = bridge_pids(proxy_pid, serving=False) + bridge_pids(proxy_pid)
        assert bridges, "the proxy keeps warm bridges"
        notes, statuses = pi.slash("/proxy stop")
        assert [n["message"] for n in notes] == [f"pi-proxy (pid {proxy_pid}) stopped."]
        assert statuses == [None]
        assert wait_gone([proxy_pid, *bridges]) == []
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/healthz", timeout=2)

        notes, _ = pi.slash("/proxy stop")
        assert [n["message"] for n in notes] == [f"No proxy answers at {url}; nothing to stop."]
        for wrong in ("/proxy restart", "/proxy constructor", "/proxy stop now"):
            notes, _ = pi.slash(wrong)
            assert [(n["message"], n["notifyType"]) for n in notes] == [("Usage: /proxy [status|start|stop|clients]",
                                                                          "warning")]
    finally:
        pi.kill()


def test_an_external_proxy_is_reported_and_left_alone(pi_home, start_proxy):
    """Also: `pi install <checkout>` installs the extension (package.json's `pi.extensions`)."""
    home, env, _ = pi_home
    installed = subprocess.run([str(PI), "install", str(ROOT)], env={**env, "PI_OFFLINE": "1", "PI_TELEMETRY": "0"},
                               cwd=home, capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    external = start_proxy({"PI_PROXY_AUTH_TOKEN": TOKEN}, agent=Path(env["PI_CODING_AGENT_DIR"]))
    url, models = external.url, model_ids(external.url, TOKEN)
    pi = Pi(home, {**env, "PI_PROXY_PORT": str(external.port), "PI_PROXY_AUTH_TOKEN": TOKEN}, extension=None)
    try:
        response, _ = pi.command({"type": "get_commands"})
        commands = [(c["name"], c["sourceInfo"]["path"]) for c in response["data"]["commands"]]
        assert commands == [("proxy", str(EXTENSION))]
        assert pi.startup_footer() == f"proxy: {url} ({len(models)} models)", "the footer shows a proxy found at start"

        notes, _ = pi.slash("/proxy status")
        assert notes[0]["message"].startswith(f"pi-proxy at {url}: external: not started by this session\n"
                                              f"{len(models)} models available")
        notes, _ = pi.slash("/proxy start")
        assert [n["message"] for n in notes] == [f"A proxy already answers at {url} (not started by this session, "
                                                 f"{len(models)} models); not starting another."]
        assert proxies_of(pi) == []
        notes, _ = pi.slash("/proxy stop")
        assert [n["message"] for n in notes] == [f"The proxy at {url} was not started by this session; leaving it "
                                                 "running."]
        notes, _ = pi.slash("/proxy clients")
        setup = notes[0]["message"]
        assert f"ANTHROPIC_BASE_URL={url} ANTHROPIC_AUTH_TOKEN=$PI_PROXY_AUTH_TOKEN claude" in setup
        assert 'env_key = "PI_PROXY_AUTH_TOKEN"' in setup
        assert 'api_key=os.environ["PI_PROXY_AUTH_TOKEN"]' in setup
        assert TOKEN not in setup

        assert pi.close() == 0
        assert external.proc.poll() is None and requests.get(f"{url}/healthz", timeout=5).ok
    finally:
        if pi.proc.poll() is None:
            pi.kill()


def test_a_wrong_token_is_said_so(pi_home, start_proxy):
    home, env, _ = pi_home
    external = start_proxy({"PI_PROXY_AUTH_TOKEN": TOKEN}, agent=Path(env["PI_CODING_AGENT_DIR"]))
    pi = Pi(home, {**env, "PI_PROXY_PORT": str(external.port)})
    try:
        assert pi.startup_footer() == f"proxy: {external.url}"
        notes, statuses = pi.slash("/proxy status")
        assert notes[0]["message"] == (f"pi-proxy at {external.url}: external: not started by this session\n"
                                       "models unknown: it wants a token: set PI_PROXY_AUTH_TOKEN")
        assert statuses == [f"proxy: {external.url}"]
    finally:
        pi.kill()


def test_the_flag_starts_it_with_the_session_and_the_end_of_pi_stops_it(pi_home):
    home, env, url = pi_home
    pi = Pi(home, env, "--proxy")
    try:
        events = pi.wait_for(is_started)
        [proxy_pid] = proxies_of(pi)
        models = model_ids(url)
        assert [status_text(e) for e in ui(events, "setStatus")][-2:] == [f"proxy: starting {url}",
                                                                          f"proxy: {url} ({len(models)} models)"]

        os.kill(proxy_pid, signal.SIGTERM)  # a started proxy that ends by itself: pi says so
        events = pi.wait_for(lambda e: e.get("method") == "notify")
        assert (events[-1]["notifyType"], events[-1]["message"].split("\n")[:2]) == (
            "warning", [f"pi-proxy (pid {proxy_pid}) exited with status 0.", "Its last output:"])
        assert "shutting down" in events[-1]["message"]
        assert [status_text(e) for e in ui(events, "setStatus")] == [None]

        pi.slash("/proxy start")
        [proxy_pid] = proxies_of(pi)
        bridges = bridge_pids(proxy_pid, serving=False)
        assert pi.close() == 0  # the session ends: session_shutdown stops the proxy before pi exits
        assert gone(proxy_pid), "stopped before pi exited"
        assert wait_gone(bridges, timeout=2) == []
    finally:
        if pi.proc.poll() is None:
            pi.kill()


def test_sigkill_of_pi_leaves_no_proxy_and_no_bridge(pi_home):
    home, env, url = pi_home
    pi = Pi(home, env, "--proxy")
    try:
        pi.wait_for(is_started)
        [proxy_pid] = proxies_of(pi)
        bridges = bridge_pids(proxy_pid, serving=False)
        assert bridges
    finally:
        pi.kill()
    assert wait_gone([proxy_pid, *bridges]) == [], "the proxy saw its stdin end and shut down with its bridges"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=2)


def test_a_failed_start_shows_the_proxys_last_lines(pi_home):
    home, env, url = pi_home
    with socket.socket() as squatter:  # the port is taken (bound, not listening: probes are refused at once)
        squatter.bind(("127.0.0.1", int(env["PI_PROXY_PORT"])))
        pi = Pi(home, env)
        try:
            assert pi.startup_footer() is None
            notes, statuses = pi.slash("/proxy start")
        finally:
            pi.kill()
    [failure] = notes
    assert failure["notifyType"] == "error"
    assert failure["message"].startswith("pi-proxy failed to start: it exited with status 1.\nIts last output:\n")
    assert failure["message"].endswith(f"pi-proxy: cannot listen on 127.0.0.1:{env['PI_PROXY_PORT']}: Address already "
                                       "in use")
    assert statuses == [f"proxy: starting {url}", None]


def test_without_a_venv_it_says_to_run_make_install(pi_home):
    home, env, _ = pi_home
    checkout = home / "checkout"  # a checkout whose `make install` has not run
    (checkout / "extensions").mkdir(parents=True)
    shutil.copy(EXTENSION, checkout / "extensions")
    pi = Pi(home, env, extension=checkout / "extensions" / "proxy.ts")
    try:
        notes, _ = pi.slash("/proxy start")
    finally:
        pi.kill()
    assert [(n["message"], n["notifyType"]) for n in notes] == [
        (f"Cannot start pi-proxy: {checkout}/.venv/bin/python is missing. Run `make install` in {checkout} first.",
         "error")]


def test_flag_and_argument_completions(tmp_path):
    """Loaded by pi's own loader: the --proxy flag, and the subcommands offered as /proxy completions
    (null when nothing matches, as pi expects)."""
    prefixes = ["", "st", "sto", "c", "x"]
    result = subprocess.run(["node", str(ROOT / "tests" / "extension_completions.mjs"), str(EXTENSION), str(tmp_path),
                             *prefixes], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["paths"] == [str(EXTENSION)] and loaded["flags"] == ["proxy"]
    completions = {prefix: items and [item["value"] for item in items]
                   for prefix, items in loaded["completions"].items()}
    assert completions == {"": ["status", "start", "stop", "clients"], "st": ["status", "start", "stop"],
                           "sto": ["stop"], "c": ["clients"], "x": None}
