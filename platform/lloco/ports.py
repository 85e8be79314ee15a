"""Free ports for the servers lloco starts on one machine (the embedded S3, the local stack, Ray's dashboard).

A port found free is only free until someone binds it, and the gap between choosing a port and the server
binding it can be long (the local stack starts S3 and Ray, whose workers open many sockets, before the
Ingress binds its gRPC port). Asking the kernel for port 0 returns an *ephemeral* port, the very range from
which every outgoing connection and every other bind(0) on the machine draws, so on a busy host (a 16-core
GPU machine starts a Ray worker per core) another process can take it in that gap. The ports here come
from below the ephemeral range instead, where the kernel never hands out a port by itself, so only a
server that names a port explicitly can collide.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOWEST = 10000  # below this are the ports many servers take by default
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default; macOS and Windows use 49152-65535
# Ports this process handed out: a caller often takes several before binding any (the embedded S3 takes ten)
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out by itself (Linux's setting; Linux's default elsewhere)."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server already listens on ``port`` where ``host`` would bind it (loopback: also on
    every interface, which includes it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for probe_host in dict.fromkeys((host, wildcard)):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((probe_host, port))
            except OSError as error:
                if error.errno in (98, 48):  # EADDRINUSE on Linux, macOS
                    return True
    return False


def free_port(host: str = LOOPBACK) -> int:
    """A port that is free on ``host`` and outside the kernel's ephemeral range (see the module's docstring)."""
    return free_port_pair(0, host)


def free_port_pair(offset: int, host: str = LOOPBACK) -> int:
    """A free port ``p`` such that ``p + offset`` is free too, both outside the ephemeral range where the
    host leaves room for them (below it, else above it), and neither handed out by this process before."""
    ephemeral_low, ephemeral_high = ephemeral_range()
    if ephemeral_low - 1 - offset >= LOWEST + 1000:
        low, high = LOWEST, ephemeral_low - 1 - offset
    elif 65535 - offset >= ephemeral_high + 1000:
        low, high = ephemeral_high + 1, 65535 - offset
    else:  # the ephemeral range covers nearly every port: any free one
        low, high = LOWEST, 65535 - offset
    for _ in range(1000):
        port = random.randint(low, high)
        pair = {port, port + offset}
        if pair.isdisjoint(_handed_out) and not any(port_in_use(each, host) for each in pair):
            _handed_out.update(pair)
            return port
    raise OSError(f"no free port pair (offset {offset}) between {low} and {high} on {host}")
