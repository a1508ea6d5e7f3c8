"""devlayer on real NVIDIA GPUs: backend choice, device indices, collectives, AMP training.

Run on a CUDA machine with ``python -m pytest -m gpu -q tests/gpu``; without a CUDA device
``tests/conftest.py`` skips every test here. Tests that need two GPUs skip, with the reason,
on a one-GPU machine.

What the library documents, and these tests hold it to:

* World size 1 needs no launcher and creates **no** process group, even under a launcher
  that says ``WORLD_SIZE=1``: ``State.comm`` is ``None`` and the collectives return their
  input. nccl itself is exercised with two ranks on two GPUs (``devlayer.spawn``).
* ``devices=`` indices are relative to what the process already sees and are applied
  through ``CUDA_VISIBLE_DEVICES`` before CUDA starts, so they are checked in fresh
  interpreters; GPUs are told apart by UUID, not only by name (a node's GPUs usually share
  one name).

These tests keep the scheduler's ``CUDA_VISIBLE_DEVICES`` (fixture ``no_launcher``) instead
of removing it as ``clean_env`` does: this process's CUDA runtime may start during a test,
and on a shared node it must start on the GPUs this job was given.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.utils.data import TensorDataset

import devlayer
from devlayer.devices import narrow_visibility
from devlayer.testing import free_port, torchrun_env
from tests.helpers import _LAUNCH_NAMES, _LAUNCH_PREFIXES, run_py, subprocess_env

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

VAR = "CUDA_VISIBLE_DEVICES"
CHILD_TIMEOUT = 120  # seconds for one child interpreter (import torch, start CUDA, init)

nvidia_only = pytest.mark.skipif(
    bool(getattr(torch.version, "hip", None)),
    reason="checks NVIDIA's CUDA_VISIBLE_DEVICES; ROCm layers HIP/ROCR variables (docs/rocm.md)",
)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A plain single process: no launcher, DEVLAYER_* or ACCELERATE_* variables.

    Unlike ``clean_env`` it keeps the visibility variables (see the module docstring).
    """
    for key in list(os.environ):
        if key.startswith(_LAUNCH_PREFIXES) or key in _LAUNCH_NAMES:
            monkeypatch.delenv(key)
    return monkeypatch


# --------------------------------------------------------------------------- child probe

# Run as ``python -c _PROBE <mode> [<devices as JSON>]``; prints one ``RESULT {json}`` line.
# list:             name and UUID of every GPU this process sees (no devlayer)
# init:             devlayer.init(devices=...), then what CUDA and devlayer report
# init-after-cuda:  start CUDA first, then devlayer.init(devices=...): the error, if any
_PROBE = r"""
import json, os, sys
import torch

def gpus():
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"name": p.name, "uuid": str(p.uuid)})
    return out

mode = sys.argv[1]
result = {"env_before": os.environ.get("CUDA_VISIBLE_DEVICES")}
if mode == "list":
    result["gpus"] = gpus()
elif mode == "init":
    import devlayer
    st = devlayer.init(devices=json.loads(sys.argv[2]))
    result.update(
        backend=st.backend,
        device=str(devlayer.device()),
        device_index=st.device_index,
        comm=st.comm,
        visibility=st.visibility,
        env_during=os.environ.get("CUDA_VISIBLE_DEVICES"),
        current=torch.cuda.current_device(),
        gpus=gpus(),
        name0=torch.cuda.get_device_name(0),
    )
    devlayer.shutdown()
    result["env_after"] = os.environ.get("CUDA_VISIBLE_DEVICES")
elif mode == "init-after-cuda":
    import devlayer
    torch.zeros(1, device="cuda")
    try:
        devlayer.init(devices=json.loads(sys.argv[2]))
    except devlayer.errors.InitOrderError as exc:
        result["error"] = str(exc)
    else:
        result["error"] = None
        devlayer.shutdown()
else:
    raise SystemExit("unknown mode " + mode)
print("RESULT " + json.dumps(result), flush=True)
"""

_KEEP = object()  # leave CUDA_VISIBLE_DEVICES as this process has it


def _probe(mode: str, devices: object = None, *, visible: object = _KEEP) -> dict:
    extra = {} if visible is _KEEP else {VAR: str(visible)}
    args = ["-c", _PROBE, mode] + ([] if mode == "list" else [json.dumps(devices)])
    proc = run_py(args, env=subprocess_env(**extra), timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, (
        f"probe {mode} devices={devices!r} {VAR}={extra.get(VAR, os.environ.get(VAR))!r} "
        f"exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"probe {mode} printed no RESULT line:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def visible_gpus() -> list[dict]:
    """Name and UUID of each GPU a child of this process sees, in CUDA's index order.

    Asked in a fresh interpreter so the answer follows this process's ``CUDA_VISIBLE_DEVICES``
    and CUDA's device order, whatever this process's own CUDA runtime started with.
    """
    gpus = _probe("list")["gpus"]
    assert gpus, "conftest found a CUDA device but a child process sees none"
    return gpus


def _need(gpus: list[dict], n: int) -> None:
    if len(gpus) < n:
        pytest.skip(f"needs {n} CUDA devices; this machine shows {len(gpus)}")


# --------------------------------------------------------------------------- 1. init


def test_init_alone_selects_cuda_and_device_zero(no_launcher):
    st = devlayer.init()
    try:
        assert devlayer.is_initialized() and devlayer.state() is st
        assert st.backend == devlayer.backend() == "cuda"
        assert st.reason.startswith("auto-detected"), st.reason
        assert devlayer.backends.available_backends()[0] == "cuda"
        assert st.device == devlayer.device() == torch.device("cuda", 0)
        assert st.device_index == 0 and torch.cuda.current_device() == 0
        assert (st.rank, st.world_size, st.local_rank, st.local_world_size) == (0, 1, 0, 1)
        assert st.process.launcher == "none" and st.is_main and st.is_local_main
        # World size 1: no process group, so no comm in the State (documented); the comm
        # the cuda backend uses with several ranks is nccl.
        assert st.comm is None and not st.owns_process_group
        assert not torch.distributed.is_initialized()
        assert devlayer.backends.get_backend("cuda").comm_backend() == "nccl"
        assert st.visibility is None  # no devices= given: nothing narrowed
        # An accelerator becomes torch's default device (set_default_device defaults on).
        assert torch.get_default_device() == st.device
        assert torch.empty(2).device == st.device
    finally:
        assert devlayer.shutdown() is True
    assert not devlayer.is_initialized()
    assert torch.get_default_device().type == "cpu"
    assert torch.empty(2).device.type == "cpu"


# --------------------------------------------------------------------------- 2. indices


@nvidia_only
def test_cuda_visible_devices_maps_the_last_gpu_to_cuda_0(visible_gpus):
    last = len(visible_gpus) - 1
    value = narrow_visibility(os.environ.get(VAR), [last])  # = str(last) when VAR is unset
    got = _probe("init", None, visible=value)
    assert got["env_before"] == value
    assert got["backend"] == "cuda" and got["comm"] is None
    assert got["device"] == "cuda:0" and got["device_index"] == 0 and got["current"] == 0
    assert got["visibility"] is None  # devlayer left the variable alone
    assert got["gpus"] == [visible_gpus[last]], "cuda:0 is not the GPU the variable named"
    assert got["name0"] == visible_gpus[last]["name"]
    assert got["env_after"] == value


@nvidia_only
def test_devices_count_selects_the_first_visible_gpu(visible_gpus):
    before = os.environ.get(VAR)
    got = _probe("init", 1)  # a count: the first device, whatever the index of the others
    expected = narrow_visibility(before, [0])
    assert got["visibility"] == [VAR, expected] and got["env_during"] == expected
    assert got["device"] == "cuda:0"
    assert got["gpus"] == [visible_gpus[0]]
    assert got["env_after"] == before, "shutdown() did not restore CUDA_VISIBLE_DEVICES"


@nvidia_only
@pytest.mark.parametrize("spec", ["list", "string"])
def test_devices_indices_narrow_and_order_visibility(visible_gpus, spec):
    _need(visible_gpus, 2)
    last = len(visible_gpus) - 1
    devices = [last, 0] if spec == "list" else f"{last},0"
    before = os.environ.get(VAR)
    got = _probe("init", devices)
    expected = narrow_visibility(before, [last, 0])
    assert got["visibility"] == [VAR, expected] and got["env_during"] == expected
    # Two GPUs visible, in the order given; the single rank (local rank 0) uses the first.
    assert got["gpus"] == [visible_gpus[last], visible_gpus[0]]
    assert got["device"] == "cuda:0" and got["current"] == 0
    assert got["env_after"] == before


@nvidia_only
def test_devices_indices_are_relative_to_the_visible_gpus(visible_gpus):
    _need(visible_gpus, 2)
    last = len(visible_gpus) - 1
    outer = narrow_visibility(os.environ.get(VAR), [last, 0])  # what a scheduler gave us
    got = _probe("init", "1,", visible=outer)  # index 1 of those two: our GPU 0
    assert got["visibility"] == [VAR, narrow_visibility(outer, [1])]
    assert got["gpus"] == [visible_gpus[0]]
    assert got["device"] == "cuda:0"
    assert got["env_after"] == outer


@nvidia_only
def test_devices_after_cuda_started_is_an_init_order_error(visible_gpus):
    before = os.environ.get(VAR)
    if narrow_visibility(before, [0]) == before:
        pytest.skip(f"{VAR}={before!r} already names one GPU: devices=[0] changes nothing")
    got = _probe("init-after-cuda", [0])
    assert got["error"] is not None, "narrowing after CUDA started was accepted silently"
    assert VAR in got["error"] and "devlayer.early" in got["error"], got["error"]


# --------------------------------------------------------------------------- 3. collectives


def test_collectives_at_world_size_one_under_torchrun_keep_cuda_tensors(no_launcher):
    for name, value in torchrun_env(0, 1, master_port=free_port()).items():
        no_launcher.setenv(name, value)
    with devlayer.init() as st:
        dev = devlayer.device()
        assert st.backend == "cuda" and dev == torch.device("cuda", 0)
        assert st.process.launcher == "torchrun" and st.world_size == 1
        # Documented: world size 1 creates no process group, even under a launcher.
        assert st.comm is None and not torch.distributed.is_initialized()

        t = torch.tensor([1.5, -2.0, 3.0], device=dev)
        for op in ("sum", "mean", "max", "min", "product"):
            out = devlayer.all_reduce(t, op=op)
            assert out is t and out.device == dev
            assert out.tolist() == [1.5, -2.0, 3.0], op

        metrics = {
            "loss": torch.tensor(0.25, device=dev),
            "n": 3,
            "acc": [torch.ones(2, device=dev)],
        }
        mean = devlayer.all_reduce(metrics, op="mean")
        assert mean["loss"] is metrics["loss"] and mean["loss"].device == dev
        assert mean["loss"].item() == 0.25
        assert mean["n"] == 3.0 and isinstance(mean["n"], float)
        assert mean["acc"][0].device == dev and mean["acc"][0].tolist() == [1.0, 1.0]

        x = torch.arange(6, dtype=torch.float32, device=dev).reshape(3, 2)
        gathered = devlayer.all_gather(x)
        assert len(gathered) == 1 and gathered[0].device == dev
        assert torch.equal(gathered[0], x)
        assert devlayer.all_gather(2.5) == [2.5]

        b = torch.full((4,), 7.0, device=dev)
        assert devlayer.broadcast(b) is b and b.device == dev and b.tolist() == [7.0] * 4
        tree = devlayer.broadcast({"seed": 11, "w": torch.tensor([1, 2], device=dev)})
        assert tree["seed"] == 11 and tree["w"].device == dev and tree["w"].tolist() == [1, 2]
        devlayer.barrier(timeout=30)


def _nccl_worker() -> dict:
    """Runs in each spawned rank (devlayer.init(backend="cuda") already ran)."""
    from tests.dist.worker_collectives import check

    st = devlayer.state()
    r, n = st.rank, st.world_size
    ranks = list(range(n))
    dev = devlayer.device()
    assert st.backend == "cuda" and st.comm == "nccl" and st.owns_process_group
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == n
    assert dev == torch.device("cuda", r) and torch.cuda.current_device() == r

    t = torch.tensor([r + 1.0, 10.0 * r], device=dev)
    assert devlayer.all_reduce(t, op="sum") is t and t.device == dev
    assert t.tolist() == [float(sum(x + 1 for x in ranks)), 10.0 * sum(ranks)]
    for op, expect in (("mean", sum(ranks) / n), ("max", n - 1.0), ("min", 0.0)):
        v = devlayer.all_reduce(torch.tensor([float(r)], device=dev), op=op)
        assert v.device == dev and abs(v.item() - expect) < 1e-6, (op, v, expect)
    half = devlayer.all_reduce(torch.full((8,), float(r + 1), device=dev, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.eq(sum(x + 1 for x in ranks)).all()

    mixed = {"loss": torch.tensor(float(r), device=dev), "n": r + 1}
    mean = devlayer.all_reduce(mixed, op="mean")
    assert mean["loss"].device == dev and mean["loss"].item() == sum(ranks) / n
    assert mean["n"] == sum(x + 1 for x in ranks) / n

    # A CPU tensor goes over the cpu:gloo half of the group and stays on the CPU.
    c = torch.tensor([float(r)], device="cpu")
    assert devlayer.all_reduce(c, op="sum") is c and c.device.type == "cpu"
    assert c.item() == sum(ranks)

    uneven = devlayer.all_gather(torch.arange(r + 1, dtype=torch.float32, device=dev))
    assert all(p.device == dev for p in uneven)
    assert [p.tolist() for p in uneven] == [list(map(float, range(x + 1))) for x in ranks]
    same = devlayer.all_gather(torch.full((2, 3), r, device=dev), same_shape=True)
    assert all(p.device == dev for p in same)
    assert [p.eq(x).all().item() for x, p in zip(ranks, same, strict=True)] == [True] * n

    src = n - 1
    b = torch.full((5,), float(r), device=dev)
    assert devlayer.broadcast(b, src=src) is b and b.device == dev
    assert b.tolist() == [float(src)] * 5

    # The CPU suite's battery, here with cuda as torch's default device (set by init()).
    summary = check()
    assert summary["comm"] == "nccl"
    devlayer.barrier(timeout=60)
    return {"rank": r, "device": str(dev), "gpu": str(torch.cuda.get_device_properties(dev).uuid)}


def test_nccl_collectives_on_two_gpus(no_launcher, visible_gpus):
    _need(visible_gpus, 2)
    results = devlayer.spawn(_nccl_worker, nprocs=2, backend="cuda", timeout=60, join_timeout=240)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["device"] for r in results] == ["cuda:0", "cuda:1"]
    assert results[0]["gpu"] != results[1]["gpu"], "both ranks ran on one GPU"


# --------------------------------------------------------------------------- 4. training


def _regression_data(n: int = 512, features: int = 8) -> TensorDataset:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, features, generator=g, device="cpu")
    w = torch.randn(features, 1, generator=g, device="cpu")
    return TensorDataset(x, x @ w + 0.5)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_prepare_loader_iterates_with_cuda_as_default_device(no_launcher, num_workers):
    data = TensorDataset(
        torch.arange(32.0, device="cpu").reshape(16, 2), torch.arange(16, device="cpu")
    )
    with devlayer.init() as st:
        assert torch.get_default_device() == st.device
        loader = devlayer.prepare_loader(data, 8, shuffle=True, num_workers=num_workers)
        batches = list(loader)
    assert len(batches) == 2
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(16))
    # Batches stay on the CPU, pinned for a fast copy to the GPU (pin_memory on accelerators).
    assert all(t.device.type == "cpu" and t.is_pinned() for b in batches for t in b)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)]
)
def test_trainer_amp_on_cuda(no_launcher, tmp_path, precision, dtype):
    from devlayer.train.checkpoint import CheckpointStore

    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16 (before Ampere)")
    # Count the optimizer steps that go through a GradScaler (the Trainer makes its own).
    scaler_steps: list[object] = []
    real_step = torch.amp.GradScaler.step

    def counting_step(self, optimizer, *args, **kwargs):
        scaler_steps.append(optimizer)
        return real_step(self, optimizer, *args, **kwargs)

    no_launcher.setattr(torch.amp.GradScaler, "step", counting_step)

    data = _regression_data()
    model = torch.nn.Linear(8, 1, device="cpu")
    out_dtypes: set[torch.dtype] = set()
    model.register_forward_hook(lambda _m, _i, out: out_dtypes.add(out.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    epochs, batch = 5, 64
    with devlayer.init() as st:
        trainer = devlayer.Trainer(
            model,
            opt,
            torch.nn.functional.mse_loss,
            precision=precision,
            batch_size=batch,
            max_epochs=epochs,
            checkpoint_dir=tmp_path / "ckpt",
            resume=None,
            progress=False,
            num_workers=0,
        )
        history = trainer.fit(data)
        dev = st.device

    steps = epochs * (len(data) // batch)
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[-1]["global_step"] == steps
    losses = [h["train_loss"] for h in history]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.5 * losses[0], losses
    # Weights live on the GPU in float32 (AMP keeps float32 master weights), finite.
    assert dev.type == "cuda" and trainer.device == dev
    for p in model.parameters():
        assert p.device == dev and p.dtype == torch.float32 and torch.isfinite(p).all()
    # The forward pass ran under autocast with the requested dtype.
    assert trainer.autocast_dtype == dtype and out_dtypes == {dtype}
    payload, _ = CheckpointStore(tmp_path / "ckpt").load(map_location="cpu")
    assert payload["global_step"] == steps
    assert torch.equal(payload["model"]["weight"], model.weight.detach().cpu())
    if precision == "16-mixed":
        assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler.is_enabled()
        assert len(scaler_steps) == steps and all(o is opt for o in scaler_steps)
        assert math.isfinite(trainer.scaler.get_scale()) and trainer.scaler.get_scale() > 0
        assert payload["scaler"] is not None and payload["scaler"]["scale"] > 0
    else:
        assert trainer.scaler is None and scaler_steps == []
        assert payload["scaler"] is None


def test_trainer_steps_never_synchronize_the_gpu(no_launcher):
    # The Trainer promises no host sync per step: the loss is summed on the device and read
    # only every log_every steps, and the stop check is a CPU tensor. CUDA's sync debug
    # mode turns any synchronizing call (.item(), a blocking copy) into an error; it is
    # switched on after two warm-up steps and off again when the run's last step is done
    # (it stops mid-epoch through max_steps), before the metrics reduction of that partial
    # epoch, which does read values once.
    class SyncGuard(devlayer.train.Callback):
        def on_train_batch_end(self, trainer, loss):
            if trainer.state.global_step == 2:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_epoch_end(self, trainer):
            torch.cuda.set_sync_debug_mode("default")

    data = _regression_data(n=1024)  # 16 steps per epoch of 64
    model = torch.nn.Linear(8, 1, device="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    try:
        with devlayer.init():
            trainer = devlayer.Trainer(
                model,
                opt,
                torch.nn.functional.mse_loss,
                batch_size=64,
                max_steps=12,
                callbacks=[SyncGuard()],
                log_every=10**9,
                resume=None,
                progress=False,
                num_workers=0,
            )
            trainer.fit(data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.state.global_step == 12


# --------------------------------------------------------------------------- 5. hang reports


def _rank_one_skips_an_all_reduce() -> None:
    """Rank 0 waits in an nccl all_reduce that rank 1 never enters (it loops in user code)."""
    from tests.dist.hang_worker import stuck_in_user_code

    devlayer.all_reduce(torch.ones(4, device=devlayer.device()))
    if devlayer.rank() == 1:
        stuck_in_user_code()
    t = devlayer.all_reduce(torch.ones(4, device=devlayer.device()))
    t.cpu()  # waits on the GPU: torch's nccl watchdog times the collective out


def test_h22_21_nccl_flight_recorder_dumps_into_the_hang_folder(
    no_launcher, visible_gpus, tmp_path
):
    """H22-21 on real GPUs: with 2 ranks on nccl (timeout 20 s) and no flight recorder
    variable set by the user, torch's flight recorder writes rank 0's dump into the hang
    folder when its watchdog times the all_reduce out, and the hang report that
    ``devlayer hangs`` prints names the flight recorder's files."""
    from devlayer.hangreport import read_dumps, verdict

    _need(visible_gpus, 2)
    for name in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        assert name not in os.environ, f"unset {name} to run this test"
    with pytest.raises(devlayer.RankFailedError):
        devlayer.spawn(
            _rank_one_skips_an_all_reduce,
            nprocs=2,
            backend="cuda",
            timeout=20,
            join_timeout=240,
            env={"DEVLAYER_HANG_DIR": str(tmp_path), "DEVLAYER_WATCHDOG": "5"},
        )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "flight_recorder_rank_0" in files, files
    reports, _ = read_dumps(tmp_path)
    text = verdict(reports, 2)
    assert "torch's flight recorder (nccl): rank " in text and "flight_recorder_rank_" in text
