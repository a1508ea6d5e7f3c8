"""Ray Train runs a devlayer Trainer (started by tests/ray/test_ray_train.py).

    ray_job.py OUT_DIR [--kill-at-step K] [--runs ref,kill]

Starts a local Ray (2 CPUs) and runs ``TorchTrainer`` twice with 2 CPU workers, each worker
running a devlayer ``Trainer`` with checkpoints every 2 steps into a folder of its run:

* ``ref``: uninterrupted;
* ``kill``: in the first attempt, rank 1 SIGKILLs itself right after optimizer step K
  (after the checkpoint of step K - 1 when K is odd); ``FailureConfig(max_failures=1)`` lets
  Ray restart the group, whose train loop resumes from devlayer's newest checkpoint.

Each worker writes ``OUT_DIR/<run>/start-rank<R>-<pid>.json`` once ``devlayer.init()``
returned (what Ray and devlayer say about this process, and whether the group existed
before) and ``end-rank<R>-<pid>.json`` after ``devlayer.shutdown()`` (the group is still
Ray's and still works); rank 0 saves the final weights to ``OUT_DIR/<run>/weights.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _started(ctx: Any, st: Any, world_before: Any) -> dict[str, Any]:
    import torch.distributed as dist

    import devlayer

    return {
        "pid": os.getpid(),
        "ray": [ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()],
        "ray_local_world": ctx.get_local_world_size(),
        "ray_node_rank": ctx.get_node_rank(),
        "devlayer": [devlayer.rank(), devlayer.world_size(), devlayer.local_rank()],
        "devlayer_local_world": devlayer.local_world_size(),
        "devlayer_node_rank": devlayer.node_rank(),
        "num_nodes": devlayer.num_nodes(),
        "torch": [dist.get_rank(), dist.get_world_size()],
        "launcher": st.process.launcher,
        "sources": dict(st.process.sources),
        "owns_process_group": st.owns_process_group,
        "comm": st.comm,
        "group_before_init": world_before is not None,
        "same_group": world_before is dist.group.WORLD,
        "outer": {k: v for k, v in os.environ.items() if k.startswith(("SLURM_PROCID", "OMPI_"))},
    }


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: adopt Ray's group, train with checkpoints, leave the group."""
    import ray.train
    import torch
    import torch.distributed as dist

    import devlayer
    from devlayer.train.fsdp import full_state_dict
    from tests.dist.trainer_worker import make_data, make_model

    out, kill_at = Path(config["out"]), config["kill_at"]
    ctx = ray.train.get_context()
    world_before = dist.group.WORLD if dist.is_initialized() else None
    st = devlayer.init(backend="cpu", timeout=120)
    rank = devlayer.rank()
    _write(out / f"start-rank{rank}-{os.getpid()}.json", _started(ctx, st, world_before))

    class KillOnce(devlayer.train.Callback):
        def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
            marker = out / "killed"
            if trainer.state.global_step == kill_at and rank == 1 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    model = make_model()
    trainer = devlayer.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        torch.nn.functional.mse_loss,
        batch_size=16,
        max_epochs=3,
        checkpoint_dir=str(out / "ckpt"),
        checkpoint_every=2,
        progress=False,
        num_workers=0,
        seed=7,
        callbacks=[KillOnce()],
    )
    trainer.fit(make_data())
    weights = full_state_dict(trainer.wrapped_model)
    if rank == 0:
        torch.save(weights, out / "weights.pt")
    devlayer.shutdown()
    alive = dist.is_initialized()
    total = torch.tensor([float(rank + 1)])
    if alive:
        dist.all_reduce(total)  # Ray's group, still usable after devlayer.shutdown()
    end = {"pid": os.getpid(), "group_after_shutdown": alive, "sum_after_shutdown": total.item()}
    end["resumed_from"] = str(trainer.resumed_from) if trainer.resumed_from else None
    _write(out / f"end-rank{rank}-{os.getpid()}.json", end)


def _fit(out: Path, name: str, kill_at: int | None) -> None:
    run = out / name
    run.mkdir(parents=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"out": str(run), "kill_at": kill_at},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(
            name=name,
            storage_path=str(out / "ray-results"),
            failure_config=FailureConfig(max_failures=1),
        ),
    )
    result = trainer.fit()
    print(f"RUN {name} error={result.error!r}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--kill-at-step", type=int, default=5)
    p.add_argument("--runs", default="ref,kill")
    args = p.parse_args()
    out = Path(args.out)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for name in args.runs.split(","):
            _fit(out, name, args.kill_at_step if name == "kill" else None)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
