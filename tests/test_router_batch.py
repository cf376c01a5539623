"""The front-end's compiled ROUTER calls (engine/router_batch.py) on real sockets: results sent
to each client by its routing id, one message per run of its items, and a gone client reported
while the others are served."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from engine.router_batch import ResultSender, RouterReader, RoutingIds

HEADER = b"HEAD0001"
ITEM = 12  # bytes a reply item


@pytest.fixture()
def router() -> Iterator[tuple[zmq.Socket[bytes], list[zmq.Socket[bytes]], list[bytes]]]:
    """A ROUTER (mandatory routing, as the front-end's) and 100 DEALERs that said hello, with
    their routing ids as the ROUTER learnt them."""
    ctx = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, 4096)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    dealers: list[zmq.Socket[bytes]] = []
    for i in range(100):
        dealer: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(i.to_bytes(2, "little"))
        dealers.append(dealer)
    reader = RouterReader(sock)
    ids: dict[int, bytes] = {}
    while len(ids) < len(dealers):
        assert sock.poll(5000)
        batch, _ = reader.read(64)
        for identity, msg, frames in batch:
            assert frames == 1
            ids[int.from_bytes(msg, "little")] = identity
    yield sock, dealers, [ids[i] for i in range(len(dealers))]
    for dealer in dealers:
        dealer.close()
    sock.close()
    ctx.term()


def test_each_run_reaches_its_client_as_one_message(
        router: tuple[zmq.Socket[bytes], list[zmq.Socket[bytes]], list[bytes]]) -> None:
    sock, dealers, identities = router
    routing = RoutingIds(capacity=4)  # grows past its first size
    conn_of_dealer = list(reversed(range(len(dealers))))  # connection numbers unrelated to the order of arrival
    for dealer, conn in enumerate(conn_of_dealer):
        routing.set(conn, identities[dealer])
    # Runs of 1, 2, 3, ... items for every other dealer, each item saying whose it is.
    chosen = list(range(0, len(dealers), 2))
    conns, items, bounds = [], [], [0]
    for k, dealer in enumerate(chosen):
        for j in range(k % 5 + 1):
            conns.append(conn_of_dealer[dealer])
            items.append(dealer.to_bytes(4, "little") + j.to_bytes(4, "little") + b"item")
        bounds.append(len(conns))
    sender = ResultSender(sock, HEADER)
    failed = sender.send(np.frombuffer(b"".join(items), np.uint8), ITEM, np.array(bounds, np.int64), len(chosen),
                         np.array(conns, np.int64), routing)
    assert failed == []
    for k, dealer in enumerate(chosen):
        assert dealers[dealer].poll(5000)
        msg = dealers[dealer].recv()
        assert not dealers[dealer].getsockopt(zmq.RCVMORE)
        assert msg[:len(HEADER)] == HEADER
        body = msg[len(HEADER):]
        assert len(body) == (k % 5 + 1) * ITEM
        assert [int.from_bytes(body[i:i + 4], "little") for i in range(0, len(body), ITEM)] == [dealer] * (k % 5 + 1)
    for dealer in range(1, len(dealers), 2):
        assert not dealers[dealer].poll(50)


def test_a_gone_client_is_reported_and_the_others_still_served(
        router: tuple[zmq.Socket[bytes], list[zmq.Socket[bytes]], list[bytes]]) -> None:
    sock, dealers, identities = router
    routing = RoutingIds()
    routing.set(0, identities[0])
    routing.set(1, b"\x00nobody")
    routing.set(2, identities[2])
    items = np.frombuffer(b"A" * ITEM + b"B" * ITEM + b"C" * ITEM, np.uint8)
    failed = ResultSender(sock, HEADER).send(items, ITEM, np.array([0, 1, 2, 3], np.int64), 3,
                                             np.array([0, 1, 2], np.int64), routing)
    assert failed == [(1, errno.EHOSTUNREACH)]
    assert routing[1] == b"\x00nobody"
    assert dealers[0].poll(5000) and dealers[0].recv() == HEADER + b"A" * ITEM
    assert dealers[2].poll(5000) and dealers[2].recv() == HEADER + b"C" * ITEM
    assert not dealers[2].poll(50)
