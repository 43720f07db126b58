"""The benchmark's WAN stand-in (tests/fake_network.py) is what it claims: TLS that verifies only
against its throwaway CA, and round trips that cost what a real network's would."""

import time

import pytest
import requests

from tests.fake_network import FakeNetwork, make_certificates
from tests.fake_upstream import FakeUpstream, Reply

DELAY_MS = 40
RTT = 2 * DELAY_MS / 1000
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    certs = make_certificates(tmp_path_factory.mktemp("tls"))
    with FakeUpstream() as fake, FakeNetwork(fake.port, certs, DELAY_MS) as net:
        fake.default = Reply(text="tok " * 5, chunks=5)
        yield net, str(certs.ca), fake


def first_byte(session: requests.Session, url: str, ca: str) -> tuple[float, bytes]:
    """(seconds to the first body byte, the whole body)"""
    started = time.perf_counter()
    with session.post(url, json=BODY, stream=True, timeout=10, verify=ca) as response:
        assert response.status_code == 200
        chunks = response.iter_content(None)
        first = next(chunks)
        elapsed = time.perf_counter() - started
        return elapsed, first + b"".join(chunks)


def test_tls_verifies_only_against_the_throwaway_ca(network):
    net, ca, _ = network
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(f"{net.base_url}/v1/chat/completions", json=BODY, timeout=10)
    for host in ("127.0.0.1", "localhost"):
        url = net.base_url.replace("127.0.0.1", host) + "/v1/chat/completions"
        assert b"data: [DONE]" in first_byte(requests.Session(), url, ca)[1]


def test_new_connection_pays_tcp_tls_and_request_round_trips_kept_one_pays_one(network):
    net, ca, _ = network
    url = f"{net.base_url}/v1/chat/completions"
    connections = net.connections
    with requests.Session() as session:
        fresh, body = first_byte(session, url, ca)
        kept, _ = first_byte(session, url, ca)
    assert b'"content":"tok ' in body
    assert net.connections == connections + 1  # the second request used the kept connection
    assert fresh >= 3 * RTT  # TCP handshake, TLS 1.3 handshake, request
    assert kept >= RTT


def test_client_disconnect_reaches_the_upstream(network):
    net, ca, fake = network
    fake.push(Reply(text="tok " * 50, chunks=50, delay=0.1))
    with requests.post(f"{net.base_url}/v1/chat/completions", json=BODY, stream=True, timeout=10,
                       verify=ca) as response:
        next(response.iter_content(1))
    assert fake.wait_for_disconnect(timeout=2 + RTT)
