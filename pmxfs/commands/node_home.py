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

    def daemon_options(self, name: str) -> list[str]:
        """The options of `pmxfs daemon` that run node `name` from these files."""
        return ["--config", str(self.config), "--authkey", str(self.authkey), "--node", name,
                "--mount", str(self.mount), "--data-dir", str(self.data_dir), "--run-dir",
                str(self.run_dir)]
