"""A hostile client, run by tests on another "host": ``attacker.py BUS CONTROL KEYS`` tries what an attacker who holds
the cluster's public key and one stolen domain key pair (in KEYS) could, and prints, as one JSON object, what each
attempt got back: null for nothing at all, else the kind of the answer."""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import zmq

from pvcluster.bus import codec
from pvcluster.bus.messages import CtlRequest, Hello
from pvcluster.keys import KeyStore, Role

WAIT_MS = 3000  # for an answer that must not come
ANSWER_MS = 20_000  # for one that must (a loaded machine may take a while)
# If anything here ever blocks, say where (the test shows stderr) instead of hanging until the test's timeout.
WATCHDOG_S = 90


def attempt(ctx: zmq.Context, endpoint: str, body: object, curve: tuple[bytes, bytes, bytes] | None = None,
            wait_ms: int = WAIT_MS) -> str | None:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A DEALER whose handshake failed has no pipe until it reconnects, and a send then blocks: give up as for no answer
    sock.setsockopt(zmq.SNDTIMEO, wait_ms)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    sock.connect(endpoint)
    try:
        try:
            sock.send(codec.encode(body, seq=1, vt_ns=0))
        except zmq.Again:
            return None
        if not sock.poll(wait_ms):
            return None
        answer = codec.decode(sock.recv()).body
    finally:
        sock.close()
    return str(getattr(answer, "kind", type(answer).__name__))


def main() -> int:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    bus, control, keys = sys.argv[1], sys.argv[2], KeyStore(Path(sys.argv[3]))
    server = keys.public(Role.cluster())
    stolen = (*keys.keypair(Role("domain", "victim")), server)
    stranger = (*zmq.curve_keypair(), server)
    wrong_server = (*zmq.curve_keypair(), zmq.curve_keypair()[0])
    shadow = CtlRequest(cmd="create", args={"domain": {"name": "evil", "kernel": "/etc/shadow"}})
    destroy = CtlRequest(cmd="destroy", args={"dom": "victim"})
    ctx = zmq.Context()
    try:
        print(json.dumps({
            "no-key-control": attempt(ctx, control, shadow),
            "no-key-bus": attempt(ctx, bus, Hello(pid=1, name="victim")),
            "wrong-key-control": attempt(ctx, control, destroy, stranger),
            "wrong-server-key-control": attempt(ctx, control, destroy, wrong_server),
            "domain-key-control": attempt(ctx, control, destroy, stolen),
            "domain-key-bus-other": attempt(ctx, bus, Hello(pid=1, name="other"), stolen, wait_ms=ANSWER_MS),
        }), flush=True)
    finally:
        ctx.destroy(linger=0)  # nothing left for interpreter exit to wait on
    return 0


if __name__ == "__main__":
    sys.exit(main())
