"""Rendezvous failures are named quickly; the store listens on loopback on one node."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

import devlayer
from devlayer.testing import free_port, slurm_env
from tests.dist.ranks import finish, start_ranks
from tests.helpers import PY, ROOT, listening_addresses, rank_results, subprocess_env

pytestmark = [pytest.mark.dist, pytest.mark.timeout(90)]


def _env_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, port: int) -> None:
    for key, value in {
        "RANK": rank,
        "WORLD_SIZE": world,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "DEVLAYER_LAUNCHER": "env",
    }.items():
        monkeypatch.setenv(key, str(value))


def _listeners_of_master_port() -> list[str]:
    listeners = listening_addresses(int(os.environ["MASTER_PORT"]))
    devlayer.barrier(timeout=20)
    return listeners


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net")
def test_single_node_store_listens_on_loopback_only(clean_env):
    per_rank = devlayer.spawn(
        _listeners_of_master_port, nprocs=2, backend="cpu", timeout=20, join_timeout=60
    )
    for listeners in per_rank:
        assert listeners, "the store should be listening while the job runs"
        assert all(addr == "0100007F" for addr in listeners), listeners


@pytest.mark.timeout(20)
def test_master_port_in_use_is_named_fast(clean_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        _env_rank(clean_env, 0, 2, port)
        # timeout=30, yet the error must come at once: the test's own limit is 20 s.
        with pytest.raises(devlayer.errors.RendezvousError, match=f"port {port} is already in use"):
            devlayer.init(backend="cpu", timeout=30)


@pytest.mark.timeout(20)
def test_missing_rank_is_named_within_the_timeout(clean_env):
    _env_rank(clean_env, 0, 3, free_port())
    with pytest.raises(devlayer.errors.RendezvousError) as info:
        devlayer.init(backend="cpu", timeout=2)
    message = str(info.value)
    assert "expected 3 ranks" in message and "only 1 joined" in message
    assert "missing rank(s): 1, 2" in message


@pytest.mark.timeout(25)
def test_unreachable_master_names_address_and_port(clean_env):
    port = free_port()
    _env_rank(clean_env, 1, 2, port)
    with pytest.raises(devlayer.errors.RendezvousError, match=f"127.0.0.1:{port}"):
        devlayer.init(backend="cpu", timeout=3)


# --------------------------------------------------------------------------- issue 14 (6, 9)

_WORKER = """
import json, os, sys
import devlayer
from tests.helpers import listening_addresses
try:
    devlayer.init(backend="cpu", timeout=float(sys.argv[1]))
except devlayer.DevlayerError as exc:
    print("ERROR", type(exc).__name__, exc, flush=True)
    sys.exit(3)
listeners = listening_addresses(int(os.environ["MASTER_PORT"]))
total = devlayer.all_reduce(__import__("torch").ones(1)).item()
devlayer.barrier(timeout=20)
print("RESULT " + json.dumps({"rank": devlayer.rank(), "sum": total, "listeners": listeners}))
devlayer.shutdown()
"""


def _start_ranks(addr: str, port: int, world: int, timeout: float) -> list[subprocess.Popen]:
    argv = ["-c", _WORKER, str(timeout)]
    return start_ranks(argv, world=world, addr=addr, port=port, stderr=subprocess.STDOUT)


def _start_worker(env: dict[str, str], timeout: float) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-c", _WORKER, str(timeout)],
        env=subprocess_env(**env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _outputs(procs: list[subprocess.Popen], limit: float) -> list[tuple[int, str]]:
    return [(code, out) for code, out, _ in finish(procs, limit)]


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# /proc/net/tcp{,6} spelling of each address (little-endian words).
_PROC_ADDR = {
    "127.0.0.2": "0200007F",
    "::1": "00000000000000000000000001000000",
    "[::1]": "00000000000000000000000001000000",
}


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net")
@pytest.mark.parametrize("addr", ["::1", "[::1]", "127.0.0.2"])
def test_store_binds_the_loopback_address_master_addr_names(addr):
    if ":" in addr and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    # Before: the store always bound 127.0.0.1, so rank 1 waited the whole timeout.
    procs = _start_ranks(addr, free_port(), 2, timeout=20)
    results = _outputs(procs, 90)
    for code, text in results:
        assert code == 0, text
    records = rank_results("".join(text for _, text in results))
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["sum"] == 2.0 for r in records)
    for record in records:  # listening on the named address only, not on every interface
        assert record["listeners"] == [_PROC_ADDR[addr]], record


@pytest.mark.timeout(120)
def test_other_ranks_say_that_rank_0_failed_when_the_port_is_busy():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        procs = _start_ranks("127.0.0.1", port, 2, timeout=6)
        (code0, out0), (code1, out1) = _outputs(procs, 90)
    assert code0 == 3 and f"port {port} is already in use" in out0, out0
    assert code1 == 3, out1
    line = next(x for x in out1.splitlines() if x.startswith("ERROR"))
    assert "RendezvousError" in line
    assert f"rank 0 (the store host) probably failed to start the store at 127.0.0.1:{port}" in line
    assert "rank 0's output" in line


# --------------------------------------------------------------------------- issue 20


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    """Until something listens on ``port`` (or ``proc`` exited); bounded by the test timeout."""
    while not listening_addresses(port) and proc.poll() is None:
        time.sleep(0.05)


@pytest.mark.timeout(150)
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net")
def test_r5_l2_a_rank_of_another_job_on_the_same_port_is_refused():
    """R5-L2: a rank of another job that reaches a world's store gets an error naming both
    jobs and joins nothing; the first job then forms its world and finishes undisturbed.

    Before: job B's rank 1 (SLURM job J+1, step 0) claimed rank 1 in job A's world (job J,
    step 1, same port), trained with A's rank 0, and A's own rank 1 was refused.
    """
    port = free_port()

    def task(rank: int, job: int, step: int) -> dict[str, str]:
        env = slurm_env(rank, 2, nodelist="localhost", job_id=job, step_id=step)
        return {**env, "MASTER_PORT": str(port)}

    a0 = _start_worker(task(0, 7001, 1), timeout=60)
    try:
        _wait_listening(port, a0)
        intruder = _start_worker(task(1, 7002, 0), timeout=60)
        ((code_b, out_b),) = _outputs([intruder], 90)
        a1 = _start_worker(task(1, 7001, 1), timeout=60)
        (code0, out0), (code1, out1) = _outputs([a0, a1], 90)
    finally:
        if a0.poll() is None:
            a0.kill()
    assert code_b == 3, out_b
    line = next(text for text in out_b.splitlines() if text.startswith("ERROR"))
    assert "RendezvousError" in line, line
    assert "slurm job SLURM_JOB_ID=7002 step SLURM_STEP_ID=0" in line, line
    assert "slurm job SLURM_JOB_ID=7001 step SLURM_STEP_ID=1" in line, line
    assert f"127.0.0.1:{port}" in line and "export MASTER_PORT" in line, line
    assert code0 == 0 and code1 == 0, out0 + out1
    records = rank_results(out0 + out1)
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["sum"] == 2.0 for r in records)


def _proc_hex(ip: str) -> str:
    """``ip`` as /proc/net/tcp{,6} spells it (each 32-bit word little-endian)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip)
    return "".join(raw[i : i + 4][::-1].hex().upper() for i in range(0, len(raw), 4))


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net")
def test_r5_l4_store_listens_on_the_address_this_hosts_name_resolves_to():
    """R5-L4: MASTER_ADDR=<this host's name> makes the store listen on the address the name
    resolves to and nowhere else (before: on every interface); the job still runs.
    """
    name = socket.gethostname()
    try:
        resolved = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        pytest.skip(f"this host's name {name!r} does not resolve here")
    procs = _start_ranks(name, free_port(), 2, timeout=20)
    results = _outputs(procs, 90)
    for code, text in results:
        assert code == 0, text
    records = rank_results("".join(text for _, text in results))
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["sum"] == 2.0 for r in records)
    for record in records:
        assert record["listeners"] == [_proc_hex(resolved)], (name, resolved, record)


def test_r5_l4_listen_address_rules():
    """R5-L4: a name is resolved; on several nodes a name that resolves to loopback here
    keeps every interface (other nodes reach this host by another address)."""
    from devlayer.rendezvous import _listen_host

    name = socket.gethostname()
    try:
        resolved = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        pytest.skip(f"this host's name {name!r} does not resolve here")
    assert _listen_host(name, 1) == resolved
    assert _listen_host(name, 2) == (None if resolved.startswith("127.") else resolved)
    assert _listen_host("::1", 2) == "::1"  # named loopback stays as named
    assert _listen_host("no-such-host.invalid", 1) is None


def test_r5_l4_address_this_host_lacks_keeps_every_interface_with_a_warning(caplog):
    """R5-L4: a non-loopback MASTER_ADDR rank 0's host does not have (NAT: a published
    container port, a service address) is left to torch's every-interface store, as
    before, with a warning naming the address; a named loopback address is still bound."""
    from devlayer.rendezvous import _listen

    src = {"master_addr": "MASTER_ADDR"}
    with caplog.at_level("WARNING", logger="devlayer"):
        kwargs = _listen("192.0.2.1", free_port(), "192.0.2.1:1", src)  # TEST-NET-1
    assert kwargs == {}
    assert "192.0.2.1, which is not an address of this host" in caplog.text
    kwargs = _listen("127.0.0.1", 0, "127.0.0.1:0", src)
    os.close(kwargs["master_listen_fd"])


@pytest.mark.timeout(30)
def test_r5_l2_store_without_a_job_record_is_named_within_the_timeout(clean_env):
    """R5-L2: a rank that reaches a store where no devlayer rank 0 recorded a job (a foreign
    store, or rank 0 died first) fails within its timeout, naming rank 0 and the port."""
    from datetime import timedelta

    import torch.distributed as dist

    foreign = dist.TCPStore(
        "127.0.0.1", 0, 1, True, timeout=timedelta(seconds=20), wait_for_workers=False
    )
    _env_rank(clean_env, 1, 2, foreign.port)
    with pytest.raises(devlayer.errors.RendezvousError) as info:
        devlayer.init(backend="cpu", timeout=2)
    message = str(info.value)
    assert f"127.0.0.1:{foreign.port}, but rank 0 did not record its job there" in message
    # nothing was claimed there (as rendezvous() names its keys: PrefixStore adds a "/")
    assert not dist.PrefixStore("devlayer/attempt/", foreign).check(["rank1"])


# --------------------------------------------------------------------------- issue 23


def _torchrun_like_ranks_meet(run_id: str, per_rank: list[dict[str, str]], timeout: float) -> None:
    """Two hand-set torchrun-like ranks (no agent), one node each, rank 0 hosting the store
    unless a variable says otherwise, each with its ``per_rank`` variables: both sum."""
    port = free_port()
    procs = [
        _start_worker(
            {
                "RANK": str(rank),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "1",
                "GROUP_RANK": str(rank),
                "GROUP_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "TORCHELASTIC_RUN_ID": run_id,
                **extra,
            },
            timeout=timeout,
        )
        for rank, extra in enumerate(per_rank)
    ]
    for code, out in _outputs(procs, 100):
        assert code == 0, out
        assert '"sum": 2.0' in out, out


@pytest.mark.timeout(120)
def test_e23_11_agents_with_other_restart_counts_meet_in_one_attempt():
    """E23-11: torchrun's restart count is per agent: after an agent was killed and started
    again (elastic grow-back), the survivor's worker says ``TORCHELASTIC_RESTART_COUNT=1``
    and the new agent's says 0. With a store rank 0 hosts for this attempt alone
    (``TORCHELASTIC_USE_AGENT_STORE=False``) both still meet, instead of waiting under
    different key prefixes until the timeout."""
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "False"}
    per_rank = [{**shared, "TORCHELASTIC_RESTART_COUNT": str(n)} for n in (1, 0)]
    _torchrun_like_ranks_meet("e23-11", per_rank, timeout=20)


@pytest.mark.timeout(120)
def test_r27_1_the_agent_store_is_read_as_torch_reads_it():
    """R27-1: ``TORCHELASTIC_USE_AGENT_STORE`` is read once, by the torchrun detector, as
    torch reads it (only ``"True"`` means torchrun's agent hosts the store). Two hand-set
    torchrun-like ranks with ``true`` in lower case, and no agent: rank 0 hosts the store,
    as ``torch.distributed``'s ``env://`` would, and both meet. The rendezvous used to read
    the variable again, without regard to case, and waited for an agent store that no one
    hosted until its timeout."""
    _torchrun_like_ranks_meet("r27-1", [{"TORCHELASTIC_USE_AGENT_STORE": "true"}] * 2, 15)
