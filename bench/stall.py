"""How long one large request stalls the proxy's other clients (issue 12, point 3).

Starts the fake upstream and a real proxy (default limits), then, for each scenario, sends one
large request while another client asks /healthz back to back; the figures are that client's median,
99th percentile and slowest answer during the large request (the slowest: the worst stall), next to
the same over 20 s with nothing else going on. Not a test: run
`.venv/bin/python bench/stall.py [scenario words...]`."""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fake_upstream import FakeUpstream, Reply  # noqa: E402
from tests.helpers import RunningProxy, children, models_json  # noqa: E402

POLLER = r"""
import gc, select, socket, sys, time
gc.disable()  # the poller's own pauses would be measured as the proxy's
host, port = sys.argv[1], int(sys.argv[2])
request = f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
with socket.create_connection((host, port)) as client:
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rest = b""
    while sys.stdin.readline():  # "measure": until the next line, /healthz back to back
        seconds = []
        while not select.select([sys.stdin], [], [], 0)[0]:
            started = time.perf_counter()
            client.sendall(request)
            while True:  # one whole answer: its head, then Content-Length bytes
                rest += client.recv(65536)
                head_end = rest.find(b"\r\n\r\n")
                if head_end >= 0:
                    length = int(rest[:head_end].lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(rest) >= head_end + 4 + length:
                        rest = rest[head_end + 4 + length:]
                        break
            seconds.append(time.perf_counter() - started)
        sys.stdin.readline()
        seconds.sort()
        print(*(seconds[min(len(seconds) - 1, int(q * len(seconds)))] * 1000 for q in (0.5, 0.99)),
              seconds[-1] * 1000, len(seconds), flush=True)
"""


class Poller:
    """A client asking the proxy's /healthz back to back while told to measure: a lean process of
    its own (a raw socket, no garbage collector). As a thread here it would share this process's GIL
    with the fake upstream, which parses the large request meanwhile; with `requests` its own pauses
    reached 15-20 ms. Started before this process lowers its priority, so it keeps normal priority."""

    def __init__(self, proxy):
        self.process = subprocess.Popen([sys.executable, "-c", POLLER, "127.0.0.1", str(proxy.port)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def during(self, while_running) -> tuple[tuple[float, float, float], float, int]:
        """((median, 99th percentile, slowest) /healthz in ms while `while_running()` runs, its
        duration in s, /healthz answered)."""
        self.process.stdin.write("measure\n")
        self.process.stdin.flush()
        time.sleep(0.3)
        started = time.perf_counter()
        try:
            while_running()
        finally:
            duration = time.perf_counter() - started
            self.process.stdin.write("stop\n")
            self.process.stdin.flush()
            *times, count = self.process.stdout.readline().split()
        return tuple(float(t) for t in times), duration, int(count)


def rss_mb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


class PeakMemory:
    """The largest resident memory (MB) of the proxy and of a child preparing a large request (it
    runs proxy.py, where the bridges run node) while in the `with` block, sampled every 20 ms."""

    def __init__(self, proxy):
        self.pid, self.proxy, self.child = proxy.proc.pid, 0, 0
        self.stopped = threading.Event()
        self.sampler = threading.Thread(target=self.sample)

    def sample(self):
        while not self.stopped.wait(0.02):
            self.proxy = max(self.proxy, rss_mb(self.pid))
            for pid, cmdline in children(self.pid):
                if b"proxy.py" in cmdline:
                    self.child = max(self.child, rss_mb(pid))

    def __enter__(self):
        self.sampler.start()
        return self

    def __exit__(self, *_):
        self.stopped.set()
        self.sampler.join()

    def __str__(self) -> str:
        return f"peak memory: proxy {self.proxy} MB, preparing child {self.child} MB"


def shown(times) -> str:
    return "/healthz median {:.1f} ms, 99th percentile {:.1f} ms, slowest {:.1f} ms".format(*times)


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
        "chat, 100,000 messages of 400 chars (40 MB, the default cap), answered": lambda: chat(
            [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y" * 400}] * 50_000),
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
        poller = Poller(proxy)
        # The fake upstream (parsing what the proxy sends it) and the large request's client run
        # here, at low priority: on a developer's machine the provider is elsewhere, and their CPU
        # would be measured as the proxy's stall. Linux keeps a niceness per thread.
        for thread in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(thread), 10)
        try:
            time.sleep(1.0)
            quiet, _, count = poller.during(lambda: time.sleep(20))
            print(f"nothing else running: {shown(quiet)} ({count} answered)", flush=True)
            for name, make in scenarios(fake, sys.argv[1:]).items():
                data = make()
                with PeakMemory(proxy) as memory:
                    times, seconds, count = poller.during(post(proxy, "/v1/chat/completions" if name.startswith(
                        "chat") else "/v1/responses", data))
                print(f"{name}: {shown(times)} during {seconds:.1f} s ({count} answered); {memory}", flush=True)
            if sys.argv[1:] and "stream" not in sys.argv[1:]:
                return
            fake.reset()  # a refused request left its reply unused
            fake.push(Reply(text=" ".join(["tok"] * 200_000)))
            times, seconds, count = poller.during(post(proxy, "/v1/responses", json.dumps(
                {"model": "fake-responses/gpt-test", "input": "hi", "stream": True}).encode(), stream=True))
            print(f"responses stream of 200,000 tokens: {shown(times)} during {seconds:.1f} s ({count} answered)",
                  flush=True)
        finally:
            poller.process.stdin.close()
            poller.process.wait()
            proxy.stop()


if __name__ == "__main__":
    main()
