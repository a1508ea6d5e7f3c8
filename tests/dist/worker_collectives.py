"""A worker that runs every collective and checks the values it gets back.

Used by the spawn, torchrun, SLURM-shaped and MPI-shaped tests: the same checks run
whatever started the ranks. Run as a script it initializes devlayer, runs ``check()`` and
prints ``RESULT <json>`` on every rank.
"""

from __future__ import annotations

import json
import sys

import torch

import devlayer


def check() -> dict[str, object]:
    """Run all collectives; raise AssertionError on any wrong value. Returns a summary."""
    r, n = devlayer.rank(), devlayer.world_size()
    ranks = list(range(n))

    t = torch.tensor([float(r + 1), 10.0 * r])
    out = devlayer.all_reduce(t, op="sum")
    assert out is t, "all_reduce must work in place and return the caller's tensor"
    assert t.tolist() == [sum(x + 1 for x in ranks), 10.0 * sum(ranks)], t

    # A non-contiguous view is reduced through a contiguous copy and written back in place.
    base = torch.zeros(2, 4)
    base[:, ::2] = float(r + 1)
    view = base[:, ::2]
    assert devlayer.all_reduce(view, op="sum") is view
    assert base[:, ::2].eq(float(sum(x + 1 for x in ranks))).all() and base[:, 1::2].eq(0).all()

    for op, expect in [
        ("mean", sum(ranks) / n),
        ("max", float(n - 1)),
        ("min", 0.0),
        ("product", float(torch.tensor([x + 1.0 for x in ranks]).prod())),
    ]:
        value = float(r) if op != "product" else float(r + 1)
        got = devlayer.all_reduce(torch.tensor([value]), op=op).item()
        assert abs(got - expect) < 1e-6, (op, got, expect)

    metrics = {
        "loss": float(r),
        "count": r + 1,
        "nested": {
            "acc": torch.tensor([0.5 * r]),
            "pair": [torch.tensor([r], dtype=torch.float64), 2],
        },
    }
    mean = devlayer.all_reduce(metrics, op="mean")
    assert mean["loss"] == sum(ranks) / n
    assert mean["count"] == sum(x + 1 for x in ranks) / n
    assert mean["nested"]["acc"].item() == 0.5 * sum(ranks) / n
    assert mean["nested"]["pair"][0].item() == sum(ranks) / n
    assert mean["nested"]["pair"][1] == 2.0
    assert mean["nested"]["acc"] is metrics["nested"]["acc"]

    # A flat dict of tensors (the fast path): 0-d metrics, and mixed shapes.
    scalars = {f"m{i}": torch.tensor(float(r * i)) for i in range(8)}
    out = devlayer.all_reduce(scalars, op="mean")
    assert all(out[f"m{i}"].item() == i * sum(ranks) / n for i in range(8))
    assert out["m3"] is scalars["m3"]
    shaped = {"w": torch.full((2, 3), float(r)), "b": torch.tensor(float(r))}
    devlayer.all_reduce(shaped, op="sum")
    assert shaped["w"].eq(sum(ranks)).all() and shaped["b"].item() == sum(ranks)
    rows = {"a": torch.full((2,), float(r)), "b": torch.full((2,), 2.0 * r)}  # same shape
    devlayer.all_reduce(rows, op="max")
    assert rows["a"].tolist() == [n - 1.0] * 2 and rows["b"].tolist() == [2.0 * (n - 1)] * 2
    mixed = {"f": torch.tensor(float(r)), "i": torch.tensor(r), "x": 1.5}  # dtypes, a number
    mixed = devlayer.all_reduce(mixed, op="sum")
    assert mixed["f"].item() == sum(ranks) and mixed["i"].item() == sum(ranks)
    assert mixed["i"].dtype == torch.int64 and mixed["x"] == 1.5 * n
    try:
        devlayer.all_reduce({"a": torch.tensor(r), "b": torch.tensor(1)}, op="mean")
    except devlayer.errors.InvalidArgumentError as exc:
        assert "['a']" in str(exc), exc  # the general path names the leaf
    else:
        raise AssertionError("mean of integer tensors must be refused")

    # Several leaves per dtype group, each with its own value per leaf and per rank, checked
    # leaf by leaf: a write-back that swapped or shifted leaves inside a group would show.
    k = sum(x + 1 for x in ranks)  # every leaf is base * (rank + 1): the sum is base * k
    tree = {
        "vecs": [torch.tensor([2.0, 3.0]) * (r + 1), torch.tensor(5.0) * (r + 1)],
        "deep": {"col": torch.tensor([[7.0], [11.0]]) * (r + 1), "num": 13.0 * (r + 1)},
        "pair": (torch.tensor([17, 19]) * (r + 1), 23 * (r + 1), torch.tensor(29) * (r + 1)),
    }
    got = devlayer.all_reduce(tree, op="sum")
    assert got["vecs"][0].tolist() == [2.0 * k, 3.0 * k] and got["vecs"][1].item() == 5.0 * k
    assert got["deep"]["col"].tolist() == [[7.0 * k], [11.0 * k]], got["deep"]["col"]
    assert got["deep"]["num"] == 13.0 * k
    assert got["pair"][0].tolist() == [17 * k, 19 * k] and got["pair"][1] == 23 * k
    assert got["pair"][2].item() == 29 * k and got["pair"][2] is tree["pair"][2]
    # 0-d tensors and numbers in one float64 group (the stacked write-back).
    f64 = torch.float64
    scalars64 = {f"s{p}": torch.tensor(float(p) * (r + 1), dtype=f64) for p in (31, 37, 41)}
    got = devlayer.all_reduce({**scalars64, "n": 43.0 * (r + 1)}, op="sum")
    assert [got[f"s{p}"].item() for p in (31, 37, 41)] == [31.0 * k, 37.0 * k, 41.0 * k]
    assert got["n"] == 43.0 * k

    assert devlayer.all_reduce(r, op="max") == n - 1
    assert devlayer.all_reduce(3, op="sum") == 3 * n

    uneven = devlayer.all_gather(torch.arange(r + 1, dtype=torch.float32).reshape(-1, 1))
    assert [p.reshape(-1).tolist() for p in uneven] == [
        list(map(float, range(x + 1))) for x in ranks
    ]
    same = devlayer.all_gather(torch.tensor([r, r]), same_shape=True)
    assert [p.tolist() for p in same] == [[x, x] for x in ranks]
    assert devlayer.all_gather(r * 1.5) == [x * 1.5 for x in ranks]
    assert devlayer.all_gather(r) == ranks

    src = n - 1
    b = devlayer.broadcast(torch.full((3,), float(r)), src=src)
    assert b.tolist() == [float(src)] * 3
    tree = devlayer.broadcast({"seed": 100 + r, "lr": 0.1 * r, "w": torch.tensor([r, r])}, src=src)
    assert tree["seed"] == 100 + src and tree["w"].tolist() == [src, src]
    assert abs(tree["lr"] - 0.1 * src) < 1e-12

    objs = devlayer.all_gather_object({"rank": r, "name": f"r{r}"})
    assert objs == [{"rank": x, "name": f"r{x}"} for x in ranks]
    assert devlayer.broadcast_object(["from", r], src=0) == ["from", 0]

    devlayer.barrier(timeout=30)
    st = devlayer.state()
    return {
        "rank": r,
        "world_size": n,
        "local_rank": st.local_rank,
        "launcher": st.process.launcher,
        "comm": st.comm,
        "env_rank": __import__("os").environ.get("RANK"),
    }


if __name__ == "__main__":
    with devlayer.init(timeout=float(sys.argv[1]) if len(sys.argv) > 1 else 60):
        summary = check()
    print("RESULT " + json.dumps(summary), flush=True)
