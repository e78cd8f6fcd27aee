"""Where the hypervisor's two sockets live: ipc:// files under the run directory, or tcp:// ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import zmq

from pvcluster.spec import MAX_PORT

# sockaddr_un holds 108 bytes; a longer ipc path fails deep inside ZeroMQ with an unhelpful error.
_IPC_PATH_MAX = 100
# With a fixed tcp port the control socket listens next to the bus; the spec's MAX_PORT leaves room for it.
CONTROL_PORT_OFFSET = 1


@attrs.frozen
class Endpoints:
    bus: str
    control: str
    transport: str = "ipc"
    host: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def for_spec(cls, spec: Any, run_dir: Path) -> Endpoints:
        if spec.bus.transport == "tcp":
            host, port = spec.bus.host, spec.bus.port
            if port > MAX_PORT:  # only a spec that skipped validation gets here
                raise ValueError(
                    f"bus.port {port} leaves no port for the control socket (port + {CONTROL_PORT_OFFSET}); "
                    f"the highest is {MAX_PORT}"
                )
            bus = f"tcp://{host}:{port}" if port else f"tcp://{host}"
            control = f"tcp://{host}:{port + CONTROL_PORT_OFFSET}" if port else f"tcp://{host}"
            return cls(bus=bus, control=control, transport="tcp", host=host, port=port)
        for name in ("bus.sock", "control.sock"):
            path = run_dir / name
            if len(str(path)) > _IPC_PATH_MAX:
                raise ValueError(
                    f"run directory {run_dir} is too long for an ipc:// socket path "
                    f"({len(str(path))} > {_IPC_PATH_MAX} bytes); choose a shorter cluster.run_dir"
                )
        return cls(bus=f"ipc://{run_dir / 'bus.sock'}", control=f"ipc://{run_dir / 'control.sock'}")

    def bind(self, bus: zmq.Socket, control: zmq.Socket) -> Endpoints:
        """Bind both sockets; with tcp port 0, pick free ports and return the endpoints actually bound."""
        if self.transport == "tcp" and not self.port:
            bport = bus.bind_to_random_port(f"tcp://{self.host}")
            cport = control.bind_to_random_port(f"tcp://{self.host}")
            return attrs.evolve(self, bus=f"tcp://{self.host}:{bport}", control=f"tcp://{self.host}:{cport}")
        bus.bind(self.bus)
        control.bind(self.control)
        return self
