"""The browser guard: web pages must not be able to use the proxy (issue 12, point 1).

A page can make its visitor's browser send "simple" cross-origin POSTs (text/plain fetches, forms)
without a CORS preflight, and with DNS rebinding its own name points at 127.0.0.1. Raw requests here
show what such a browser sends (Host, Origin, Content-Type); tests/test_browser.py does it with a real
Chromium."""

import http.client
import json
import socket

import pytest

from proxy import host_allowed, host_name
from tests.fake_upstream import Reply
from tests.helpers import api_error, running_proxy

ALLOWED_ORIGIN = "http://app.example:8000"
CHAT = {"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "hi"}]}
ENDPOINTS = [  # path, body, error family
    ("/v1/chat/completions", CHAT, "openai"),
    ("/v1/messages", {"model": "fake-anthropic/claude-test", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]}, "anthropic"),
    ("/v1/responses", {"model": "fake-responses/gpt-test", "input": "hi"}, "openai"),
    ("/api/stream", {"model": {"provider": "fake-chat", "id": "chat-model"}, "context": {
        "messages": [{"role": "user", "content": "hi", "timestamp": 0}]}, "options": {}}, "pi"),
]


def raw_request(proxy, method: str, path: str, headers: dict, body: bytes = b"") -> http.client.HTTPResponse:
    """One request written byte for byte (no client library adds or normalises a header); the
    response read whole."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall("\r\n".join(lines).encode() + body)
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    response.body = response.read()
    sock.close()
    return response


def browser_post(proxy, path: str, body, **headers) -> http.client.HTTPResponse:
    headers = {"Host": f"127.0.0.1:{proxy.port}", "Content-Type": "application/json", **headers}
    return raw_request(proxy, "POST", path, {k: v for k, v in headers.items() if v is not None},
                       json.dumps(body).encode())


def assert_error_shape(response, status: int, family: str, words: str):
    assert response.status == status, response.body
    assert words in api_error(json.loads(response.body), family)["message"]
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.fixture(scope="module")
def open_proxy(agent_dir, tmp_path_factory):
    """A proxy opened deliberately: one more host name, one web origin."""
    with running_proxy(agent_dir, tmp_path_factory.mktemp("logs") / "open.log", {
            "PI_PROXY_ALLOWED_HOSTS": "devbox.lan, Proxy.Example",
            "PI_PROXY_CORS_ORIGINS": f"{ALLOWED_ORIGIN}/"}) as running:
        yield running


@pytest.mark.parametrize("path,body,family", ENDPOINTS)
def test_a_rebound_host_name_is_refused_in_each_apis_shape(proxy, fake, path, body, family):
    response = browser_post(proxy, path, body, Host=f"attacker.example:{proxy.port}")
    assert_error_shape(response, 403, family, "PI_PROXY_ALLOWED_HOSTS")
    assert json.loads(response.body).get("error", {}) != {}
    assert fake.requests == [], "the upstream was never called"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}", "[::1]:{port}",
                                  "127.0.0.1", "127.1.2.3:{port}"])
def test_loopback_names_are_served(proxy, fake, host):
    response = raw_request(proxy, "GET", "/v1/models", {"Host": host.format(port=proxy.port)})
    assert response.status == 200 and json.loads(response.body)["data"]


def test_get_requests_and_probes_are_guarded_too_but_healthz_is_not(proxy):
    foreign = {"Host": "attacker.example"}
    assert raw_request(proxy, "GET", "/v1/models", foreign).status == 403
    assert raw_request(proxy, "HEAD", "/", foreign).status == 403
    assert raw_request(proxy, "HEAD", "/", {"Host": f"127.0.0.1:{proxy.port}"}).status == 200  # Claude Code's probe
    assert raw_request(proxy, "GET", "/healthz", {**foreign, "Origin": "http://attacker.example"}).status == 200
    assert raw_request(proxy, "GET", "/v1/models", {}).status == 200, "HTTP/1.1 without Host: not a browser"


@pytest.mark.parametrize("path,body,family", ENDPOINTS)
@pytest.mark.parametrize("origin", ["http://127.0.0.2:8000", "null", "https://attacker.example"])
def test_a_foreign_origin_is_refused(proxy, fake, path, body, family, origin):
    response = browser_post(proxy, path, body, Origin=origin)
    assert_error_shape(response, 403, family, "PI_PROXY_CORS_ORIGINS")
    assert fake.requests == []


@pytest.mark.parametrize("path,body,family", ENDPOINTS)
@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_a_body_that_is_not_json_by_its_content_type_is_415(proxy, fake, path, body, family, content_type):
    response = browser_post(proxy, path, body, **{"Content-Type": content_type})
    assert_error_shape(response, 415, family, "Content-Type: application/json")
    assert fake.requests == []


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8", None])
def test_json_and_a_missing_content_type_are_accepted(proxy, fake, content_type):
    fake.push(Reply(text="fine"))
    response = browser_post(proxy, "/v1/chat/completions", CHAT, **{"Content-Type": content_type})
    assert response.status == 200, response.body
    assert json.loads(response.body)["choices"][0]["message"]["content"] == "fine"


def test_allowed_host_names_are_served(open_proxy, proxy):
    for host in ("devbox.lan", f"proxy.example:{open_proxy.port}"):
        assert raw_request(open_proxy, "GET", "/v1/models", {"Host": host}).status == 200
    assert raw_request(open_proxy, "GET", "/v1/models", {"Host": "devbox.lan.attacker.example"}).status == 403
    assert raw_request(proxy, "GET", "/v1/models", {"Host": "devbox.lan"}).status == 403, "only where configured"


def test_an_allowed_origins_preflight_and_request_get_cors_answers(open_proxy, fake):
    preflight = raw_request(open_proxy, "OPTIONS", "/v1/chat/completions", {
        "Host": f"127.0.0.1:{open_proxy.port}", "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"})
    assert preflight.status == 204, preflight.body
    assert preflight.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization,content-type,x-stainless-os"
    assert int(preflight.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in preflight.headers["Vary"]

    fake.push(Reply(text="from a web app"))
    response = browser_post(open_proxy, "/v1/chat/completions", CHAT, Origin=ALLOWED_ORIGIN)
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]
    assert json.loads(response.body)["choices"][0]["message"]["content"] == "from a web app"

    error = browser_post(open_proxy, "/v1/messages", {"model": "nope"}, Origin=ALLOWED_ORIGIN)
    assert error.status == 400 and error.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN, \
        "the web app can read its errors"


def test_a_foreign_origins_preflight_is_refused(open_proxy, fake):
    preflight = raw_request(open_proxy, "OPTIONS", "/v1/chat/completions", {
        "Host": f"127.0.0.1:{open_proxy.port}", "Origin": "http://app.example:8001",
        "Access-Control-Request-Method": "POST"})
    assert preflight.status == 403 and "Access-Control-Allow-Origin" not in preflight.headers
    assert browser_post(open_proxy, "/v1/chat/completions", CHAT, Origin="http://app.example:8001").status == 403
    assert fake.requests == []


def test_any_origin_can_be_allowed_with_a_warning(agent_dir, tmp_path, fake):
    with running_proxy(agent_dir, tmp_path / "any.log", {"PI_PROXY_CORS_ORIGINS": "*"}) as running:
        fake.push(Reply(text="anyone"))
        response = browser_post(running, "/v1/chat/completions", CHAT, Origin="https://anywhere.example")
        assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == "https://anywhere.example"
    assert "warning: PI_PROXY_CORS_ORIGINS=*: every web page you visit can use this proxy" in \
        running.log_path.read_text()


@pytest.mark.parametrize("header,name", [("127.0.0.1:4141", "127.0.0.1"), ("[::1]:4141", "::1"), ("[::1]", "::1"),
                                         ("Example.COM.", "example.com"), ("a.test:80", "a.test"), ("::1", "::1")])
def test_host_name(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize("name,bound,allowed,expected", [
    ("127.0.0.1", "127.0.0.1", set(), True),
    ("127.9.9.9", "127.0.0.1", set(), True),
    ("::1", "127.0.0.1", set(), True),
    ("::ffff:127.0.0.1", "127.0.0.1", set(), True),
    ("localhost", "127.0.0.1", set(), True),
    ("attacker.example", "127.0.0.1", set(), False),
    ("192.168.1.5", "127.0.0.1", set(), False),
    ("192.168.1.5", "192.168.1.5", set(), True),  # bound there
    ("192.168.1.5", "0.0.0.0", set(), True),  # bound to all: an address cannot be rebound
    ("devbox", "0.0.0.0", set(), False),  # a name can: it has to be listed
    ("devbox", "0.0.0.0", {"devbox"}, True),
    ("devbox", "devbox", set(), True),
])
def test_host_allowed(name, bound, allowed, expected):
    assert host_allowed(name, bound, frozenset(allowed)) is expected
