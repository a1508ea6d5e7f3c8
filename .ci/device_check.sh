#!/usr/bin/env bash
# The checks that need the lent GPU machine, as one prepared call (docs/testing.md, "Real-GPU
# tests"). Two steps:
#
#   bash .ci/device_check.sh prep     # here: wheels the device lacks, into .device/ (ignored)
#   bash .ci/device_check.sh run      # there, in one `run` call with carry [".device"]
#
# The device image has its own python3 with a CUDA build of torch, pytest and
# pytest-timeout, but no internet: devlayer and python-hostlist travel as wheels. `run`
# writes everything under $OUT (or .device/out): the environment, `pytest -m gpu`, and the
# ledger benchmark on gloo at 1 MiB and 4 B (issue 22: a machine with more cores than ranks).
# CHUNKS (default 100) sets the benchmark's chunks; SKIP_BENCH=1 leaves it out.
set -uo pipefail
cd "$(dirname "$0")/.."

prep() {
    set -e
    rm -rf .device/wheels && mkdir -p .device/wheels
    grep -qx "/.device/" .git/info/exclude 2>/dev/null || echo "/.device/" >>.git/info/exclude
    python3 -m pip wheel -q --no-deps -w .device/wheels . "python-hostlist>=1.23"
    ls -l .device/wheels
}

run() {
    local out="${OUT:-.device/out}" py="${PYTHON:-python3}" chunks="${CHUNKS:-100}"
    mkdir -p "$out"
    {
        date -u
        nvidia-smi -L || true
        "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'gpus', torch.cuda.device_count())"
        nproc
    } >"$out/env.txt" 2>&1
    "$py" -m pip install -q --no-deps --no-index .device/wheels/*.whl >"$out/install.txt" 2>&1
    echo "pip install: $?" >>"$out/install.txt"
    # Tests and benchmarks run from this folder, whose devlayer/ shadows the installed one;
    # an install maps backends/ to devlayer.backends, so the copy gets a link for the run.
    if [ ! -e devlayer/backends ]; then
        ln -s ../backends devlayer/backends
        trap 'rm -f devlayer/backends' EXIT
    fi
    # Only the files that hold gpu tests: collecting the rest needs the dev extras.
    mapfile -t files < <(grep -rlE "pytest\.mark\.gpu" tests --include="test_*.py" | sort)
    timeout 300 "$py" -m pytest -m gpu -q -p no:cacheprovider --timeout 120 "${files[@]}" \
        >"$out/pytest_gpu.txt" 2>&1
    echo "pytest -m gpu: exit $?" | tee -a "$out/pytest_gpu.txt"
    tail -5 "$out/pytest_gpu.txt"
    if [ "${SKIP_BENCH:-0}" != 1 ]; then
        local torchrun=("$py" -m torch.distributed.run --standalone --nproc-per-node=2)
        for size in 1048576 4; do
            OMP_NUM_THREADS=1 timeout 400 "${torchrun[@]}" -m benchmarks.ledger \
                --skip 1,2,3,5 --sizes "$size" --no-float \
                --arms ledger_on,ledger_off_again,spin --chunks "$chunks" \
                >"$out/ledger_$size.txt" 2>&1
            echo "ledger $size: exit $?" | tee -a "$out/ledger_$size.txt"
            grep -E "^\| (1 MiB|4 B) " "$out/ledger_$size.txt" || tail -3 "$out/ledger_$size.txt"
        done
    fi
}

case "${1:-}" in
prep) prep ;;
run) run ;;
*)
    echo "usage: bash .ci/device_check.sh prep|run" >&2
    exit 2
    ;;
esac
