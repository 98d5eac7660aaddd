"""A free TCP port for a launcher's rendezvous, so that several multi-process runs on one machine (two
web UI trainings, parallel tests) do not all take torchrun's default 29500."""

import socket


def free_port() -> int:
    """A port no one listens on now (the system's pick; free until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
