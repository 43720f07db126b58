"""The relay (proxy.py section 5): pooled bridges make their HTTP requests through proxy.py, which
keeps the upstream connections. Through the real proxy, bridge and pi-ai: connections are reused,
a killed bridge drops its upstream request at once, the socket serves our bridges only, proxies and
custom CAs are honoured; and the upstream timeout counts from when the upstream was contacted."""

import json
import os
import shutil
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
import requests
import urllib3

from proxy import upstream_ssl_context
from tests.fake_network import FakeNetwork, make_certificates
from tests.fake_upstream import Reply
from tests.helpers import wait_for


def chat(proxy, model: str = "fake-chat/chat-model", stream: bool = False, **kwargs) -> requests.Response:
    return requests.post(f"{proxy.url}/v1/chat/completions", timeout=30, stream=stream, **kwargs,
                         json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


def relay_of(proxy) -> tuple[str, str]:
    """The relay socket and token an idle bridge of this proxy was given."""
    assert wait_for(lambda: proxy.bridges(serving=False))
    environ = Path(f"/proc/{proxy.bridges(serving=False)[0]}/environ").read_bytes().split(b"\0")
    variables = dict(entry.decode().split("=", 1) for entry in environ if entry.startswith(b"PI_PROXY_RELAY"))
    return variables["PI_PROXY_RELAY"], variables["PI_PROXY_RELAY_TOKEN"]


def ask_relay(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(request)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_requests_reuse_one_upstream_connection_and_reach_it_unchanged(proxy, fake):
    fake.push(Reply(text="one"), Reply(text="two"))
    opened = fake.connections
    replies = [chat(proxy).json()["choices"][0]["message"]["content"] for _ in range(2)]
    assert replies == ["one", "two"]
    assert fake.connections - opened <= 1, "the second request reuses the first one's connection"
    headers = fake.requests[-1].headers
    assert headers["user-agent"].startswith("OpenAI/JS"), "the SDK's own User-Agent"
    assert headers["authorization"].startswith("Bearer ") and headers["x-stainless-lang"] == "js"
    assert not [name for name in headers if name.startswith("x-pi-")], "nothing of the relay's own"


def test_a_killed_bridge_drops_its_upstream_request_at_once(proxy, fake):
    fake.push(Reply(text="never finished at all", chunks=4, hang_after=2), Reply(text="after"))
    response = chat(proxy, stream=True)  # returns once the first text has come
    (serving,) = wait_for(lambda: proxy.bridges())
    os.kill(serving, signal.SIGKILL)
    killed = time.monotonic()
    assert fake.wait_for_disconnect(timeout=2), "the upstream sees the disconnect"
    assert time.monotonic() - killed < 2
    response.close()
    assert chat(proxy).json()["choices"][0]["message"]["content"] == "after", "the pool serves on"


def test_the_relay_serves_no_one_but_its_bridges(proxy, fake):
    path, token = relay_of(proxy)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700, "no other user may enter"
    for header in ["", "x-pi-relay-token: guessed\r\n"]:
        answer = ask_relay(path, f"GET {fake.base_url}/v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\n{header}\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 403 ")
    assert fake.requests == []
    # A bridge's warm-up: the relay echoes it without contacting anyone.
    answer = ask_relay(path, f"POST http://relay.invalid/echo HTTP/1.1\r\nx-pi-relay-token: {token}\r\n"
                             f"content-length: 7\r\n\r\ndata: w".encode())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\ndata: w")
    assert fake.requests == []


# ---------------------------------------------------------------- proxies and certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make test certificates")
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_fake(fake, certificates):
    """The fake upstream behind TLS, with a certificate no default store trusts."""
    with FakeNetwork(fake.port, certificates, delay_ms=0) as network:
        yield network


class ConnectProxy:
    """An HTTP proxy that tunnels CONNECT requests, remembering their targets."""

    def __init__(self):
        self.targets = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        method, target, _ = head.split(b"\r\n")[0].decode().split()
        self.targets.append(f"{method} {target}")
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(source, sink):
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            for sock in (source, sink):
                sock.close()
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self):
        self.listener.close()


def tls_agent(tmp_path, tls_fake) -> Path:
    """An agent directory whose provider `tls` is the fake behind TLS."""
    agent = tmp_path / "agent"
    agent.mkdir()
    (agent / "models.json").write_text(json.dumps({"providers": {"tls": {
        "baseUrl": f"{tls_fake.base_url}/v1", "api": "openai-completions", "apiKey": "tls-key",
        "models": [{"id": "m"}]}}}))
    return agent


def test_https_proxy_and_node_extra_ca_certs_are_honoured(start_proxy, tmp_path, fake, tls_fake, certificates):
    tunnel = ConnectProxy()
    try:
        running = start_proxy({"PI_PROXY_BRIDGE_POOL": "1", "HTTPS_PROXY": tunnel.url,
                               "NODE_EXTRA_CA_CERTS": str(certificates.ca)}, agent=tls_agent(tmp_path, tls_fake))
        fake.push(Reply(text="through the tunnel"))
        assert chat(running, "tls/m").json()["choices"][0]["message"]["content"] == "through the tunnel"
        assert tunnel.targets == [f"CONNECT {tls_fake.base_url.removeprefix('https://')}"]
    finally:
        tunnel.close()


def test_no_proxy_and_requests_ca_bundle_are_honoured(start_proxy, tmp_path, fake, tls_fake, certificates):
    running = start_proxy({"PI_PROXY_BRIDGE_POOL": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1",
                           "REQUESTS_CA_BUNDLE": str(certificates.ca)}, agent=tls_agent(tmp_path, tls_fake))
    fake.push(Reply(text="direct"))
    assert chat(running, "tls/m").json()["choices"][0]["message"]["content"] == "direct"


def test_an_untrusted_certificate_is_refused(tls_fake, certificates):
    for environ, trusted in [({}, False), ({"NODE_EXTRA_CA_CERTS": str(certificates.ca)}, True),
                             ({"SSL_CERT_FILE": str(certificates.ca)}, True)]:
        pool = urllib3.PoolManager(ssl_context=upstream_ssl_context(environ), retries=False)
        try:
            pool.request("GET", f"{tls_fake.base_url}/v1/models", timeout=5)
            verified = True
        except urllib3.exceptions.SSLError:
            verified = False
        assert verified == trusted, environ


# ---------------------------------------------------------------- the upstream timeout


def test_the_upstream_timeout_counts_from_when_the_upstream_was_contacted(start_proxy, tmp_path, fake):
    """A bridge that takes longer to start than the whole upstream timeout still gets the full
    timeout for the upstream: here `node` takes 2.5 s to start, the upstream answers after 1 s,
    the timeout is 2 s."""
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "node").write_text(f"#!/bin/sh\nsleep 2.5\nexec {shutil.which('node')} \"$@\"\n")
    (slow / "node").chmod(0o755)
    running = start_proxy({"PATH": f"{slow}:{os.environ['PATH']}", "PI_PROXY_BRIDGE_POOL": "0",
                           "PI_PROXY_UPSTREAM_TIMEOUT_MS": "2000"})
    fake.push(Reply(text="worth the wait", first_byte_delay=1.0))
    started = time.monotonic()
    response = chat(running)
    assert time.monotonic() - started > 3.5, "the bridge's start and the upstream's delay both passed"
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "worth the wait"
