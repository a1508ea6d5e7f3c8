"""``devlayer info``: what devlayer sees on this machine, in one process, no process group."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

import devlayer
from devlayer import DevlayerError
from devlayer.config import Settings
from devlayer.devices import usable_cpus
from devlayer.launchers import detect
from devlayer.registry import entry_point_errors, select_backend

SCHEMA_VERSION = 1
#: devlayer's own variables shown with the backends' visibility variables.
DEVLAYER_VARS = ("DEVLAYER_DEVICES", "DEVLAYER_BACKEND", "DEVLAYER_VISIBILITY_APPLIED")


def visibility_vars() -> tuple[str, ...]:
    """Every registered backend's visibility variables, then devlayer's own."""
    names = [
        v for be in devlayer.backends.registered_backends().values() for v in be.visibility_vars
    ]
    return tuple(dict.fromkeys([*names, *DEVLAYER_VARS]))


def comm_names(be: Any) -> tuple[str, ...]:
    """The process-group backends to report: torch's, and the backend's default."""
    import torch.distributed as dist

    names = [c for c in dist.Backend.backend_list if c not in ("undefined", "fake")]
    with contextlib.suppress(DevlayerError):  # no comm at all: comm_backend reports it
        names.append(be.default_comm())
    return tuple(dict.fromkeys(names))


def collect() -> dict[str, Any]:
    """Gather the report as a JSON-ready dict (schema version :data:`SCHEMA_VERSION`)."""
    import torch

    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "devlayer": devlayer.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backends": [],
        "selected": None,
        "selection_error": None,
        "devices": None,
        "comm": {},
        "launcher": None,
        "launcher_error": None,
        "visibility": {v: os.environ[v] for v in visibility_vars() if v in os.environ},
        "runtime_initialized": False,
        "warnings": [],
    }
    _add_backends(report)
    local_ranks = _add_launcher(report)
    warnings: list[str] = report["warnings"]
    warnings.extend(pitfalls(os.environ, report))
    threads = os.environ.get("OMP_NUM_THREADS")
    cores = usable_cpus()
    if threads and threads.isdigit() and cores and int(threads) * local_ranks > cores:
        warnings.append(
            f"OMP_NUM_THREADS={threads} x {local_ranks} local rank(s) > {cores} cores: threads "
            f"will compete; use OMP_NUM_THREADS={max(cores // local_ranks, 1)}"
        )
    return report


def _add_backends(report: dict[str, Any]) -> None:
    """Every registered backend's availability, then the selected one's devices and comms."""
    warnings: list[str] = report["warnings"]
    for name, be in devlayer.backends.registered_backends().items():
        avail = be.availability()
        report["backends"].append(
            {
                "name": name,
                "priority": be.priority,
                "device_type": be.device_type,
                "available": avail.ok,
                "reason": avail.reason,
            }
        )
    for plugin, error in entry_point_errors().items():
        warnings.append(f"backend plugin {plugin!r} failed to load: {error}")
    try:
        sel = select_backend()
        be = sel.backend
        report["selected"] = {"name": be.name, "reason": sel.reason}
        count = be.device_count()
        names = []
        if be.device_type not in ("cpu",):
            names = [be.runtime.device_name(i) for i in range(count)]
        report["devices"] = {"type": be.device_type, "count": count, "names": names}
        report["comm"] = {c: bool(be.comm_available(c)) for c in comm_names(be)}
        report["runtime_initialized"] = bool(be.runtime.is_initialized())
        if be.simulated:
            warnings.append(f"{be.name} is simulated (DEVLAYER_SIMULATE); no real device is used")
    except DevlayerError as exc:
        report["selection_error"] = str(exc)
        warnings.append(f"backend selection failed: {exc}")


def _add_launcher(report: dict[str, Any]) -> int:
    """What the launcher's environment says; returns the ranks on this node (1 if unknown)."""
    try:
        info = detect(os.environ)
    except DevlayerError as exc:
        report["launcher_error"] = str(exc)
        report["warnings"].append(f"launcher environment: {exc}")
        return 1
    report["launcher"] = {
        "name": info.launcher,
        "rank": info.rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "local_world_size": info.local_world_size,
        "node_rank": info.node_rank,
        "num_nodes": info.num_nodes,
        "master_addr": info.master_addr,
        "master_port": info.master_port,
        "sources": dict(info.sources),
        "notes": list(info.notes),
    }
    report["warnings"].extend(info.notes)
    return info.local_world_size


def pitfalls(env: Mapping[str, str], report: Mapping[str, Any]) -> list[str]:
    """Known traps: every backend's own notes plus the vendor-neutral ones (pure)."""
    out: list[str] = []
    selected = (report.get("selected") or {}).get("name")
    for name, be in devlayer.backends.registered_backends().items():
        try:
            out.extend(be.notes(env, selected=name == selected))
        except Exception as exc:  # a plugin's notes must not break info
            out.append(f"backend {name!r}: notes failed: {type(exc).__name__}: {exc}")
    if report.get("runtime_initialized"):
        out.append(
            f"the {selected} runtime is already initialized in this process: changes to its "
            f"visibility variables no longer apply here (set them before the first device call)"
        )
    backend = Settings.from_env(env, ("backend",)).backend
    if backend and report.get("selection_error") and backend in report["selection_error"]:
        out.append(f"DEVLAYER_BACKEND={backend!r} cannot be used: see selection error above")
    return out


def text_report(report: dict[str, Any]) -> str:
    lines = [
        f"devlayer {report['devlayer']}  torch {report['torch']}  python {report['python']}",
        "",
        "backends (auto-detect order):",
    ]
    for b in report["backends"]:
        mark = "yes" if b["available"] else "no "
        lines.append(f"  {b['name']:<8} {mark}  {b['reason']}")
    sel = report["selected"]
    lines.append("")
    if sel:
        lines.append(f"selected: {sel['name']} ({sel['reason']})")
        dev = report["devices"]
        lines.append(f"devices:  {dev['count']} {dev['type']}")
        lines.extend(f"  [{i}] {n}" for i, n in enumerate(dev["names"]))
        comms = [c for c, ok in report["comm"].items() if ok]
        lines.append(f"comm:     {', '.join(comms) or 'none'}")
    else:
        lines.append(f"selected: none ({report['selection_error']})")
    la = report["launcher"]
    if la:
        lines.append(
            f"launcher: {la['name']}  rank {la['rank']}/{la['world_size']}  local "
            f"{la['local_rank']}/{la['local_world_size']}  node {la['node_rank']}/"
            f"{la['num_nodes']}  master {la['master_addr']}:{la['master_port']}"
        )
        for key, src in la["sources"].items():
            lines.append(f"  {key:<17} <- {src}")
    if report["visibility"]:
        lines.append("environment:")
        lines.extend(f"  {k}={v}" for k, v in report["visibility"].items())
    if report["warnings"]:
        lines.append("warnings:")
        lines.extend(f"  ! {w}" for w in report["warnings"])
    return "\n".join(lines)


def run(*, as_json: bool = False) -> int:
    """Print the report; exit code 0 (warnings do not fail)."""
    report = collect()
    if as_json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(text_report(report))
    return 0
