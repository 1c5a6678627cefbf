"""How long torch's idle OpenMP threads spin before they sleep.

torch's CPU kernels run on a GNU OpenMP (libgomp) team. After each parallel region the
helper threads spin, waiting for the next one, for ``GOMP_SPINCOUNT`` iterations
(300,000 by default), then sleep. Inside one decode step the next region comes within
microseconds, so the spin pays. After a pipeline stage's last region it does not: the
stage then waits for the other stages, and its helpers keep burning a core for
milliseconds. With one node per machine that core has nothing better to do. With
several nodes on one machine (a test swarm, ``bench --mesh``, a workstation also
running other work) it is the core the next stage needs, and a chain of stage processes
computes each token clearly slower with the default spin than with a sixth of it, which
does not slow a lone process. Much shorter spins end inside a step and do. The figures, and the commands that measure them, are in docs/PERFORMANCE.md
("OpenMP's idle spin").

The count is read once, when libgomp loads (the first ``import torch``), so it must be
in the environment before that: the command line sets it first thing.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

VARIABLE = "GOMP_SPINCOUNT"
NODE_SPIN_COUNT = 50_000  # about a sixth of libgomp's default; see the module docstring


def limit_idle_spin(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set :data:`VARIABLE` to :data:`NODE_SPIN_COUNT` unless the user chose a spin
    (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) or torch is already loaded (too late to
    matter). Child processes inherit it. Returns whether it set the variable."""
    if VARIABLE in environ or "OMP_WAIT_POLICY" in environ or "torch" in sys.modules:
        return False
    environ[VARIABLE] = str(NODE_SPIN_COUNT)
    return True
