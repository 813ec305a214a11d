"""A free TCP port, without importing torch (the engine and tool-server hosts never need it)."""
from __future__ import annotations

import socket


def free_port() -> int:
    # the wildcard address: a port taken on any interface (a gloo pair on the node IP, say) is skipped;
    # one free on 127.0.0.1 alone could still be taken where the rendezvous store listens
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
