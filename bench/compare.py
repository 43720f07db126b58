"""Two trees side by side, taking turns: the CPU of a 16,000-token stream and of a 20-token one.

`make bench` runs one tree; its figures move by 10-20 % from run to run on a shared machine, more
than a change is likely to. This runs a proxy of each tree in turn against one fake upstream, so
both see the same machine. The other tree needs its bridge built: e.g.
    git worktree add /tmp/before <commit> && (cd /tmp/before && npm ci --omit=dev && npm run build)
    .venv/bin/python bench/compare.py /tmp/before . [rounds]
Not a test; prints one line per tree and round."""

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import tests.helpers as helpers  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402


def main():
    trees = [Path(tree).resolve() for tree in sys.argv[1:3]]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    with FakeUpstream() as fake:
        for round_ in range(1, rounds + 1):
            for tree in trees:
                helpers.ROOT = tree  # RunningProxy starts this tree's proxy.py (and so its bridge)
                with tempfile.TemporaryDirectory() as home:
                    agent = Path(home) / "agent"
                    agent.mkdir()
                    (agent / "models.json").write_text(json.dumps(bench.models_json(fake.base_url)))
                    proxy = helpers.RunningProxy(agent, Path(home) / "proxy.log", bench.proxy_settings())
                    try:
                        time.sleep(1.0)
                        long = bench.long_stream_cpu(fake, proxy, 16000, 3)
                        short = bench.cpu_per_request(fake, proxy, 20, 10)
                    finally:
                        proxy.stop()
                print(f"round {round_}, {tree}: 16k stream {long['cpu_s_per_1k_tokens'] * 1000:.1f} ms per 1,000 "
                      f"tokens (proxy {long['proxy_cpu_s'] * 1000:.0f} ms, bridge {long['bridge_cpu_s'] * 1000:.0f} "
                      f"ms per stream); 20-token stream: proxy.py {short['proxy_cpu_s'] * 1000:.1f} ms, bridge "
                      f"{short['bridge_cpu_s'] * 1000:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
