"""A returning node syncs a large tree without disturbing the ring (issue 12).

Three real daemons with FUSE mounts and corosync's default totem timers (no token line in the
config); node3 is stopped, node1 gets 1,000 files of 5 KiB (5 MiB) from 8 writer threads, and
node3 comes back twice: with its data directory, then with an empty one (a full transfer). Each
time node3 must end up synced with the same tree checksum as the others, a write on its mount
must reach them, and neither survivor may lose the token or install any ring but the join.
The scenario is `sync_harness.run_scenario`; timings are the benchmark's, not asserted here.

The full size (10,000 files, 50 MiB), with the sync times, counters and profiles, is run by hand:

    .venv/bin/python tools/bench_sync.py --files 10000 --mib 50 --profile /tmp/sync-profiles

It needs root and /dev/fuse (skipped otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemon_harness import fuse_unavailable
from sync_harness import EMPTY, KEPT, SURVIVORS, ReturnResult, run_scenario

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.slow]

FILES = 1_000
TOTAL_BYTES = 5 << 20


def check_undisturbed(result: ReturnResult) -> None:
    facts = json.dumps(result.__dict__)
    assert result.token_losses() == dict.fromkeys(SURVIVORS, 0), facts
    assert result.rings_installed() == dict.fromkeys(SURVIVORS, 1), facts
    for name in SURVIVORS:
        assert len(result.ring_ids[name]) == 2, facts  # the ring of two, then the join
    assert len(set(result.checksums.values())) == 1, facts


def test_returning_node_syncs_a_large_tree_without_token_loss(tmp_path: Path) -> None:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    result = run_scenario(tmp_path, files=FILES, total_bytes=TOTAL_BYTES, token_ms=None,
                          specs=(KEPT, EMPTY))
    assert [r.variant for r in result.returns] == [KEPT.name, EMPTY.name]
    for ret in result.returns:
        check_undisturbed(ret)
