"""Fixtures shared by the test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cpg_harness import ProcessGroup


@pytest.fixture
def group() -> Iterator[ProcessGroup]:
    """Every process a test starts goes in here; all are killed and reaped at teardown."""
    procs = ProcessGroup()
    try:
        yield procs
    finally:
        procs.close()
