"""``import devlayer.early`` applies DEVLAYER_DEVICES before torch is imported."""

from __future__ import annotations

import pytest

import devlayer
from devlayer.early import apply
from devlayer.testing import simulate
from tests.helpers import run_py, subprocess_env


def test_apply_without_devices_does_nothing():
    env: dict[str, str] = {}
    assert apply(env) == {} and env == {}


def test_apply_narrows_every_vendor_when_backend_unknown():
    env = {"DEVLAYER_DEVICES": "1,3", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    done = apply(env)
    assert done == {"CUDA_VISIBLE_DEVICES": "5,7", "ZE_AFFINITY_MASK": "1,3"}
    assert env["DEVLAYER_VISIBILITY_APPLIED"] == "CUDA_VISIBLE_DEVICES=1,3;ZE_AFFINITY_MASK=1,3"


def test_apply_only_the_named_backend():
    env = {"DEVLAYER_DEVICES": "[2]", "DEVLAYER_BACKEND": "xpu"}
    assert apply(env) == {"ZE_AFFINITY_MASK": "2"}
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_apply_is_idempotent_in_a_process_tree():
    env = {"DEVLAYER_DEVICES": "1", "DEVLAYER_BACKEND": "cuda"}
    assert apply(env) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert apply(env) == {}  # a child re-importing devlayer.early does not narrow twice
    assert env["CUDA_VISIBLE_DEVICES"] == "0"


def test_apply_keeps_hidden_vendor_hidden():
    env = {"DEVLAYER_DEVICES": "[0]", "CUDA_VISIBLE_DEVICES": ""}
    assert apply(env) == {"ZE_AFFINITY_MASK": "0"}
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_apply_rejects_a_bad_spec():
    with pytest.raises(devlayer.errors.DeviceError, match="DEVLAYER_DEVICES="):
        apply({"DEVLAYER_DEVICES": "0,0"})


def test_import_early_sets_visibility_before_torch():
    code = (
        "import sys, os; import devlayer.early; "
        "assert 'torch' not in sys.modules; "
        "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['DEVLAYER_VISIBILITY_APPLIED'])"
    )
    proc = run_py(["-c", code], env=subprocess_env(DEVLAYER_DEVICES="1,2", DEVLAYER_BACKEND="cuda"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1,2", "CUDA_VISIBLE_DEVICES=1,2"]


@pytest.mark.simulated
def test_simulated_init_after_early_does_not_narrow_twice(clean_env):
    clean_env.setenv("DEVLAYER_DEVICES", "1,3")
    clean_env.setenv("DEVLAYER_BACKEND", "cuda")
    env: dict[str, str] = {"DEVLAYER_DEVICES": "1,3", "DEVLAYER_BACKEND": "cuda"}
    apply(env)
    for key in ("CUDA_VISIBLE_DEVICES", "DEVLAYER_VISIBILITY_APPLIED"):
        clean_env.setenv(key, env[key])
    # initialized=True: a library already started CUDA, which is fine after devlayer.early
    with simulate("cuda", 4, initialized=True) as fake, devlayer.init() as st:
        assert st.visibility == ("CUDA_VISIBLE_DEVICES", "1,3")
        assert fake.current == 0
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3"


def test_early_refuses_a_huge_count_before_building_any_list():
    """DEVLAYER_DEVICES=1000000000 with import devlayer.early: a short error, not an OOM."""
    from devlayer.devices import MAX_DEVICE_COUNT
    from devlayer.early import apply

    env = {"DEVLAYER_DEVICES": "1000000000"}
    with pytest.raises(devlayer.errors.DeviceError) as err:
        apply(env)
    assert "1000000000" in str(err.value) and str(MAX_DEVICE_COUNT) in str(err.value)
    assert len(str(err.value)) < 300
    assert "CUDA_VISIBLE_DEVICES" not in env
