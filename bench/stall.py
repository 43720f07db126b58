"""How long one large request stalls the proxy's other clients (issue 12, point 3).

Starts the fake upstream and a real proxy (default limits), then, for each scenario, sends one
large request while another client asks /healthz back to back; the figure is the slowest /healthz
answer during the large request (the worst stall), next to the same client's slowest answer with
nothing else going on. Not a test: run `.venv/bin/python bench/stall.py [scenario words...]`."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fake_upstream import FakeUpstream, Reply  # noqa: E402
from tests.helpers import RunningProxy, models_json  # noqa: E402

POLLER = """
import select, sys, time, requests
url, slowest, count = sys.argv[1], 0.0, 0
with requests.Session() as session:
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:  # until told to stop
        started = time.perf_counter()
        session.get(url, timeout=600)
        slowest, count = max(slowest, time.perf_counter() - started), count + 1
print(slowest * 1000, count, flush=True)
"""


def worst_healthz(proxy, while_running) -> tuple[float, float, int]:
    """(slowest /healthz in ms while `while_running()` runs, its duration in s, /healthz answered).
    The client asking /healthz is a process of its own: as a thread here it would share this
    process's GIL with the fake upstream, which parses the large request meanwhile, and measure that."""
    poller = subprocess.Popen([sys.executable, "-c", POLLER, f"{proxy.url}/healthz"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    poller.stdout.readline()
    time.sleep(0.3)
    started = time.perf_counter()
    try:
        while_running()
    finally:
        duration = time.perf_counter() - started
        slowest, count = poller.communicate("stop\n")[0].split()
    return float(slowest), duration, int(count)


def post(proxy, path: str, data: bytes, stream: bool = False):
    def run():
        with requests.post(f"{proxy.url}{path}", data=data, headers={"Content-Type": "application/json"},
                           timeout=600, stream=stream) as response:
            size = sum(len(chunk) for chunk in response.iter_content(65536))
            print(f"    {path}: {response.status_code}, {size} bytes back", flush=True)
    return run


def scenarios(fake, names) -> dict:
    def chat(messages):
        fake.push(Reply(text="ok"))
        return json.dumps({"model": "fake-chat/chat-model", "messages": messages}).encode()

    every = {
        "chat, 20,000 messages of 400 chars (8 MB), answered": lambda: chat(
            [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y" * 400}] * 10_000),
        "chat, 1.4 M messages (47 MB)": lambda: chat([{"role": "user", "content": "hi"}] * 1_400_000),
        "responses, 200,000 input items": lambda: json.dumps({"model": "fake-responses/gpt-test",
                                                               "input": [{"role": "user", "content": "z"}] * 200_000}
                                                              ).encode(),
    }
    return {name: make for name, make in every.items() if not names or any(n in name for n in names)}


def main():
    with FakeUpstream() as fake, tempfile.TemporaryDirectory() as home:
        agent_dir = Path(home) / "agent"
        agent_dir.mkdir()
        (agent_dir / "models.json").write_text(json.dumps(models_json(fake.base_url)))
        proxy = RunningProxy(agent_dir, Path(home) / "proxy.log", {"PI_PROXY_LOG_LEVEL": "WARNING",
                                                                      "PI_PROXY_MAX_BODY_SIZE": "52428800",
                                                                      "PI_PROXY_UPSTREAM_TIMEOUT_MS": "120000"})
        try:
            time.sleep(1.0)
            quiet, _, _ = worst_healthz(proxy, lambda: time.sleep(3))
            print(f"nothing else running: slowest /healthz {quiet:.1f} ms", flush=True)
            for name, make in scenarios(fake, sys.argv[1:]).items():
                data = make()
                stall, seconds, count = worst_healthz(proxy, post(proxy, "/v1/chat/completions" if name.startswith(
                    "chat") else "/v1/responses", data))
                print(f"{name}: slowest /healthz {stall:.1f} ms during {seconds:.1f} s ({count} answered)",
                      flush=True)
            if sys.argv[1:] and "stream" not in sys.argv[1:]:
                return
            fake.reset()  # a refused request left its reply unused
            fake.push(Reply(text=" ".join(["tok"] * 200_000)))
            stall, seconds, count = worst_healthz(proxy, post(proxy, "/v1/responses", json.dumps(
                {"model": "fake-responses/gpt-test", "input": "hi", "stream": True}).encode(), stream=True))
            print(f"responses stream of 200,000 tokens: slowest /healthz {stall:.1f} ms during {seconds:.1f} s "
                  f"({count} answered)", flush=True)
        finally:
            proxy.stop()


if __name__ == "__main__":
    main()
