"""torchrun / torchelastic (and ``accelerate launch``, which starts torchrun).

Matches when ``RANK`` is set with one of torchrun's own markers (``TORCHELASTIC_RUN_ID``,
``GROUP_RANK``, ``TORCHELASTIC_RESTART_COUNT``); named ``accelerate`` when
``accelerate launch`` started torchrun. Also records the agent's ``--max-restarts`` and
whether it shares its store with the workers (``ProcessInfo.agent_store``).

Example:
    >>> info = TORCHRUN.detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
    ...                         "TORCHELASTIC_RUN_ID": "none", "MASTER_PORT": "29511"})
    >>> (info.launcher, info.rank, info.master_addr, info.master_port)
    ('torchrun', 1, '127.0.0.1', 29511)
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import (
    LOOPBACK,
    EnvReader,
    Launcher,
    ProcessInfo,
    num_nodes,
    read_port,
    refuse_node_without_local_world,
)

__all__ = ["TORCHRUN"]

_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT")


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if not any(m in env for m in _MARKERS) or "RANK" not in env:
        return None
    name = "accelerate" if "ACCELERATE_MIXED_PRECISION" in env else "torchrun"
    r = EnvReader(env, name, ("TORCHELASTIC_RUN_ID",))
    r.int("rank", "RANK")
    world = r.int("world_size", "WORLD_SIZE")
    r.int("local_rank", "LOCAL_RANK")
    local_world = r.int("local_world_size", "LOCAL_WORLD_SIZE", default=world)
    refuse_node_without_local_world(r, world)
    r.int("node_rank", "GROUP_RANK", default=0)
    r.int("num_nodes", "GROUP_WORLD_SIZE", default=num_nodes(world, local_world))
    r.int("restart_count", "TORCHELASTIC_RESTART_COUNT", default=0)
    r.int("max_restarts", "TORCHELASTIC_MAX_RESTARTS", default=0)
    r.check_counts()
    addr = r.str("master_addr", "MASTER_ADDR")
    if addr is None:
        addr = LOOPBACK
        r.sources["master_addr"] = "default: loopback"
    port = read_port(r)
    if port is None and world > 1:
        # world 1 needs no store: that is also what devlayer.init() of a single process
        # exports (ProcessInfo.torch_env), which its child processes inherit.
        raise LaunchEnvError(
            f"torchrun set RANK but not MASTER_PORT (WORLD_SIZE={world}); is this a torchrun "
            f"child? export MASTER_PORT=<free port, same on every rank>"
        )
    return r.info(
        master_addr=addr,
        master_port=port,
        agent_store=_agent_store(r),
        agent_supervised="TORCHELASTIC_RUN_ID" in env,
    )


def _agent_store(r: EnvReader) -> bool:
    """``TORCHELASTIC_USE_AGENT_STORE`` as torch reads it: ``"True"`` alone means shared."""
    found = r.first(("TORCHELASTIC_USE_AGENT_STORE",))
    if found is None:
        return False
    r.sources["agent_store"] = found[0]
    return found[1] == "True"


TORCHRUN = Launcher(
    "torchrun",
    detect=_detect,
    aliases=("accelerate", "torchelastic"),
    prefixes=("TORCHELASTIC_",),
    variables=("GROUP_RANK", "GROUP_WORLD_SIZE"),
    job_id_vars=("TORCHELASTIC_RUN_ID",),
)
