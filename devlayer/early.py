"""Apply ``DEVLAYER_DEVICES`` to the vendor visibility variables at import time.

For scripts that cannot call ``devlayer.init()`` before something touches the GPU (a
library that initializes CUDA on import, say), put this first::

    import devlayer.early  # noqa: F401  (must come before torch and friends)

It reads ``DEVLAYER_DEVICES`` (and ``DEVLAYER_BACKEND`` to know the vendor) and narrows the
visibility variable(s) right away, without importing torch: the first of each backend's
``visibility_vars``. With no ``DEVLAYER_BACKEND`` it narrows every backend's, e.g.
``CUDA_VISIBLE_DEVICES`` (honoured by CUDA and ROCm) and ``ZE_AFFINITY_MASK`` (Intel),
which cannot both name real devices on one machine. It marks what it did in
``DEVLAYER_VISIBILITY_APPLIED`` so that ``init()`` (and child processes) do not narrow the
relative indices a second time. Importing it when ``DEVLAYER_DEVICES`` is unset does nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from devlayer.config import Settings
from devlayer.devices import (
    APPLIED_MARKER,
    MAX_DEVICE_COUNT,
    applied_entries,
    narrow_visibility,
    selected_indices,
)
from devlayer.errors import DeviceError, DevlayerError
from devlayer.registry import get_backend, registered_backends

__all__ = ["apply"]


def _early_vars(backend: str | None) -> tuple[str, ...]:
    """The variable each backend narrows first (its class facts: no torch, no runtime)."""
    if backend is None:
        found = list(registered_backends().values())
    else:
        try:
            found = [get_backend(backend, origin="DEVLAYER_BACKEND")]
        except DevlayerError:  # init() reports an unknown name; nothing to narrow here
            return ()
    return tuple(dict.fromkeys(b.visibility_vars[0] for b in found if b.visibility_vars))


def apply(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Narrow visibility variables in ``env`` (default ``os.environ``) from DEVLAYER_DEVICES.

    Returns:
        The variables that were set, with their new values.
    """
    env = os.environ if env is None else env
    settings = Settings.from_env(env, ("devices", "backend"))
    spec = settings.devices
    if isinstance(spec, int) and spec > MAX_DEVICE_COUNT:  # before any list is built
        raise DeviceError(
            f"DEVLAYER_DEVICES={spec} asks for a count of {spec} devices; no node has more "
            f"than {MAX_DEVICE_COUNT}: use 'auto' for all of them or a smaller count"
        )
    indices = selected_indices(spec)
    if indices is None:
        return {}
    names = _early_vars(settings.backend)
    done: dict[str, str] = {}
    marker = ",".join(map(str, indices))
    for var in names:
        if f"{var}={marker}" in applied_entries(env):
            continue
        if len(names) > 1 and var in env and not env[var].strip():
            continue  # that vendor's devices are hidden on purpose; leave them hidden
        done[var] = narrow_visibility(env.get(var), indices)
    env.update(done)
    if done:
        # init() compares against the variable of the backend it selects.
        env[APPLIED_MARKER] = ";".join(f"{var}={marker}" for var in done)
    return done


apply()
