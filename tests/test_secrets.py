"""The end-of-session secret scan (conftest.no_secret_leaks) must be able to fail: a secret planted
in each channel it watches is found, and a session that leaks one fails."""

import socket
import subprocess
import sys

import httpx2 as httpx
import requests

from tests.fake_upstream import Reply
from tests.helpers import ROOT
from tests.secret_scan import PROXY_PORTS, RESPONSES, SECRETS, everything_seen, find_leaks

PLANTED = "sk-planted-SECRET-9999zzzz"  # not in LEAK_WATCH: finding it here fails nothing else
CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}


def leaks_since(start: int) -> list:
    return find_leaks([(str(i), bytes(data)) for i, data in enumerate(RESPONSES[start:])], {PLANTED})


def test_requests_bodies_and_headers_are_scanned(fake):
    start = len(RESPONSES)
    fake.push(Reply(status=500, error_body=f"oops {PLANTED}"))
    _ = requests.post(f"{fake.base_url}/v1/chat/completions", json={}, timeout=10).text
    assert leaks_since(start), "a plain response body"

    start = len(RESPONSES)
    fake.push(Reply(text="hello", headers={"x-planted": PLANTED}))
    with requests.post(f"{fake.base_url}/v1/chat/completions", json=CHAT, stream=True, timeout=10):
        pass  # the body is never read: the header alone must be found
    assert leaks_since(start), "a response header"

    start = len(RESPONSES)
    fake.push(Reply(text=f"a {PLANTED} b", delay=0.01))
    with requests.post(f"{fake.base_url}/v1/chat/completions", json=CHAT, stream=True, timeout=10) as response:
        lines = list(response.iter_lines())
    assert lines and leaks_since(start), "a stream=True body read line by line"


def test_httpx_streams_are_scanned(fake):
    start = len(RESPONSES)
    fake.push(Reply(text=f"a {PLANTED} b", delay=0.01))
    with httpx.Client(timeout=10) as client, \
            client.stream("POST", f"{fake.base_url}/v1/chat/completions", json=CHAT) as response:
        assert list(response.iter_lines())
    assert leaks_since(start)


def test_raw_sockets_to_a_proxy_are_scanned(fake):
    PROXY_PORTS.add(fake.port)  # the fake stands in for a proxy here
    try:
        fake.push(Reply(status=500, error_body=f"oops {PLANTED}"))
        start = len(RESPONSES)
        with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\n{}")
            while sock.recv(7):  # small reads: the secret arrives split between them
                pass
    finally:
        PROXY_PORTS.discard(fake.port)
    assert leaks_since(start)


def test_logs_and_proxy_commands_are_scanned(tmp_path):
    log = tmp_path / "proxy.log"
    log.write_text(f"INFO something {PLANTED}\n")
    assert find_leaks([(str(log), log.read_bytes())], {PLANTED})
    start = len(RESPONSES)
    subprocess.run([sys.executable, "-c", f"import sys; print({PLANTED!r}, file=sys.stderr)", "proxy.py"],
                   capture_output=True, timeout=30)
    assert leaks_since(start), "the output of a proxy.py command"
    assert not find_leaks(everything_seen(), {"sk-never-used-anywhere-0000"})


def test_a_session_that_leaks_fails(tmp_path):
    (tmp_path / "test_leak.py").write_text(
        "import requests\n"
        "from tests.fake_upstream import Reply\n"
        "def test_leak(fake):\n"
        f"    fake.push(Reply(status=500, error_body='key: ' + {SECRETS['fake-chat']!r}))\n"
        "    requests.post(fake.base_url + '/v1/chat/completions', json={}, timeout=10).text\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_leak.py")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "secrets leaked" in result.stdout and "1 passed" in result.stdout, result.stdout[-2000:]
