"""`devlayer bench` starts its own ranks and prints nccl-tests-style numbers."""

from __future__ import annotations

import json

import pytest

from devlayer.cli.bench import bus_factor, parse_size
from tests.helpers import run_py

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_bench_json_two_ranks():
    proc = run_py(
        [
            "-m",
            "devlayer",
            "bench",
            "--nproc",
            "2",
            "--sizes",
            "4,1K",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--json",
        ],
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (doc,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert doc["schema"] == 1 and doc["world_size"] == 2 and doc["comm"] == "gloo"
    assert [r["bytes"] for r in doc["results"]] == [4, 1024]
    for r in doc["results"]:
        assert r["time_us"] > 0 and r["busbw_GBps"] == pytest.approx(r["algbw_GBps"])


def test_bench_table_world_one_all_gather():
    proc = run_py(
        ["-m", "devlayer", "bench", "--op", "all_gather", "--sizes", "4K", "--iters", "2"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "algbw (GB/s)" in proc.stdout and "4096" in proc.stdout


def test_sizes_and_bus_factors():
    assert parse_size("64MiB") == 64 * 1024**2 and parse_size("1k") == 1024
    assert bus_factor("all_reduce", 4) == 1.5 and bus_factor("all_gather", 4) == 0.75
    assert bus_factor("broadcast", 8) == 1.0
    with pytest.raises(ValueError, match="'12Q'"):
        parse_size("12Q")
