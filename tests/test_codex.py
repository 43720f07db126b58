"""The real Codex CLI (`@openai/codex`, a devDependency) against the proxy, through every upstream API.

Codex is configured as its docs describe for a custom provider (`wire_api = "responses"`) and runs
`codex exec` with the model named `gpt-5.5`, so that it sends its full default request: function
tools, the custom (freeform) `apply_patch` tool with a grammar, and hosted tools. The fake upstream
then makes the model call `exec_command` and `apply_patch`; Codex must run both and send their
outputs back, and print the final answer. Codex's own network features are turned off, so the run
talks only to the proxy.
"""

import json
import os
import subprocess

import pytest

from tests.fake_upstream import Reply
from tests.helpers import ROOT, running_proxy
from tests.secret_scan import SECRETS

CODEX = ROOT / "node_modules" / ".bin" / "codex"
APIS = {"openai-responses": "/v1/responses", "anthropic-messages": "/v1/messages",
        "openai-completions": "/v1/chat/completions"}
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello from apply_patch\n*** End Patch\n"


def codex_runs() -> str | None:
    """Why Codex cannot run here, or None."""
    if not CODEX.exists():
        return f"{CODEX} is not installed (npm ci installs the @openai/codex devDependency)"
    try:
        result = subprocess.run([str(CODEX), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"the Codex binary cannot run on this machine: {error}"
    if result.returncode != 0:
        return f"the Codex binary cannot run on this machine: {result.stderr.decode(errors='replace')[-300:]}"
    return None


pytestmark = pytest.mark.skipif(codex_runs() is not None, reason=str(codex_runs()))


@pytest.fixture(scope="module", params=list(APIS))
def codex_proxy(request, fake, tmp_path_factory):
    """A proxy whose only model is `gpt-5.5` (a name Codex knows), served by one upstream API."""
    api = request.param
    agent_dir = tmp_path_factory.mktemp("codex-home") / "agent"
    agent_dir.mkdir()
    base_url = fake.base_url if api == "anthropic-messages" else f"{fake.base_url}/v1"
    (agent_dir / "models.json").write_text(json.dumps({"providers": {"fake-codex": {
        "baseUrl": base_url, "api": api, "apiKey": SECRETS["fake-chat"],
        "models": [{"id": "gpt-5.5", "reasoning": True, "contextWindow": 200000, "maxTokens": 8192}]}}}))
    with running_proxy(agent_dir, tmp_path_factory.mktemp("logs") / "proxy.log", {"OPENAI_API_KEY": ""}) as running:
        yield api, running


def run_codex(proxy_url: str, workdir, home, prompt: str) -> subprocess.CompletedProcess:
    provider = f'{{name="pi-proxy",base_url="{proxy_url}/v1",wire_api="responses",env_key="PI_PROXY_KEY"}}'
    command = [str(CODEX), "exec", "--skip-git-repo-check", "--sandbox", "danger-full-access",
               "--disable", "plugins", "--disable", "remote_plugin", "--disable", "apps",
               "-c", "check_for_update_on_startup=false", "-c", "analytics.enabled=false",
               "-c", "model_provider=pi", "-c", 'model="gpt-5.5"', "-c", f"model_providers.pi={provider}",
               "-C", str(workdir), prompt]
    (home / ".codex").mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
           "PI_PROXY_KEY": "unused"}
    return subprocess.run(command, env=env, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)


def test_codex_exec_runs_tools_through_the_proxy(codex_proxy, fake, tmp_path):
    api, proxy = codex_proxy
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    # A reasoning model thinks before it calls: with thinking on, Anthropic's API refuses a tool loop
    # replayed without that thinking, so Codex's reasoning items must bring it back.
    fake.push(Reply(reasoning="Run it first.", text="Running it.",
                    tool_calls=[("call_x1", "exec_command", {"cmd": "echo codex-ran-this | tee out.txt"})]),
              Reply(reasoning="Now the patch.", tool_calls=[("call_p1", "apply_patch", {"input": PATCH})]),
              Reply(text="All done here."))
    result = run_codex(proxy.url, workdir, home, "Write out.txt, then add hello.txt.")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All done here." in result.stdout
    assert (workdir / "out.txt").read_text().strip() == "codex-ran-this", "Codex ran the function call"
    assert (workdir / "hello.txt").read_text() == "hello from apply_patch\n", "Codex applied the custom tool call"
    turns = [r.body for r in fake.requests if r.path == APIS[api]]
    assert len(turns) == 3, [r.path for r in fake.requests]
    first_tools = json.dumps(turns[0].get("tools"))
    assert "exec_command" in first_tools and "apply_patch" in first_tools
    assert "web_search" not in first_tools, "hosted tools are dropped"
    second, third = json.dumps(turns[1]), json.dumps(turns[2])
    assert "call_x1" in second and "Running it." in second and "Output:\\ncodex-ran-this" in second, \
        "the function call went back with its output"
    assert "call_p1" in third and "Success. Updated the following files" in third, \
        "the custom tool call went back with its output"
    assert "Now the patch." in third, "the reasoning went back with its tool call"
    assert fake.pending == 0 and not fake.refusals
