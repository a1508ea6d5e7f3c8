"""Rendezvous: rank 0 hosts torch's TCP store where MASTER_ADDR points; every rank checks in.

The store listens on the address ``MASTER_ADDR`` names or resolves to, not on every
interface. A rank of another job is refused by job identity; a missing or duplicated rank
is named instead of waited for; a port another program holds is reported at once; other
ranks learn that rank 0 failed. Used by ``init()`` when devlayer creates the process group
itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from devlayer.errors import RendezvousError
from devlayer.launchers import ProcessInfo
from devlayer.net import bounded_call

__all__ = ["LEAVE_WAIT_S", "LEFT_KEY", "leave", "loopback_listener", "rendezvous"]

log = logging.getLogger("devlayer")


def rendezvous(info: ProcessInfo, timeout: timedelta) -> Any:
    """Connect to (rank 0: host) the TCP store and wait until every rank checked in.

    Each torchelastic restart gets its own key prefix, so a restarted job never reads
    the addresses of the attempt that died (torchrun reuses its agent's store). A rank that
    meets rank 0's store of a round that has ended (:data:`LEFT_KEY`: ``init()`` again on
    the same port while rank 0 has not yet left the round before) drops that connection and
    connects again until the new store is up; in torchrun's agent store, which outlives the
    rounds, it meets the others under the next round's keys.

    Returns:
        A ``torch.distributed.PrefixStore`` ready for ``init_process_group``.

    Raises:
        RendezvousError: Port in use, address unreachable, a rank missing or duplicated,
            only an ended round's store met within the timeout.
    """
    import torch.distributed as dist

    port = info.master_port
    addr = _unbracket(info.master_addr)  # "[::1]" names the host ::1
    where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    agent_store = info.agent_store  # read once, by the torchrun detector
    is_server = info.rank == 0 and not agent_store
    store_host = "torchrun's agent" if agent_store else "rank 0"
    meet = _Meeting(info, where, store_host, timeout, time.monotonic() + timeout.total_seconds())
    host = _listen_host(addr, info.num_nodes) if is_server else None
    kwargs = _listen(host, port, where, info.sources) if host is not None else {}

    def make_store() -> Any:
        wait = timeout if is_server else timedelta(seconds=max(meet.left(), 0.001))
        made = dist.TCPStore(
            host_name=addr,
            port=int(port or 0),
            world_size=info.world_size,
            is_master=is_server,
            timeout=wait,
            wait_for_workers=False,
            multi_tenant="master_listen_fd" not in kwargs,
            **kwargs,
        )
        made.set_timeout(timeout)  # the process group's own waits get the whole timeout
        return dist.PrefixStore(_attempt_prefix(info.restart_count, agent_store), made)

    if is_server or agent_store:  # a new store, or one that outlives the rounds
        store = _open(make_store, meet, is_server)
    else:
        store = _open_current_round(make_store, meet)
    hint = (
        "this process hosts the store; see the first error above"
        if is_server
        else _store_host_hint(store_host, where)
    )
    # The job key lives outside the attempt prefix: a rank of another job (or of another
    # restart count) must meet it before it can claim a rank or count as joined.
    writes_job = is_server or (agent_store and info.rank == 0)
    with _lost_store_is_named(info, where, hint):
        _check_job(store.underlying_store, info, where, meet.deadline, timeout, writes_job)
        if agent_store:
            store = _current_round_of_agent_store(store)
        _check_in(store, info, where, meet.deadline, timeout)
    return store


#: Key (under the attempt prefix) that every rank adds 1 to when it leaves its round
#: (:func:`leave`): a store that holds it belongs to a round that has ended.
LEFT_KEY = "devlayer/left"


#: The longest :func:`leave` waits for its mark (plus one second:
#: :func:`devlayer.net.bounded_call`).
LEAVE_WAIT_S = 2.0

#: Whether this process left a round (:func:`leave`): its next rendezvous may meet the
#: old store while that goes away, so a failed connection is tried again, not final.
_left_a_round = False


def leave(store: Any) -> None:
    """Mark ``store``'s round as ended for this rank (``shutdown()`` calls it first).

    A rank that calls ``init()`` again on the same port may meet rank 0's store of this
    round while rank 0 has not yet left it; this mark tells it so. A store already gone
    needs no mark: the error is ignored. A store host that stopped answering (a stopped
    process, a lost node) is given up after :data:`LEAVE_WAIT_S` seconds: torch's store
    timeout does not end a request already waiting (seen with torch 2.13).
    """
    global _left_a_round
    _left_a_round = True
    with contextlib.suppress(Exception):  # TimeoutError included
        bounded_call(lambda: store.add(LEFT_KEY, 1), time.monotonic() + LEAVE_WAIT_S)


def _round_ended(store: Any) -> bool:
    """Whether ``store`` belongs to a round that has ended: it holds :data:`LEFT_KEY`, or
    it went away while asked (its host is tearing it down)."""
    try:
        return bool(store.check([LEFT_KEY]))
    except Exception:  # torch's DistNetworkError & co.
        return True


def _current_round_of_agent_store(store: Any) -> Any:
    """The keys of the round now starting in torchrun's agent store, which outlives rounds.

    ``store`` holds the attempt's first round; each round that has ended there (a rank
    left it: :data:`LEFT_KEY` is set; no rank leaves a round before all checked in) moves
    on to the next prefix, ``round1/``, ``round2/``... A rank quicker to start again waits
    in the new round's keys, not in its own claim of the old one.
    """
    import torch.distributed as dist

    prefix, number = store, 0
    while store.check([LEFT_KEY]):
        number += 1
        store = dist.PrefixStore(f"round{number}/", prefix)
    return store


@dataclass(frozen=True)
class _Meeting:
    """Where and until when one rank meets the others (the parts its errors name)."""

    info: ProcessInfo
    where: str
    store_host: str
    timeout: timedelta
    deadline: float  # time.monotonic()

    def left(self) -> float:
        """Seconds left until the deadline."""
        return self.deadline - time.monotonic()


def _open_current_round(make_store: Callable[[], Any], meet: _Meeting) -> Any:
    """A client's connection to the store of the round now starting, not of one that ended.

    Rank 0 takes its store of the previous round away only after it left that round too,
    so a rank quicker to start again may meet it: that connection is dropped and another
    made (2 ms, doubling to 50 ms, between tries) until the deadline. A connection that
    fails is tried again too, once this process has left a round (the old store may close
    it while it goes away; not one that timed out); otherwise its error is final at once,
    as before.
    """
    delay = 0.002
    while True:
        try:
            store = _open(make_store, meet, is_server=False)
        except RendezvousError as err:
            if not _left_a_round or meet.left() <= 0 or not _closed_under_us(err):
                raise
            store = None  # the old store closed the connection while it went away
        if store is not None and not _round_ended(store):
            return store
        del store  # closes this connection to the old store
        if meet.left() <= 0:
            raise RendezvousError(
                f"rank {meet.info.rank} met only the previous round's rendezvous store at "
                f"{meet.where} within {meet.timeout.total_seconds():g}s: rank 0 had not left "
                f"that round (it still runs the code before its shutdown()) or did not start "
                f"the new one. Call init() and shutdown() the same number of times on every "
                f"rank, or give init() a longer timeout"
            )
        time.sleep(min(delay, max(meet.left(), 0.0)))
        delay = min(delay * 2, 0.05)


def _closed_under_us(err: RendezvousError) -> bool:
    """Whether a failed connection was closed by its store (worth another try: an old
    round's store going away), not timed out: torch already retried that one until the
    deadline, and another try would leave its connecting thread running past it (a process
    that exits then is aborted by the C++ runtime)."""
    cause = err.__cause__
    return cause is not None and "timed out" not in str(cause).lower()


def _open(make_store: Callable[[], Any], meet: _Meeting, is_server: bool) -> Any:
    """``make_store()`` (a client's bounded by the deadline), its errors named."""
    src, where, seconds = meet.info.sources, meet.where, meet.timeout.total_seconds()
    try:
        return make_store() if is_server else bounded_call(make_store, meet.deadline)
    except TimeoutError:
        raise RendezvousError(
            f"rank {meet.info.rank} got no answer from a rendezvous store at {where} within "
            f"{seconds:g}s: the connection was accepted but nothing answered "
            f"as a torch store, so another program probably holds the port. "
            f"{_store_host_hint(meet.store_host, where)}"
        ) from None
    except Exception as exc:
        text = str(exc)
        if is_server and ("in use" in text.lower() or "EADDRINUSE" in text):
            raise _port_in_use(where, meet.info.master_port, src) from exc
        raise RendezvousError(
            f"rank {meet.info.rank} could not reach the rendezvous store at {where} within "
            f"{seconds:g}s (MASTER_ADDR from "
            f"{src.get('master_addr', 'MASTER_ADDR')}, MASTER_PORT from "
            f"{src.get('master_port', 'MASTER_PORT')}): {text.splitlines()[0] if text else exc!r}. "
            f"{_store_host_hint(meet.store_host, where)}"
        ) from exc


def _attempt_prefix(restart_count: int, agent_store: bool) -> str:
    """The key prefix of this attempt's rendezvous in the store.

    torchrun's agent store outlives an attempt, so there each restart gets its own prefix.
    A store rank 0 hosts is new for every attempt and holds no stale keys; and the restart
    count is per agent (an agent started again to grow an elastic job back says 0 while the
    survivor says 1), so it must not split the ranks of one attempt.

    Example:
        >>> _attempt_prefix(2, agent_store=True), _attempt_prefix(2, agent_store=False)
        ('devlayer/attempt2/', 'devlayer/attempt/')
    """
    return f"devlayer/attempt{restart_count}/" if agent_store else "devlayer/attempt/"


def _listen_host(addr: str, num_nodes: int) -> str | None:
    """Where rank 0's store listens: the address ``MASTER_ADDR`` names or resolves to.

    ``None`` (every interface, torch's default) only when the name does not resolve here,
    or when it resolves to a loopback address while other nodes take part: they reach this
    host by another address (Debian's ``127.0.1.1 <hostname>`` line in /etc/hosts).

    Example:
        >>> _listen_host("127.0.0.2", 1), _listen_host("localhost", 1)
        ('127.0.0.2', 'localhost')
    """
    if _is_loopback(addr):
        return addr
    try:
        found = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    host = str(found[0][4][0]) if found else ""
    if not host or (num_nodes > 1 and _is_loopback(host)):
        return None
    return host


def _listen(host: str, port: int | None, where: str, src: Mapping[str, str]) -> dict[str, Any]:
    """Rank 0 listens on ``host`` (what MASTER_ADDR names) only, not on every interface.

    A non-loopback address this host does not have is left to torch (every interface), as
    before, with a warning: behind NAT (a container's published port, a cluster service
    address) the other ranks reach rank 0 by an address it cannot bind.
    """
    try:
        return {"master_listen_fd": loopback_listener(int(port or 0), host)[0]}
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _port_in_use(where, port, src) from exc
        if exc.errno == errno.EADDRNOTAVAIL and not _is_loopback(host):
            log.warning(
                "rank 0: MASTER_ADDR (from %s) gives %s, which is not an address of this host; "
                "the rendezvous store listens on every interface. If rank 0 is not meant to "
                "run elsewhere (NAT), start it on the host MASTER_ADDR names",
                src.get("master_addr", "MASTER_ADDR"),
                host,
            )
            return {}
        raise RendezvousError(
            f"rank 0 cannot listen on {where} (address {host}): {exc.strerror or exc} "
            f"(MASTER_ADDR from {src.get('master_addr', 'MASTER_ADDR')}); name a loopback "
            f"address this host has, e.g. MASTER_ADDR=127.0.0.1"
        ) from exc


@contextmanager
def _lost_store_is_named(info: ProcessInfo, where: str, hint: str) -> Iterator[None]:
    """A store that goes away inside the block becomes a RendezvousError ending in ``hint``."""
    try:
        yield
    except RendezvousError:
        raise
    except Exception as exc:  # the store's host went away (torch's DistNetworkError & co.)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousError(
            f"rank {info.rank} lost the rendezvous store at {where} while the ranks were "
            f"meeting ({text}). {hint}"
        ) from exc


#: Key (outside the attempt prefix) where the store host records its job's identity.
_JOB_KEY = "devlayer/job"


def _check_job(
    store: Any, info: ProcessInfo, where: str, deadline: float, timeout: timedelta, writes: bool
) -> None:
    """Refuse a store that belongs to another job, before touching any of its keys.

    The store host records :attr:`ProcessInfo.job_identity`; every other rank waits for that
    record and compares. Only the host writes, so a rank of another job that reaches the
    port first cannot claim the store, and one that comes later leaves the job untouched.
    """
    mine = info.job_identity
    if writes:
        theirs = store.compare_set(_JOB_KEY, "", mine).decode()
    else:
        delay = 0.002
        while not store.check([_JOB_KEY]):
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"rank {info.rank} reached the rendezvous store at {where}, but rank 0 "
                    f"did not record its job there within {timeout.total_seconds():g}s (it "
                    f"does so first): rank 0 failed or did not start (look at its output), "
                    f"or that store is not this job's (give each job its own MASTER_PORT)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        theirs = store.get(_JOB_KEY).decode()
    if theirs != mine:
        raise _other_job(info, where, theirs)


def _other_job(info: ProcessInfo, where: str, theirs: str) -> RendezvousError:
    src = info.sources
    return RendezvousError(
        f"rank {info.rank} of {info.job_identity} reached the rendezvous store at {where}, but "
        f"that store serves another job: {theirs}. Two jobs meet on one port (MASTER_ADDR "
        f"from {src.get('master_addr', 'MASTER_ADDR')}, MASTER_PORT from "
        f"{src.get('master_port', 'MASTER_PORT')}); this rank did not join it and the other "
        f"job goes on. Give each job its own port (export MASTER_PORT=<free port>)"
    )


def _check_in(
    store: Any, info: ProcessInfo, where: str, deadline: float, timeout: timedelta
) -> None:
    """Claim this rank in the store and wait for the others; a duplicate rank is an error."""
    src = info.sources
    claims = store.add(f"rank{info.rank}", 1)
    if claims > 1:
        raise RendezvousError(
            f"two processes claim rank {info.rank} at {where} (rank from "
            f"{src.get('rank', 'RANK')}); every process needs a distinct rank, or another "
            f"job uses the same MASTER_PORT"
        )
    store.set(f"host{info.rank}", socket.gethostname())
    store.add("joined", 1)
    _wait_for_all(store, info, where, deadline, timeout)


def _unbracket(addr: str) -> str:
    """``"[::1]"`` -> ``"::1"`` (URL-style brackets around an IPv6 address)."""
    addr = addr.strip()
    return addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr


def _store_host_hint(store_host: str, where: str) -> str:
    """What a rank that cannot use the store should look at (issue 14: blame the cause)."""
    return (
        f"{store_host} (the store host) probably failed to start the store at {where} (a port "
        f"in use, an address this host does not have) or exited: look at {store_host}'s "
        f"output for its first error; otherwise check that {where} is reachable from here"
    )


def _is_loopback(addr: str) -> bool:
    import ipaddress

    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _port_in_use(where: str, port: object, src: Mapping[str, str]) -> RendezvousError:
    return RendezvousError(
        f"rank 0 cannot listen on {where}: port {port} is already in use "
        f"(MASTER_PORT: {src.get('master_port', 'MASTER_PORT')}). Choose a free "
        f"port (export MASTER_PORT=...), or stop the process holding it"
    )


def loopback_listener(port: int = 0, host: str = "127.0.0.1") -> tuple[int, int]:
    """A socket listening on one address only, for a TCP store's ``master_listen_fd``.

    torch's store server otherwise listens on every interface; on one node nothing outside
    this machine needs to reach it. ``host`` is the loopback address ``MASTER_ADDR`` names
    (``127.0.0.1``, ``127.0.0.2``, ``::1``...; ``localhost`` = ``127.0.0.1``) or the address
    its host name resolves to, so clients that connect there find it. Returns
    ``(file descriptor, port)``; the store owns the descriptor from then on.

    Raises:
        OSError: The port is taken, or this host has no such address.
    """
    host = "127.0.0.1" if host in ("", "localhost") else _unbracket(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Rerunning a job on the same derived port must not wait for TIME_WAIT to expire
    # (torch's own store sets SO_REUSEADDR too); a live listener still makes bind fail.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    bound = int(sock.getsockname()[1])
    return sock.detach(), bound


def _wait_for_all(
    store: Any, info: ProcessInfo, where: str, deadline: float, timeout: timedelta
) -> None:
    next_note = time.monotonic() + 30.0
    delay = 0.002
    while True:
        joined = store.add("joined", 0)
        if joined == info.world_size:
            return
        now = time.monotonic()
        if joined > info.world_size:
            raise RendezvousError(
                f"{joined} processes joined at {where} but WORLD_SIZE={info.world_size}; "
                f"another job is using the same MASTER_PORT, or WORLD_SIZE is too small"
            )
        if now >= deadline:
            missing = [r for r in range(info.world_size) if not store.check([f"host{r}"])]
            raise RendezvousError(
                f"expected {info.world_size} ranks (WORLD_SIZE from "
                f"{info.sources.get('world_size', 'WORLD_SIZE')}) at {where}, but only "
                f"{joined} joined within {timeout.total_seconds():g}s; missing rank(s): "
                f"{', '.join(map(str, missing))}. Start as many processes as WORLD_SIZE says, "
                f"or check why those ranks did not start"
            )
        if now >= next_note:
            log.warning(
                "rank %d: waiting at %s for %d more rank(s) (%d of %d joined)",
                info.rank,
                where,
                info.world_size - joined,
                joined,
                info.world_size,
            )
            next_note = now + 30.0
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
