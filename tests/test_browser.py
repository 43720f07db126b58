"""A real headless Chromium against the proxy (issue 12, point 1): an attacker's page on another
loopback address tries the requests any web page can send without a CORS preflight, and none of them
may reach the upstream; a page of an origin allowed in PI_PROXY_CORS_ORIGINS reads a completion.

Chromium is Debian's `chromium` package (`make test` installs it through apt); where it is missing
the test is skipped."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.fake_upstream import Reply
from tests.helpers import CHROMIUM, page_dom

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (`make test` installs Debian's chromium through apt, "
                             "which failed or is not available here): the real-browser test is skipped")

ATTACK = {"model": "fake-chat/chat-model", "max_tokens": 4096, "messages": [{"role": "user", "content": "pwned"}]}
ATTACKER_PAGE = """<!doctype html><html><body><pre id="log"></pre>
<iframe name="sink-0"></iframe><iframe name="sink-1"></iframe>
<script>
const log = (line) => { document.getElementById("log").textContent += line + "\\n"; };
const body = %(body)s;
const targets = %(targets)s;
targets.forEach((base, i) => {
  const url = base + "/v1/chat/completions";
  // A CORS "simple" request: text/plain needs no preflight; the response is opaque, the request goes out.
  fetch(url, {method: "POST", mode: "no-cors", body: body})
    .then(() => log("text " + i + " sent"), (e) => log("text " + i + " failed " + e));
  // A body without a Content-Type at all (a Blob of no type): also a simple request.
  fetch(url, {method: "POST", mode: "no-cors", body: new Blob([body])})
    .then(() => log("blob " + i + " sent"), (e) => log("blob " + i + " failed " + e));
  // A form: enctype text/plain writes name=value, so the name carries the JSON up to a last field.
  const form = document.createElement("form");
  form.method = "POST"; form.enctype = "text/plain"; form.action = url; form.target = "sink-" + i;
  const input = document.createElement("input");
  input.name = body.slice(0, -1) + ', "x": "'; input.value = '"}';
  form.appendChild(input); document.body.appendChild(form); form.submit();
  log("form " + i + " submitted");
});
</script></body></html>"""
ALLOWED_PAGE = """<!doctype html><html><body><pre id="out">waiting</pre>
<script>
fetch(%(url)s, {method: "POST", headers: {"Content-Type": "application/json", "Authorization": "Bearer unused"},
                body: JSON.stringify({model: "fake-chat/chat-model", messages: [{role: "user", content: "hi"}]})})
  .then((r) => r.json())
  .then((reply) => { document.getElementById("out").textContent = "REPLY:" + reply.choices[0].message.content; },
        (e) => { document.getElementById("out").textContent = "FAILED:" + e; });
</script></body></html>"""


class Recorder(ThreadingHTTPServer):
    """Serves one page at / and records every other request: the attacker's page and, on
    127.0.0.1, a canary that receives the same attacks (so the test knows Chromium sent them)."""

    daemon_threads = True

    def __init__(self, host: str, page: str = ""):
        self.page, self.received = page, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(handler):
                handler.send_response(200)
                handler.send_header("Content-Type", "text/html")
                handler.end_headers()
                handler.wfile.write(self.page.encode())

            def do_POST(handler):
                body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
                self.received.append((handler.headers.get("Content-Type"), body))
                handler.send_response(200)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

        super().__init__((host, 0), Handler)
        self.url = f"http://{host}:{self.server_port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def pages():
    servers = []

    def serve(host: str, page: str = "") -> Recorder:
        servers.append(Recorder(host, page))
        return servers[-1]
    yield serve
    for server in servers:
        server.stop()


def test_an_attackers_page_cannot_use_the_proxy_and_an_allowed_one_can(start_proxy, tmp_path, fake, pages):
    allowed = pages("127.0.0.3")
    proxy = start_proxy({"PI_PROXY_CORS_ORIGINS": allowed.url})
    canary = pages("127.0.0.1")
    attacker = pages("127.0.0.2", ATTACKER_PAGE % {"body": json.dumps(json.dumps(ATTACK)),
                                                   "targets": json.dumps([proxy.url, canary.url])})
    fake.default = Reply(text="the attacker's answer")
    dom = page_dom(attacker.url, tmp_path / "profile-attacker")
    for attempt in ("text 0 sent", "blob 0 sent", "form 0 submitted", "form 1 submitted"):
        assert attempt in dom, dom
    types = sorted(str(content_type).split(";")[0] for content_type, _ in canary.received)
    assert types == ["None", "text/plain", "text/plain"], \
        f"Chromium sent the three attacks (seen by the canary): {canary.received}"
    assert all(json.loads(body)["messages"] == ATTACK["messages"] for _, body in canary.received), \
        "each attack's body is the JSON request"
    assert fake.requests == [], "no attack reached the upstream through the proxy"

    fake.default = Reply(text="hello, web app")
    allowed.page = ALLOWED_PAGE % {"url": json.dumps(f"{proxy.url}/v1/chat/completions")}
    dom = page_dom(allowed.url, tmp_path / "profile-allowed")
    assert "REPLY:hello, web app" in dom, dom
    assert len(fake.requests) == 1
