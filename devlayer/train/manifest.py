"""The checkpoint manifest: what ``manifest.json`` holds and how a folder is verified.

A checkpoint folder is trusted only after :func:`verify`: ``manifest.json`` is a small
regular file of strict JSON with the expected fields, a known ``format_version`` and (from
format 2) its own checksum; ``state.pt`` and every shard file it lists have the recorded
size and sha256; and the folder's name agrees with the step it records. Nothing here
imports torch: it reads bytes and JSON.

Example:
    >>> digest({"step": 1})[:12]
    '8565a5686536'
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import devlayer
from devlayer.config import short_repr
from devlayer.train.errors import CheckpointCorruptError, CheckpointError, CheckpointVersionError
from devlayer.train.files import read_regular, sha256_file

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_LIMIT",
    "RUN_ID",
    "SHARD_NAME",
    "SINGLE_FILE_FORMAT",
    "STATE_FILE",
    "check_file",
    "digest",
    "folder_step",
    "read",
    "verify",
]

#: The folder, inside a checkpoint, that holds the shards of a sharded checkpoint.
SHARDS_DIR = "shards"

#: Newest version of the on-disk layout; a reader refuses manifests with a higher number.
#: 2 added ``run_id`` and ``manifest_sha256`` (a checksum of the manifest itself); 3 added
#: ``shards`` (the files of a sharded checkpoint, see :mod:`devlayer.train.sharded`). A
#: checkpoint without shards is still written as format 2, so older readers load it;
#: format 1 manifests (no checksum) are still read.
FORMAT_VERSION = 3


SINGLE_FILE_FORMAT = 2


STATE_FILE = "state.pt"


MANIFEST_FILE = "manifest.json"


_REQUIRED_FIELDS: dict[str, int] = {"step": 0, "epoch": 0, "world_size": 1, "size": 0}


_SHA256 = re.compile(r"[0-9a-f]{64}")


#: A shard file name: one plain name inside ``shards/`` (never a path out of it).
SHARD_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.-]{1,255}")


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


#: Largest manifest.json read; real ones are under 1 KiB.
MANIFEST_LIMIT = 1 << 20


def digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's own content (every field but ``manifest_sha256``)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def folder_step(folder: Path) -> int | None:
    """The step a folder's name claims (``...-<digits>``), or None for another name."""
    head, sep, digits = folder.name.rpartition("-")
    return int(digits) if sep and head and digits.isdigit() else None


def read(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``, parsed and checked field by field (never trusted as is)."""
    path = folder / MANIFEST_FILE
    fix = (
        f"delete {folder} (resume then uses the newest checkpoint that verifies) "
        "or restore it from a copy"
    )
    manifest = _manifest_json(path, fix)
    _check_version(folder, path, manifest, fix)
    _check_fields(path, manifest, fix)
    if manifest["format_version"] >= 2:
        recorded, actual = manifest.get("manifest_sha256"), digest(manifest)
        if recorded != actual:
            raise CheckpointCorruptError(
                f"{path} was changed after it was written: its manifest_sha256 is "
                f"{recorded!r}, its content hashes to {actual} (a hand-edited step, size or "
                f"sha256 is never trusted); {fix}"
            )
    claimed = folder_step(folder)
    if claimed is not None and claimed != manifest["step"]:
        raise CheckpointCorruptError(
            f"{folder} is named for step {claimed} but its manifest says step "
            f"{manifest['step']}: the folder was renamed or copied by hand, and using it would "
            f"misorder resume and pruning; rename it back to step {manifest['step']} or {fix}"
        )
    return manifest


def _manifest_json(path: Path, fix: str) -> dict[str, Any]:
    try:
        raw = read_regular(path, MANIFEST_LIMIT, fix)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} is missing: the checkpoint is incomplete or was changed by hand; {fix}"
        ) from None
    if not raw:
        raise CheckpointCorruptError(f"{path} is empty (0 bytes), expected JSON; {fix}")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"{path} is not valid JSON ({len(raw)} bytes: {exc}); {fix}"
        ) from exc
    if not isinstance(manifest, dict):
        raise CheckpointCorruptError(
            f"{path} holds a JSON {type(manifest).__name__}, expected an object; {fix}"
        )
    return manifest


def _check_version(folder: Path, path: Path, manifest: Mapping[str, Any], fix: str) -> None:
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointCorruptError(
            f"{path} has format_version={version!r}, expected an integer from 1 to "
            f"{FORMAT_VERSION}; {fix}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{folder} was written by a newer devlayer "
            f"({manifest.get('devlayer_version', 'unknown version')}, format {version}); "
            f"this devlayer {devlayer.__version__} reads formats up to {FORMAT_VERSION}: "
            "upgrade devlayer (pip install -U devlayer) to load it"
        )


def _check_fields(path: Path, manifest: Mapping[str, Any], fix: str) -> None:
    bad = [
        f"{key}={manifest.get(key, '<missing>')!r}"
        for key, minimum in _REQUIRED_FIELDS.items()
        if isinstance(manifest.get(key), bool)
        or not isinstance(manifest.get(key), int)
        or manifest[key] < minimum
    ]
    sha = manifest.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        bad.append(f"sha256={sha!r}")
    run_id = manifest.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
        bad.append(f"run_id={run_id!r}")
    if "shards" in manifest and not _valid_shards(manifest["shards"]):
        bad.append(f"shards={short_repr(manifest['shards'])}")
    if bad:
        raise CheckpointCorruptError(
            f"{path} has missing or invalid fields: {', '.join(bad)} (expected integers "
            f"step >= 0, epoch >= 0, world_size >= 1, size >= 0, a 64-digit hex sha256, "
            f"a run_id string or null, and shards as {{file name: {{size, sha256}}}}); {fix}"
        )


def _valid_shards(shards: object) -> bool:
    return isinstance(shards, dict) and all(
        isinstance(name, str)
        and SHARD_NAME.fullmatch(name) is not None
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and not isinstance(entry.get("size"), bool)
        and entry["size"] >= 0
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"]) is not None
        for name, entry in shards.items()
    )


def verify(folder: Path) -> dict[str, Any]:
    manifest = read(folder)
    check_file(folder, STATE_FILE, manifest["size"], manifest["sha256"])
    for name, entry in manifest.get("shards", {}).items():
        check_file(folder, f"{SHARDS_DIR}/{name}", entry["size"], entry["sha256"])
    return manifest


def check_file(folder: Path, name: str, expected_size: int, expected_sha256: str) -> None:
    """Raise unless ``folder/name`` is a regular file of that size and sha256."""
    state = folder / name
    fix = f"delete {folder} (resume then uses the newest checkpoint that verifies)"
    try:
        size, digest = sha256_file(state, expected_size, fix)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{state} is missing (the manifest expects {expected_size} bytes); {fix}"
        ) from None
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {state}: {exc}; check permissions and mounts") from exc
    if size != expected_size:
        what = (
            "is empty (0 bytes)"
            if size == 0
            else f"has more than {expected_size} bytes"
            if size > expected_size
            else f"has {size} bytes"
        )
        raise CheckpointCorruptError(
            f"{state} {what}, the manifest says {expected_size}: the file is truncated "
            f"or was replaced; {fix}"
        )
    if digest != expected_sha256:
        raise CheckpointCorruptError(
            f"{state} has sha256 {digest}, the manifest says {expected_sha256}: the file "
            f"was damaged or modified after it was written; {fix}"
        )
