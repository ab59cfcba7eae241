"""Ports for the servers tests start: picked below the kernel's ephemeral range, where no other
process's outgoing connection can take one between the pick and the server's bind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from baton import embedded


def _expected_range() -> tuple[int, int] | None:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        return None
    return (embedded._PICK_FROM, low - 1) if low - 1 - embedded._PICK_FROM >= 1000 else None


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    span = embedded._picked_range()
    assert span == _expected_range()
    ports = embedded.free_ports(50) + [embedded.free_port() for _ in range(50)]
    assert len(set(ports)) == 100  # never the same one twice in a process
    if span is not None:  # a machine whose ephemeral range leaves room below it (this one)
        assert all(span[0] <= p <= span[1] for p in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[0]))


def test_a_port_someone_holds_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        # A range of one port, and it is held: the kernel gives another.
        monkeypatch.setattr(embedded, "_picked_range", lambda: (taken, taken))
        monkeypatch.setattr(embedded, "_picked", set())
        assert embedded.free_port() != taken
        assert taken not in embedded.free_ports(3)


def test_without_a_known_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_picked_range", lambda: None)
    ports = embedded.free_ports(5)
    assert len(set(ports)) == 5 and all(p > 0 for p in ports)
