"""A fake Amazon Bedrock runtime: enough of ConverseStream for pi-ai's Bedrock provider (the AWS SDK)
to get a short text answer (pure stdlib).

    POST /model/{modelId}/converse-stream   -> 200, application/vnd.amazon.eventstream:
        messageStart, contentBlockDelta (one per word), contentBlockStop, messageStop, metadata
    anything else                           -> 404

Strict where Bedrock is: the request must be signed with AWS Signature Version 4 (the signature is
checked against the secret the fake was given: 403 InvalidSignatureException otherwise, as AWS
answers), be JSON with a non-empty `messages` list. HTTP/1.1 only: the AWS SDK speaks HTTP/2 to
Bedrock by default, so clients set AWS_BEDROCK_FORCE_HTTP1=1 (pi-ai's switch for endpoints that
need it).

AWS event-stream framing (each message): total length (u32), headers length (u32), CRC32 of those
8 bytes, headers (name length u8, name, type u8 = 7 string, value length u16, value), payload,
CRC32 of everything before it. Big-endian.

    with FakeBedrock(secret_key="...") as bedrock:
        bedrock.base_url, bedrock.answer = "Hello from Bedrock", bedrock.requests  # [(path, headers, body)]
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

__all__ = ["FakeBedrock", "event_message"]

PATH = re.compile(r"^/model/([^/]+)/converse-stream$")
AUTHORIZATION = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/bedrock/aws4_request, "
                           r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")


def event_message(event_type: str, payload: dict) -> bytes:
    """One AWS event-stream message carrying a ConverseStream event."""
    headers = b"".join(bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
                       for name, value in ((":event-type", event_type), (":content-type", "application/json"),
                                           (":message-type", "event")))
    body = json.dumps(payload, separators=(",", ":")).encode()
    prelude = struct.pack(">II", 12 + len(headers) + len(body) + 4, len(headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


def sigv4_signature(secret_key: str, method: str, path: str, query: str, headers: dict, signed: list, body: bytes,
                     date: str, region: str) -> str:
    """AWS Signature Version 4 of a request, as the AWS SDK computes it (path URI-encoded twice for
    every service but S3)."""
    canonical = "\n".join([
        method,
        quote(quote(unquote(path), safe="/~"), safe="/~"),
        query,
        "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed),
        ";".join(signed),
        hashlib.sha256(body).hexdigest(),
    ])
    scope = f"{date}/{region}/bedrock/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", headers["x-amz-date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (date, region, "bedrock", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {name.lower(): value for name, value in self.headers.items()}
        owner = self.server.owner
        with owner.lock:
            owner.requests.append((self.path, headers, body))
        match = PATH.match(self.path.split("?")[0])
        if not match:
            return self.fail(404, "UnknownOperationException", "not found")
        if not owner.signed_correctly(self.command, self.path, headers, body):
            return self.fail(403, "InvalidSignatureException", "The request signature we calculated does not match "
                                                               "the signature you provided.")
        if owner.failure:
            return self.fail(*owner.failure)
        try:
            request = json.loads(body)
            assert request["messages"] and isinstance(request["messages"], list)
        except (ValueError, KeyError, TypeError, AssertionError):
            return self.fail(400, "ValidationException", "Malformed input request")
        words = re.findall(r"\S+\s*", owner.answer)
        events = [("messageStart", {"role": "assistant"})]
        events += [("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": word}}) for word in words]
        events += [("contentBlockStop", {"contentBlockIndex": 0}), ("messageStop", {"stopReason": "end_turn"}),
                   ("metadata", {"usage": {"inputTokens": 7, "outputTokens": len(words), "totalTokens": 7 + len(words)},
                                 "metrics": {"latencyMs": 5}})]
        stream = b"".join(event_message(kind, payload) for kind, payload in events)
        self.send_response(200)
        self.send_header("content-type", "application/vnd.amazon.eventstream")
        self.send_header("x-amzn-requestid", "fake-request-1")
        self.send_header("content-length", str(len(stream)))
        self.end_headers()
        self.wfile.write(stream)

    do_GET = do_POST

    def fail(self, status: int, kind: str, message: str) -> None:
        data = json.dumps({"message": message}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("x-amzn-errortype", f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "FakeBedrock"


class FakeBedrock:
    def __init__(self, access_key: str, secret_key: str, answer: str = "Hello from Bedrock",
                 failure: tuple[int, str, str] | None = None):
        """`failure`: (status, exception name, message) answered to every signed request instead."""
        self.access_key, self.secret_key, self.answer, self.failure = access_key, secret_key, answer, failure
        self.requests: list[tuple[str, dict, bytes]] = []
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.owner = self
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def signed_correctly(self, method: str, path: str, headers: dict, body: bytes) -> bool:
        match = AUTHORIZATION.match(headers.get("authorization", ""))
        if not match or "x-amz-date" not in headers:
            return False
        access_key, date, region, signed, signature = match.groups()
        signed = signed.split(";")
        if (access_key != self.access_key or not {"host", "x-amz-date"} <= set(signed)
                or not set(signed) <= set(headers)):
            return False
        path, _, query = path.partition("?")
        expected = sigv4_signature(self.secret_key, method, path, query, headers, signed, body, date, region)
        return hmac.compare_digest(expected, signature)

    def __enter__(self) -> "FakeBedrock":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
