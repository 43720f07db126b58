"""Runs proxy.fetch_remote_images as the proxy does (gevent, monkey-patched), for
test_remote_images: one JSON case per stdin line -> one JSON answer per stdout line.

A case: {"urls": [...], "config": {Config fields}, "hosts": {"images.test": "127.0.0.1"}}. The
made-up host names in `hosts` resolve to the test's image servers through fetch_remote_images'
`addresses` argument (a resolver like any other); every other name and address goes through the
real check (checked_addresses), so 127.0.0.1 itself stays refused."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import proxy  # noqa: E402


def answer(case: dict) -> dict:
    hosts = case.get("hosts", {})

    def addresses(host, port):
        return [hosts[host]] if host in hosts else proxy.checked_addresses(host, port)

    config = proxy.Config(remote_images=True, **case.get("config", {}))
    wanted = [(url, f"images[{i}]") for i, url in enumerate(case["urls"])]
    started = time.monotonic()
    try:
        result = {"images": proxy.fetch_remote_images(wanted, config, addresses)}
    except proxy.ApiError as error:
        result = {"status": error.status, "message": error.message, "param": error.param}
    return {**result, "elapsed": time.monotonic() - started}


for line in sys.stdin:
    print(json.dumps(answer(json.loads(line))), flush=True)
