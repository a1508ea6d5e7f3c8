"""Sharded checkpoints for ``strategy="fsdp"``: every rank writes only its own shards.

The model and optimizer state go through ``torch.distributed.checkpoint`` (DCP) into the
``shards/`` folder of a checkpoint: each rank writes the pieces it holds, rank 0 adds DCP's
``.metadata`` (which piece lives where), and no rank ever gathers the full model. Loading
reads whichever pieces this rank's shards need, so a checkpoint written by 2 ranks resumes
on 1 rank and the reverse (DCP reshards).

devlayer's checkpoint promises hold for the shards too: they are written into the
checkpoint's temporary folder and become visible only with it (one rename by rank 0),
every file is recorded with its size and sha256 in ``manifest.json`` and checked before a
load, and nothing is unpickled beyond plain data: tensors load as raw bytes, DCP's own
small objects with ``torch.load(weights_only=True)``, and ``.metadata`` through
:class:`MetadataUnpickler`, which builds only DCP's metadata record classes.

Example:
    >>> import pickle, io
    >>> try:
    ...     MetadataUnpickler(io.BytesIO(pickle.dumps(print))).load()
    ... except pickle.UnpicklingError as exc:
    ...     print(str(exc)[:44])
    builtins.print is not part of DCP checkpoint
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

from devlayer.train.errors import CheckpointCorruptError, CheckpointError
from devlayer.train.files import read_regular
from devlayer.train.manifest import SHARDS_DIR

__all__ = [
    "METADATA_LIMIT",
    "SHARDS_DIR",
    "MetadataUnpickler",
    "background_group",
    "VerifiedReader",
    "read_shards",
    "restore_state",
    "shard_stager",
    "training_state",
    "write_shards",
    "write_shards_async",
]

#: Largest ``.metadata`` read (it lists every tensor piece; large models stay far below).
METADATA_LIMIT = 256 << 20

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
#: Every class DCP (torch 2.6 - 2.13) puts into ``.metadata``: plain records, no code.
_ALLOWED = frozenset(
    {
        (_DCP_METADATA, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "Path"),
        ("collections", "OrderedDict"),
    }
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else (the "restricting globals" recipe).

    ``find_class`` resolves only DCP's metadata records, ``torch.Size``, torch dtypes and
    path objects; any other global (a function, ``os.system``...) is refused before it is
    looked up, so a crafted file cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only when it is one of DCP's metadata types."""
        import torch

        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not part of DCP checkpoint metadata; devlayer refuses to "
            "load it (a checkpoint must not run code)"
        )


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _VerifiedReader(FileSystemReader):
        def __init__(self, path: Path, files: Collection[str]) -> None:
            super().__init__(path)
            self._folder = Path(path)
            self._files = frozenset(files)
            self.error: CheckpointError | None = None  # the first refusal: DCP wraps it

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return self._read_metadata(kwargs.get("rank"))
            except CheckpointError as exc:
                self.error = self.error or exc
                raise

        def _read_metadata(self, rank: int | None) -> Any:
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            self._check(name)
            fix = f"delete {self._folder.parent} (resume then uses the previous checkpoint)"
            raw = read_regular(self._folder / name, METADATA_LIMIT, fix)
            try:
                metadata = MetadataUnpickler(io.BytesIO(raw)).load()
            except Exception as exc:
                raise CheckpointCorruptError(
                    f"{self._folder / name} is not DCP metadata devlayer can read ({exc}); {fix}"
                ) from exc
            for index, info in (getattr(metadata, "storage_data", None) or {}).items():
                self._check(str(getattr(info, "relative_path", "")))
                self._check_range(name, index, info, fix)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def _check_range(self, name: str, index: Any, info: Any, fix: str) -> None:
            """A storage entry's bytes lie inside its (verified) shard file."""
            offset: Any = getattr(info, "offset", None)
            length: Any = getattr(info, "length", None)
            size = os.stat(self._folder / str(info.relative_path)).st_size
            valid = all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)
            )
            if not valid or offset + length > size:
                raise CheckpointCorruptError(
                    f"{self._folder / name} is corrupt: the entry for "
                    f"{getattr(index, 'fqn', index)!r} has offset={offset!r}, length={length!r}, "
                    f"but {info.relative_path} holds {size} bytes; {fix}"
                )

        def _check(self, name: str) -> None:
            if name not in self._files:
                raise CheckpointCorruptError(
                    f"{self._folder} refers to {name!r}, which its manifest does not list "
                    f"(listed: {sorted(self._files)}); the checkpoint was changed after it "
                    f"was written. Delete {self._folder.parent}"
                )

    return _VerifiedReader


def VerifiedReader(path: Path, files: Collection[str]) -> Any:
    """A DCP ``FileSystemReader`` that reads only the files ``files`` names (the manifest's).

    Args:
        path: The checkpoint's ``shards/`` folder.
        files: The file names in it that the manifest recorded and verified.
    """
    return _reader_class()(path, files)


def _first_failure(exc: BaseException) -> str:
    """The lowest rank's error inside DCP's CheckpointException (it holds every rank's)."""
    failures = getattr(exc, "failures", None) or {}
    for rank, failure in sorted(failures.items()):
        # DCP keeps (exception, stack summary) per failed rank.
        inner = failure[0] if isinstance(failure, tuple) and failure else failure
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _one_process(world_size: int) -> Iterator[None]:
    """At world size 1 (no process group) DCP warns that it assumes one process: it is right."""
    with warnings.catch_warnings():
        if world_size == 1:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def training_state(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model``'s and ``optimizer``'s state as DCP's ``get_state_dict`` gives it.

    Whatever wraps the model (DDP, ``torch.compile``, FSDP), the keys are the plain
    module's parameter names, and the optimizer state is keyed by those names too. A
    sharded model gives its shards (no collective gathers them).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return dict(model_state), dict(optimizer_state)


def restore_state(
    model: Any, optimizer: Any, model_state: Mapping[str, Any], optimizer_state: Any
) -> None:
    """Load what :func:`training_state` gave into ``model`` and ``optimizer`` (DCP's
    ``set_state_dict``).

    ``optimizer_state`` may also be ``optimizer.state_dict()``'s own form (parameters
    numbered, as checkpoints written before the strategy objects hold it): it is then
    loaded with ``optimizer.load_state_dict``, exactly as it was saved.
    """
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_state_dict,
    )

    if _numbered(optimizer_state):
        set_model_state_dict(model, dict(model_state))
        optimizer.load_state_dict(optimizer_state)
        return
    set_state_dict(
        model, optimizer, model_state_dict=dict(model_state), optim_state_dict=optimizer_state
    )


def _numbered(optimizer_state: Any) -> bool:
    """True for ``optimizer.state_dict()``'s form: parameters as ints, not names."""
    groups = optimizer_state.get("param_groups", []) if isinstance(optimizer_state, Mapping) else []
    params = [p for g in groups if isinstance(g, Mapping) for p in g.get("params", [])]
    return any(isinstance(p, int) for p in params)


def _state(model: Any, optimizer: Any) -> dict[str, Any]:
    model_state, optimizer_state = training_state(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def write_shards(folder: Path, model: Any, optimizer: Any, *, world_size: int) -> None:
    """Write this rank's shards of ``model`` and ``optimizer`` into ``folder`` (collective).

    Every rank calls it with the same ``folder`` (rank 0's temporary checkpoint folder);
    it returns on every rank once rank 0 has written ``.metadata``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    writer = dcp.FileSystemWriter(folder, single_file_per_rank=True, sync_files=True)
    try:
        with _one_process(world_size):
            dcp.save(_state(model, optimizer), storage_writer=writer, no_dist=world_size == 1)
    except CheckpointException as exc:  # a BaseException: it would pass `except Exception`
        raise CheckpointError(
            f"writing the shards into {folder} failed: {_first_failure(exc)}; check the disk "
            "and that every rank sees this folder (a shared file system on several nodes)"
        ) from exc


def shard_stager() -> Any:
    """A DCP stager whose CPU copy of this rank's shards is kept and reused between saves.

    DCP's default staging allocates a new CPU copy at every save (and deep-copies a CPU
    ``DTensor`` once more before that): fresh pages cost several times the copy itself,
    all of it on the training thread. This stager allocates once, at the first save, and
    later saves only copy into the same memory (no collective). The copy stays allocated
    until :meth:`close` (one copy of this rank's shards).

    The copy is not page-locked: DCP pins its staging memory through CUDA's host-register
    call only, which would fail on other accelerators; unpinned memory works on every
    device, with a slower device-to-host copy.

    Returns:
        The stager for ``dcp.async_save(async_stager=...)``, or ``None`` where torch has
        no ``DefaultStager`` (before 2.9): DCP's default staging is used then.
    """
    from torch.distributed.checkpoint import staging

    if not hasattr(staging, "DefaultStager"):
        return None
    return staging.DefaultStager(
        staging.StagingOptions(
            use_pinned_memory=False,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=False,
        )
    )


def write_shards_async(
    folder: Path,
    model: Any,
    optimizer: Any,
    *,
    world_size: int,
    group: Any,
    stager: Any = None,
) -> Callable[[], None]:
    """Stage this rank's shards now and write them into ``folder`` in the background.

    The shards are copied to CPU memory before this returns (later steps cannot change
    what is written), by ``stager`` (:func:`shard_stager`; ``None``: DCP's default
    staging); DCP's writer thread then plans, writes and fsyncs them, with its collectives
    on ``group`` (a process group used by nothing else). Every rank calls it with the same
    ``folder``.

    Returns:
        Waits for the write (call it in the background thread): it returns once every
        rank's shards and DCP's ``.metadata`` are written (on rank 0) and raises
        :class:`CheckpointError` when DCP failed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    writer = dcp.FileSystemWriter(folder, single_file_per_rank=True, sync_files=True)
    with _one_process(world_size):
        future = dcp.async_save(
            _state(model, optimizer),
            storage_writer=writer,
            process_group=group,
            async_stager=stager,
            no_dist=world_size == 1,
        )

    # A stager of its own would give an AsyncSaveResponse; the default stager a Future.
    upload = cast("Future[Any]", getattr(future, "upload_completion", future))

    def written() -> None:
        try:
            with _one_process(world_size):
                upload.result()
        except CheckpointException as exc:
            raise CheckpointError(
                f"writing the shards into {folder} failed: {_first_failure(exc)}; check the "
                "disk and that every rank sees this folder"
            ) from (_os_error(exc) or exc)

    return written


#: The background saves' gloo group and the world group it was made in.
_BACKGROUND: dict[str, Any] = {}


def background_group(world_size: int) -> Any:
    """A gloo group of its own for DCP's collectives in background saves (``None`` at world
    size 1). Created once per process group, by every rank at the same (first) save."""
    if world_size == 1:
        return None
    import torch.distributed as dist

    world = dist.group.WORLD
    if _BACKGROUND.get("world") is not world:
        _BACKGROUND["group"] = dist.new_group(backend="gloo")
        _BACKGROUND["world"] = world
    return _BACKGROUND["group"]


def _os_error(exc: BaseException) -> OSError | None:
    """The first OSError among the ranks' failures in DCP's CheckpointException."""
    for _rank, failure in sorted((getattr(exc, "failures", None) or {}).items()):
        inner = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(inner, OSError):
            return inner
    return None


def read_shards(
    folder: Path, files: Collection[str], model: Any, optimizer: Any, *, world_size: int
) -> None:
    """Load ``model`` and ``optimizer`` from the verified shards in ``folder`` (collective).

    The saved pieces are cut to this run's shards, so the world size may differ from the
    one that wrote them.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    reader = VerifiedReader(folder, files)
    try:
        with _one_process(world_size):
            dcp.load(state, storage_reader=reader, no_dist=world_size == 1)
    except CheckpointException as exc:
        if reader.error is not None:  # our own verdict (corrupt, not listed), word for word
            raise type(reader.error)(str(reader.error)) from exc
        raise CheckpointError(
            f"cannot restore the shards in {folder}: {_first_failure(exc)}. It was saved "
            "with another model or optimizer; build the same ones as the run that saved it, "
            "or start a fresh run in a new checkpoint_dir"
        ) from exc
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
