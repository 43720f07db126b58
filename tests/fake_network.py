"""A slow, encrypted network in front of a fake upstream: the benchmark's WAN scenario.

    client ──TCP──> DelayRelay ──TCP──> TLS front ──TCP──> target (e.g. tests/fake_upstream.py)
                    each chunk N ms     a throwaway certificate
                    late each way       for localhost / 127.0.0.1

The relay delivers every chunk `delay_ms` late in each direction (so a request/response exchange
costs 2 × delay_ms, the round trip), and a connection's first client bytes one round trip more:
a loopback connect() returns at once, where a real TCP handshake costs a round trip before the
client can send. TLS (1.3: one round trip) is negotiated through the relay, so a fresh HTTPS
connection pays TCP + TLS + request = 3 round trips before its first response byte, a kept-alive
one pays 1. `tc netem` is not available on our machines; this needs nothing but Python and the
`openssl` command.

API::

    from tests.fake_network import make_certificates, FakeNetwork
    certs = make_certificates(directory)     # .ca (PEM to trust), .cert, .key
    net = FakeNetwork(target_port, certs, delay_ms=25).start()
    net.base_url                             # "https://127.0.0.1:PORT"; trust certs.ca
    net.connections                          # how many connections clients opened to it
    net.stop()

Run alone (a fake upstream streaming `--tokens` tokens behind the network, until stdin closes;
prints one JSON line {"base_url", "ca", "fake_url"}):

    .venv/bin/python -m tests.fake_network --delay-ms 25 --tokens 20 --dir /tmp/wan
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Certificates", "make_certificates", "FakeNetwork"]

_READ = 64 * 1024


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the certificate a client must trust
    cert: Path  # the server's, for localhost and 127.0.0.1, signed by ca
    key: Path


def make_certificates(directory: Path) -> Certificates:
    """A throwaway CA and a server certificate it signed for localhost / 127.0.0.1 (valid 2 days).
    A CA plus a leaf rather than one self-signed leaf: every TLS stack (Node, OpenSSL's strict
    mode, Python 3.13's VERIFY_X509_STRICT) accepts that as a trust anchor."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca_key, csr, extensions = directory / "ca.key", directory / "server.csr", directory / "server.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                          "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", certs.ca, "-days", "2", "-subj", "/CN=pi-proxy bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", certs.key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", certs.ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-out", certs.cert, "-extfile", extensions],
    ):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return certs


class FakeNetwork:
    """The relay and the TLS front, on one asyncio loop in a daemon thread."""

    def __init__(self, target_port: int, certificates: Certificates, delay_ms: float = 25.0,
                 target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.delay = delay_ms / 1000
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(certificates.cert, certificates.key)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-network", daemon=True)
        self.servers: list[asyncio.Server] = []
        self.base_url = ""
        self.connections = 0

    def start(self) -> "FakeNetwork":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(timeout=10)
        return self

    def stop(self) -> None:
        async def close():
            for server in self.servers:
                server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def __enter__(self) -> "FakeNetwork":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _listen(self) -> None:
        front = await asyncio.start_server(self._front, "127.0.0.1", 0, ssl=self.tls)
        front_port = front.sockets[0].getsockname()[1]
        relay = await asyncio.start_server(lambda r, w: self._relay(r, w, front_port), "127.0.0.1", 0)
        self.servers = [front, relay]
        self.base_url = f"https://127.0.0.1:{relay.sockets[0].getsockname()[1]}"

    async def _relay(self, client_reader, client_writer, front_port: int) -> None:
        self.connections += 1
        handshake_done = self.loop.time() + 2 * self.delay  # SYN out, SYN-ACK back
        await self._join(client_reader, client_writer, ("127.0.0.1", front_port), self.delay, handshake_done)

    async def _front(self, client_reader, client_writer) -> None:
        await self._join(client_reader, client_writer, self.target, 0.0, 0.0)

    async def _join(self, client_reader, client_writer, address, delay: float, client_not_before: float) -> None:
        """Connects the client to `address` and pipes both ways until both ends are done; any
        error closes both connections (the other side then sees the disconnect, as over a real
        network)."""
        try:
            server_reader, server_writer = await asyncio.open_connection(*address)
        except OSError:
            client_writer.close()
            return
        pipes = [asyncio.create_task(self._pipe(client_reader, server_writer, delay, client_not_before)),
                 asyncio.create_task(self._pipe(server_reader, client_writer, delay, 0.0))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            pass  # stop()
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in (client_writer, server_writer):
                writer.close()

    async def _pipe(self, reader, writer, delay: float, not_before: float) -> None:
        """Copies reader to writer, each chunk delivered `delay` after it arrived (and not before
        `not_before` + delay), in order; EOF is delivered the same way."""
        deliveries: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await deliveries.get()
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    else:
                        writer.close()
                    return
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(_READ)
                deliveries.put_nowait((max(self.loop.time(), not_before) + delay, data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()


def main() -> None:
    from tests.fake_upstream import FakeUpstream, Reply

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=25.0, help="added to each chunk, each way")
    parser.add_argument("--tokens", type=int, default=20, help="deltas in the fake's streamed answer")
    parser.add_argument("--dir", type=Path, required=True, help="where the certificates are written")
    args = parser.parse_args()
    certs = make_certificates(args.dir)
    with FakeUpstream() as fake, FakeNetwork(fake.port, certs, args.delay_ms) as network:
        fake.default = Reply(text="tok " * args.tokens, chunks=args.tokens)
        print(json.dumps({"base_url": network.base_url, "ca": str(certs.ca), "fake_url": fake.base_url}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
