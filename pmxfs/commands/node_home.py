"""Where one node's files live when a whole node is kept under one directory, as `pmxfs demo`
lays it out (and the tests that run real daemons): `corosync.conf`, `authkey`, `data/`, `run/`,
the mount `mnt/` and the daemon's output `daemon.log`."""

from __future__ import annotations

from pathlib import Path


class NodeHome:
    """Mixed into a class with a `home` directory: the paths of the node's files under it."""

    home: Path

    @property
    def config(self) -> Path:
        return self.home / "corosync.conf"

    @property
    def authkey(self) -> Path:
        return self.home / "authkey"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def mount(self) -> Path:
        return self.home / "mnt"

    @property
    def log(self) -> Path:
        return self.home / "daemon.log"
