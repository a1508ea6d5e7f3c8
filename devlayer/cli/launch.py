"""``devlayer launch``: torchrun with devlayer's defaults (built on ``torch.distributed.run``).

Differences from plain ``torchrun``, all about fewer surprises:

* ``--nproc auto`` starts one process per visible device of the selected backend (one on
  CPU unless ``--nproc N`` asks for more).
* ``--devices 1,3`` restricts the children to those devices through the vendor's
  visibility variable (``CUDA_VISIBLE_DEVICES``, ``ZE_AFFINITY_MASK``...).
* On one node the rendezvous store runs in this process, listening on 127.0.0.1 only, on
  a free port (never a fixed 29500 that a second job on the machine would collide with).
* ``OMP_NUM_THREADS`` defaults to cores / local ranks instead of torchrun's 1.
* The exit code is the failing rank's, and one line names that rank; then the hang
  report of the ranks' dumps (:mod:`devlayer.hangreport`, the folder is
  ``DEVLAYER_HANG_DIR`` or one per launch), naming how each rank that left no dump ended
  (its exit code or signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from devlayer.config import Settings
from devlayer.devices import (
    check_rank_count,
    narrow_visibility,
    selected_indices,
    usable_cpus,
)
from devlayer.errors import DevlayerError
from devlayer.hangdump import default_dir
from devlayer.hangreport import read_dumps, verdict

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``devlayer launch`` options."""
    parser.add_argument(
        "--nproc",
        "--nproc-per-node",
        default=None,
        dest="nproc",
        help="processes on this node: 'auto' (one per visible device; 1 on cpu) or a number "
        "(default: PET_NPROC_PER_NODE under Kubeflow, else auto)",
    )
    parser.add_argument("--backend", default=None, help="device backend for the children")
    parser.add_argument(
        "--devices",
        default=None,
        help="devices the children may use, e.g. '1,3' (vendor visibility)",
    )
    # Defaults of the next four (and --nproc): Kubeflow's PET_* variables when set, else
    # _DEFAULTS (see fill_defaults).
    parser.add_argument("--nnodes", default=None, help="number of nodes (or MIN:MAX)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank")
    parser.add_argument("--master-addr", default=None, help="rank-0 node for multi-node runs")
    parser.add_argument("--master-port", type=int, default=None, help="its port")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of a c10d rendezvous")
    parser.add_argument("--rdzv-id", default=None, help="job id shared by all nodes")
    parser.add_argument("--max-restarts", type=int, default=0, help="restarts on failure")
    parser.add_argument(
        "--monitor-interval", type=float, default=0.2, help="seconds between checks of the children"
    )
    parser.add_argument(
        "-m", dest="module", default=None, help="run a module (like python -m) instead of a script"
    )
    parser.add_argument(
        "script_args", nargs=argparse.REMAINDER, help="the script and its arguments"
    )


#: Defaults of the options Kubeflow's ``PET_*`` variables may give.
_DEFAULTS: dict[str, str | int | None] = {
    "nproc": "auto",
    "nnodes": "1",
    "node_rank": 0,
    "master_addr": None,
    "master_port": None,
}


def fill_defaults(args: argparse.Namespace, env: Mapping[str, str]) -> argparse.Namespace:
    """Options not given on the command line: from Kubeflow Trainer's ``PET_*``, else defaults.

    Kubeflow (Trainer v2, and PyTorchJob with ``nprocPerNode``) passes torchrun's arguments
    as ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
    ``PET_MASTER_PORT``; ``devlayer launch`` reads them as torchrun does. A command-line
    option wins.

    Raises:
        DevlayerError: ``PET_NODE_RANK`` or ``PET_MASTER_PORT`` is no integer.

    Example:
        >>> args = argparse.Namespace(nproc=None, nnodes=None, node_rank=None,
        ...                           master_addr="given", master_port=None)
        >>> env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "pod-0"}
        >>> filled = fill_defaults(args, env)
        >>> (filled.nproc, filled.nnodes, filled.node_rank, filled.master_addr)
        ('auto', '2', 1, 'given')
    """
    from devlayer.launchers import torchrun_arguments

    pet = torchrun_arguments(env)
    for name, default in _DEFAULTS.items():
        if getattr(args, name, None) is not None:
            continue
        value: str | int | None = pet.get(name, default)
        if name in ("node_rank", "master_port") and isinstance(value, str):
            if not value.isdigit():
                var = "PET_NODE_RANK" if name == "node_rank" else "PET_MASTER_PORT"
                raise DevlayerError(f"{var}={value!r} is not a whole number; fix the job spec")
            value = int(value)
        setattr(args, name, value)
    return args


def _plan_devices(args: argparse.Namespace, env: dict[str, str]) -> tuple[int, dict[str, str]]:
    """(processes per node, environment changes for the children).

    ``--devices`` follows the rule ``init(devices=...)`` follows: indices must exist on every
    backend (``--devices 1,3`` on the one cpu device is a ``DeviceError``, never ignored),
    and on a backend without device indices a count is a number of ranks.
    """
    from devlayer.devices import check_request
    from devlayer.registry import select_backend

    changes: dict[str, str] = {}
    if args.backend:
        changes["DEVLAYER_BACKEND"] = args.backend
    be = select_backend(args.backend, env={**env, **changes}).backend
    spec = Settings().given("devices", args.devices, origin="--devices").devices
    check_request(
        spec,
        device_type=be.device_type,
        visible=be.device_count(),
        indexed=be.indexed,
        origin="--devices",
    )
    indices = selected_indices(spec)
    var = be.visibility_var(env) if be.indexed else None
    if indices is not None and var is not None:
        changes[var] = narrow_visibility(env.get(var), indices)
        changes["DEVLAYER_VISIBILITY_APPLIED"] = f"{var}={','.join(map(str, indices))}"
    nproc = _nproc(args.nproc, be, indices)
    if isinstance(spec, int) and not be.indexed:
        check_rank_count(spec, nproc, device_type=be.device_type, origin="--devices")
    return nproc, changes


def _nproc(raw: str, be: Any, indices: tuple[int, ...] | None) -> int:
    """``--nproc``: a number >= 1, or 'auto' (one per selected device; one per counted rank
    on a backend without device indices, else 1 there)."""
    if raw == "auto":
        if indices is None:
            return max(be.device_count(), 1) if be.indexed else 1
        return len(indices)
    try:
        nproc = int(raw)
    except ValueError:
        raise DevlayerError(f"--nproc={raw!r}: use 'auto' or a number >= 1") from None
    if nproc < 1:
        raise DevlayerError(f"--nproc={nproc}: use 'auto' or a number >= 1")
    return nproc


def _loopback_store(timeout: timedelta) -> tuple[Any, int]:
    """A TCP store served from this process on 127.0.0.1 only (the agents are clients)."""
    import torch.distributed as dist

    from devlayer.rendezvous import loopback_listener

    fd, port = loopback_listener()
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=fd,
    )
    return store, port


def _how_it_ended(code: int) -> str:
    """``exited with code N`` or ``was killed by SIGNAME`` for a process's exit code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _describe_failure(error: Any) -> tuple[int, str]:
    rank, failure = error.get_first_failure()
    code = failure.exitcode
    line = (
        f"devlayer launch: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) "
        f"{_how_it_ended(code)}"
    )
    return (128 - code if code < 0 else code or 1), line


def _hang_folder(env: Mapping[str, str]) -> str | None:
    """The ranks' hang folder: ``DEVLAYER_HANG_DIR``, else one for this launch, set for the
    children (so that this process knows where to read); None when hang reports are off."""
    settings = Settings.from_env(env)
    if not settings.hang_reports:
        return None
    if settings.hang_dir:
        return settings.hang_dir
    folder = str(default_dir("launch", f"pid{os.getpid()}", None))
    os.environ["DEVLAYER_HANG_DIR"] = folder  # inherited by the children torchrun starts
    return folder


def _hang_summary(folder: str, error: Any, world_size: int, since: float) -> str:
    """The hang report of the dumps in ``folder`` written since ``since`` (``time.time()``),
    with how each failed rank that left no dump ended; empty when there is no dump.

    Args:
        folder: The ranks' hang folder.
        error: torchrun's ``ChildFailedError`` (its ``failures``: rank -> exit code).
        world_size: The job's ranks (on this node's launch: the ranks it started).
        since: When the job started; older dumps are an earlier run's.
    """
    reports, _ = read_dumps(folder)
    reports = {r: doc for r, doc in reports.items() if doc.get("time", 0) >= since}
    if not reports:
        return ""
    exits = {r: _how_it_ended(f.exitcode) for r, f in getattr(error, "failures", {}).items()}
    world = max([world_size, *(int(d.get("world_size", 0)) for d in reports.values())])
    return f"hang report (devlayer hangs {folder}):\n{verdict(reports, world, exits)}"


def _refuse_nested(env: dict[str, str]) -> None:
    """Refuse to start ranks from a process that is itself one of several ranks on its node.

    ``srun -n 2 devlayer launch --nproc 2 train.py`` would start two separate 2-rank jobs.
    One ``devlayer launch`` per node (``srun --ntasks-per-node=1``) stays allowed.
    """
    from devlayer.errors import LaunchEnvError
    from devlayer.launchers import detect, torchrun_arguments

    if torchrun_arguments(env):
        return  # Kubeflow's PET_* describe this node, for one launch per node: this one
    info = detect(env)
    if info.local_world_size > 1:
        raise LaunchEnvError(
            f"devlayer launch is running as rank {info.rank} of {info.world_size} "
            f"({info.local_world_size} on this node) under {info.launcher}: every one of them "
            f"would start its own job. Run the script directly under the launcher "
            f"({info.launcher}), which already starts the ranks, or one devlayer launch per node "
            f"(e.g. srun --ntasks-per-node=1 devlayer launch ...)"
        )


def run(args: argparse.Namespace) -> int:
    """Start the job; returns the exit code (the first failing rank's, else 0)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    env = dict(os.environ)
    fill_defaults(args, env)
    _refuse_nested(env)
    nproc, changes = _plan_devices(args, env)
    if "OMP_NUM_THREADS" not in env:
        changes["OMP_NUM_THREADS"] = str(max(usable_cpus() // nproc, 1))
    os.environ.update(changes)  # inherited by the children torchrun starts

    single_node = args.nnodes in ("1", "1:1") and not (args.rdzv_endpoint or args.master_addr)
    argv = [
        f"--nproc-per-node={nproc}",
        f"--nnodes={args.nnodes}",
        f"--max-restarts={args.max_restarts}",
        f"--monitor-interval={args.monitor_interval}",
    ]
    store = None
    if single_node:
        # Everything listens on 127.0.0.1: the rendezvous store is served from this process
        # (agents join as clients), and instead of torchrun's shared agent store (which
        # listens on every interface) rank 0 hosts the workers' store through
        # devlayer.init(), which binds loopback. A fresh store per attempt also means a
        # restarted attempt never sees the keys of the one that died.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        store, port = _loopback_store(timedelta(minutes=10))
        argv += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-conf=is_host=false",
            f"--rdzv-id=devlayer-{os.getpid()}",
            "--local-addr=127.0.0.1",
        ]
    else:
        argv += _multi_node_args(args)
    targs = get_args_parser().parse_args([*argv, *_target_args(args)])
    hangs = _hang_folder(env)
    started = time.time()
    try:
        torchrun(targs)
    except ChildFailedError as exc:
        code, line = _describe_failure(exc)
        print(line, file=sys.stderr, flush=True)
        report = _hang_summary(hangs, exc, nproc, started - 1) if hangs is not None else ""
        if report:
            print(report, file=sys.stderr, flush=True)
        return code
    finally:
        del store
    return 0


def _multi_node_args(args: argparse.Namespace) -> list[str]:
    """torchrun's rendezvous options across nodes: an endpoint, or a master address.

    A c10d endpoint also sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun (see
    the comment below; docs/checkpoints.md, "With torchrun's elastic mode").
    """
    if args.rdzv_endpoint:
        # torchrun's shared store keeps an agent's first-round address, so an agent that
        # joins later (an elastic job growing back) waits for a MASTER_ADDR the surviving
        # rank-0 agent never publishes; rank 0's worker hosts the store instead.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        return [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.rdzv_endpoint}",
            f"--rdzv-id={args.rdzv_id or 'devlayer'}",
            f"--node-rank={args.node_rank}",
        ]
    if not args.master_addr:
        raise DevlayerError(
            f"--nnodes={args.nnodes} needs --master-addr (the rank-0 node) or "
            f"--rdzv-endpoint HOST:PORT"
        )
    return [
        f"--master-addr={args.master_addr}",
        f"--master-port={args.master_port or 29500}",
        f"--node-rank={args.node_rank}",
    ]


def _target_args(args: argparse.Namespace) -> list[str]:
    """``-m module`` or the script, then its own arguments (a leading ``--`` dropped)."""
    rest = list(args.script_args)
    if rest and rest[0] == "--":
        rest.pop(0)
    if args.module:
        return ["-m", args.module, *rest]
    if rest:
        return rest
    raise DevlayerError("devlayer launch needs a script (or -m module) to run")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devlayer.cli.launch``: the same as ``devlayer launch``."""
    parser = argparse.ArgumentParser(prog="devlayer launch")
    add_arguments(parser)
    return run(parser.parse_args(argv))
