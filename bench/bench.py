"""`make bench`: the proxy measured against the fake upstream called directly, in the same run.

    bench/bench.py [loopback] [wan] [--delay-ms 25] [--idle [SECONDS]]

Two scenarios (both by default; docs/performance.md says how to read them):

loopback: starts tests/fake_upstream.py in this process and a real proxy (proxy.py, its bridge pool,
pi-ai) configured to reach it, then measures:
  1. time to first token and total time of a stream, 20 and 2,000 tokens, p50/p90, proxy vs direct
     (requests 0.3 s apart, so the pool is warm: its bridges have loaded);
  2. CPU-seconds per request of the bridge processes (the proxy's reaped children) and of proxy.py;
  3. sustained requests/second, short non-streaming requests, 4 and 16 concurrent clients;
  4. peak RSS of one in-flight bridge, and of proxy.py holding 100 concurrent slow streams;
  5. a 16,000-token stream: CPU of proxy + bridge per 1,000 tokens (and the 2,000-token one's).

wan: the fake upstream behind TLS and a relay adding --delay-ms to each chunk each way
(tests/fake_network.py, in its own process so that its timers do not share this one's GIL), a proxy
configured to reach it over HTTPS, and first-token times of a 20-token stream for three clients,
interleaved: one holding a warm keep-alive TLS connection to the upstream, one connecting fresh for
each request, and the proxy; one client with pauses between requests, then 4 clients at once; the
CPU of proxy.py and of its bridges per request; with --idle, one request each after everything sat
idle for SECONDS (default 120).

Writes bench/results.json (the scenarios run replace theirs, the others are kept) and prints a table
per scenario. Not a test: nothing here runs under `make test`."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fake_upstream import FakeUpstream, Reply  # noqa: E402
from tests.helpers import RunningProxy  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
MODEL = "bench/m"
USER = [{"role": "user", "content": "hi"}]


def proc_stat(pid: int) -> list:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_split(pid: int) -> tuple[float, float]:
    """(own CPU-seconds, CPU-seconds of its reaped children)."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK


def memory_mb(pid: int, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def percentile(values: list, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def stream_timing(session: requests.Session, url: str, body: dict, verify: bool | str = True) -> tuple[float, float]:
    """(seconds to the first content delta, seconds to the end of the stream)."""
    started = time.perf_counter()
    first = None
    with session.post(url, json=body, stream=True, timeout=60, verify=verify) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and b'"content":"' in line:
                first = time.perf_counter()
    return first - started, time.perf_counter() - started


def latency(fake, proxy, tokens: int, runs: int) -> dict:
    fake.default = Reply(text="tok " * tokens, chunks=tokens)
    body = {"model": "m", "messages": USER, "stream": True}
    session = requests.Session()
    result = {}
    for name, url, model in (("direct", f"{fake.base_url}/v1/chat/completions", "m"),
                             ("proxy", f"{proxy.url}/v1/chat/completions", MODEL)):
        timings = []
        for _ in range(runs):
            time.sleep(0.3)
            timings.append(stream_timing(session, url, {**body, "model": model}))
        ttft, total = [t[0] * 1000 for t in timings], [t[1] * 1000 for t in timings]
        result[name] = {"ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p90": percentile(ttft, 90),
                        "total_ms_p50": percentile(total, 50), "total_ms_p90": percentile(total, 90)}
    return result


def cpu_per_request(fake, proxy, tokens: int, runs: int) -> dict:
    """CPU of proxy.py and of its bridges over `runs` sequential streams. Bridges are counted
    when reaped; the pool holds as many idle bridges after as before, so the sum is per request."""
    fake.default = Reply(text="tok " * tokens, chunks=tokens)
    session = requests.Session()
    time.sleep(1.0)
    own_before, children_before = cpu_split(proxy.proc.pid)
    for _ in range(runs):
        stream_timing(session, f"{proxy.url}/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True})
        time.sleep(0.3)
    time.sleep(1.0)
    own_after, children_after = cpu_split(proxy.proc.pid)
    return {"proxy_cpu_s": (own_after - own_before) / runs, "bridge_cpu_s": (children_after - children_before) / runs}


def throughput(fake, proxy, clients: int, seconds: float) -> dict:
    fake.default = Reply(text="short answer")
    result = {}
    for name, url, model in (("direct", f"{fake.base_url}/v1/chat/completions", "m"),
                             ("proxy", f"{proxy.url}/v1/chat/completions", MODEL)):
        done, errors = [0], [0]
        deadline = time.perf_counter() + seconds

        def client(url=url, model=model, deadline=deadline, done=done, errors=errors):
            session = requests.Session()
            while time.perf_counter() < deadline:
                response = session.post(url, json={"model": model, "messages": USER}, timeout=60)
                if response.status_code == 200:
                    done[0] += 1
                else:
                    errors[0] += 1

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result[name] = {"requests_per_s": done[0] / (time.perf_counter() - started), "errors": errors[0]}
        time.sleep(1.0)
    return result


def concurrent_slow_streams(fake, proxy, streams: int) -> dict:
    """`streams` clients each holding a 40-token stream that lasts about 4 s."""
    fake.default = Reply(text="tok " * 40, chunks=40, delay=0.1)
    peak = {"proxy_rss_mb": 0.0, "bridge_rss_mb": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["proxy_rss_mb"] = max(peak["proxy_rss_mb"], memory_mb(proxy.proc.pid, "VmRSS"))
            for pid in proxy.bridges():
                peak["bridge_rss_mb"] = max(peak["bridge_rss_mb"], memory_mb(pid, "VmHWM"))
            time.sleep(0.2)

    def one(_):
        try:
            with requests.post(f"{proxy.url}/v1/chat/completions", stream=True, timeout=120,
                               json={"model": MODEL, "messages": USER, "stream": True}) as response:
                lines = [line for line in response.iter_lines() if line.startswith(b"data: ")]
            return response.status_code == 200 and lines[-1] == b"data: [DONE]" and b'"error"' not in lines[-2]
        except requests.RequestException:
            return False

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        ok = sum(pool.map(one, range(streams)))
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    return {"streams": streams, "completed": ok, "errors": streams - ok, "seconds": elapsed, **peak}


def long_stream_cpu(fake, proxy, tokens: int, runs: int) -> dict:
    cpu = cpu_per_request(fake, proxy, tokens, runs)
    per_k = (cpu["proxy_cpu_s"] + cpu["bridge_cpu_s"]) / tokens * 1000
    return {**cpu, "tokens": tokens, "cpu_s_per_1k_tokens": per_k}


def proxy_settings() -> dict:
    """The proxy's environment beyond the test defaults: the bench's own PI_PROXY_* variables
    (e.g. PI_PROXY_BRIDGE_POOL=4 make bench-wan) over these."""
    return {"PI_PROXY_LOG_LEVEL": "WARNING", "PI_PROXY_UPSTREAM_TIMEOUT_MS": "60000",
            **{name: value for name, value in os.environ.items()
               if name.startswith("PI_PROXY_") and name != "PI_PROXY_PORT"}}


def models_json(fake_url: str) -> dict:
    return {"providers": {"bench": {"baseUrl": f"{fake_url}/v1", "api": "openai-completions", "apiKey": "sk-bench",
                                    "models": [{"id": "m", "maxTokens": 32000}]}}}


def bookkeeping(runs: int = 2000) -> dict:
    """CPU-ms of one request's bookkeeping (proxy.py section 12: its record fed a 20-token stream's
    events, the ledger, the INFO log line written, text and JSON), measured in this process: the
    proxy's CPU per request is too coarse to show it."""
    import logging

    import proxy as pi_proxy
    events = [{"type": "start"}, *({"type": "text_delta", "contentIndex": 0, "delta": "x"} for _ in range(20)),
              {"type": "done", "reason": "stop", "message": {"usage": {
                  "input": 12, "output": 20, "cacheRead": 0, "cacheWrite": 0, "cost": {"total": 0.00034}}}}]
    model = {"provider": "bench", "id": "m", "api": "openai-completions"}
    sink = open(os.devnull, "w")
    handler = logging.StreamHandler(sink)
    pi_proxy.log.addHandler(handler)
    pi_proxy.log.setLevel(logging.INFO)
    pi_proxy.log.propagate = False
    figures = {}
    for name, formatter in (("text", logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")),
                            ("json", pi_proxy.JsonLogFormatter())):
        handler.setFormatter(formatter)
        ledger = pi_proxy.Ledger()
        started = time.process_time()
        for _ in range(runs):
            record = pi_proxy.RequestRecord(pi_proxy.request_id(None), "chat")
            record.note_body({"model": MODEL, "stream": True})
            record.note_model(model)
            for _event in record.observe(events):
                pass
            record.status = 200
            record.finish(ledger)
        figures[f"{name}_cpu_ms"] = (time.process_time() - started) / runs * 1000
    pi_proxy.log.removeHandler(handler)
    sink.close()
    return figures


def loopback_table(results: dict) -> str:
    lat, cpu, tp, slow, long = (results[k] for k in ("latency", "cpu_per_request", "throughput", "slow_streams",
                                                     "long_stream"))
    rows = ["| figure | proxy | direct | proxy − direct |", "|---|---|---|---|"]
    for tokens, figures in lat.items():
        for key, label in (("ttft", "time to first token"), ("total", "total time")):
            for p in ("p50", "p90"):
                proxy_ms, direct_ms = figures["proxy"][f"{key}_ms_{p}"], figures["direct"][f"{key}_ms_{p}"]
                rows.append(f"| {label}, {tokens} tokens, {p} | {proxy_ms:.1f} ms | {direct_ms:.1f} ms | "
                            f"{proxy_ms - direct_ms:+.1f} ms |")
    rows.append(f"| CPU per 20-token stream: bridge | {cpu['bridge_cpu_s'] * 1000:.0f} ms | | |")
    rows.append(f"| CPU per 20-token stream: proxy.py | {cpu['proxy_cpu_s'] * 1000:.1f} ms | | |")
    if "bookkeeping" in results:
        bookkeeping = results["bookkeeping"]
        rows.append(f"| of which the request's record, usage and log line (text / JSON) | "
                    f"{bookkeeping['text_cpu_ms']:.3f} / {bookkeeping['json_cpu_ms']:.3f} ms | | |")
    for clients, figures in tp.items():
        rows.append(f"| short requests/s, {clients} clients | {figures['proxy']['requests_per_s']:.1f} "
                    f"({figures['proxy']['errors']} errors) | {figures['direct']['requests_per_s']:.0f} | |")
    rows.append(f"| peak RSS, one in-flight bridge | {slow['bridge_rss_mb']:.1f} MB | | |")
    rows.append(f"| peak RSS, proxy.py with {slow['streams']} concurrent slow streams | {slow['proxy_rss_mb']:.1f} MB "
                f"({slow['completed']} completed, {slow['errors']} errors, {slow['seconds']:.1f} s) | | |")
    for tokens, figures in long.items():
        rows.append(f"| CPU per 1,000 tokens, {tokens}-token stream (proxy + bridge) | "
                    f"{figures['cpu_s_per_1k_tokens'] * 1000:.1f} ms (proxy {figures['proxy_cpu_s'] * 1000:.0f} ms, "
                    f"bridge {figures['bridge_cpu_s'] * 1000:.0f} ms per stream) | | |")
    return "\n".join(rows)


def loopback() -> dict:
    with FakeUpstream() as fake, tempfile.TemporaryDirectory() as home:
        agent_dir = Path(home) / "agent"
        agent_dir.mkdir()
        (agent_dir / "models.json").write_text(json.dumps(models_json(fake.base_url)))
        proxy = RunningProxy(agent_dir, Path(home) / "proxy.log", proxy_settings())
        try:
            time.sleep(1.0)
            results = {"proxy_settings": proxy_settings()}
            print("loopback: latency ...", flush=True)
            results["latency"] = {20: latency(fake, proxy, 20, 30), 2000: latency(fake, proxy, 2000, 15)}
            print("loopback: CPU per request ...", flush=True)
            results["cpu_per_request"] = cpu_per_request(fake, proxy, 20, 20)
            results["bookkeeping"] = bookkeeping()
            print("loopback: throughput ...", flush=True)
            results["throughput"] = {clients: throughput(fake, proxy, clients, 8.0) for clients in (4, 16)}
            print("loopback: 100 slow streams ...", flush=True)
            results["slow_streams"] = concurrent_slow_streams(fake, proxy, 100)
            print("loopback: long streams ...", flush=True)
            results["long_stream"] = {2000: long_stream_cpu(fake, proxy, 2000, 5),
                                      16000: long_stream_cpu(fake, proxy, 16000, 3)}
        finally:
            proxy.stop()
    return results


# ------------------------------------------------------------------------------------------- WAN

WAN_KINDS = ("warm", "fresh", "proxy")  # the clients compared, in the order they take turns


def wan_clients(upstream_url: str, proxy_url: str, ca: str) -> dict:
    """One factory per kind of client; a client is a callable that makes one 20-token stream
    request and returns its time to first token in ms. Each client makes one request when made
    (the warm one's connection opens then; for all, the client-side code's first run)."""
    chat = "/v1/chat/completions"
    body = {"messages": USER, "stream": True}

    def warm():
        session = requests.Session()
        return lambda: stream_timing(session, upstream_url + chat, {**body, "model": "m"}, ca)[0] * 1000

    def fresh():
        def one():
            with requests.Session() as session:
                return stream_timing(session, upstream_url + chat, {**body, "model": "m"}, ca)[0] * 1000
        return one

    def proxy():
        session = requests.Session()
        return lambda: stream_timing(session, proxy_url + chat, {**body, "model": MODEL})[0] * 1000

    def made(factory):
        def make():
            client = factory()
            client()
            return client
        return make

    return {"warm": made(warm), "fresh": made(fresh), "proxy": made(proxy)}


def wan_first_tokens(factories: dict, clients: int, rounds: int, pause: float) -> dict:
    """`rounds` rounds; in each, every kind in turn: a pause, then each of its `clients` clients
    makes one request, all at once. Returns p50/p90 and the samples per kind."""
    group = {kind: [factories[kind]() for _ in range(clients)] for kind in WAN_KINDS}
    samples = {kind: [] for kind in WAN_KINDS}
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(rounds):
            for kind in WAN_KINDS:
                time.sleep(pause)
                samples[kind].extend(pool.map(lambda client: client(), group[kind]))
    return {kind: {"ttft_ms_p50": percentile(values, 50), "ttft_ms_p90": percentile(values, 90),
                   "samples_ms": [round(value, 1) for value in values]} for kind, values in samples.items()}


def wan(delay_ms: float, idle_s: float | None) -> dict:
    with tempfile.TemporaryDirectory() as home:
        network = subprocess.Popen([sys.executable, "-m", "tests.fake_network", "--delay-ms", str(delay_ms),
                                    "--tokens", "20", "--dir", str(Path(home) / "tls")],
                                   cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            upstream = json.loads(network.stdout.readline())
            agent_dir = Path(home) / "agent"
            agent_dir.mkdir()
            (agent_dir / "models.json").write_text(json.dumps(models_json(upstream["base_url"])))
            # Node reads NODE_EXTRA_CA_CERTS; proxy.py's own HTTPS (requests, ssl) the other two.
            trust = {name: upstream["ca"] for name in ("NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")}
            proxy = RunningProxy(agent_dir, Path(home) / "proxy.log", {**proxy_settings(), **trust})
            try:
                time.sleep(1.0)
                factories = wan_clients(upstream["base_url"], proxy.url, upstream["ca"])
                results = {"delay_ms_each_way": delay_ms, "tokens": 20, "proxy_settings": proxy_settings()}
                print(f"wan ({delay_ms:g} ms each way): sequential ...", flush=True)
                own_before, children_before = cpu_split(proxy.proc.pid)
                rounds = 20
                results["sequential"] = wan_first_tokens(factories, 1, rounds, 0.5)
                time.sleep(1.0)  # the last bridge reaped
                own_after, children_after = cpu_split(proxy.proc.pid)
                proxy_requests = rounds + 1  # and the client's first, when made
                results["cpu_per_request"] = {"proxy_cpu_s": (own_after - own_before) / proxy_requests,
                                              "bridge_cpu_s": (children_after - children_before) / proxy_requests}
                print("wan: 4 clients ...", flush=True)
                results["clients_4"] = wan_first_tokens(factories, 4, 10, 0.5)
                if idle_s is not None:
                    print(f"wan: {idle_s:g} s idle ...", flush=True)
                    clients = {kind: factories[kind]() for kind in WAN_KINDS}
                    time.sleep(idle_s)
                    results["after_idle"] = {"idle_s": idle_s, **{kind: {"ttft_ms": clients[kind]()}
                                                                   for kind in ("proxy", "fresh", "warm")}}
            finally:
                proxy.stop()
        finally:
            network.stdin.close()
            network.wait(timeout=10)
    return results


def wan_table(results: dict) -> str:
    delay = results["delay_ms_each_way"]
    rows = [f"| first token, {results['tokens']}-token stream, {2 * delay:g} ms round trip | warm connection | "
            "new connection | proxy | proxy − warm |", "|---|---|---|---|---|"]
    for key, label in (("sequential", "1 client, pauses"), ("clients_4", "4 clients at once")):
        for p in ("p50", "p90"):
            warm, fresh, proxy = (results[key][kind][f"ttft_ms_{p}"] for kind in WAN_KINDS)
            rows.append(f"| {label}, {p} | {warm:.1f} ms | {fresh:.1f} ms | {proxy:.1f} ms | {proxy - warm:+.1f} ms |")
    if "after_idle" in results:
        idle = results["after_idle"]
        warm, fresh, proxy = (idle[kind]["ttft_ms"] for kind in WAN_KINDS)
        rows.append(f"| first request after {idle['idle_s']:g} s idle | {warm:.1f} ms | {fresh:.1f} ms | "
                    f"{proxy:.1f} ms | {proxy - warm:+.1f} ms |")
    cpu = results["cpu_per_request"]
    rows.append(f"| CPU per request: proxy.py | | | {cpu['proxy_cpu_s'] * 1000:.1f} ms | |")
    rows.append(f"| CPU per request: bridge | | | {cpu['bridge_cpu_s'] * 1000:.0f} ms | |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------- main

def conditions() -> dict:
    """What a figure was measured on: the commit (and whether the tree differed from it), the time,
    the load average (the machine is shared)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": bool(git("status", "--porcelain", "-uno", "--", ".", ":!bench/results.json")),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_average": [round(load, 2) for load in os.getloadavg()]}


def main():
    parser = argparse.ArgumentParser(description="The benchmark: bench/results.json and a table per scenario.")
    parser.add_argument("scenarios", nargs="*", metavar="loopback|wan", help="default: both")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="wan: added to each chunk each way (25)")
    parser.add_argument("--idle", type=float, nargs="?", const=120.0, metavar="SECONDS",
                        help="wan: also a request after SECONDS (120) idle")
    args = parser.parse_args()
    run = {"loopback": loopback, "wan": lambda: wan(args.delay_ms, args.idle)}
    tables = {"loopback": loopback_table, "wan": wan_table}
    unknown = set(args.scenarios) - set(run)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}")
    path = ROOT / "bench" / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved = {scenario: saved[scenario] for scenario in run if scenario in saved}
    for scenario in args.scenarios or list(run):
        before = conditions()
        results = run[scenario]()
        after = conditions()
        saved[scenario] = {**before, "load_average_after": after["load_average"], **results}
        path.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"\n{scenario} (commit {before['commit']}{' + changes' if before['modified'] else ''}, "
              f"load average {before['load_average'][0]} before, {after['load_average'][0]} after)")
        print(tables[scenario](saved[scenario]))


if __name__ == "__main__":
    main()
