"""Images given by URL: refused unless PI_PROXY_REMOTE_IMAGES=1; then fetched under a size cap, a
time cap and a content check, and never from a loopback, link-local, private or otherwise
non-public address (as resolved, at every redirect hop).

All traffic stays on this machine. The success path fetches from a test image server on
127.0.0.1, which only a proxy started with PI_PROXY_TEST_IMAGE_PORT=<its port> may reach; the
refusal tests run against a proxy without that switch."""

import base64
import json
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import proxy as proxy_module
from tests.conftest import RunningProxy
from tests.fake_upstream import Reply

# A real 1x1 PNG.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")
PNG_B64 = base64.b64encode(PNG).decode()
MAX_BYTES = 50_000
TIMEOUT = 2.0


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

            def reply(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
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
    running = RunningProxy(agent_dir, tmp_path_factory.mktemp("logs") / "guarded.log", REMOTE_ENV)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def exempt(agent_dir, tmp_path_factory, images):
    """Remote images on, and 127.0.0.1:<images.port> (only that) exempt from the address check."""
    running = RunningProxy(agent_dir, tmp_path_factory.mktemp("logs") / "exempt.log",
                           {**REMOTE_ENV, "PI_PROXY_TEST_IMAGE_PORT": str(images.port)})
    yield running
    running.stop()


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
    assert response.status_code == 400, response.text
    body = response.json()
    if kind == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        return body["error"]
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == ENDPOINTS[kind][2]
    return body["error"]


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


# --- refused addresses (no address exempt) ------------------------------------------------------


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:{port}/cat.png", "refused: 127.0.0.1 is a loopback address"),
    ("http://localhost:{port}/cat.png", "is a loopback address (localhost resolves to it)"),
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


def test_the_test_image_server_itself_is_refused_without_the_switch(guarded, images):
    """The success tests below pass only because of PI_PROXY_TEST_IMAGE_PORT."""
    assert_refused(guarded, "chat", f"{images.url}/cat.png", "127.0.0.1 is a loopback address")


@pytest.mark.parametrize("url, reason", [
    ("ftp://example.com/cat.png", "Images must be base64 data: URIs or http(s) URLs"),
    ("http://no-such-host.invalid/cat.png", "no-such-host.invalid does not resolve"),
])
def test_other_bad_urls(guarded, url, reason):
    assert_refused(guarded, "chat", url, reason)


# --- with the test image server exempt ------------------------------------------------------------


def wire_image(kind: str, body: dict) -> tuple[str, str]:
    """(media type, base64 data) of the one image in an upstream request, in its wire format."""
    if kind == "chat":
        part = next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")
        media_type, data = part["image_url"]["url"].removeprefix("data:").split(";base64,")
        return media_type, data
    if kind == "anthropic":
        block = next(b for b in body["messages"][-1]["content"] if b["type"] == "image")
        assert block["source"]["type"] == "base64"
        return block["source"]["media_type"], block["source"]["data"]
    part = next(p for p in body["input"][-1]["content"] if p["type"] == "input_image")
    media_type, data = part["image_url"].removeprefix("data:").split(";base64,")
    return media_type, data


@pytest.mark.parametrize("path", ["/cat.png", "/to-cat"])
@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_fetched_image_reaches_the_upstream_as_base64(exempt, fake, images, kind, path):
    fake.push(Reply(text="a cat"))
    response = post(exempt, kind, f"{images.url}{path}")
    assert response.status_code == 200, response.text
    assert "a cat" in response.text
    upstream = [r for r in fake.requests if r.path == ENDPOINTS[kind][0]]
    assert len(upstream) == 1
    assert wire_image(kind, upstream[0].body) == ("image/png", PNG_B64)
    assert images.hits[-1] == ("/cat.png", f"127.0.0.1:{images.port}")


def test_count_tokens_reads_the_fetched_image(exempt, images):
    body = body_for("anthropic", f"{images.url}/cat.png")
    del body["max_tokens"]
    by_url = requests.post(f"{exempt.url}/v1/messages/count_tokens", json=body, timeout=30)
    body["messages"][0]["content"][1]["source"] = {"type": "base64", "media_type": "image/png", "data": PNG_B64}
    inline = requests.post(f"{exempt.url}/v1/messages/count_tokens", json=body, timeout=30)
    assert by_url.status_code == inline.status_code == 200
    assert by_url.json() == inline.json()


@pytest.mark.parametrize("target, reason", [
    ("http://127.0.0.1:{other}/cat.png", "refused: 127.0.0.1 is a loopback address"),
    ("http://localhost:{other}/cat.png", "is a loopback address (localhost resolves to it)"),
    ("http://169.254.169.254/latest/meta-data/", "refused: 169.254.169.254 is a link-local address"),
    ("http://10.0.0.1/cat.png", "refused: 10.0.0.1 is a private address"),
])
@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_redirects_are_checked_at_every_hop(exempt, fake, images, other_images, kind, target, reason):
    """The first hop is the exempt test server; where it redirects to is checked like any URL."""
    images.redirect_target = target.format(other=other_images.port)
    assert_refused(exempt, kind, f"{images.url}/to-target", reason)
    assert images.hits[-1][0] == "/to-target" and not other_images.hits and not fake.requests


@pytest.mark.parametrize("path, reason", [
    ("/big.png", f"the image is larger than {MAX_BYTES} bytes"),
    ("/page.html", "the server sent 'text/html', not an image"),
    ("/lying.png", "are not a PNG, JPEG, GIF or WebP image"),
    ("/missing.png", "the server answered HTTP 404"),
    ("/loop", "more than 3 redirects"),
])
@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_bad_images_are_400(exempt, fake, images, kind, path, reason):
    assert_refused(exempt, kind, f"{images.url}{path}", reason)
    assert not fake.requests


@pytest.mark.parametrize("path", ["/slow.png", "/drip.png"])
def test_time_cap_holds(exempt, images, path):
    started = time.monotonic()
    response = post(exempt, "chat", f"{images.url}{path}", timeout=TIMEOUT * 5)
    elapsed = time.monotonic() - started
    assert f"fetching it took longer than {TIMEOUT:g} s" in error_of(response, "chat")["message"]
    assert TIMEOUT * 0.9 < elapsed < TIMEOUT + 2, elapsed


def test_a_slow_fetch_does_not_block_other_requests(exempt, images):
    slow = threading.Thread(target=post, args=(exempt, "chat", f"{images.url}/slow.png"))
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert requests.get(f"{exempt.url}/v1/models", timeout=10).status_code == 200
    assert time.monotonic() - started < TIMEOUT / 2
    assert slow.is_alive()  # the fetch was still waiting while the other request was answered
    slow.join()


# --- the address check itself, with DNS answers made up ------------------------------------------


def resolver(*addresses):
    return lambda host, port, type: [(socket.AF_INET, type, 6, "", (address, port)) for address in addresses]


@pytest.mark.parametrize("answers, reason", [
    (["127.0.0.1"], "127.0.0.1 is a loopback address (rebind.example resolves to it)"),
    (["93.184.215.14", "10.1.2.3"], "10.1.2.3 is a private address"),  # one bad answer is enough
    (["fd00::1"], "fd00::1 is a private address"),
    (["fe80::1"], "fe80::1 is a link-local address"),
    (["100.64.0.1"], "100.64.0.1 is a non-public address"),
    ([], "rebind.example does not resolve"),
])
def test_every_dns_answer_is_checked(answers, reason):
    with pytest.raises(proxy_module.RemoteImageRefused) as caught:
        proxy_module.checked_addresses("rebind.example", 80, None, resolver(*answers))
    assert reason in str(caught.value)


def test_public_answers_pass_and_the_test_port_exempts_only_itself():
    assert proxy_module.checked_addresses("x.example", 80, None, resolver("93.184.215.14")) == ["93.184.215.14"]
    assert proxy_module.checked_addresses("x.example", 8080, 8080, resolver("127.0.0.1")) == ["127.0.0.1"]
    for address, port in (("127.0.0.1", 8081), ("127.0.0.2", 8080), ("10.0.0.1", 8080)):
        with pytest.raises(proxy_module.RemoteImageRefused):
            proxy_module.checked_addresses("x.example", port, 8080, resolver(address))


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
