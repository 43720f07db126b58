"""Large requests are prepared in a child process (proxy.py, section 15: `prepared`): parsed,
checked, translated and serialised there, so that the proxy's loop never holds the GIL for them
and its collector never walks what they build. The mechanism, called here as the routes call it,
and each client API's large request answered end to end through the real bridge and pi-ai."""

import contextlib
import json
import os
import signal
import threading
import time

import gevent
import gevent.lock
import pytest
import requests

import proxy as proxy_module
from tests.fake_upstream import Reply
from tests.helpers import children, models_json, wait_for

LARGE = proxy_module.PREPARED_APART_BYTES + 1


class StubProxy:
    """What `prepared` reads of the Proxy."""

    def __init__(self, **config):
        self.config = proxy_module.Config(**config)
        self.response_store = proxy_module.ResponseStore(10**6, 60)
        self.preparers = gevent.lock.BoundedSemaphore(2)

    def envelope_key(self) -> bytes:
        return b"k" * 32


def client() -> proxy_module.ClientRequest:
    return proxy_module.ClientRequest(proxy_module.RequestRecord("req_test", "chat"))


def prepared(job, size: int = LARGE, stub=None, request=None):
    return proxy_module.prepared(job, bytearray(b" " * size), stub or StubProxy(), request or client())


def test_a_large_body_is_prepared_in_a_child_process_and_a_small_one_here():
    def job(raw, proxy, request, fetch_images):
        request.record.note_body({"model": "fake-chat/chat-model", "stream": True})
        return os.getpid(), len(raw), proxy_module.json_text(["x" * 200_000]), {"small": b"y"}, proxy.response_store

    stub, request = StubProxy(), client()
    pid, size, large, small, store = prepared(job, stub=stub, request=request)
    assert pid != os.getpid() and size == LARGE
    assert type(large) is proxy_module.JsonText and json.loads(b"".join(large)) == ["x" * 200_000]
    assert small == {"small": b"y"}, "large JSON text travels as it is, the rest pickled"
    assert store is stub.response_store, "the store stands for the proxy's own, not a copy"
    assert (request.record.model, request.record.stream) == ("fake-chat/chat-model", True)
    assert pid not in [child for child, _ in children(os.getpid())], "the child was reaped"
    assert prepared(job, size=proxy_module.PREPARED_APART_BYTES)[0] == os.getpid()


def test_what_a_child_reads_of_the_store_is_the_most_recently_used_here():
    """The child reads its own copy of the Responses store: the entries it used are refreshed in the
    proxy's, or a long session's items, referenced at every turn, would be evicted first."""
    stub = StubProxy()
    for name in ("used", "other"):
        stub.response_store.put(("item", name), {"id": name})

    def job(raw, proxy, request, fetch_images):
        return proxy.response_store.get(("item", "used"), proxy_module.ByteBudget(1000))

    assert prepared(job, stub=stub) == {"id": "used"}
    assert list(stub.response_store.entries) == [("item", "other"), ("item", "used")]
    assert stub.response_store.hits is None


def test_a_childs_api_error_is_the_clients_and_a_bug_is_not():
    def refused(raw, proxy, request, fetch_images):
        raise proxy_module.ApiError(413, "messages holds more than 2 entries", "request_too_large",
                                    param="messages", code="request_too_large")

    with pytest.raises(proxy_module.ApiError) as error:
        prepared(refused)
    assert (error.value.status, error.value.message, error.value.type, error.value.param, error.value.code) == (
        413, "messages holds more than 2 entries", "request_too_large", "messages", "request_too_large")

    def broken(raw, proxy, request, fetch_images):
        raise KeyError("no such thing")

    with pytest.raises(RuntimeError, match="KeyError: 'no such thing'"):
        prepared(broken)

    def gone(raw, proxy, request, fetch_images):
        os._exit(3)

    with pytest.raises(RuntimeError, match="ended without an answer"):
        prepared(gone)

    def unpicklable(raw, proxy, request, fetch_images):
        return threading.Lock()

    with pytest.raises(RuntimeError, match="cannot pickle '_thread.lock' object"):
        prepared(unpicklable)


@pytest.mark.parametrize("remote_images, refusal", [
    (False, "this proxy fetches none"),
    (True, "could not be used: refused"),  # a loopback address: the proxy's checked fetch refuses it
])
def test_a_child_asks_the_proxy_for_remote_images(remote_images, refusal):
    """Fetching needs the loop, which the child must never run: it sends the URLs and waits for
    the proxy's answer, here the fetcher's refusal, raised in the child and passed on as its error."""
    def job(raw, proxy, request, fetch_images):
        return fetch_images([("http://127.0.0.1:9/pixel.png", "messages[3].content[0].image_url")])

    with pytest.raises(proxy_module.ApiError) as error:
        prepared(job, stub=StubProxy(remote_images=remote_images))
    assert error.value.status == 400 and error.value.param == "messages[3].content[0].image_url"
    assert refusal in error.value.message


def test_the_images_the_proxy_fetches_for_a_child_take_their_places(monkeypatch):
    """The proxy's answer (here its fetcher stood in for: the real one refuses every loopback
    address) goes back to the child, which puts each image where its URL was."""
    fetched = []

    def fetch_remote_images(wanted, config):
        fetched.append((os.getpid(), wanted))
        return [{"type": "image", "data": f"image of {url}", "mimeType": "image/png"} for url, _ in wanted]

    monkeypatch.setattr(proxy_module, "fetch_remote_images", fetch_remote_images)

    def job(raw, proxy, request, fetch_images):
        context = {"messages": [
            {"role": "user", "content": [{"type": "image", "url": "https://a.example/1.png", "param": "p1"},
                                         {"type": "text", "text": "and"},
                                         {"type": "image", "url": "https://b.example/2.png", "param": "p2"}]}]}
        proxy_module.add_remote_images(context, fetch_images)
        return context["messages"][0]["content"]

    content = prepared(job, stub=StubProxy(remote_images=True))
    assert fetched == [(os.getpid(), [("https://a.example/1.png", "p1"), ("https://b.example/2.png", "p2")])]
    assert [block.get("data") or block["text"] for block in content] == [
        "image of https://a.example/1.png", "and", "image of https://b.example/2.png"]


def test_a_child_past_its_time_is_killed_and_the_request_refused(monkeypatch, tmp_path):
    pid_file = tmp_path / "child"

    def job(raw, proxy, request, fetch_images):
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)

    monkeypatch.setattr(proxy_module, "PREPARE_TIMEOUT", 0.5)
    started = time.monotonic()
    with pytest.raises(proxy_module.ApiError) as error:
        prepared(job)
    assert error.value.status == 503 and "longer than 0.5 s" in error.value.message
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_child_whose_request_is_abandoned_is_killed_and_reaped(tmp_path):
    """A request ended while its child works (its greenlet killed, as on shutdown) takes the child
    with it: no process left, no zombie."""
    pid_file = tmp_path / "child"

    def job(raw, proxy, request, fetch_images):
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)

    waiting = gevent.spawn(prepared, job)
    with gevent.Timeout(10):
        while not pid_file.exists() or not pid_file.read_text():
            gevent.sleep(0.01)
    pid = int(pid_file.read_text())
    waiting.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# --- end to end -------------------------------------------------------------------------------------

PADDING = "p" * 40  # a message's text: 5,000 messages make a body of about 300 KB


def large_chat(count: int) -> list:
    return [{"role": "user" if index % 2 == 0 else "assistant", "content": f"{PADDING} {index}"}
            for index in range(count)]


@pytest.mark.parametrize("path, body, sent", [
    ("/v1/chat/completions", {"model": "fake-chat/chat-model", "messages": large_chat(5001)},
     lambda upstream: upstream["messages"]),
    ("/v1/messages", {"model": "fake-anthropic/claude-test", "max_tokens": 10, "messages": large_chat(5001)},
     lambda upstream: upstream["messages"]),
    ("/v1/responses", {"model": "fake-responses/gpt-test", "input": large_chat(5001), "store": False},
     lambda upstream: upstream["input"]),
])
def test_each_api_answers_a_large_request(proxy, fake, path, body, sent):
    assert len(json.dumps(body)) > LARGE
    fake.push(Reply(text="ok"))
    response = requests.post(proxy.url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    upstream = sent(fake.requests[-1].body)
    assert len(upstream) == 5001 and f"{PADDING} 5000" in json.dumps(upstream[-1])


def test_stream_proxy_answers_a_large_request(proxy, fake):
    model = proxy_module.build_registry([], models_json(fake.base_url)).models["fake-chat/chat-model"]
    messages = [{"role": "user", "content": f"{PADDING} {index}", "timestamp": 0} for index in range(5001)]
    fake.push(Reply(text="ok"))
    response = requests.post(proxy.url + "/api/stream", json={"model": model, "context": {"messages": messages},
                                                             "options": {}}, timeout=60)
    assert response.status_code == 200 and '"type":"done"' in response.text.replace(" ", ""), response.text
    assert len(fake.requests[-1].body["messages"]) == 5001


def test_count_tokens_of_a_large_request_is_the_estimate_made_here(proxy):
    body = {"model": "fake-anthropic/claude-test", "messages": large_chat(5001)}
    response = requests.post(proxy.url + "/v1/messages/count_tokens", json=body, timeout=60)
    assert response.status_code == 200, response.text
    model = proxy_module.resolve_claude_model(body["model"], proxy_module.build_registry(
        [], models_json("http://127.0.0.1:9")).models, lambda provider: True)
    _, estimate = proxy_module.messages_context(body, model, StubProxy(), fetch_images=None)
    assert response.json() == {"input_tokens": estimate} and estimate > 5001


def test_a_large_stored_response_is_the_history_of_the_next(proxy, fake):
    """The store the child sees is the proxy's as of the fork; what the child prepares to keep (the
    large input, as JSON text) is kept by the proxy when the response ends."""
    fake.push(Reply(text="first answer"))
    first = requests.post(proxy.url + "/v1/responses", json={"model": "fake-responses/gpt-test",
                                                             "input": large_chat(5001)}, timeout=60)
    assert first.status_code == 200, first.text
    fake.push(Reply(text="second answer"))
    second = requests.post(proxy.url + "/v1/responses", json={
        "model": "fake-responses/gpt-test", "previous_response_id": first.json()["id"], "input": "and then?"},
        timeout=60)
    assert second.status_code == 200, second.text
    upstream = fake.requests[-1].body["input"]
    assert len(upstream) == 5003 and "first answer" in json.dumps(upstream[-2]) and "and then?" in json.dumps(
        upstream[-1])


def test_a_child_preparing_a_request_dies_with_the_proxy(start_proxy):
    """SIGKILL leaves the proxy no time to kill anything: the child dies at once all the same
    (PDEATHSIG), long before its work would have ended."""
    running = start_proxy({"PI_PROXY_MAX_BODY_SIZE": "20000000"})
    body = {"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "x"}] * 100_000}

    def send():
        with contextlib.suppress(requests.ConnectionError):
            requests.post(running.url + "/v1/chat/completions", json=body, timeout=60)

    threading.Thread(target=send, daemon=True).start()
    preparing = []
    assert wait_for(lambda: preparing.extend(pid for pid, cmdline in children(running.proc.pid)
                                             if b"proxy.py" in cmdline) or preparing, 20), "no child process"
    started = time.monotonic()
    os.kill(running.proc.pid, signal.SIGKILL)
    running.proc.wait()
    assert wait_for(lambda: not os.path.exists(f"/proc/{preparing[0]}") or b") Z" in open(
        f"/proc/{preparing[0]}/stat", "rb").read(), 0.5), "the child outlived the proxy"
    assert time.monotonic() - started < 1
