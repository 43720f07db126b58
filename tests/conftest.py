"""Shared fixtures: a fake upstream speaking three provider protocols, and real proxy processes
(proxy.py + bridge.mjs + pi-ai) configured through a temporary PI_CODING_AGENT_DIR. What the tests
share besides fixtures is in helpers.py; the secret scanner is the plugin secret_scan.py."""

import json
from contextlib import ExitStack

import httpx2 as httpx
import openai
import pytest

from tests.fake_github import FakeGitHub
from tests.fake_upstream import FakeUpstream
from tests.helpers import models_json, running_proxy
from tests.secret_scan import record_response

pytest_plugins = ["tests.secret_scan"]


def output_limits(models: dict) -> dict:
    """{model id: maxTokens} of a models.json's models (pi's default 16384 where none is given)."""
    return {m["id"]: m.get("maxTokens", 16384) for spec in models["providers"].values() for m in spec.get("models", [])}


@pytest.fixture(scope="session")
def fake():
    upstream = FakeUpstream()
    upstream.start()
    upstream.output_limits = output_limits(models_json(upstream.base_url))
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def github():
    """A fake github.com and api.github.com (device flow, Copilot token exchange, quota)."""
    server = FakeGitHub()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def agent_dir(tmp_path_factory, fake):
    directory = tmp_path_factory.mktemp("home") / "agent"
    directory.mkdir()
    (directory / "models.json").write_text(json.dumps(models_json(fake.base_url), indent=2))
    return directory


@pytest.fixture(scope="session")
def proxy(agent_dir, tmp_path_factory):
    """The proxy most tests share, with the test defaults (helpers.proxy_env)."""
    with running_proxy(agent_dir, tmp_path_factory.mktemp("logs") / "proxy.log") as running:
        yield running


@pytest.fixture
def start_proxy(agent_dir, tmp_path):
    """A test's own proxies: start_proxy(env, agent=agent_dir, name="proxy") starts one (its log
    tmp_path/<name>.log, numbered when the name repeats) and the test's end stops them all. Module
    fixtures use helpers.running_proxy the same way."""
    with ExitStack() as started:
        names = []

        def start(env: dict | None = None, agent=None, name: str = "proxy"):
            log_name = name if name not in names else f"{name}{names.count(name)}"
            names.append(name)
            return started.enter_context(running_proxy(agent or agent_dir, tmp_path / f"{log_name}.log", env))
        yield start


@pytest.fixture(autouse=True)
def fresh_fake(request):
    """Each test starts with an empty script and request log on the shared fake upstream."""
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()
    yield


@pytest.fixture
def client(proxy):
    http = httpx.Client(timeout=30, event_hooks={"response": [record_response]})
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, http_client=http)
