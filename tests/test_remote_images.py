"""Images given by URL: refused unless PI_PROXY_REMOTE_IMAGES=1; then fetched at once under a count
cap, a per-image and a per-request size cap (decompressed), one deadline and a content check, and
never from a loopback, link-local, private or otherwise non-public address (as resolved, at every
redirect hop). Errors say "refused" or "failed", never what another host answered.

All traffic stays on this machine. The refusals are tested end to end, through a proxy. Fetching
itself is tested by tests/image_fetcher.py, which runs the proxy's fetch_remote_images as the
proxy does, with made-up host names that resolve to the test image servers on 127.0.0.1 (through
the function's resolver argument): the proxy itself has no switch that lets it fetch from here."""

import base64
import gzip
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import proxy as proxy_module
from tests.helpers import ROOT, free_port, response_error, running_proxy

# A real 1x1 PNG.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")
PNG_B64 = base64.b64encode(PNG).decode()
MAX_BYTES = 50_000
TIMEOUT = 2.0
DELAY = 0.8
BOMB = gzip.compress(PNG + b"\0" * (MAX_BYTES * 20))


class ImageServer:
    """Serves the paths below on 127.0.0.1 and counts the requests it gets."""

    def __init__(self):
        self.hits, self.redirect_target = [], ""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits.append((self.path, self.headers.get("Host")))
                path = self.path.split("?")[0]
                if path == "/cat.png":
                    self.reply(200, "image/png", PNG)
                elif path == "/big.png":  # no Content-Length: the cap must hold while reading
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(PNG + b"\0" * (MAX_BYTES * 2))
                elif path == "/slow.png":  # headers, a few bytes, then silence
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    self.wfile.write(PNG[:8])
                    self.wfile.flush()
                    time.sleep(TIMEOUT * 3)
                elif path == "/drip.png":  # a byte now and then: no read ever times out
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    for _ in range(int(TIMEOUT * 6)):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.5)
                elif path == "/gzip.png":  # a compressed image: its decompressed size is what counts
                    self.reply(200, "image/png", gzip.compress(PNG + b"\0" * (MAX_BYTES // 2)), encoding="gzip")
                elif path == "/bomb.png":  # 1 KB on the wire, far past the cap once inflated
                    self.reply(200, "image/png", BOMB, encoding="gzip")
                elif path == "/half.png":  # a bit more than half the per-image cap
                    self.reply(200, "image/png", PNG + b"\0" * (MAX_BYTES // 2 + 1000))
                elif path == "/delay.png":  # answers after a while
                    time.sleep(DELAY)
                    self.reply(200, "image/png", PNG)
                elif path == "/page.html":
                    self.reply(200, "text/html", b"<html>not an image</html>")
                elif path == "/lying.png":
                    self.reply(200, "image/png", b"<html>not an image either</html>")
                elif path == "/missing.png":
                    self.reply(404, "text/plain", b"no")
                elif path == "/to-cat":
                    self.redirect("/cat.png")
                elif path == "/to-target":
                    self.redirect(server.redirect_target)
                elif path == "/loop":
                    self.redirect("/loop")
                else:
                    self.reply(404, "text/plain", b"unknown")

            def reply(self, status, content_type, body, encoding=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if encoding:
                    self.send_header("Content-Encoding", encoding)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def redirect(self, location):
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def images():
    server = ImageServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def other_images():
    """A second image server: a target only redirects should lead to, and never reach."""
    server = ImageServer()
    yield server
    server.stop()


REMOTE_ENV = {"PI_PROXY_REMOTE_IMAGES": "1", "PI_PROXY_REMOTE_IMAGE_MAX_BYTES": str(MAX_BYTES),
              "PI_PROXY_REMOTE_IMAGE_TIMEOUT": str(TIMEOUT)}


@pytest.fixture(scope="module")
def guarded(agent_dir, tmp_path_factory):
    """Remote images on, and no address exempt from the check."""
    with running_proxy(agent_dir, tmp_path_factory.mktemp("logs") / "guarded.log", REMOTE_ENV) as running:
        yield running


# The three ways to give an image by URL, the field each error must name, and the upstream path
# and wire format the fetched image must arrive in.
ENDPOINTS = {
    "chat": ("/v1/chat/completions", "fake-chat/chat-model", "messages[0].content[1].image_url.url"),
    "anthropic": ("/v1/messages", "fake-anthropic/claude-test", "messages[0].content[1].source.url"),
    "responses": ("/v1/responses", "fake-responses/gpt-test", "input[0].content[1].image_url"),
}


def body_for(kind: str, url: str) -> dict:
    path, model, _ = ENDPOINTS[kind]
    if kind == "chat":
        return {"model": model, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    if kind == "anthropic":
        return {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image", "source": {"type": "url", "url": url}}]}]}
    return {"model": model, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}]}


def post(running, kind: str, url: str, timeout: float = 30) -> requests.Response:
    return requests.post(running.url + ENDPOINTS[kind][0], json=body_for(kind, url), timeout=timeout)


def error_of(response: requests.Response, kind: str) -> dict:
    """The error in the endpoint's own shape; the message and the field it names."""
    error = response_error(response, 400, "anthropic" if kind == "anthropic" else "openai")
    assert error["type"] == "invalid_request_error"
    assert kind == "anthropic" or error["param"] == ENDPOINTS[kind][2]
    return error


def assert_refused(running, kind: str, url: str, reason: str):
    error = error_of(post(running, kind, url), kind)
    assert reason in error["message"], error["message"]
    if "PI_PROXY_REMOTE_IMAGES" in error["message"] or "could not be used" in error["message"]:
        assert f"The image at {ENDPOINTS[kind][2]} " in error["message"]  # Anthropic's errors have no param


# --- off by default -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_off_by_default_is_400_naming_the_switch(proxy, fake, images, kind):
    before = len(images.hits)
    assert_refused(proxy, kind, f"{images.url}/cat.png", "PI_PROXY_REMOTE_IMAGES=1")
    assert len(images.hits) == before and not fake.requests  # nothing fetched, nothing sent upstream


def test_count_tokens_follows_the_same_rule(proxy, images):
    body = body_for("anthropic", f"{images.url}/cat.png")
    del body["max_tokens"]
    response = requests.post(f"{proxy.url}/v1/messages/count_tokens", json=body, timeout=30)
    assert response.status_code == 400 and "PI_PROXY_REMOTE_IMAGES" in response.json()["error"]["message"]


# --- refused addresses (no address exempt), end to end --------------------------------------------


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:{port}/cat.png", "refused: 127.0.0.1 is a loopback address"),
    ("http://localhost:{port}/cat.png", "refused: localhost resolves to a non-public address"),
    ("http://[::1]:{port}/cat.png", "refused: ::1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]:{port}/cat.png", "is a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "refused: 169.254.169.254 is a link-local address"),
    ("http://10.0.0.1/cat.png", "refused: 10.0.0.1 is a private address"),
    ("http://192.168.1.1/cat.png", "refused: 192.168.1.1 is a private address"),
    ("http://0.0.0.0:{port}/cat.png", "refused: 0.0.0.0 is an unspecified address"),
    ("http://224.0.0.1/cat.png", "refused: 224.0.0.1 is a multicast address"),
])
@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_non_public_addresses_are_refused(guarded, fake, images, kind, url, reason):
    before = len(images.hits)
    assert_refused(guarded, kind, url.format(port=images.port), reason)
    assert len(images.hits) == before and not fake.requests


@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_a_large_request_s_images_are_checked_by_the_proxy_too(guarded, fake, images, kind):
    """A body over 100 KB is prepared in a child process, which asks the proxy for its images:
    the same fetcher, the same refusal naming the same field."""
    body = body_for(kind, f"http://127.0.0.1:{images.port}/cat.png")
    padding = [{"role": "user", "content": "p" * 1000}, {"role": "assistant", "content": "q" * 1000}] * 60
    body["input" if kind == "responses" else "messages"] = [*body.get("messages", body.get("input")), *padding]
    assert len(json.dumps(body)) > 100_000
    before = len(images.hits)
    error = error_of(requests.post(guarded.url + ENDPOINTS[kind][0], json=body, timeout=30), kind)
    assert "refused: 127.0.0.1 is a loopback address" in error["message"], error["message"]
    assert f"The image at {ENDPOINTS[kind][2]} " in error["message"]
    assert len(images.hits) == before and not fake.requests


def test_a_name_s_addresses_are_not_told(guarded):
    """What a name resolves to stays on the proxy's side (issue 12 point 5)."""
    error = error_of(post(guarded, "chat", f"http://localhost:{free_port()}/x.png"), "chat")
    assert "127.0.0.1" not in error["message"] and "::1" not in error["message"]


@pytest.mark.parametrize("url, reason", [
    ("ftp://example.com/cat.png", "Images must be base64 data: URIs or http(s) URLs"),
    ("http://no-such-host.invalid/cat.png", "could not be used: fetching it failed"),
])
def test_other_bad_urls(guarded, url, reason):
    assert_refused(guarded, "chat", url, reason)


def test_too_many_images_are_refused(guarded, fake, images):
    body = body_for("chat", f"{images.url}/cat.png")
    body["messages"][0]["content"] += [{"type": "image_url", "image_url": {"url": f"{images.url}/{i}.png"}}
                                       for i in range(16)]
    response = requests.post(guarded.url + ENDPOINTS["chat"][0], json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[17].image_url.url"
    assert "PI_PROXY_REMOTE_IMAGE_MAX_COUNT" in error["message"]
    assert not fake.requests


# --- fetching, through the proxy's own code (tests/image_fetcher.py) ------------------------------


class Fetcher:
    def __init__(self):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "image_fetcher.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def __call__(self, *urls, hosts=None, **config) -> dict:
        config = {"remote_image_max_bytes": MAX_BYTES, "remote_image_timeout": TIMEOUT, **config}
        self.process.stdin.write(json.dumps({"urls": urls, "hosts": hosts or {}, "config": config}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def stop(self):
        self.process.stdin.close()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def fetch(images, other_images):
    fetcher = Fetcher()
    yield lambda *paths, **config: fetcher(*[f"http://images.test:{images.port}{path}" for path in paths],
                                           hosts={"images.test": "127.0.0.1"}, **config)
    fetcher.stop()


def refusal(answer: dict, param: str = "images[0]") -> str:
    assert answer.get("status") == 400 and answer["param"] == param, answer
    return answer["message"]


@pytest.mark.parametrize("path", ["/cat.png", "/to-cat", "/gzip.png"])
def test_a_fetched_image_becomes_a_base64_block(fetch, images, path):
    answer = fetch(path)
    data = PNG if path != "/gzip.png" else PNG + b"\0" * (MAX_BYTES // 2)
    assert answer["images"] == [{"type": "image", "data": base64.b64encode(data).decode(), "mimeType": "image/png"}]
    assert images.hits[-1][1] == f"images.test:{images.port}", "the Host header names the URL's host"


@pytest.mark.parametrize("target, reason", [
    ("http://127.0.0.1:{other}/cat.png", "refused: 127.0.0.1 is a loopback address"),
    ("http://localhost:{other}/cat.png", "refused: localhost resolves to a non-public address"),
    ("http://169.254.169.254/latest/meta-data/", "refused: 169.254.169.254 is a link-local address"),
    ("http://10.0.0.1/cat.png", "refused: 10.0.0.1 is a private address"),
])
def test_redirects_are_checked_at_every_hop(fetch, images, other_images, target, reason):
    """The first hop is the test server; where it redirects to is checked like any URL."""
    images.redirect_target = target.format(other=other_images.port)
    assert reason in refusal(fetch("/to-target"))
    assert images.hits[-1][0] == "/to-target" and not other_images.hits


@pytest.mark.parametrize("path, reason", [
    ("/big.png", f"refused: the image is larger than {MAX_BYTES} bytes"),
    ("/bomb.png", f"refused: the image is larger than {MAX_BYTES} bytes"),
    ("/loop", "refused: more than 3 redirects"),
    # What another host answered is not told: only that it failed.
    ("/page.html", "could not be used: fetching it failed"),
    ("/lying.png", "could not be used: fetching it failed"),
    ("/missing.png", "could not be used: fetching it failed"),
])
def test_bad_images_are_400(fetch, path, reason):
    message = refusal(fetch(path))
    assert message.endswith(reason), message
    assert "404" not in message and "text/html" not in message


def test_the_images_of_a_request_share_one_byte_budget(fetch):
    assert "images" in fetch("/half.png", remote_image_max_total_bytes=MAX_BYTES * 2)
    answer = fetch("/half.png", "/cat.png", "/half.png", remote_image_max_total_bytes=MAX_BYTES)
    # Fetched at once: whichever of the two large ones comes second goes past the budget.
    assert answer.get("status") == 400 and answer["param"] in ("images[0]", "images[2]"), answer
    assert f"the request's images together are larger than {MAX_BYTES} bytes" in answer["message"]


def test_the_images_are_fetched_at_once_within_one_deadline(fetch):
    answer = fetch(*["/delay.png"] * 4, remote_image_timeout=DELAY * 3)
    assert len(answer["images"]) == 4 and answer["elapsed"] < DELAY * 2.5, answer["elapsed"]


@pytest.mark.parametrize("paths", [["/slow.png"], ["/drip.png"], ["/cat.png", "/drip.png"]])
def test_time_cap_holds(fetch, paths):
    answer = fetch(*paths)
    assert f"took longer than {TIMEOUT:g} s" in refusal(answer, f"images[{len(paths) - 1}]")
    assert TIMEOUT * 0.9 < answer["elapsed"] < TIMEOUT + 1.5, answer["elapsed"]


# --- the address check itself, with DNS answers made up ------------------------------------------


def resolver(*addresses):
    return lambda host, port, type: [(socket.AF_INET, type, 6, "", (address, port)) for address in addresses]


@pytest.mark.parametrize("answers, reason", [
    (["127.0.0.1"], "refused: rebind.example resolves to a non-public address"),
    (["93.184.215.14", "10.1.2.3"], "refused: rebind.example resolves to a non-public address"),  # one is enough
    (["fd00::1"], "refused: rebind.example resolves to a non-public address"),
    (["100.64.0.1"], "refused: rebind.example resolves to a non-public address"),
    ([], "fetching it failed"),
])
def test_every_dns_answer_is_checked_and_none_is_told(answers, reason):
    with pytest.raises(proxy_module.RemoteImageRefused) as caught:
        proxy_module.checked_addresses("rebind.example", 80, resolver(*answers))
    assert str(caught.value) == reason
    assert not any(address in str(caught.value) for address in answers)


def test_public_answers_pass():
    assert proxy_module.checked_addresses("x.example", 80, resolver("93.184.215.14")) == ["93.184.215.14"]
    for address in ("127.0.0.1", "fe80::1", "10.0.0.1"):
        with pytest.raises(proxy_module.RemoteImageRefused):
            proxy_module.checked_addresses(address, 80, resolver(address))


def test_the_connection_goes_to_the_checked_address(images):
    """The adapter connects to the address it was given, while Host names the URL's host: a name
    that DNS would now answer differently for is never looked up again."""
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", proxy_module.PinnedAdapter("127.0.0.1"))
    response = session.get(f"http://images.invalid:{images.port}/cat.png",
                           headers={"Host": f"images.invalid:{images.port}"}, timeout=5)
    assert response.content == PNG and images.hits[-1] == ("/cat.png", f"images.invalid:{images.port}")


@pytest.mark.parametrize("cert_name, matches", [("images.test", True), ("other.test", False)])
def test_a_pinned_https_connection_still_checks_the_host_names_certificate(tmp_path, cert_name, matches):
    """TLS to the pinned address sends the URL's host name (SNI) and checks the certificate against it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    f"/CN={cert_name}", "-addext", f"subjectAltName=DNS:{cert_name}", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    server, names = ImageServer(), []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    try:
        session = requests.Session()
        session.trust_env = False
        session.mount("https://", proxy_module.PinnedAdapter("127.0.0.1"))
        url = f"https://images.test:{server.port}/cat.png"
        if matches:
            response = session.get(url, headers={"Host": f"images.test:{server.port}"}, verify=str(cert), timeout=5)
            assert response.content == PNG and server.hits[-1] == ("/cat.png", f"images.test:{server.port}")
        else:
            with pytest.raises(requests.exceptions.SSLError):
                session.get(url, verify=str(cert), timeout=5)
            assert not server.hits
        assert names == ["images.test"]
    finally:
        server.stop()
