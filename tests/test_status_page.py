"""The status page (GET / from a browser) in a real headless Chromium: a proxy with a Copilot login
serves a few requests through the fake upstreams, then the page's rendered DOM must show them: the
totals, a row per request, the chart's bars, the Copilot quota bar. A screenshot lands in the test's
temp dir. Non-browser GET / and HEAD / answer as before."""

import json
import re
import subprocess

import pytest
import requests

from tests.helpers import CHROMIUM, agent_with_auth, models_json, page_dom, redirect_env, stored_copilot

TOKEN = "status-page-SECRET-7777"
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (`make test` installs Debian's chromium through apt, "
                             "which failed or is not available here): the status page's browser test is skipped")


@pytest.fixture
def watched(start_proxy, tmp_path, fake, github):
    """watched(**env): a proxy with a Copilot login, GitHub and Copilot redirected to the fakes."""
    agent = agent_with_auth(tmp_path, {"github-copilot": stored_copilot(3600)})
    (agent / "models.json").write_text(json.dumps(models_json(fake.base_url)))
    return lambda **env: start_proxy({**redirect_env(fake, github), **env}, agent=agent)


def test_the_page_shows_totals_rows_chart_and_quota(watched, tmp_path):
    proxy = watched()
    ids = []
    for model in ("fake-chat/chat-model", "fake-anthropic/claude-test", "fake-responses/gpt-test"):
        reply = requests.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                              json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200
        ids.append(reply.headers["x-request-id"])
    usage = requests.get(f"{proxy.url}/usage", timeout=30).json()
    assert usage["totals"]["requests"] == 3, "the records are in before the page loads"

    dom = page_dom(f"{proxy.url}/", tmp_path / "profile")
    assert 'data-loaded="yes"' in dom, dom[-3000:]
    requests_figure = re.search(r'data-figure="requests"><b>([^<]*)</b>', dom)
    assert requests_figure and requests_figure.group(1) == "3"
    rows = re.findall(r'<tr data-id="([^"]+)"', dom)
    assert rows == ids[::-1], "one row per request, newest first"
    for chart in ("requests", "tokens"):
        bars = re.findall(rf'<rect class="bar {chart}"[^>]*data-value="(\d+)"', dom)
        assert len(bars) == 60
        assert sum(map(int, bars)) == sum(minute[chart] for minute in usage["minutes"]) > 0
    assert re.search(r'id="premium-bar"><div style="width: 71.2%;">', dom), "the Copilot quota as a bar"
    assert "213 of 300 left" in dom
    assert f"ANTHROPIC_BASE_URL={proxy.url} ANTHROPIC_AUTH_TOKEN=unused claude" in dom
    assert "<li>fake-chat/chat-model</li>" in dom
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="http', dom), "nothing external"

    screenshot = tmp_path / "status-page.png"
    shot = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                           "--window-size=1200,1500", "--hide-scrollbars", f"--screenshot={screenshot}",
                           f"{proxy.url}/"],
                          capture_output=True, text=True, timeout=90)
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]


def test_with_a_token_the_page_asks_for_it(watched, tmp_path):
    proxy = watched(PI_PROXY_AUTH_TOKEN=TOKEN)
    dom = page_dom(f"{proxy.url}/", tmp_path / "profile")
    assert re.search(r'<form class="card" id="login" style="display: block;">', dom)
    assert "data-loaded" not in dom and TOKEN not in dom


def test_clients_that_are_not_browsers_get_the_probe_answer(proxy):
    assert requests.get(f"{proxy.url}/", headers={"Accept": "*/*"}, timeout=10).json() == {
        "status": "ok", "service": "pi-proxy"}
    assert requests.head(f"{proxy.url}/", timeout=10).status_code == 200
    page = requests.get(f"{proxy.url}/", headers={"Accept": "text/html,*/*;q=0.8"}, timeout=10)
    assert page.headers["Content-Type"].startswith("text/html") and "default-src 'self'" in page.headers[
        "Content-Security-Policy"]
