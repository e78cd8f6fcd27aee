"""The trio adapter for ZeroMQ sockets (pvcluster/bus/zsock.py): a reader parked on the edge-triggered descriptor is
never left asleep with a frame waiting, and a frame flood still lets other tasks run."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import trio
import trio.testing
import zmq

from pvcluster.bus.zsock import TrioSocket

# A hang guard only: every test here finishes in milliseconds, or never when a wake-up is lost.
HANG_S = 30
ENDPOINTS = (f"inproc://zsock-{n}" for n in itertools.count())


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A ROUTER (the hypervisor's side) and a DEALER peer over inproc, where a send is delivered at once: the
    peer's frame has reached the ROUTER, and raised its descriptor's edge, before ``send`` returns."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    endpoint = next(ENDPOINTS)
    router.bind(endpoint)
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect(endpoint)
    yield router, dealer
    router.close(linger=0)
    dealer.close(linger=0)
    ctx.term()


def test_a_send_that_consumes_the_edge_wakes_the_parked_reader(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    async def body() -> None:
        router, dealer = pair
        sock = TrioSocket(router)  # no safety_poll task: only the wake-up after a send can rescue the reader
        dealer.send(b"hello")
        assert await sock.recv_multipart() == [b"peer", b"hello"]
        got: list[list[bytes]] = []
        with trio.fail_after(HANG_S):
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    for _ in range(20):
                        got.append(await sock.recv_multipart())

                nursery.start_soon(reader)
                for i in range(20):
                    await trio.testing.wait_all_tasks_blocked()  # the reader is parked on the descriptor
                    dealer.send(b"%d" % i)  # its edge is raised ...
                    await sock.send_multipart([b"peer", b"ack"])  # ... and this send's own processing consumes it
        assert got == [[b"peer", b"%d" % i] for i in range(20)]
        assert [dealer.recv() for _ in range(20)] == [b"ack"] * 20

    trio.run(body)


def test_has_pending_wakes_the_parked_reader(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    async def body() -> None:
        router, dealer = pair
        sock = TrioSocket(router)
        got: list[list[bytes]] = []
        with trio.fail_after(HANG_S):
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    got.append(await sock.recv_multipart())

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                dealer.send(b"x")
                assert sock.has_pending()  # reading ZMQ_EVENTS consumed the edge; the reader must be woken all the same
        assert got == [[b"peer", b"x"]]

    trio.run(body)


def test_a_flood_of_waiting_frames_does_not_starve_other_tasks(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    async def body() -> None:
        router, dealer = pair
        sock = TrioSocket(router)
        for i in range(200):
            dealer.send(b"%d" % i)
        ticks = 0
        with trio.fail_after(HANG_S):
            async with trio.open_nursery() as nursery:

                async def other() -> None:
                    nonlocal ticks
                    while True:
                        await trio.lowlevel.checkpoint()
                        ticks += 1

                nursery.start_soon(other)
                for _ in range(200):
                    await sock.recv_multipart()
                nursery.cancel_scope.cancel()
        assert ticks >= 5  # the reader yielded now and then (every _YIELD_EVERY receives)

    trio.run(body)


def test_a_reader_parked_on_a_closed_socket_is_told(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    async def body() -> None:
        router, _ = pair
        sock = TrioSocket(router)
        with trio.fail_after(HANG_S):
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await sock.recv_multipart()

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                sock.close()

    trio.run(body)
