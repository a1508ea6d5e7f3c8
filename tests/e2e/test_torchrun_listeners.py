"""What listens where under ``torchrun --standalone`` (issue 14, item 11; docs/reliability.md).

torchrun's own agent hosts the workers' store and binds every interface; that is torch's
behaviour, not devlayer's, and is documented with the alternative (``devlayer launch``,
whose loopback-only store is proved by tests/e2e/test_launch.py). This test keeps the
documented claim true: if a torch release changes it, the docs need to change too.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.helpers import run_py, subprocess_env, torchrun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

_WORKER = (
    "import json, os\n"
    "from tests.helpers import listening_addresses\n"
    "print('LISTENERS ' + json.dumps(listening_addresses(int(os.environ['MASTER_PORT']))))\n"
)

#: /proc/net spelling of the wildcard addresses (0.0.0.0 and ::).
_WILDCARDS = {"00000000", "00000000000000000000000000000000"}


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net")
def test_torchrun_standalone_agent_store_listens_on_every_interface(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    proc = run_py(torchrun(str(script), nproc=1)[1:], env=subprocess_env(), timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"LISTENERS (\[.*\])", proc.stdout)
    assert found, proc.stdout
    listeners = set(json.loads(found.group(1)))
    assert listeners and listeners <= _WILDCARDS, listeners
