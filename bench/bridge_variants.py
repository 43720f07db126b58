"""How a bridge process spends CPU and memory, for each way of running it (docs/performance.md,
"Where a bridge's time goes"). Run from the repository root: .venv/bin/python bench/bridge_variants.py

Each variant is a node command line. N rounds, each running every variant once (interleaved, so
that the machine's load weighs on all alike): spawn the bridge and, after it has loaded (1.5 s
later, as in the pool), send one 20-token stream request to a fake upstream (directly: no relay).
Reports the medians of: CPU-seconds spent loading, CPU-seconds for the whole request (load +
answer), time from request to first event and to the final event, peak RSS."""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fake_upstream import FakeUpstream, Reply  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
WARM = ["anthropic-messages", "openai-completions", "openai-responses"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stream_request(base_url: str, api: str = "openai-completions") -> dict:
    model = {"id": "m", "name": "m", "api": api, "provider": "fake",
             "baseUrl": f"{base_url}/v1" if api.startswith("openai") else base_url,
             "reasoning": False, "input": ["text"], "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
             "contextWindow": 100000, "maxTokens": 1000}
    return {"op": "stream", "model": model, "options": {"apiKey": "k", "maxRetryDelayMs": 0}, "payload": {},
            "context": {"messages": [{"role": "user", "content": "hi", "timestamp": 0}]}}


def run_once(command: list, request: dict, settle: float = 1.5) -> dict:
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    time.sleep(settle)
    load_cpu = cpu_seconds(proc.pid)
    sent = time.perf_counter()
    proc.stdin.write(json.dumps(request).encode() + b"\n")
    proc.stdin.flush()
    first = None
    for line in proc.stdout:
        first = first or time.perf_counter()
        if json.loads(line)["type"] in ("done", "error"):
            break
    final = time.perf_counter()
    rss = peak_rss_mb(proc.pid)  # before it exits: a zombie has no memory figures
    time.sleep(0.05)  # let it reach exit, then read its CPU total before reaping
    total_cpu = cpu_seconds(proc.pid)
    proc.stdin.close()
    proc.wait()
    return {"load_cpu": load_cpu, "request_cpu": total_cpu, "first_event_ms": (first - sent) * 1000,
            "final_event_ms": (final - sent) * 1000, "peak_rss_mb": rss}


def medians(results: list) -> dict:
    return {key: round(statistics.median(r[key] for r in results), 3) for key in results[0]}


VARIANTS = {
    "node -e 0 (floor)": ["node", "-e", "process.stdin.resume()"],
    "source, whole pi-ai index, providers loaded on first use": ["node", "bridge.mjs"],
    "source, providers preloaded": ["node", "bridge.mjs", *WARM],
    "bundle, providers preloaded": ["node", "build/bridge.mjs", *WARM],
    "bundle, providers preloaded, warm-up (used)": ["node", "build/bridge.mjs", "--warm-up", *WARM],
    "bundle, one API preloaded": ["node", "build/bridge.mjs", "openai-completions"],
    "bundle, one API preloaded, warm-up": ["node", "build/bridge.mjs", "--warm-up", "openai-completions"],
    "bundle, no preload": ["node", "build/bridge.mjs"],
    "bundle + --max-semi-space-size=1": ["node", "--max-semi-space-size=1", "build/bridge.mjs", *WARM],
    "bundle + --max-semi-space-size=4": ["node", "--max-semi-space-size=4", "build/bridge.mjs", *WARM],
    "bundle + --max-lazy": ["node", "--max-lazy", "build/bridge.mjs", *WARM],
    "bundle + --single-threaded-gc": ["node", "--single-threaded-gc", "build/bridge.mjs", *WARM],
    "bundle + --v8-pool-size=0": ["node", "--v8-pool-size=0", "build/bridge.mjs", *WARM],
}


def main():
    runs = int(os.environ.get("RUNS", "5"))
    only = sys.argv[1:]
    with FakeUpstream() as fake:
        fake.default = Reply(text="tok " * 20, chunks=20)
        request = stream_request(fake.base_url)
        chosen = {name: command for name, command in VARIANTS.items() if not only or any(o in name for o in only)}
        results = {name: [] for name in chosen}
        for _ in range(runs):
            for name, command in chosen.items():
                floor = command[-1] == "process.stdin.resume()"
                results[name].append({"load_cpu": run_floor(command)} if floor else run_once(command, request))
        print(f"{'variant':58s} {'load CPU':>9s} {'req CPU':>8s} {'1st ev':>7s} {'final':>7s} {'peak RSS':>9s}")
        for name, runs_of_variant in results.items():
            r = medians(runs_of_variant)
            if "request_cpu" not in r:
                print(f"{name:58s} {r['load_cpu'] * 1000:7.0f}ms")
                continue
            print(f"{name:58s} {r['load_cpu'] * 1000:7.0f}ms {r['request_cpu'] * 1000:6.0f}ms "
                  f"{r['first_event_ms']:5.1f}ms {r['final_event_ms']:5.1f}ms {r['peak_rss_mb']:7.1f}MB", flush=True)


def run_floor(command):
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE)
    time.sleep(0.5)
    cpu = cpu_seconds(proc.pid)
    proc.stdin.close()
    proc.wait()
    return cpu


if __name__ == "__main__":
    main()
