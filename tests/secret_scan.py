"""The secret scanner, a pytest plugin (registered in conftest.py): every test secret, and everything
the tests receive from a proxy or its processes; at the end of the run none of the secrets may appear
in any of it. Tests that plant secrets of their own add them to LEAK_WATCH."""

import socket
import subprocess
import weakref
from pathlib import Path

import httpx2 as httpx
import pytest
import requests

# Test secrets: none of them may ever appear in a response or a log line.
SECRETS = {
    "fake-chat": "sk-chat-SECRET-aaaa1111",
    "fake-anthropic": "sk-ant-SECRET-bbbb2222",
    "fake-responses": "sk-resp-SECRET-cccc3333",
    "openai": "sk-openai-env-SECRET-dddd4444",
    "fake-copilot": "sk-copilot-SECRET-eeee5555",
}


# What is recorded, session-wide:
# - every response (headers and body) read through `requests`, also stream=True ones, as they are read;
# - every response read through httpx2 (the openai and anthropic SDKs, plain httpx clients);
# - every byte received on a socket opened with socket.create_connection to a proxy (raw requests);
# - every proxy process's log file (LOGS) and the output of `proxy.py` commands run with subprocess.run.
LEAK_WATCH = set(SECRETS.values())
LOGS: list[Path] = []
RESPONSES: list[bytearray] = []
PROXY_PORTS: set[int] = set()


def recorded(head: bytes = b"") -> bytearray:
    """A new entry in RESPONSES, filled as its bytes arrive."""
    entry = bytearray(head)
    RESPONSES.append(entry)
    return entry


def find_leaks(seen, watch) -> list[tuple[str, str]]:
    """(where, secret) for each secret in `watch` found in the (where, bytes) pairs of `seen`."""
    return [(where, secret) for where, data in seen for secret in watch if secret.encode() in data]


def everything_seen() -> list[tuple[str, bytes]]:
    seen = [(str(path), path.read_bytes()) for path in LOGS if path.exists()]
    return seen + [(f"response {i}: {bytes(data[:80])!r}", bytes(data)) for i, data in enumerate(RESPONSES)]


def record_requests_responses():
    """Patch requests so that every response's headers, and its body as it is read (whichever way:
    .content, .text, .json(), iter_content, iter_lines), land in RESPONSES."""
    build_response = requests.adapters.HTTPAdapter.build_response
    iter_content = requests.models.Response.iter_content

    def recording_build_response(self, req, resp):
        response = build_response(self, req, resp)
        response._recorded = recorded(f"{response.status_code} {dict(response.headers)}\n".encode())
        return response

    def recording_iter_content(self, *args, **kwargs):
        entry = getattr(self, "_recorded", None)
        if entry is None:
            entry = self._recorded = recorded()
        for chunk in iter_content(self, *args, **kwargs):
            entry += chunk.encode() if isinstance(chunk, str) else chunk
            yield chunk

    requests.adapters.HTTPAdapter.build_response = recording_build_response
    requests.models.Response.iter_content = recording_iter_content


def record_httpx_responses():
    """Patch httpx2 so that every response's headers and raw body bytes land in RESPONSES."""
    iter_raw, aiter_raw = httpx.Response.iter_raw, httpx.Response.aiter_raw

    def recording_iter_raw(self, *args, **kwargs):
        entry = recorded(f"{self.status_code} {dict(self.headers)}\n".encode())
        for chunk in iter_raw(self, *args, **kwargs):
            entry += chunk
            yield chunk

    async def recording_aiter_raw(self, *args, **kwargs):
        entry = recorded(f"{self.status_code} {dict(self.headers)}\n".encode())
        async for chunk in aiter_raw(self, *args, **kwargs):
            entry += chunk
            yield chunk

    httpx.Response.iter_raw, httpx.Response.aiter_raw = recording_iter_raw, recording_aiter_raw


class RecordingSocket(socket.socket):
    """A client socket to a proxy whose received bytes land in RESPONSES, one entry per socket
    (so that a secret split between two reads is still found)."""

    __slots__ = ()
    entries: "weakref.WeakKeyDictionary[socket.socket, bytearray]" = weakref.WeakKeyDictionary()

    def _entry(self) -> bytearray:
        if self not in self.entries:
            self.entries[self] = recorded()
        return self.entries[self]

    def recv(self, *args, **kwargs):
        data = super().recv(*args, **kwargs)
        self._entry().extend(data)
        return data

    def recv_into(self, buffer, nbytes=0, *args):
        count = super().recv_into(buffer, nbytes, *args)
        self._entry().extend(memoryview(buffer)[:count])
        return count


def record_raw_sockets():
    create_connection = socket.create_connection

    def recording_create_connection(address, *args, **kwargs):
        sock = create_connection(address, *args, **kwargs)
        if address[1] in PROXY_PORTS:
            sock.__class__ = RecordingSocket
        return sock

    socket.create_connection = recording_create_connection


def record_proxy_commands():
    """`proxy.py login/logout/models ...` run by tests: their output is a proxy process's log too."""
    run = subprocess.run

    def recording_run(args, *rest, **kwargs):
        result = run(args, *rest, **kwargs)
        if any("proxy.py" in str(arg) for arg in (args if isinstance(args, (list, tuple)) else [args])):
            for output in (result.stdout, result.stderr):
                if output:
                    RESPONSES.append(bytearray(output.encode() if isinstance(output, str) else output))
        return result

    subprocess.run = recording_run


def record_response(response):
    """An httpx2 response hook: make sure the body is read (and so recorded by the iter_raw patch)."""
    response.read()


@pytest.fixture(scope="session", autouse=True)
def no_secret_leaks():
    record_requests_responses()
    record_httpx_responses()
    record_raw_sockets()
    record_proxy_commands()
    yield
    seen = everything_seen()
    leaks = find_leaks(seen, LEAK_WATCH)
    print(f"\nsecret scan: {len(seen)} logs and responses, {sum(len(data) for _, data in seen)} bytes, "
          f"{len(LEAK_WATCH)} secrets, {len(leaks)} leaks")
    assert not leaks, f"secrets leaked: {leaks[:5]}"
