"""``free_port`` picks ports no outgoing connection can take first: below the
kernel's ephemeral range, and free when given."""

from __future__ import annotations

import socket

from app.local.deployments import ephemeral_low, free_port


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    low = ephemeral_low()
    for _ in range(20):
        port = free_port()
        assert 1024 <= port < low, (port, low)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if it was not free


def test_a_port_in_use_is_not_given() -> None:
    held = []
    try:
        for _ in range(20):
            sock = socket.socket()
            port = free_port()
            sock.bind(("127.0.0.1", port))
            sock.listen()
            held.append((sock, port))
        ports = [port for _, port in held]
        assert len(set(ports)) == len(ports)  # each was free when it was given
    finally:
        for sock, _ in held:
            sock.close()
