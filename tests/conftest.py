"""What every test process, and every node process a test starts, runs with.

Tests start several node processes on one machine (CI's has 2 cores), and torch gives
each process one OpenMP thread per core: the teams of several processes then take turns
on the same cores and every step gets slower (docs/PERFORMANCE.md, "Many chats at
once"). One thread per process is how a swarm of separate machines looks from each node,
and it is set before anything imports torch. A test that wants other threads passes
``--threads`` to its nodes.

Fixtures every test file may use live here too.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def internet():
    """An emulated internet (shardmesh/tools/emulated_internet.py), built for one test and
    deleted after it; the test is skipped, saying why, where one cannot be built."""
    from shardmesh.tools.emulated_internet import Internet, can_build

    why = can_build()
    if why:
        pytest.skip(f"the emulated internet {why}")
    net = Internet()
    try:
        yield net
    finally:
        net.close()
