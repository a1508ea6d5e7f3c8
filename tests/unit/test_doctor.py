"""``devlayer doctor``'s hints, without processes (tests/e2e/test_doctor.py runs it)."""

from __future__ import annotations

import pytest

from devlayer.cli.doctor import suspect
from devlayer.hooks import COMM_NETWORKS, CommNetwork


def test_the_network_hints_name_what_the_backends_declare() -> None:
    """The collectives' hints name the comm libraries' variables that backends/ declares
    (cuda: NCCL, xpu: oneCCL) and gloo's; cli/doctor.py itself names no vendor."""
    assert suspect("barrier") == (
        "a rank stuck or dead before the barrier; NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME"
    )
    assert suspect("all_reduce") == (
        "the comm backend's network settings (CCL_*, NCCL_*, GLOO_SOCKET_IFNAME)"
    )
    assert suspect("all_gather") == suspect("all_reduce")
    assert suspect("rendezvous").startswith("MASTER_ADDR, MASTER_PORT, WORLD_SIZE")
    assert suspect("no such step") == ""


def test_a_plugins_comm_network_joins_the_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vendor outside devlayer declares its comm library's variables the same way."""
    suspect("barrier")  # the built-in backends are loaded (and have declared theirs)
    monkeypatch.setitem(COMM_NETWORKS, "zzcomm", CommNetwork("ZZ_", "ZZ_IFNAME"))
    assert suspect("barrier").endswith("NCCL_SOCKET_IFNAME / ZZ_IFNAME / GLOO_SOCKET_IFNAME")
    assert suspect("all_gather").endswith("(CCL_*, NCCL_*, ZZ_*, GLOO_SOCKET_IFNAME)")
