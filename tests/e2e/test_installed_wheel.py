"""What users install: the wheel and sdist built from this checkout, used without the checkout.

The wheel is installed into a scratch virtual environment (torch comes from the test's own
environment through a path entry, not from the checkout), and every command runs from a
folder outside the checkout with no PYTHONPATH to it. ``devlayer.__file__`` proves which copy
ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, rank_results

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _source_modules() -> set[str]:
    """Files a user must get, as paths inside the installed ``devlayer`` package."""
    found = {f"devlayer/{p.relative_to(ROOT / 'devlayer').as_posix()}"
             for p in (ROOT / "devlayer").rglob("*.py")}  # fmt: skip
    found |= {f"devlayer/backends/{p.name}" for p in (ROOT / "backends").glob("*.py")}
    found.add("devlayer/py.typed")
    return {f for f in found if "__pycache__" not in f}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheel = next(out.glob("devlayer-*.whl"))
    sdist = next(out.glob("devlayer-*.tar.gz"))
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.timeout(360)
def test_wheel_and_sdist_contain_every_module(built):
    expected = _source_modules()
    with zipfile.ZipFile(built["wheel"]) as whl:
        in_wheel = {n for n in whl.namelist() if n.startswith("devlayer/")}
    assert expected - in_wheel == set(), f"missing from the wheel: {sorted(expected - in_wheel)}"
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    # the sdist keeps the source layout: devlayer/... and the top-level backends/
    in_sdist = {n if not n.startswith("backends/") else f"devlayer/{n}" for n in names}
    assert expected - in_sdist == set(), f"missing from the sdist: {sorted(expected - in_sdist)}"
    assert "devlayer/train/trainer.py" in in_wheel  # the module a hand-kept list once missed


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A scratch venv holding only the wheel; torch etc. through a .pth to our site-packages."""
    base = tmp_path_factory.mktemp("user")
    venv = base / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    # A plain path line: the .pth files over there (our editable install's finder among
    # them) are not run, so the only devlayer this interpreter can import is the wheel's.
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "-q",
            str(built["wheel"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    work = base / "work"
    work.mkdir()
    return {"python": py, "bin": venv / "bin", "site": site, "work": work}


def _user_env(installed: dict[str, Path]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith(("DEVLAYER_", "RANK", "WORLD_SIZE", "MASTER_"))
    }
    env["PATH"] = f"{installed['bin']}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(installed: dict[str, Path], args: list[str], timeout: float = 240) -> str:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout,
        env=_user_env(installed), cwd=installed["work"],
    )  # fmt: skip
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(600)
def test_installed_wheel_info_quickstart_and_trainer_resume(installed):
    site = str(installed["site"])
    where = _run(
        installed,
        [
            str(installed["python"]),
            "-c",
            "import devlayer, sys; print(devlayer.__file__); "
            "print(devlayer.Trainer.__module__, devlayer.launchers.detect({}).launcher); "
            "print('torch' in sys.modules)",
        ],
    ).split()
    assert where[0].startswith(site), where
    assert where[1:] == ["devlayer.train.trainer", "none", "True"]

    info = json.loads(_run(installed, [str(installed["bin"] / "devlayer"), "info", "--json"]))
    assert info["selected"]["name"] == "cpu" and info["launcher"]["name"] == "none", info

    # examples/quickstart.py, copied out of the checkout, under torchrun with 2 ranks
    script = installed["work"] / "quickstart.py"
    script.write_text(
        "import devlayer, os\n"
        "os.write(1, ('FILE ' + devlayer.__file__ + '\\n').encode())\n"
        + (ROOT / "examples" / "quickstart.py").read_text()
    )
    torchrun = [str(installed["python"]), "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2"]  # fmt: skip
    out = _run(installed, [*torchrun, str(script)])
    files = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("FILE ")]
    assert len(files) == 2 and all(f.startswith(site) for f in files), out
    assert "2 rank(s) on cpu" in out

    # a 2-rank Trainer run with checkpoints, then a resume, through the installed package
    job = installed["work"] / "job.py"
    job.write_text((ROOT / "tests" / "launchers" / "job.py").read_text())
    ckpt = installed["work"] / "ckpt"
    train = [*torchrun, str(job), "train", str(ckpt), "--epochs"]
    first = rank_results(_run(installed, [*train, "1"]))
    assert [r["step"] for r in first] == [6, 6]
    assert all(r["file"].startswith(site) for r in first)
    again = rank_results(_run(installed, [*train, "2"]))
    assert [r["step"] for r in again] == [12, 12]
    assert all(r["resumed_from"] and r["resumed_from"].endswith("6") for r in again), again
    assert len({r["checksum"] for r in again}) == 1


def test_public_submodules_are_attributes_without_importing_torch():
    code = (
        "import sys, devlayer\n"
        "mods = ['launchers', 'devices', 'errors', 'early']\n"
        "for m in mods: getattr(devlayer, m)\n"
        "assert devlayer.launchers.detect({}).launcher == 'none'\n"
        "print('torch' in sys.modules)\n"
        "assert devlayer.backends.__name__ == 'devlayer.backends'\n"
        "assert devlayer.train.Trainer is devlayer.Trainer\n"
        "assert devlayer.testing.free_port() > 0\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVLAYER_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "ok"]
