"""Every provider module pi-ai registers works from the bundle (build/bridge.mjs), through the proxy;
Amazon Bedrock answers a conversation. The APIs come from pi-ai's own registry (register-builtins.js):
a provider that a pi-ai update adds is covered without a change here."""

import base64
import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.fake_bedrock import FakeBedrock
from tests.helpers import ROOT, running_proxy, sse_events
from tests.secret_scan import LEAK_WATCH

REGISTRY = ROOT / "node_modules/@mariozechner/pi-ai/dist/providers/register-builtins.js"
REGISTERED_APIS = re.findall(r'registerApiProvider\(\{\s*api: "([^"]+)"', REGISTRY.read_text())
BUILD = ROOT / "build"

AWS_KEY, AWS_SECRET = "AKIDFAKEBEDROCK0001", "fake-aws-secret-SECRET-ffff6666"
LEAK_WATCH.add(AWS_SECRET)
# The AWS SDK speaks HTTP/2 to Bedrock unless told otherwise; the fakes speak HTTP/1.1.
AWS_ENV = {"AWS_ACCESS_KEY_ID": AWS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_REGION": "us-east-1",
           "AWS_BEDROCK_FORCE_HTTP1": "1"}
# openai-codex-responses reads the ChatGPT account from its key, a JWT.
CODEX_KEY = "e30." + base64.urlsafe_b64encode(json.dumps(
    {"https://api.openai.com/auth": {"chatgpt_account_id": "acct-fake"}}).encode()).decode().rstrip("=") + ".sig"


class CatchAll(ThreadingHTTPServer):
    """Answers every request 400 (an error no SDK retries), recording its request line."""
    daemon_threads = True

    def __init__(self):
        self.requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002
                pass

            def do_POST(handler):
                handler.rfile.read(int(handler.headers.get("content-length") or 0))
                self.requests.append(f"{handler.command} {handler.path}")
                body = b'{"error":{"message":"catch-all","type":"invalid_request_error"}}'
                handler.send_response(400)
                handler.send_header("content-type", "application/json")
                handler.send_header("content-length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            do_GET = do_POST

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def test_the_registry_has_every_api_of_pi_ais_catalog():
    result = subprocess.run(["node", str(BUILD / "bridge.mjs")], cwd=ROOT, input=b'{"op":"catalog"}\n',
                            capture_output=True, timeout=60, env={"PATH": subprocess.os.environ["PATH"]})
    (catalog,) = [json.loads(line) for line in result.stdout.splitlines()]
    apis = {model["api"] for provider in catalog["providers"] for model in provider["models"]}
    assert "bedrock-converse-stream" in apis
    assert apis <= set(REGISTERED_APIS), "the registry parse above missed some"


def test_no_dynamic_import_in_the_bundle_gets_a_commonjs_only_chunk():
    """With --splitting, esbuild turns a dynamically imported CommonJS module into a chunk that
    exports only `default` (evanw/esbuild#3245): `(await import("pkg")).Name` is then undefined in
    the bundle (Bedrock's HTTP handler and proxy agent were). Such packages stay external."""
    chunks = {path.name: path.read_text() for path in BUILD.glob("*.mjs")}
    assert chunks, "no bundle: run npm run build"
    commonjs = {name for name, text in chunks.items() if re.search(r"^export default require_\w+\(\);$", text, re.M)}
    imports = [(name, target) for name, text in chunks.items()
               for target in re.findall(r'import\("\./([^"]+)"\)', text)]
    assert imports, "the bundle's provider chunks are loaded with import()"
    assert [(name, target) for name, target in imports if target in commonjs] == []


@pytest.fixture(scope="module")
def catch_all():
    server = CatchAll()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def proxy_to_catch_all(catch_all, tmp_path_factory):
    """One custom provider per registered API, all pointing at the catch-all server. HTTP_PROXY
    points there too: the providers that honour it (Bedrock's AWS SDK) load their proxy agent."""
    home = tmp_path_factory.mktemp("providers")
    (home / "agent").mkdir()
    providers = {f"api-{api}": {"baseUrl": catch_all.url, "api": api, "models": [{"id": "m"}],
                                "apiKey": CODEX_KEY if api == "openai-codex-responses" else "sk-catch-all"}
                 for api in REGISTERED_APIS}
    (home / "agent" / "models.json").write_text(json.dumps({"providers": providers}))
    with running_proxy(home / "agent", home / "proxy.log", {**AWS_ENV, "HTTP_PROXY": catch_all.url,
                                                           "PI_PROXY_UPSTREAM_TIMEOUT_MS": "30000"}) as running:
        yield running


@pytest.mark.parametrize("api", REGISTERED_APIS)
def test_provider_module_loads_from_the_bundle_and_calls_out(api, catch_all, proxy_to_catch_all):
    before = len(catch_all.requests)
    response = requests.post(f"{proxy_to_catch_all.url}/v1/chat/completions", timeout=60,
                             json={"model": f"api-{api}/m", "messages": [{"role": "user", "content": "hi"}]})
    assert catch_all.requests[before:], \
        f"{api}: no request reached the upstream: {response.status_code} {response.text}"
    assert response.status_code >= 400 and "Cannot find module" not in response.text, response.text


def test_bedrock_answers_through_the_proxy(tmp_path):
    home = tmp_path / "home"
    (home / "agent").mkdir(parents=True)
    with FakeBedrock(AWS_KEY, AWS_SECRET) as bedrock:
        (home / "agent" / "models.json").write_text(
            json.dumps({"providers": {"amazon-bedrock": {"baseUrl": bedrock.base_url}}}))
        with running_proxy(home / "agent", home / "proxy.log",
                           {**AWS_ENV, "PI_PROXY_UPSTREAM_TIMEOUT_MS": "30000"}) as proxy:
            models = requests.get(f"{proxy.url}/v1/models", timeout=30).json()["data"]
            model = next(m["id"] for m in models if m["id"].startswith("amazon-bedrock/anthropic.claude"))
            body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 50}
            answer = requests.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=60)
            with requests.post(f"{proxy.url}/v1/chat/completions", json={**body, "stream": True}, stream=True,
                               timeout=60) as streamed:
                events = list(sse_events(streamed))
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from Bedrock"
    assert answer.json()["usage"]["completion_tokens"] == 3
    deltas = [json.loads(data)["choices"][0]["delta"].get("content") for _, data in events[:-1]]
    assert "".join(filter(None, deltas)) == "Hello from Bedrock" and events[-1] == (None, "[DONE]")
    path, headers, sent = bedrock.requests[0]
    assert path == f"/model/{model.split('/', 1)[1].replace(':', '%3A')}/converse-stream"
    sent = json.loads(sent)
    assert [message["role"] for message in sent["messages"]] == ["user"]
    assert sent["messages"][0]["content"][0] == {"text": "Say hello"} and sent["inferenceConfig"]["maxTokens"] == 50


@pytest.mark.parametrize("failure, status, error_type", [
    ((429, "ThrottlingException", "Too many requests, please wait before trying again."), 429, "rate_limit_error"),
    ((403, "AccessDeniedException", "You don't have access to the model with the specified model ID."), 403,
     "permission_error"),
    ((400, "ValidationException", "The provided model identifier is invalid."), 400, "invalid_request_error"),
])
def test_bedrock_errors_keep_their_status(tmp_path, failure, status, error_type):
    """The AWS SDK connects on its own, so no status is seen on the wire: the exception's name says it."""
    home = tmp_path / "home"
    (home / "agent").mkdir(parents=True)
    with FakeBedrock(AWS_KEY, AWS_SECRET, failure=failure) as bedrock:
        (home / "agent" / "models.json").write_text(
            json.dumps({"providers": {"amazon-bedrock": {"baseUrl": bedrock.base_url}}}))
        with running_proxy(home / "agent", home / "proxy.log",
                           {**AWS_ENV, "PI_PROXY_UPSTREAM_TIMEOUT_MS": "30000"}) as proxy:
            body = {"model": "amazon-bedrock/anthropic.claude-sonnet-4-5-20250929-v1:0", "max_tokens": 50,
                    "messages": [{"role": "user", "content": "hi"}]}
            answer = requests.post(f"{proxy.url}/v1/messages", json=body, timeout=60)
    assert bedrock.requests, "the request reached the fake Bedrock"
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["type"] == error_type and failure[2] in answer.json()["error"]["message"]


def test_fake_bedrock_refuses_a_wrong_signature():
    with FakeBedrock(AWS_KEY, "another-secret") as bedrock:
        response = requests.post(f"{bedrock.base_url}/model/m/converse-stream", json={"messages": [1]}, timeout=10,
                                 headers={"authorization": f"AWS4-HMAC-SHA256 Credential={AWS_KEY}/20260101/us-east-1/"
                                                           "bedrock/aws4_request, SignedHeaders=host;x-amz-date, "
                                                           f"Signature={'0' * 64}", "x-amz-date": "20260101T000000Z"})
    assert response.status_code == 403 and response.headers["x-amzn-errortype"].startswith("InvalidSignatureException")
