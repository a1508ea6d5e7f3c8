"""DDP vs FSDP memory and throughput per rank, for a model where sharding matters.

    torchrun --standalone --nproc-per-node=2 benchmarks/fsdp.py --strategy fsdp
    python -m benchmarks.run --only fsdp          # both strategies (and Accelerate's FSDP)

One strategy per process, so that each peak RSS belongs to one strategy. The model is an
MLP of ``--layers`` square ``Linear(--width)`` layers (12 x 2048 = 50 M parameters by
default) trained with AdamW. Each rank reports, from the tensors it holds after a step:
parameter, gradient and optimizer-state bytes (``DTensor`` shards counted locally), their
sum, peak RSS, and samples/s over ``--steps`` timed steps after one warm-up step. A
checksum of the loss sequence shows that the strategies trained the same model.

Prints one ``RESULT {json}`` line per rank, and on rank 0 a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import devlayer  # noqa: E402

STRATEGIES = ("ddp", "fsdp", "accelerate-fsdp")


def make_model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks)


def _local_bytes(tensor: Any) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return int(local.numel() * local.element_size())


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    optim = sum(
        _local_bytes(v)
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    return {"params": params, "grads": grads, "optim": optim, "total": params + grads + optim}


def _accelerate_fsdp(model: torch.nn.Module) -> tuple[Any, Any, Any]:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    return model, opt, acc


def run(strategy: str, width: int, layers: int, batch: int, steps: int) -> dict[str, Any]:
    model = make_model(width, layers)
    n_params = sum(p.numel() for p in model.parameters())
    backward = None
    if strategy == "accelerate-fsdp":
        net, opt, acc = _accelerate_fsdp(model)
        backward = acc.backward
    else:
        net = devlayer.prepare_model(model, strategy)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(devlayer.rank())
    x = torch.randn(batch, width, generator=g)
    y = torch.randn(batch, width, generator=g)
    losses, measured = [], {}
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()  # step 0 is the warm-up
        loss = torch.nn.functional.mse_loss(net(x), y)
        if backward is not None:
            backward(loss)
        else:
            loss.backward()
        opt.step()
        if step == steps:
            measured = state_bytes(net, opt)  # gradients still allocated
        opt.zero_grad(set_to_none=False)
        losses.append(float(devlayer.all_reduce(loss.detach(), op="mean")))
    seconds = time.perf_counter() - t0
    return {
        "strategy": strategy,
        "rank": devlayer.rank(),
        "world_size": devlayer.world_size(),
        "params_m": round(n_params / 1e6, 1),
        "sharded": all(hasattr(p, "to_local") for p in net.parameters()),
        **{f"{k}_mb": round(v / 2**20, 1) for k, v in measured.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "samples_per_s": round(batch * devlayer.world_size() * steps / seconds, 2),
        "losses": [round(v, 6) for v in losses],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a 4 x 1024 model, 2 steps")
    p.add_argument("--json", default=None, help="append each rank's record to this JSONL file")
    args = p.parse_args()
    if args.quick:
        args.width, args.layers, args.steps = 1024, 4, 2
    with devlayer.init():
        try:
            record = run(args.strategy, args.width, args.layers, args.batch, args.steps)
        except Exception as exc:  # a peer that cannot run here is reported, not hidden
            record = {"strategy": args.strategy, "rank": devlayer.rank(), "skipped": repr(exc)}
        line = json.dumps({"type": "fsdp", **record}) + "\n"
        os.write(1, ("RESULT " + line).encode())
        if args.json:
            with open(args.json, "a", encoding="utf-8") as fh:  # one short append per rank
                fh.write(line)


if __name__ == "__main__":
    main()
