"""Client connections (issue 12, points 6 and 11): timeouts for idle, slow-header and trickled-body
clients; backpressure and a stall limit for a client that never reads its stream; a client that
half-closes its socket after its request still gets its answer; malformed framing is logged briefly.
The proxy here has small timeouts of its own."""

import json
import socket
import time
from pathlib import Path

import pytest

from tests.fake_upstream import Reply
from tests.helpers import api_error, proc_rss, running_proxy, zombie

TIMEOUT = 2.0  # header, body and idle timeouts of the proxy below
STALL = 3.0  # how long it lets a client read nothing
CHAT = {"model": "fake-chat/chat-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def strict(agent_dir, tmp_path_factory):
    with running_proxy(agent_dir, tmp_path_factory.mktemp("logs") / "strict.log", {
        "PI_PROXY_CLIENT_HEADER_TIMEOUT_S": str(TIMEOUT), "PI_PROXY_CLIENT_BODY_TIMEOUT_S": str(TIMEOUT),
        "PI_PROXY_CLIENT_IDLE_TIMEOUT_S": str(TIMEOUT), "PI_PROXY_CLIENT_STALL_TIMEOUT_S": str(STALL)}) as running:
        yield running


def connect(proxy, receive_buffer: int | None = None) -> socket.socket:
    if receive_buffer is None:
        return socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connecting: the window
    sock.connect(("127.0.0.1", proxy.port))
    return sock


def head(proxy, path: str, length: int, method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def request_bytes(proxy, body: dict, path: str = "/v1/chat/completions") -> bytes:
    data = json.dumps(body).encode()
    return head(proxy, path, len(data)) + data


def closed_after(sock: socket.socket, limit: float, trickle: bytes = b"") -> tuple[float, bytes]:
    """Seconds until the proxy closes the connection (sending `trickle` every 0.2 s meanwhile),
    and what it sent; fails past `limit`."""
    started, received = time.monotonic(), b""
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            if trickle:
                sock.sendall(trickle)
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:  # reset: closed too
            data = b""
        if not data:
            return time.monotonic() - started, received
        received += data
    raise AssertionError(f"the connection was still open after {limit} s; received {received[:200]!r}")


def healthz(sock: socket.socket, port: int):
    """One GET /healthz on a kept-alive connection, its answer read whole."""
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    received = b""
    while not received.endswith(b'{"status":"ok"}\n'):
        data = sock.recv(65536)
        assert data, received
        received += data
    assert received.startswith(b"HTTP/1.1 200 OK")


def test_a_connection_that_sends_nothing_is_closed(strict):
    elapsed, received = closed_after(connect(strict), limit=TIMEOUT + 3)
    assert TIMEOUT - 0.1 < elapsed and received == b""


def test_a_request_head_trickled_line_by_line_is_cut_off(strict):
    sock = connect(strict)
    sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{strict.port}\r\n".encode())
    elapsed, received = closed_after(sock, limit=TIMEOUT + 3, trickle=b"X-Slow: 1\r\n")
    assert TIMEOUT - 0.1 < elapsed and received == b""


def test_an_idle_kept_alive_connection_is_closed(strict):
    sock = connect(strict)
    healthz(sock, strict.port)
    elapsed, _ = closed_after(sock, limit=TIMEOUT + 3)
    assert TIMEOUT - 0.1 < elapsed


def test_a_kept_alive_connection_that_is_used_stays_open(strict):
    sock = connect(strict)
    for _ in range(4):
        healthz(sock, strict.port)
        time.sleep(TIMEOUT / 4)


@pytest.mark.parametrize("path,family", [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"),
                                         ("/api/stream", "pi")])
def test_a_trickled_body_is_408_in_the_apis_shape(strict, fake, path, family):
    sock = connect(strict)
    sock.sendall(head(strict, path, 1000) + b'{"model": ')
    elapsed, received = closed_after(sock, limit=TIMEOUT + 3, trickle=b" ")
    assert TIMEOUT - 0.1 < elapsed
    status, _, body = received.partition(b"\r\n")[0], None, received.partition(b"\r\n\r\n")[2]
    assert status.startswith(b"HTTP/1.1 408") and b"Connection: close" in received
    assert "did not arrive within 2 s" in api_error(json.loads(body), family)["message"]
    assert fake.requests == []


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_half_closes_after_its_request_gets_the_answer(strict, fake, stream):
    fake.push(Reply(text="an answer for a half-closed socket", first_byte_delay=0.5, delay=0.05))
    sock = connect(strict)
    sock.sendall(request_bytes(strict, {**CHAT, "stream": stream}))
    sock.shutdown(socket.SHUT_WR)  # "my request is complete"; it still reads
    _, received = closed_after(sock, limit=10)
    text = received.decode()
    if stream:
        chunks = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
            "an answer for a half-closed socket"
        assert "data: [DONE]" in text
    else:
        assert json.loads(text.partition("\r\n\r\n")[2])["choices"][0]["message"]["content"] == \
            "an answer for a half-closed socket"
    assert fake.disconnects == []


def test_malformed_framing_is_a_400_logged_briefly(strict):
    host = f"Host: 127.0.0.1:{strict.port}\r\n".encode()
    malformed = [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\n" + host + b"Content-Length: abc\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + host + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n",
    ]
    log_before = strict.log_path.stat().st_size
    for request in malformed:
        sock = connect(strict)
        sock.sendall(request)
        _, received = closed_after(sock, limit=5)
        assert received.startswith(b"HTTP/1.1 400 "), received
    cut = connect(strict)  # a body cut short by a close
    cut.sendall(head(strict, "/v1/chat/completions", 100) + b"{")
    cut.close()
    time.sleep(0.3)
    log = Path(strict.log_path).read_bytes()[log_before:].decode()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert log.count("malformed request from 127.0.0.1") == 3
    assert log.count("a request body could not be read") == 2
    assert "GARBAGE" in log and "GARBAGE\r\n" not in log, "the client's bytes are quoted, never written raw"


def test_a_client_that_never_reads_holds_bounded_memory_and_is_ended(strict, fake):
    """The upstream streams 40 MB as fast as it can; the client reads nothing. The proxy stops reading
    the bridge, the bridge stops reading the upstream; after STALL seconds the stream is ended and its
    bridge killed, which the upstream sees."""
    fake.push(Reply(text="x" * 40_000_000, chunks=100_000))
    rss_before = proc_rss(strict.proc.pid)
    sock = connect(strict, receive_buffer=4096)
    sock.sendall(request_bytes(strict, {**CHAT, "stream": True}))
    assert fake.wait_for_requests(1, timeout=10)
    started, peak, bridge_peak = time.monotonic(), rss_before, 0
    while (bridges := strict.bridges()) and time.monotonic() - started < STALL + 45:
        peak = max(peak, proc_rss(strict.proc.pid))
        try:
            bridge_peak = max(bridge_peak, sum(proc_rss(pid) for pid in bridges if not zombie(pid)))
        except OSError:  # it ended meanwhile
            pass
        time.sleep(0.1)
    ended = time.monotonic() - started
    print(f"\nnever-reading client: proxy RSS {rss_before / 2**20:.1f} MB before, peak +"
          f"{(peak - rss_before) / 2**20:.1f} MB; its bridge's RSS peak {bridge_peak / 2**20:.0f} MB; "
          f"stream ended after {ended:.1f} s")
    assert peak - rss_before < 10 * 2**20, "the proxy buffered the stream instead of holding the bridge back"
    assert STALL - 0.5 < ended < STALL + 30  # the kernel buffers fill first: seconds on a loaded machine
    assert fake.wait_for_disconnect(timeout=5), "the upstream saw its request end"
    sock.close()
    assert "a client read nothing for 3 s" in strict.log_path.read_text()
