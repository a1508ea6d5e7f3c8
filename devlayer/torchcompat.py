"""Which torch releases devlayer accepts, and the advisories it knows for those it accepts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from devlayer.errors import DevlayerError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MIN_TORCH",
    "TORCH_ADVISORIES",
    "check_torch_version",
    "float_dtype",
    "torch_advisories",
]


MIN_TORCH = (2, 6)


def check_torch_version(version: str | None = None) -> None:
    """Refuse torch older than 2.6, whose ``torch.load`` is unsafe by default.

    Raises:
        DevlayerError: Naming the version found and the fix.
    """
    from packaging.version import Version

    if version is None:
        import torch

        version = torch.__version__
    release = Version(version).release
    if tuple(release[:2]) < MIN_TORCH:
        raise DevlayerError(
            f"torch {version} is too old: devlayer needs torch >= 2.6, where torch.load defaults "
            f"to weights_only=True (older releases can run code from checkpoint files); "
            f"upgrade with `pip install 'torch>=2.6'`"
        )


#: Published advisories for torch releases devlayer still accepts (>= 2.6), as
#: (first affected, first fixed, id, what). docs/security.md lists the same.
#: torch < 2.6 is refused outright (CVE-2025-32434: code execution through torch.load even
#: with weights_only=True).
TORCH_ADVISORIES = (
    ("2.6.0", "2.7.0", "CVE-2025-3730", "denial of service in ctc_loss"),
    ("0", "2.9.1", "CVE-2025-2999", "memory corruption in unpack_sequence"),
    ("0", "2.10.0", "CVE-2025-3001", "memory corruption in lstm_cell"),
)


def torch_advisories(version: str) -> list[str]:
    """Known advisories that apply to torch ``version`` (one sentence each).

    Example:
        >>> torch_advisories("2.13.0")
        []
        >>> [a.split(":")[0] for a in torch_advisories("2.8.0")]
        ['CVE-2025-2999', 'CVE-2025-3001']
    """
    from packaging.version import Version

    v = Version(Version(version).base_version)
    return [
        f"{cve}: {what} (torch {first}..<{fixed}); upgrade to torch >= {fixed}"
        for first, fixed, cve, what in TORCH_ADVISORIES
        if Version(first) <= v < Version(fixed)
    ]


def float_dtype(device: torch.device) -> torch.dtype:
    """The dtype for Python floats on ``device``: float64, or float32 where torch has none.

    Asked of torch by allocating an empty float64 tensor there, so no vendor is named:
    MPS refuses float64 with a TypeError ("the MPS framework doesn't support float64").
    A device torch cannot reach here (a simulated one) keeps float64.

    Example:
        >>> import torch
        >>> float_dtype(torch.device("cpu"))
        torch.float64
    """
    import torch

    if device.type == "cpu":
        return torch.float64
    try:
        torch.empty(0, dtype=torch.float64, device=device)
    except TypeError:
        return torch.float32
    except Exception:  # not reachable here (simulated): no dtype fact to learn
        return torch.float64
    return torch.float64
