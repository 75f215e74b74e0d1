"""Loopback ports for the tests that start servers (``ipiqa serve``, tritonserver)."""
from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """``n`` different ports free on 127.0.0.1 right now (the OS picks them; all held until all are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    """Free to listen on as tritonserver does (SO_REUSEADDR: a killed server's TIME_WAIT sockets do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
