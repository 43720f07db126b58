"""The warm bridge pool: requests are served by bridges started before them, the pool refills,
an idle bridge that dies is replaced, and nothing outlives the proxy."""

import os
import signal
import time

import pytest
import requests

from proxy import Demand
from tests.fake_upstream import Reply
from tests.helpers import alive, running_proxy, wait_for

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def pooled(agent_dir, tmp_path):
    with running_proxy(agent_dir, tmp_path / "proxy.log", {"PI_PROXY_BRIDGE_POOL": "2"}) as running:
        yield running


def chat(proxy, text: str = "pooled", **reply) -> requests.Response:
    return requests.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                         json={"model": "fake-chat/chat-model", "messages": USER}, **reply)


def test_a_request_is_served_by_a_bridge_started_before_it(pooled, fake):
    idle = wait_for(lambda: len(pooled.bridges(serving=False)) == 2 and pooled.bridges(serving=False))
    assert len(idle) == 2, "the pool holds two idle bridges"
    fake.push(Reply(text="one two three four five six", delay=0.3))
    response = requests.post(f"{pooled.url}/v1/chat/completions", stream=True, timeout=30,
                             json={"model": "fake-chat/chat-model", "messages": USER, "stream": True})
    serving = wait_for(pooled.bridges)
    assert len(serving) == 1 and serving[0] in idle, "the serving bridge was one of the idle ones"
    assert b'six"' in b"".join(response.iter_content(None)), "the whole reply arrives"


def test_the_pool_refills_after_use(pooled, fake):
    before = set(wait_for(lambda: len(pooled.bridges(serving=False)) == 2 and pooled.bridges(serving=False)))
    for text in ("first", "second", "third"):
        fake.push(Reply(text=text))
        assert chat(pooled).json()["choices"][0]["message"]["content"] == text
    after = wait_for(lambda: len(pooled.bridges(serving=False)) == 2 and pooled.bridges(serving=False))
    assert len(after) == 2 and not before & set(after), "used bridges are gone, fresh ones wait"
    assert pooled.wait_no_bridges()


def test_an_idle_bridge_that_dies_is_replaced(pooled, fake):
    idle = wait_for(lambda: len(pooled.bridges(serving=False)) == 2 and pooled.bridges(serving=False))
    os.kill(idle[0], signal.SIGKILL)
    replaced = wait_for(lambda: len(pooled.bridges(serving=False)) == 2 and idle[0] not in pooled.bridges(serving=False)
                        and pooled.bridges(serving=False))
    assert replaced and idle[0] not in replaced
    fake.push(Reply(text="after a death"))
    answer = chat(pooled).json()
    assert answer.get("choices", [{}])[0].get("message", {}).get("content") == "after a death", answer


def test_sigterm_leaves_no_bridge_behind(pooled, fake):
    idle = wait_for(lambda: len(pooled.bridges(serving=False)) == 2 and pooled.bridges(serving=False))
    fake.push(Reply(text="one two three", hang_after=3))  # then silent, within the 4 s timeout
    response = requests.post(f"{pooled.url}/v1/chat/completions", stream=True, timeout=30,
                             json={"model": "fake-chat/chat-model", "messages": USER, "stream": True})
    serving = wait_for(pooled.bridges)
    assert serving
    bridges = set(idle) | set(serving) | set(pooled.bridges(serving=False))
    pooled.proc.send_signal(signal.SIGTERM)
    assert pooled.proc.wait(timeout=10) == 0
    assert not [pid for pid in bridges if alive(pid)], "every bridge was killed and reaped"
    body = b"".join(response.iter_content(None))
    assert body.rstrip().endswith(b"data: [DONE]"), "the open stream still got its end"
    assert fake.wait_for_disconnect(timeout=2)


def test_idle_bridges_exit_when_the_proxy_dies_without_cleanup(pooled):
    idle = wait_for(lambda: len(pooled.bridges(serving=False)) == 2 and pooled.bridges(serving=False))
    pooled.proc.kill()
    pooled.proc.wait()
    assert wait_for(lambda: not [pid for pid in idle if alive(pid)], timeout=5), \
        "an idle bridge notices the end of its stdin and exits"


def test_pool_size_zero_spawns_on_demand(start_proxy, fake):
    running = start_proxy({"PI_PROXY_BRIDGE_POOL": "0"})
    time.sleep(0.5)
    assert running.bridges(serving=False) == []
    fake.push(Reply(text="on demand"))
    assert chat(running).json()["choices"][0]["message"]["content"] == "on demand"
    assert running.wait_no_bridges() and running.bridges(serving=False) == []


def test_the_pool_grows_to_the_requests_that_ran_at_once(pooled, fake):
    wait_for(lambda: len(pooled.bridges(serving=False)) == 2)
    for _ in range(4):
        fake.push(Reply(text="one two three", delay=1.5))  # long enough for two bridges to start on demand
    responses = [requests.post(f"{pooled.url}/v1/chat/completions", stream=True, timeout=30,
                               json={"model": "fake-chat/chat-model", "messages": USER, "stream": True})
                 for _ in range(4)]
    assert wait_for(lambda: len(pooled.bridges()) == 4, timeout=30), "four requests in flight at once"
    for response in responses:
        assert b'three"' in b"".join(response.iter_content(None)), "the whole reply arrives"
    assert wait_for(lambda: not pooled.bridges() and len(pooled.bridges(serving=False)) == 4, timeout=30), \
        "four clients at once: four bridges wait for their next requests"


def test_demand_is_the_most_requests_at_once_within_its_window():
    demand = Demand(window=300)
    assert demand.peak(now=0) == 0
    for now, count in [(0, 1), (10, 4), (20, 2), (200, 3), (250, 1)]:
        demand.note(count, now)
    assert demand.peak(now=250) == 4
    assert demand.peak(now=311) == 3, "the 4 at t=10 is out of the window; the 3 at t=200 is not"
    assert demand.peak(now=501) == 1
    assert demand.peak(now=551) == 0
    assert len(demand.peaks) == 0
