"""The node shortens OpenMP's idle spin before torch loads, unless the user chose one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shardmesh.node.openmp_spin import NODE_SPIN_COUNT, VARIABLE


def _run(code: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (VARIABLE, "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split("\n")


def test_the_command_line_sets_the_spin_before_torch_loads() -> None:
    code = (
        "import os, sys\n"
        "from shardmesh.node import openmp_spin\n"
        "seen = []\n"
        "original = openmp_spin.limit_idle_spin\n"
        "def spy(*a, **k):\n"
        "    seen.append('torch' in sys.modules)\n"
        "    return original(*a, **k)\n"
        "from shardmesh import cli\n"
        "cli.limit_idle_spin = spy\n"
        "try:\n"
        "    cli.main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(seen, os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    assert _run(code)[-2] == f"[False] {NODE_SPIN_COUNT}"


@pytest.mark.parametrize("chosen", [{VARIABLE: "7"}, {"OMP_WAIT_POLICY": "PASSIVE"}])
def test_a_spin_the_user_chose_is_kept(chosen: dict[str, str]) -> None:
    code = "import os\nfrom shardmesh.node.openmp_spin import limit_idle_spin\nprint(limit_idle_spin(), os.environ.get('GOMP_SPINCOUNT'))\n"
    assert _run(code, **chosen)[-2] == f"False {chosen.get(VARIABLE)}"


def test_too_late_once_torch_is_loaded() -> None:
    code = "import os, torch\nfrom shardmesh.node.openmp_spin import limit_idle_spin\nprint(limit_idle_spin(), os.environ.get('GOMP_SPINCOUNT'))\n"
    assert _run(code)[-2] == "False None"
