"""Each room's ``__init__`` says what it offers, and importing a room stays cheap.

A room that lists submodules in ``__all__`` must list exactly the public modules on
disk (so the list cannot go stale), and importing the room package must not load them,
least of all torch: a ``--layers none`` gateway imports ``api`` and ``mesh`` and must
never pay for a tensor library. ``placement`` is pure and light, so it re-exports its
functions instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import shardmesh

ROOT = Path(shardmesh.__file__).parent
SUBMODULE_ROOMS = ["api", "mesh", "backends", "backends/torch", "backends/mlx", "node", "tools"]
TENSOR_LIBRARIES = ("torch", "mlx", "mlx_lm", "transformers", "numpy")


def _public_modules(folder: Path) -> list[str]:
    modules = [p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")]
    packages = [p.name for p in folder.iterdir() if (p / "__init__.py").is_file()]
    return sorted(modules + packages)


@pytest.mark.parametrize("room", SUBMODULE_ROOMS)
def test_all_names_exactly_the_public_modules(room: str) -> None:
    namespace: dict = {}
    exec((ROOT / room / "__init__.py").read_text(), namespace)
    assert namespace.get("__doc__"), f"shardmesh/{room}/__init__.py needs a docstring saying what the room is for"
    assert sorted(namespace["__all__"]) == _public_modules(ROOT / room)


def test_importing_the_rooms_loads_no_submodule_and_no_tensor_library() -> None:
    rooms = ", ".join(f"shardmesh.{r.replace('/', '.')}" for r in SUBMODULE_ROOMS)
    code = (
        "import sys\n"
        f"import {rooms}, shardmesh.placement, shardmesh.contract\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TENSOR_LIBRARIES!r}))\n"
        f"print(sorted(m for m in sys.modules if m.startswith('shardmesh.') and m.count('.') >= 2"
        " and not m.startswith(('shardmesh.placement.', 'shardmesh.contract.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    libraries, submodules = out.stdout.splitlines()[-2:]
    assert libraries == "[]"
    # Subpackages count as loaded once imported above (backends.torch, backends.mlx).
    assert submodules == "['shardmesh.backends.mlx', 'shardmesh.backends.torch']"


def test_placement_reexports_what_it_names() -> None:
    import shardmesh.placement as placement
    from shardmesh.placement.routing import find_route

    missing = [name for name in placement.__all__ if not hasattr(placement, name)]
    assert not missing
    assert placement.find_route is find_route
