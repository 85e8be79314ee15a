"""Ports for the servers lloco starts itself: free, outside the kernel's ephemeral range, never handed twice."""

from __future__ import annotations

import socket

from lloco.ports import ephemeral_range, free_port, free_port_pair


def test_free_ports_are_outside_the_ephemeral_range_distinct_and_bindable() -> None:
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)  # a caller may take several before binding any
    assert not any(low <= port <= high for port in ports)
    with socket.socket() as server:
        server.bind(("127.0.0.1", ports[-1]))


def test_a_pair_keeps_its_offset_and_both_ports_are_free() -> None:
    port = free_port_pair(10000)
    low, high = ephemeral_range()
    for each in (port, port + 10000):
        assert not low <= each <= high
        with socket.socket() as server:
            server.bind(("127.0.0.1", each))
