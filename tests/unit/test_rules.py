"""Project rules kept as tests so they cannot regress (STYLE.md sections 1, 5 and 11)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, longest_functions_tool, subprocess_env

#: Vendor APIs in code: torch's vendor modules (their private ``torch._C._cuda_*`` bindings
#: too), IPEX and oneCCL; ``_`` separates name parts (``_ipex``, ``ipex_optimize``).
VENDOR_APIS = re.compile(
    r"torch\.(_C\._)?(cuda|xpu|mps|backends\.mps)(?![a-zA-Z0-9])|intel_extension_for_pytorch|"
    r"oneccl_bindings|(?<![a-zA-Z0-9])ipex(?![a-zA-Z0-9])"
)


def _python_files(*folders: str) -> list[Path]:
    return [p for f in folders for p in (ROOT / f).rglob("*.py")]


def test_import_devlayer_is_light():
    code = (
        "import sys, os; before = dict(os.environ); import devlayer; "
        "heavy = [m for m in ('torch', 'numpy', 'devlayer.backends.cuda', 'devlayer.lifecycle',"
        " 'devlayer.registry') if m in sys.modules]; "
        "assert not heavy, heavy; assert dict(os.environ) == before, 'env changed'; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _code_lines(path: Path) -> dict[int, str]:
    """Each line's code with string literals and comments removed (docs may name vendors)."""
    kept: dict[int, list[str]] = {}
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.STRING, tokenize.COMMENT, tokenize.ENCODING):
                continue
            if sys.version_info >= (3, 12) and tok.type in (
                tokenize.FSTRING_START,
                tokenize.FSTRING_MIDDLE,
                tokenize.FSTRING_END,
            ):
                continue
            kept.setdefault(tok.start[0], []).append(tok.string)
    return {n: " ".join(parts) for n, parts in kept.items()}


def test_only_backends_touch_vendor_apis():
    offenders = []
    for path in _python_files("devlayer", "examples", "benchmarks"):
        lines = path.read_text().splitlines()
        for n, code in _code_lines(path).items():
            if VENDOR_APIS.search(code.replace(" . ", ".")):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {lines[n - 1].strip()}")
    assert not offenders, "vendor APIs outside backends/:\n" + "\n".join(offenders)


def test_vendor_api_rule_catches_code_not_docs(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        '"""Mentions torch.cuda in a docstring."""\n'
        "x = 'optimize=\"ipex\"'  # torch.xpu in a comment\n"
        "n = torch.cuda.device_count()\n"
        "import intel_extension_for_pytorch as ipex\n"
        "m = torch._C._cuda_getDeviceCount()\n"
        "from devlayer.backends import _ipex\n"
        "y = torch.cudart, torch.mpsx, pipex\n"
    )
    hits = [
        n for n, code in _code_lines(src).items() if VENDOR_APIS.search(code.replace(" . ", "."))
    ]
    assert hits == [3, 4, 5, 6]


#: Vendor names as they appear in code: device types, comm backends and libraries, and the
#: parts of the vendors' variable names. ``_`` separates parts here (``NCCL_SOCKET_IFNAME``,
#: ``TORCH_XCCL_*``, ``ZE_AFFINITY_MASK``, ``PYTORCH_CUDA_ALLOC_CONF``), where ``\b`` would not.
VENDOR_LITERALS = re.compile(
    r"(?<![a-z0-9])(cuda|xpu|mps|rocm|rocr|hip|nccl|rccl|xccl|ccl|oneccl|ipex|ze|oneapi|sycl)"
    r"(?![a-z0-9])",
    re.IGNORECASE,
)

#: The named places outside backends/ that may spell a vendor: (file, top-level name of an
#: assignment or a function), each with its reason.
VENDOR_LITERAL_ALLOWED = {
    # The documented list of built-in backends (one line per vendor).
    ("devlayer/registry.py", "BUILTINS"),
}


def _nodes_named(tree: ast.Module, names: set[str]) -> set[int]:
    """``id()`` of every node in the top-level assignments to, or definitions of, a name in
    ``names``."""
    skip: set[int] = set()
    for stmt in tree.body:
        targets = getattr(stmt, "targets", None) or [getattr(stmt, "target", None)]
        named = getattr(stmt, "name", None) in names and isinstance(stmt, ast.FunctionDef)
        if named or any(isinstance(t, ast.Name) and t.id in names for t in targets):
            skip.update(id(n) for n in ast.walk(stmt))
    return skip


def _vendor_literals(
    path: Path, allowed: set[str] = frozenset(), pattern: re.Pattern[str] | None = VENDOR_LITERALS
) -> list[tuple[int, str]]:
    """``(line, text)`` of string constants naming a vendor (matching ``pattern``; ``None``:
    every one), outside docstrings and outside the top-level assignments and functions named
    in ``allowed``."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _nodes_named(tree, set(allowed))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            skip.add(id(body[0].value))  # a docstring: documentation may name vendors
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skip
        and (pattern is None or pattern.search(node.value))
    ]


def test_no_vendor_literals_outside_backends():
    """Adding a vendor is one file in backends/ and one BUILTINS line: nothing else in the
    library spells "cuda", "nccl", "CUDA_VISIBLE_DEVICES" or "mps" (issue 15)."""
    offenders = []
    for path in _python_files("devlayer"):
        rel = path.relative_to(ROOT).as_posix()
        allowed = {name for file, name in VENDOR_LITERAL_ALLOWED if file == rel}
        offenders += [f"{rel}:{n}: {text[:80]!r}" for n, text in _vendor_literals(path, allowed)]
    assert not offenders, "vendor literals outside backends/:\n" + "\n".join(offenders)


def test_vendor_literal_rule_catches_code_not_docs(tmp_path: Path) -> None:
    """Vendor names in string constants are found, underscored variable names included
    (``NCCL_*``, ``TORCH_NCCL_*``, ``TORCH_XCCL_*``, ``CCL_*``), but not in docstrings,
    comments, the allowed tables and functions, or inside other words (``dumps``, ``size``)."""
    src = tmp_path / "m.py"
    src.write_text(
        '"""Docs may say cuda and CUDA_VISIBLE_DEVICES."""\n'
        "TABLE = {'cuda': 'nccl'}\n"
        "ALLOWED = ('xpu',)\n"
        "def f(t):\n"
        '    """On mps too."""\n'
        "    return 'float32' if t == 'mps' else f'{t}:gloo'  # cuda in a comment\n"
        "MSG = f'set HIP_VISIBLE_DEVICES={1}'\n"
        "OK = 'GLOO_SOCKET_IFNAME, cpu:gloo, json.dumps, the size, a zebra'\n"
        "NET = ('NCCL_SOCKET_IFNAME', 'CCL_*', 'TORCH_NCCL_ASYNC_ERROR_HANDLING')\n"
        "MORE = ('TORCH_XCCL_X', 'ZE_AFFINITY_MASK', 'PYTORCH_CUDA_ALLOC_CONF', '_ipex')\n"
        "def allowed():\n"
        "    return 'use ipex'\n"
    )
    found = sorted(n for n, _ in _vendor_literals(src, {"ALLOWED", "allowed"}))
    assert found == [2, 2, 6, 7, 9, 9, 9, 10, 10, 10, 10]


def test_vendor_files_do_not_import_each_other():
    for path in _python_files("backends"):
        text = path.read_text()
        # Vendor files stand alone; shared helpers are private modules (_ipex).
        others = {p.stem for p in (ROOT / "backends").glob("*.py")} - {path.stem}
        others = {o for o in others if not o.startswith("_")}
        for other in others:
            assert f"from .{other} " not in text and f"backends.{other}" not in text, (
                f"{path.name} imports {other}"
            )


@pytest.mark.parametrize(
    "pattern",
    [
        r"weights_only\s*=\s*False",
        r"torch\.distributed\.rpc",
        r"pickle\.loads?\(",
        r"pickle\.Unpickler|_pickle|\bdill\b|cloudpickle",
    ],
)
def test_no_unsafe_loading_in_library(pattern):
    # The exceptions: devlayer.spawn unpickles results sent by its own child processes over
    # a pipe (marked "# trusted:"), never data from disk or the network; and the sharded
    # checkpoints' MetadataUnpickler, whose find_class resolves only DCP's metadata records
    # (tests/unit/test_sharded.py proves it refuses anything else).
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _python_files("devlayer", "backends")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(pattern, line)
        and not (p.name == "multiproc.py" and "# trusted: our own child process" in line)
        and not (p.name == "sharded.py" and "class MetadataUnpickler(pickle.Unpickler)" in line)
    ]
    assert not hits, hits


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_wheel_install_maps_backends_into_devlayer(tmp_path):
    """pip install . puts backends/ at devlayer/backends (the package-dir mapping)."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr
    assert (target / "devlayer" / "backends" / "cuda.py").is_file()
    env = subprocess_env()
    env["PYTHONPATH"] = str(target)
    code = (
        "import devlayer, devlayer.backends.cpu as c; "
        f"assert devlayer.__file__.startswith({str(target)!r}), devlayer.__file__; "
        "print(sorted(devlayer.backends.registered_backends()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "'cpu', 'cuda', 'mps', 'xpu'" in run.stdout


def test_torch_version_gate_and_advisories():
    import devlayer
    from devlayer.torchcompat import check_torch_version, torch_advisories

    with pytest.raises(devlayer.DevlayerError, match=r"torch 2\.5\.1\+cu121 is too old.*>= 2\.6"):
        check_torch_version("2.5.1+cu121")
    check_torch_version("2.6.0")
    assert [a.split(":")[0] for a in torch_advisories("2.6.0")] == [
        "CVE-2025-3730",
        "CVE-2025-2999",
        "CVE-2025-3001",
    ]
    assert torch_advisories("2.9.1") == [torch_advisories("2.9.1")[0]]
    assert torch_advisories("2.10.0") == [] and torch_advisories("2.13.0+cpu") == []


def test_object_collectives_only_in_the_documented_functions():
    """Pickling collectives (they trust peers) live only in the two documented functions."""
    pattern = re.compile(
        r"\b(all_gather_object|broadcast_object_list|gather_object|"
        r"scatter_object_list|send_object_list|recv_object_list)\("
    )
    hits = []
    for path in _python_files("devlayer", "backends"):
        current = ""
        for line in path.read_text().splitlines():
            if line.startswith("def "):
                current = line.split("(")[0][4:]
            if pattern.search(line.split("#")[0]) and "dist." in line:
                hits.append((path.name, current))
    # The public functions record the call in the ledger and run these bodies (issue 22).
    assert hits and set(hits) <= {
        ("comm.py", "_all_gather_object"),
        ("comm.py", "_broadcast_object"),
    }, hits


#: Top-level tables of ``"module:attr"`` strings that are not edges: ``registry.BUILTINS``
#: names the vendor modules the registry loads on demand, as it loads entry points (a vendor
#: imports the registry, never the reverse).
STRING_TABLES_ALLOWED = {("devlayer/registry.py", "BUILTINS")}

#: A string naming a devlayer module and one of its attributes: ``"devlayer.x.y:name"``.
_TARGET = re.compile(r"(devlayer(?:\.\w+)*):(\w+)")


def _allowed_tables(path: Path, allowed: set[tuple[str, str]]) -> set[str]:
    rel = path.resolve().as_posix().removeprefix(ROOT.as_posix() + "/")
    return {name for file, name in allowed if file == rel}


def _string_imports(node: ast.AST) -> list[tuple[int, str]]:
    """The modules ``node`` imports by name: ``importlib.import_module("a.b")``, or a
    ``"devlayer.a.b:attr"`` string (gives ``devlayer.a.b`` and ``devlayer.a.b.attr``)."""
    func = getattr(node, "func", None)
    if isinstance(node, ast.Call) and "import_module" in (
        getattr(func, "attr", None),
        getattr(func, "id", None),
    ):
        first = node.args[0] if node.args else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [(node.lineno, first.value)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        match = _TARGET.fullmatch(node.value)
        if match:
            return [(node.lineno, match[1]), (node.lineno, f"{match[1]}.{match[2]}")]
    return []


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``path`` (``from a import b`` gives a.b too),
    counting imports by name (:func:`_string_imports`) outside ``STRING_TABLES_ALLOWED``."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text(), str(path))
    skip = _nodes_named(tree, _allowed_tables(path, STRING_TABLES_ALLOWED))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif id(node) not in skip:
            found += _string_imports(node)
    return found


def test_library_never_imports_its_test_helpers():
    """devlayer.testing is for users' tests; the library and the backends never import it.

    (Simulation, which the library does need, lives in devlayer.simulation; socket helpers
    in devlayer.net.)
    """
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in _python_files("devlayer", "backends")
        if path.name != "testing.py"
        for line, module in _imports(path)
        if module == "devlayer.testing" or module.startswith("devlayer.testing.")
    ]
    assert not offenders, offenders


#: The modules that may import torch.distributed, and why. Everything else goes through
#: devlayer.comm (collectives) and devlayer.lifecycle (the process group).
DIST_OWNERS = {
    "devlayer/rendezvous.py": "the TCP store",
    "devlayer/lifecycle.py": "creates and destroys the process group",
    "devlayer/comm.py": "the collectives",
    "devlayer/train/fsdp.py": "FSDP2 (fully_shard over a DeviceMesh)",
    "devlayer/train/commhooks.py": "DDP's comm hook (its bucket all_reduce, recorded)",
    "devlayer/train/sharded.py": "sharded checkpoints (torch.distributed.checkpoint)",
    "devlayer/cli/launch.py": "runs torchrun itself (torch.distributed.run)",
    "devlayer/cli/info.py": "lists the comm backends torch knows (a fact, no process group)",
    "devlayer/registry.py": "torch's device -> comm backend map (a fact, no process group)",
}


def _dist_offenders(folders: tuple[str, ...], owners: dict[str, str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in _python_files(*folders)
        if str(path.relative_to(ROOT)) not in owners
        for line, module in _imports(path)
        if module == "torch.distributed" or module.startswith("torch.distributed.")
    ]


def test_only_the_owning_modules_import_torch_distributed():
    """The Trainer and the CLI talk to other ranks through comm, not torch.distributed."""
    assert not _dist_offenders(("devlayer", "backends"), DIST_OWNERS)


def test_the_torch_distributed_rule_catches_an_offender():
    """The rule is not vacuous: without comm in the owners, comm.py is reported."""
    owners = {k: v for k, v in DIST_OWNERS.items() if k != "devlayer/comm.py"}
    assert any(o.startswith("devlayer/comm.py:") for o in _dist_offenders(("devlayer",), owners))


def test_the_rules_name_files_that_exist():
    """A rule's list of exceptions names files that are there (a stale entry hides nothing)."""
    missing = [f for f in DIST_OWNERS if not (ROOT / f).is_file()]
    missing += [f for f, _ in VENDOR_LITERAL_ALLOWED if not (ROOT / f).is_file()]
    assert not missing, missing


#: docs/architecture.md's layers, bottom up: the first part of a module's name below
#: devlayer -> its layer. A module may import its own layer and the ones below, never above.
LAYERS = {
    **dict.fromkeys(
        (
            "_version",
            "errors",
            "net",
            "torchcompat",
            "simulation",
            "tree",
            "collective_checks",
            "numbers",
            "ledger",
            "hangreport",
        ),
        0,
    ),
    # `launchers` is a package: base, precedence and one module per launcher, all layer 1.
    **dict.fromkeys(("launchers", "devices", "config", "vendor", "registry", "hooks"), 1),
    "backends": 2,
    **dict.fromkeys(
        (
            "rendezvous",
            "lifecycle",
            "comm",
            "multiproc",
            "farm",
            "early",
            "hangdump",
            "peerwatch",
        ),
        3,
    ),
    "train": 4,
    "cli": 5,
    "__main__": 5,
}

#: Outside the layers: the package's lazy table names every layer by design, and
#: devlayer.testing is for users' tests (nothing in the library imports it).
LAYERS_EXEMPT = {"devlayer/__init__.py", "devlayer/testing.py"}


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "devlayer" else None


def _own_layer(rel: str) -> int | None:
    """The layer of the file at ``rel`` (relative to the root), None when it is in none."""
    return 2 if rel.startswith("backends/") else _layer_of(rel[:-3].replace("/", "."))


def _layer_offenders(files: dict[str, Path]) -> list[str]:
    """Upward imports in ``files`` (path relative to the root -> the file to read)."""
    offenders = []
    for rel, path in files.items():
        if rel in LAYERS_EXEMPT:
            continue
        own = _own_layer(rel)
        if own is None:
            offenders.append(f"{rel}: in no layer; add it to LAYERS and docs/architecture.md")
            continue
        offenders += [
            f"{rel}:{line}: imports {module} (layer {_layer_of(module)}) from layer {own}"
            for line, module in _imports(path)
            if (_layer_of(module) or 0) > own
        ]
    return offenders


def test_the_import_rules_follow_imports_by_name(tmp_path: Path) -> None:
    """A ``"devlayer.x:attr"`` string (a lazy import) and ``importlib.import_module("...")``
    are edges too: in a layer-1 module both are reported as upward imports; a logger name
    (no ``:attr``) is not an import."""
    upward = tmp_path / "registry.py"
    upward.write_text(
        "import importlib, logging\n"
        "TABLE = {'x': 'devlayer.train.optimize:apply_optimization'}\n"
        "def f():\n"
        "    return importlib.import_module('devlayer.cli.info')\n"
        "log = logging.getLogger('devlayer.train')\n"
    )
    assert _layer_offenders({"devlayer/registry.py": upward}) == [
        "devlayer/registry.py:2: imports devlayer.train.optimize (layer 4) from layer 1",
        "devlayer/registry.py:2: imports devlayer.train.optimize.apply_optimization (layer 4) "
        "from layer 1",
        "devlayer/registry.py:4: imports devlayer.cli.info (layer 5) from layer 1",
    ]


def test_only_registry_builtins_names_vendor_modules_by_string():
    """The one allowed table of import strings is the documented built-in vendor list; with
    it the registry has no upward edge, without it its vendor modules are reported."""
    path = ROOT / "devlayer" / "registry.py"
    assert not _layer_offenders({"devlayer/registry.py": path})
    tree = ast.parse(path.read_text())
    strings = [m for node in ast.walk(tree) for _, m in _string_imports(node) if "backends" in m]
    assert "devlayer.backends.cpu" in strings


def test_no_module_imports_a_layer_above_its_own():
    """docs/architecture.md's layers, counting imports inside functions: the registry
    (layer 1) never imports the training layer, the process layer never the CLI, and a
    new module must be placed in a layer."""
    files = {p.relative_to(ROOT).as_posix(): p for p in _python_files("devlayer", "backends")}
    assert not _layer_offenders(files)


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule is not vacuous: a function-level import of devlayer.train in a layer-1
    module is reported, and so is a module in no layer."""
    upward = tmp_path / "registry.py"
    upward.write_text("def f():\n    from devlayer.train.optimize import OPTIMIZATIONS\n")
    found = _layer_offenders(
        {"devlayer/registry.py": upward, "devlayer/newthing.py": tmp_path / "registry.py"}
    )
    assert "devlayer/registry.py:2: imports devlayer.train.optimize (layer 4) from layer 1" in found
    assert any(o.startswith("devlayer/newthing.py: in no layer") for o in found), found


#: The lowest layer whose modules may import the package face ``devlayer`` (``import
#: devlayer``, ``from devlayer import init``): the training layer and the commands use "the
#: public devlayer API" (docs/architecture.md). The face's lazy names reach every layer up to
#: the Trainer, so below layer 4 a module imports the module it needs (``devlayer.lifecycle``).
FACE_FROM_LAYER = 4


def _submodule_names() -> set[str]:
    """The names ``from devlayer import name`` may take as a submodule rather than the face."""
    pkg = ROOT / "devlayer"
    names = {p.stem for p in pkg.glob("*.py")} | {p.name for p in pkg.iterdir() if p.is_dir()}
    return names | {"backends"}  # the top-level backends/ folder, installed as devlayer.backends


def _face_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, statement)`` for each import of the package face in ``path``."""
    submodules = _submodule_names()
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, "import devlayer") for a in node.names if a.name == "devlayer"]
        elif isinstance(node, ast.ImportFrom) and node.module == "devlayer" and not node.level:
            found += [
                (node.lineno, f"from devlayer import {a.name}")
                for a in node.names
                if a.name not in submodules
            ]
    return found


def _face_offenders(files: dict[str, Path]) -> list[str]:
    return [
        f"{rel}:{line}: {stmt} in layer {own}; import the module that defines it"
        for rel, path in files.items()
        if rel not in LAYERS_EXEMPT
        and (own := _own_layer(rel)) is not None
        and own < FACE_FROM_LAYER
        for line, stmt in _face_imports(path)
    ]


def test_no_module_below_the_training_layer_imports_the_package_face():
    """Layers 0-3 and the backends never ``import devlayer`` for its lazy names: the face
    resolves them from every layer (the Trainer included), which hides an upward edge from
    the layer rule. Importing a submodule (``from devlayer import devices``) is allowed."""
    files = {p.relative_to(ROOT).as_posix(): p for p in _python_files("devlayer", "backends")}
    assert not _face_offenders(files)


def test_the_face_rule_catches_a_face_import(tmp_path: Path) -> None:
    """The rule is not vacuous: ``import devlayer`` in a function and ``from devlayer import
    init`` are reported in the process layer, a submodule import is not, and the training
    layer may use the face."""
    src = tmp_path / "m.py"
    src.write_text(
        "from devlayer import devices, init\n"
        "def f():\n"
        "    import devlayer\n"
        "    import devlayer.lifecycle\n"
    )
    found = _face_offenders({"devlayer/multiproc.py": src, "devlayer/train/model.py": src})
    assert found == [
        "devlayer/multiproc.py:1: from devlayer import init in layer 3; import the module "
        "that defines it",
        "devlayer/multiproc.py:3: import devlayer in layer 3; import the module that defines it",
    ]


#: Modules of devlayer/launchers/ that are no launcher: what the launcher modules share.
LAUNCHER_SHARED = {"__init__", "base", "mpi", "precedence"}
LAUNCHER_MODULE_LINES = 200


def _launcher_module_problems(path: Path, in_precedence: set[str]) -> list[str]:
    """A launcher module defines one ``Launcher`` record, listed in PRECEDENCE, imports no
    other launcher module (only ``base`` and the shared ``mpi`` detector) and stays short."""
    tree = ast.parse(path.read_text(), str(path))
    records = [
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "id", None) == "Launcher"
        for target in node.targets
        if isinstance(target, ast.Name)
    ]
    problems = []
    if len(records) != 1:
        problems.append(f"{path.name}: {len(records)} Launcher records, expected one")
    elif f"{path.stem}.{records[0]}" not in in_precedence:
        problems.append(f"{path.name}: {records[0]} is not in launchers.PRECEDENCE")
    allowed = {f"devlayer.launchers.{m}" for m in ("base", "mpi")}
    problems += [
        f"{path.name}:{line}: imports {module}"
        for line, module in _imports(path)
        if module.startswith("devlayer.launchers.")
        and module.rsplit(".", 1)[0] not in allowed
        and module not in allowed
    ]
    lines = len(path.read_text().splitlines())
    if lines >= LAUNCHER_MODULE_LINES:
        problems.append(f"{path.name}: {lines} lines, keep a launcher under 200")
    return problems


def test_a21_l4_each_launcher_is_one_short_module_with_one_record():
    """A21-L4: every module of devlayer/launchers/ but the shared ones defines exactly one
    Launcher record, which is in PRECEDENCE, imports no other launcher module and has
    fewer than 200 lines: a new launcher is one file plus one line."""
    import importlib

    from devlayer.launchers import PRECEDENCE

    folder = ROOT / "devlayer" / "launchers"
    modules = [p for p in sorted(folder.glob("*.py")) if p.stem not in LAUNCHER_SHARED]
    in_precedence = {
        f"{m.stem}.{name}"
        for m in modules
        for name, value in vars(importlib.import_module(f"devlayer.launchers.{m.stem}")).items()
        if any(value is rec for rec in PRECEDENCE)
    }
    assert len(modules) == len(PRECEDENCE)
    assert not [p for m in modules for p in _launcher_module_problems(m, in_precedence)]


def test_a21_l4_the_launcher_module_rule_catches_offenders(tmp_path: Path) -> None:
    """A21-L4: the rule is not vacuous: two records, an import of another launcher module
    and a record missing from PRECEDENCE are each reported."""
    bad = tmp_path / "lsf.py"
    bad.write_text(
        "from devlayer.launchers.slurm import SLURM\n"
        "LSF = Launcher('lsf', detect=f)\nJSRUN = Launcher('jsrun', detect=f)\n"
    )
    found = _launcher_module_problems(bad, set())
    assert "lsf.py: 2 Launcher records, expected one" in found
    assert "lsf.py:1: imports devlayer.launchers.slurm" in found
    bad.write_text("LSF = Launcher('lsf', detect=f)\n" + "\n" * 200)
    assert _launcher_module_problems(bad, set()) == [
        "lsf.py: LSF is not in launchers.PRECEDENCE",
        "lsf.py: 201 lines, keep a launcher under 200",
    ]


def _launcher_variable_literals(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of string constants in ``path``'s code (not its docstrings) that
    name a variable of a launcher record (one of its prefixes or whole names)."""
    from devlayer.launchers import PRECEDENCE

    prefixes = tuple(p for rec in PRECEDENCE for p in rec.prefixes)
    names = {v for rec in PRECEDENCE for v in rec.variables}
    return [
        (line, text)
        for line, text in _vendor_literals(path, set(), pattern=None)
        if any(
            word.startswith(prefixes) or word in names
            for word in re.findall(r"[A-Z][A-Z0-9_]+", text)
        )
    ]


def test_a21_m1_the_training_layer_reads_no_launcher_variable():
    """A21-M1: no module of devlayer/train/ names a launcher's variable (``SLURM_*``,
    ``OMPI_*``, ``TORCHELASTIC_*``, ... as the launcher records declare them) in code: what
    it needs of the launcher comes parsed, on ``ProcessInfo`` (``cpus_per_rank``)."""
    offenders = [
        f"{path.relative_to(ROOT).as_posix()}:{line}: {text[:80]!r}"
        for path in _python_files("devlayer/train")
        for line, text in _launcher_variable_literals(path)
    ]
    assert not offenders, "launcher variables named in devlayer/train/:\n" + "\n".join(offenders)


def test_a21_m1_the_launcher_variable_rule_catches_a_reader(tmp_path: Path) -> None:
    """A21-M1: the rule is not vacuous: ``SLURM_CPUS_PER_TASK``, ``OMPI_COMM_WORLD_SIZE``
    and ``MASTER_PORT`` in code are reported, in a docstring or a plain word they are not."""
    src = tmp_path / "m.py"
    src.write_text(
        '"""Reads SLURM_CPUS_PER_TASK? No: docs may name it."""\n'
        "def f(env):\n"
        "    return env.get('SLURM_CPUS_PER_TASK'), f'{env} OMPI_COMM_WORLD_SIZE=2'\n"
        "WORDS = 'a SLURM job, the slurm launcher, RANKS, world_size'\n"
        "VAR = 'MASTER_PORT'\n"
    )
    assert sorted(line for line, _ in _launcher_variable_literals(src)) == [3, 3, 5]


def test_the_library_import_graph_has_no_cycle():
    """Module-level and function-level imports between devlayer modules form no cycle."""
    modules = {
        ("devlayer." + ".".join(p.relative_to(ROOT / "devlayer").with_suffix("").parts)).replace(
            ".__init__", ""
        ): p
        for p in _python_files("devlayer")
    }
    modules["devlayer"] = ROOT / "devlayer" / "__init__.py"
    graph = {
        # an import of a module's own parent package is Python's doing, not a dependency
        name: {
            m
            for _, m in _imports(path)
            if m in modules and m != name and not name.startswith(m + ".")
        }
        for name, path in modules.items()
        if name != "devlayer"  # the package's lazy table names every module by design
    }
    for deps in graph.values():
        deps.discard("devlayer")
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle.extend([*stack[stack.index(dep) :], dep] if dep in stack else [node, dep])
                return True
            if dep not in state and visit(dep, [*stack, dep]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if name not in state and visit(name, [name]):
            break
    assert not cycle, " -> ".join(cycle)


def _package_of(rel: str) -> str:
    """``"devlayer/train/x.py"`` -> ``"devlayer.train"``; ``"backends/x.py"`` ->
    ``"devlayer.backends"`` (where an install puts it)."""
    parts = rel[:-3].split("/")
    return ".".join(["devlayer", *parts[:-1]] if parts[0] == "backends" else parts[:-1])


def _private_owner(module: str) -> str | None:
    """The package that owns the first ``_private`` part of ``module``, None if none."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _private_offenders(files: dict[str, Path]) -> list[str]:
    """``from devlayer.x import _name``, and any import (by name too) of a private module
    (``devlayer.backends._ipex``) from outside the package that holds it."""
    offenders = []
    for rel, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                offenders += [
                    f"{rel}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if node.module.startswith("devlayer")
                    and a.name.startswith("_")
                    and not a.name.startswith("__")
                ]
        here = _package_of(rel)
        for line, module in _imports(path):
            owner = _private_owner(module) if module.startswith("devlayer.") else None
            if owner and here != owner and not here.startswith(owner + "."):
                offenders.append(f"{rel}:{line}: {module} (private to {owner})")
    return sorted(set(offenders))


def test_no_module_imports_another_modules_private_names():
    """``from devlayer.x import _name`` couples to what x may change at will (issue 15), and
    so does naming a private module of another package, even in a string
    (``"devlayer.backends._ipex:fn"`` from train/).

    Relative imports inside ``backends/`` (``from ._ipex import ...``) are one package's
    own business and allowed.
    """
    files = {p.relative_to(ROOT).as_posix(): p for p in _python_files("devlayer", "backends")}
    offenders = _private_offenders(files)
    assert not offenders, offenders


def test_the_private_rule_catches_a_private_module_named_in_a_string(tmp_path: Path) -> None:
    """The rule is not vacuous: train/ naming ``devlayer.backends._ipex`` in a string is
    reported; a backend importing its own package's private module is not."""
    src = tmp_path / "m.py"
    src.write_text("T = {'ipex': 'devlayer.backends._ipex:trainer_optimize'}\n")
    found = _private_offenders({"devlayer/train/optimize.py": src, "backends/cpu.py": src})
    assert found == [
        "devlayer/train/optimize.py:1: devlayer.backends._ipex (private to devlayer.backends)",
        "devlayer/train/optimize.py:1: devlayer.backends._ipex.trainer_optimize (private to "
        "devlayer.backends)",
    ]


def _readme_api_names() -> set[str]:
    """Names in the first column of the API overview's table (docs/api.md, README's API
    table before the docs site) and in its list of errors."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index("## The top-level names") : text.index("## The other modules")]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ")[0]
            for code in re.findall(r"`([^`]+)`", first):
                names.update(re.findall(r"(?<![.\w])([A-Za-z_]\w*)(?=\(|$| )", code))
    errors = section[section.index("Errors all derive") :].split("\n\n")[0]
    names.update(re.findall(r"`(?:devlayer\.)?(\w+Error)`", errors))
    import builtins

    return names - set(dir(builtins))  # "(also `ValueError`)" names a base class


def test_readme_api_table_and_all_name_the_same_names():
    """The public surface has one list users read (docs/api.md) and one Python reads
    (__all__)."""
    import devlayer

    readme = _readme_api_names()
    exported = set(devlayer.__all__)
    assert exported - readme == set(), (
        f"in __all__ but not in docs/api.md's table: {exported - readme}"
    )
    assert readme - exported == set(), (
        f"in docs/api.md's table but not in __all__: {readme - exported}"
    )


def test_every_lazy_name_is_typed_and_resolves():
    """__init__'s TYPE_CHECKING imports (for type checkers) and its lazy table agree."""
    import ast

    import devlayer

    tree = ast.parse((ROOT / "devlayer" / "__init__.py").read_text())
    typed = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for sub in node.body
        if isinstance(sub, ast.ImportFrom)
        for alias in sub.names
    }
    assert typed == set(devlayer._LAZY), typed ^ set(devlayer._LAZY)
    for name in devlayer.__all__:
        assert getattr(devlayer, name) is not None, name


def test_the_top_level_stays_small():
    """Issue 15: about 30 top-level names; the rest lives in the module it belongs to."""
    import devlayer

    assert len(devlayer.__all__) <= 32, sorted(devlayer.__all__)


#: Spellings of the never-released 0.1.0 that were removed, not deprecated (STYLE.md 9; each
#: is in CHANGELOG.md under "Removed" with its replacement): module -> names.
REMOVED_NAMES = {
    "devlayer": (
        "Availability",
        "Backend",
        "Runtime",
        "available_backends",
        "get_backend",
        "register_backend",
        "registered_backends",
        "unregister_backend",
        "FarmResult",
        "Callback",
        "CheckpointError",
        "EarlyStopping",
        "PreemptedError",
        "seed_everything",
        "BackendNotFoundError",
        "DeviceError",
        "InitOrderError",
        "InvalidArgumentError",
        "LaunchEnvError",
        "NotInitializedError",
        "RendezvousError",
    ),
    "devlayer.lifecycle": ("TORCH_ADVISORIES", "MIN_TORCH", "MAX_TIMEOUT", "loopback_listener"),
    "devlayer.train.checkpoint": ("TrainingCheckpoints", "model_state_mismatch", "MANIFEST_LIMIT"),
    "devlayer.config": ("moved_name",),
}


@pytest.mark.parametrize(
    ("module", "name"), [(m, name) for m, names in REMOVED_NAMES.items() for name in names]
)
def test_removed_spellings_are_gone_not_deprecated(module: str, name: str) -> None:
    """No shims before the first release: an old spelling is an AttributeError, no warning."""
    import importlib
    import warnings

    mod = importlib.import_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match=name):
            getattr(mod, name)


def test_the_changelog_names_every_removed_spelling():
    """CHANGELOG.md's "Removed" names each removed spelling (module.name, and the Backend
    hooks), so a reader of an old snippet finds its replacement."""
    text = (ROOT / "CHANGELOG.md").read_text()
    removed = text[text.index("### Removed") : text.index("## 0.1.0")]
    spelled = [f"`{m}.{n}" for m, names in REMOVED_NAMES.items() for n in names]
    spelled += [f"`Backend.{h}(" for h in ("install_hint", "comm_hint", "comm_env", "optimize")]
    assert [s for s in spelled if s not in removed] == []


def test_devlayer_farm_is_only_the_module():
    """``devlayer.farm`` is the module; calling it is a TypeError, not the queue with a warning."""
    import devlayer
    import devlayer.farm

    module = devlayer.farm
    assert module is sys.modules["devlayer.farm"] and callable(module.farm)
    with pytest.raises(TypeError, match="not callable"):
        module([[sys.executable, "-c", "pass"]], backend="cpu", parallel=1)


def test_no_deprecation_warnings_in_the_library():
    """Nothing in devlayer/ or backends/ warns of a deprecation: until a release there is
    nobody to migrate (STYLE.md 9). A deprecation after a release edits this rule."""
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {code}"
        for path in _python_files("devlayer", "backends")
        for n, code in _code_lines(path).items()
        if re.search(r"\b(Pending)?DeprecationWarning\b|\bFutureWarning\b", code)
    ]
    assert not offenders, offenders


def test_devlayer_backends_re_exports_the_registry_lazily():
    code = (
        "import sys, devlayer.backends as b; "
        "assert 'torch' not in sys.modules and 'devlayer.registry' not in sys.modules; "
        "from devlayer.backends import register_backend, Backend; import devlayer.registry as r; "
        "assert register_backend is r.register_backend and Backend is r.Backend; "
        "assert 'torch' not in sys.modules, 'torch'; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_project_uses_no_removed_top_level_name():
    """Library, tests, examples, benchmarks and docs use no removed top-level spelling
    (``devlayer.register_backend``, calling ``devlayer.farm(...)``); CHANGELOG.md names them."""
    names = "|".join(sorted(REMOVED_NAMES["devlayer"], key=len, reverse=True))
    old = re.compile(rf"(?<![\w.])devlayer\s?\.\s?(?:({names})\b|farm\s?\()")
    offenders = []
    for path in _python_files("devlayer", "backends", "tests", "examples", "benchmarks"):
        rel = str(path.relative_to(ROOT))
        raw = path.read_text().splitlines()
        lines = dict(_code_lines(path))
        lines.update({n: t for n, t in enumerate(raw, 1) if t.lstrip().startswith(">>>")})
        offenders += [f"{rel}:{n}: {raw[n - 1].strip()}" for n, t in lines.items() if old.search(t)]
    docs = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*.md")]
    for path in docs:
        offenders += [
            f"{path.relative_to(ROOT)}: {m.group(0)}" for m in old.finditer(path.read_text())
        ]
    assert not offenders, "removed top-level spellings:\n" + "\n".join(offenders)


def test_tests_with_a_reliability_id_say_what_they_prove():
    """Every test named for a reliability ID (test_f4_..., test_r2_2_...) has a docstring.

    Issue 15: the ID in the name points at docs/reliability.md; the docstring says what the
    test proves, so a reader need not decode the ID or the assertions.
    """
    named = re.compile(r"test_(r\d|[a-z]\d+)_")
    missing = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and named.match(node.name)
                and not ast.get_docstring(node)
            ):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not missing, "tests with a reliability ID but no docstring:\n" + "\n".join(missing)


#: The most lines the module that defines ``Trainer`` may have (issue 21, item 2): the loop's
#: parts live in modules named for what they hold (steps, validation, history, loading).
TRAINER_MODULE_LINES = 500


def _modules_defining(name: str, paths: list[Path]) -> list[Path]:
    """The files among ``paths`` with a top-level ``class <name>``."""
    return [
        path
        for path in paths
        if any(
            isinstance(node, ast.ClassDef) and node.name == name
            for node in ast.parse(path.read_text()).body
        )
    ]


def _too_many_lines(paths: list[Path], limit: int) -> list[str]:
    return [
        f"{path.name}: {n} lines, keep it at most {limit}"
        for path in paths
        if (n := len(path.read_text().splitlines())) > limit
    ]


def test_a21_m2_the_module_that_defines_trainer_has_at_most_500_lines():
    """A21-M2: the module that defines ``Trainer`` has at most 500 lines (815 before the
    split): validation, the optimizer steps, the rate log, loading, history and report,
    export and the checkpoint payload are modules of their own."""
    defining = _modules_defining("Trainer", _python_files("devlayer"))
    assert [p.relative_to(ROOT).as_posix() for p in defining] == ["devlayer/train/trainer.py"]
    assert _too_many_lines(defining, TRAINER_MODULE_LINES) == []


def test_a21_m2_the_trainer_size_rule_catches_a_long_module(tmp_path: Path) -> None:
    """A21-M2: the rule is not vacuous: a module defining ``Trainer`` in 501 lines is found
    and reported; 500 lines pass."""
    module = tmp_path / "loop.py"
    module.write_text("class Trainer:\n" + "    x = 1\n" * 500)
    assert _modules_defining("Trainer", [module]) == [module]
    assert _too_many_lines([module], TRAINER_MODULE_LINES) == [
        "loop.py: 501 lines, keep it at most 500"
    ]
    module.write_text("class Trainer:\n" + "    x = 1\n" * 499)
    assert _too_many_lines([module], TRAINER_MODULE_LINES) == []


def _too_long(sizes: list[Any], limit: int) -> list[str]:
    """The functions over ``limit`` code lines, less those over it only by their signature
    (no other exception: there is none today)."""
    return [
        f"{s.where}: {s.code} code lines ({s.signature} of them its signature)"
        for s in sizes
        if s.code > limit and not s.only_signature_over(limit)
    ]


def test_no_library_function_over_60_code_lines():
    """No function in devlayer/ or backends/ has more than 60 lines of code, counted as
    tools/longest_functions.py counts them (docstring, comments and blank lines left out).

    A function over it only by its signature is exempt: its body alone fits in 60 lines and
    every signature line besides ``def ...(`` and ``) -> ...:`` holds one parameter (or the
    bare ``*``), so the extra lines are a list of options, not logic (Trainer.__init__:
    33 options on 35 lines, a 33-line body). Everything else is split into helpers.
    """
    tool = longest_functions_tool()
    offenders = _too_long(tool.all_sizes(["devlayer", "backends"]), tool.LIMIT)
    assert not offenders, "functions over 60 code lines:\n" + "\n".join(offenders)


def test_the_function_length_rule_catches_a_long_body():
    """The rule is not vacuous: a 61-line body is reported; 40 options one per line with a
    short body are exempt; a signature made long by one default spread over lines is not."""
    options = "".join(f"    o{i}=None,\n" for i in range(40))
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    spread = "def g(a=(\n" + "".join(f"    {i},\n" for i in range(40)) + ")):\n" + body[:300]
    short = "".join(f"    y{i} = {i}\n" for i in range(30))
    source = f"def long():\n{body}\ndef options(\n    *,\n{options}) -> None:\n{short}"
    tool = longest_functions_tool()
    sizes = tool.sizes(source + spread, "m.py")
    assert [s.code for s in sizes] == [62, 73, 67]  # each one over the limit
    found = _too_long(sizes, tool.LIMIT)
    assert [f.split(":")[1].split(" (")[0] for f in found] == ["1 long", "137 g"], found


#: Modules (a path or the start of one) that may read DEVLAYER_* variables from an environment
#: mapping besides devlayer/config.py, which parses them into its Settings object, and why.
_ENV_READERS = {
    ("devlayer/launchers", "DEVLAYER_LAUNCHER"): "detect(env, force=, launchers=) is a pure "
    "function of the launcher env it is given (a child's env in `devlayer launch`, a plain dict "
    "in tests), not of this process's settings; the name is valid only against the launcher "
    "records passed in `launchers=` (a user's own launcher included), which config.py cannot "
    "know, and `force=` wins over it with its own origin in messages",
    ("devlayer/launchers", "DEVLAYER_DISABLE_LAUNCHERS"): "the same, for `disable=`",
    ("devlayer/devices.py", "DEVLAYER_VISIBILITY_APPLIED"): "not a user setting but devlayer's "
    "own marker, read beside the visibility variable it describes: init() and devlayer.early "
    "change both during the process, so a Settings object parsed once would be stale",
}


def _devlayer_constants(paths: list[Path]) -> set[str]:
    """Names of module-level constants that hold a DEVLAYER_* name (``APPLIED_MARKER``)."""
    names = set()
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and str(node.value.value).startswith("DEVLAYER_")
            ):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _env_reads(path: Path, constants: set[str]) -> list[tuple[int, str]]:
    """(line, variable) for each ``env.get("DEVLAYER_X")``, ``os.getenv``, ``env_flag``,
    ``env["DEVLAYER_X"]`` or ``"DEVLAYER_X" in env`` (a literal, or a constant that holds one;
    writes not counted)."""
    values = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            values.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})

    def name(node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Constant) and str(node.value).startswith("DEVLAYER_"):
            return str(node.value)
        ident = getattr(node, "id", None) or getattr(node, "attr", None)
        return values.get(ident, ident) if ident in constants else None

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        key = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if getattr(func, "attr", getattr(func, "id", None)) in ("get", "getenv", "env_flag"):
                key = name(node.args[0])
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            key = name(node.slice)
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            key = name(node.left)
        if key is not None:
            found.append((node.lineno, key))
    return found


def _env_read_offenders(paths: list[Path]) -> list[str]:
    constants = _devlayer_constants(paths)
    offenders = []
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        for line, key in _env_reads(path, constants):
            allowed = any(rel.startswith(p) and key == k for p, k in _ENV_READERS)
            if rel != "devlayer/config.py" and not allowed:
                offenders.append(f"{rel}:{line}: {key}")
    return offenders


def test_a21_s4_only_the_settings_module_reads_devlayer_variables():
    """A21-S4: DEVLAYER_* variables are read from the environment only in devlayer/config.py
    (the Settings object) and the listed exceptions, each with its reason; the rest of the
    library receives parsed values."""
    offenders = _env_read_offenders(_python_files("devlayer", "backends"))
    assert not offenders, "DEVLAYER_* read outside devlayer/config.py:\n" + "\n".join(offenders)


def test_a21_s4_the_settings_rule_catches_a_reader(tmp_path: Path) -> None:
    """A21-S4: the rule sees os.environ.get, os.getenv, a subscript, ``in`` and a constant
    that holds the name, and not a write or a docstring."""
    module = ROOT / "devlayer" / "_settings_rule_probe.py"
    module.write_text(
        '"""DEVLAYER_DEBUG in a docstring."""\nimport os\nMARK = "DEVLAYER_MARK"\n'
        'a = os.environ.get("DEVLAYER_DEBUG")\nb = os.getenv("DEVLAYER_COMM")\n'
        'c = os.environ["DEVLAYER_BACKEND"]\nd = "DEVLAYER_SIMULATE" in os.environ\n'
        'e = os.environ.get(MARK)\nos.environ["DEVLAYER_X"] = "1"\n'
    )
    try:
        found = _env_read_offenders([module])
    finally:
        module.unlink()
    assert [f.split(": ")[1] for f in found] == [
        "DEVLAYER_DEBUG",
        "DEVLAYER_COMM",
        "DEVLAYER_BACKEND",
        "DEVLAYER_SIMULATE",
        "DEVLAYER_MARK",
    ]


def _references(path: Path, name: str) -> list[int]:
    """Lines where ``name`` is used (called or passed on), not imported or defined."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if (isinstance(node, ast.Name) and node.id == name)
        or (isinstance(node, ast.Attribute) and node.attr == name)
    ]


def test_a21_s5_parse_devices_has_one_caller():
    """A21-S5: ``parse_devices`` is used in one place, the settings normalisation in
    devlayer/config.py (a variable's text and an argument alike); the rest receive parsed
    specs."""
    users = {
        f"{path.relative_to(ROOT).as_posix()}:{line}"
        for path in _python_files("devlayer", "backends")
        for line in _references(path, "parse_devices")
    }
    assert len(users) == 1 and next(iter(users)).startswith("devlayer/config.py:"), users
