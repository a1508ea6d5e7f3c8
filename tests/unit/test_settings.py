"""The settings object: every ``DEVLAYER_*`` variable init() and the collectives use, parsed
once from a plain mapping (issue 21, item 4; STYLE.md section 4c)."""

from __future__ import annotations

from dataclasses import fields
from datetime import timedelta

import pytest

import devlayer
from devlayer.config import DEFAULT_TIMEOUT, Settings
from devlayer.errors import DevlayerError
from devlayer.testing import simulate

#: field, variable, text, parsed value, default, bad text (None: every text is accepted here).
CASES = [
    ("backend", "DEVLAYER_BACKEND", " xpu ", "xpu", None, None),
    ("devices", "DEVLAYER_DEVICES", "1,3", (1, 3), None, "1,1"),
    ("timeout", "DEVLAYER_TIMEOUT", "30", timedelta(seconds=30), DEFAULT_TIMEOUT, "soon"),
    ("comm", "DEVLAYER_COMM", " GLOO ", "gloo", None, None),
    ("set_default_device", "DEVLAYER_SET_DEFAULT_DEVICE", "0", False, None, "maybe"),
    ("accelerator_hooks", "DEVLAYER_ACCELERATOR_HOOKS", "a:b, c:d,", ("a:b", "c:d"), (), None),
    ("allow_shared_devices", "DEVLAYER_ALLOW_SHARED_DEVICES", "yes", True, False, "2"),
    ("debug", "DEVLAYER_DEBUG", "1", True, False, "maybe"),
    ("simulate", "DEVLAYER_SIMULATE", " cuda:4 ", "cuda:4", None, None),
    ("hang_dir", "DEVLAYER_HANG_DIR", " /scratch/hangs ", "/scratch/hangs", None, None),
    ("hang_reports", "DEVLAYER_HANG_REPORTS", "0", False, True, "maybe"),
    ("watchdog", "DEVLAYER_WATCHDOG", "90", 90.0, None, "soon"),
    ("peer_watch", "DEVLAYER_PEER_WATCH", "off", False, True, "later"),
    ("ddp_ledger", "DEVLAYER_DDP_LEDGER", "0", False, True, "maybe"),
    ("progress_interval", "DEVLAYER_PROGRESS_INTERVAL", " 2.5 ", 2.5, 30.0, "soon"),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("name", "variable", "text", "value", "default", "bad"), CASES, ids=IDS)
def test_a21_s1_each_setting_is_parsed_from_a_plain_mapping(
    name: str, variable: str, text: str, value: object, default: object, bad: str | None
) -> None:
    """A21-S1: each DEVLAYER_* setting, from a plain dict: the parsed value and the variable
    as its origin; unset or blank: the default, origin "default"; a bad value raises a
    DevlayerError naming the variable and the value."""
    got = Settings.from_env({variable: text})
    assert getattr(got, name) == value
    assert got.origin(name) == variable
    for empty in ({}, {variable: "  "}):
        unset = Settings.from_env(empty)
        assert getattr(unset, name) == default
        assert unset.origin(name) == "default"
    if bad is not None:
        with pytest.raises(DevlayerError, match=f"{variable}={bad!r}"):
            Settings.from_env({variable: bad})


def test_a21_s1_every_field_has_a_case_and_a_variable() -> None:
    """A21-S1: the table above covers every field of Settings, and every field has its own
    DEVLAYER_* variable (a new setting without a test or a variable fails here)."""
    assert set(IDS) == {f.name for f in fields(Settings)} - {"origins"}
    assert Settings.variables() == {case[0]: case[1] for case in CASES}


def test_a21_s1_only_the_named_settings_are_read() -> None:
    """A21-S1: from_env(env, names) parses only those: a bad DEVLAYER_TIMEOUT does not stop a
    reader of DEVLAYER_SIMULATE (the simulation), and the others keep their defaults."""
    env = {"DEVLAYER_TIMEOUT": "soon", "DEVLAYER_SIMULATE": "cuda:2"}
    got = Settings.from_env(env, ("simulate",))
    assert got.simulate == "cuda:2" and got.timeout == DEFAULT_TIMEOUT
    assert got.origin("timeout") == "default"
    with pytest.raises(DevlayerError, match="DEVLAYER_TIMEOUT='soon'"):
        Settings.from_env(env)
    with pytest.raises(DevlayerError, match="'nope'"):
        Settings.from_env(env, ("nope",))


def test_a21_s2_an_argument_wins_over_its_variable_and_is_normalised_alike() -> None:
    """A21-S2: given(name, value) normalises an argument as the variable's text is normalised
    ("1,3" = [1, 3], 30 = timedelta(seconds=30), "GLOO" = "gloo"), records the argument as
    the origin, and None keeps the variable's value."""
    env = Settings.from_env({"DEVLAYER_DEVICES": "1,3", "DEVLAYER_COMM": "gloo"})
    from_arg = Settings.from_env({}).given("devices", [1, 3]).given("comm", "GLOO")
    assert (from_arg.devices, from_arg.comm) == (env.devices, env.comm)
    assert from_arg.origin("devices") == "devices"
    kept = env.given("devices", None).given("timeout", 30)
    assert kept.devices == (1, 3) and kept.origin("devices") == "DEVLAYER_DEVICES"
    assert kept.timeout == timedelta(seconds=30) and kept.origin("timeout") == "timeout"
    assert env.given("devices", "0,", origin="--devices").origin("devices") == "--devices"
    with pytest.raises(DevlayerError, match=r"--devices='x'"):
        env.given("devices", "x", origin="--devices")
    with pytest.raises(DevlayerError, match=r"timeout='30'"):  # text only from variables
        env.given("timeout", "30")


@pytest.mark.simulated
def test_a21_s3_the_default_device_setting_given_two_ways_is_one_request(sim):
    """A21-S3: DEVLAYER_SET_DEFAULT_DEVICE=0 then init(set_default_device=False) is the same
    request as init() (was: "already called with different arguments"); True is refused."""
    sim.setenv("DEVLAYER_SET_DEFAULT_DEVICE", "0")
    with simulate("cuda", 2):
        st = devlayer.init(backend="cuda")
        try:
            assert devlayer.init(backend="cuda", set_default_device=False) is st
            with pytest.raises(DevlayerError, match="set_default_device=True"):
                devlayer.init(backend="cuda", set_default_device=True)
        finally:
            devlayer.shutdown()


def test_a21_s3_init_keeps_the_settings_it_read(clean_env):
    """A21-S3: the State keeps the Settings init() read (with their origins), so the
    collectives read DEVLAYER_DEBUG from there instead of the environment."""
    clean_env.setenv("DEVLAYER_DEBUG", "1")
    with devlayer.init(backend="cpu", timeout=30) as st:
        assert st.settings.debug is True and st.settings.origin("debug") == "DEVLAYER_DEBUG"
        assert st.settings.timeout == timedelta(seconds=30)
        assert st.settings.origin("timeout") == "timeout"


def test_a21_s1_the_readme_table_lists_every_setting() -> None:
    """A21-S1: the table of variables (docs/environment.md, once README's) has a row for
    every setting, naming its field."""
    from tests.helpers import ROOT

    readme = (ROOT / "docs" / "environment.md").read_text()
    missing = [
        f"{variable} ({name})"
        for name, variable in Settings.variables().items()
        if f"| `{variable}` | `{name}`: " not in readme
    ]
    assert not missing, missing
