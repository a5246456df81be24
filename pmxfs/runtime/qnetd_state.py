"""What qnetd keeps on disk per cluster across restarts: the arbiter's memory of who had the vote.

core/qnetd_arbiter.py gives the vote only to a ring holding a member of the last ring that had
it (`last_holder`) and a member whose tree carries the newest stamp any node reported
(`newest_stamp`), so that acknowledged writes are never left behind. A qnetd that forgot both
at a restart could hand the vote to a partition with an older tree; so the server writes them to
`DIR/clusters/<cluster name>_<cluster id>.json` -- `{"last_holder": [node ids], "newest_stamp":
n}` -- durably (runtime/durable_file.py) whenever they change and *before* it sends the vote
that follows from the change, and gives them to the cluster's new arbiter when it starts.

A missing file means nothing is known (a new cluster). A file that cannot be read is an error
the server logs; it then starts the cluster knowing nothing, which is what corosync-qnetd always
does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pmxfs.core.errors import LocalError
from pmxfs.core.qdevice_wire import MAX_NODE_ID, MAX_NODES, MAX_SEQ
from pmxfs.runtime.durable_file import write_file

CLUSTERS = "clusters"


class StateError(LocalError):
    """A cluster's state file that cannot be read or written; str() is one line."""


@dataclass(frozen=True)
class ClusterState:
    last_holder: frozenset[int] = frozenset()
    newest_stamp: int = 0


def state_path(directory: Path, cluster_name: str, cluster_id: str) -> Path:
    return directory / CLUSTERS / f"{cluster_name}_{cluster_id}.json"


def load_state(path: Path) -> ClusterState:
    """The state in `path`; empty when there is none; StateError when it is unusable."""
    try:
        fields = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return ClusterState()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, RecursionError):
        raise StateError(f"{path} is not JSON") from None
    if not isinstance(fields, dict):
        raise StateError(f"{path} is not a JSON object")
    holder, stamp = fields.get("last_holder", []), fields.get("newest_stamp", 0)
    if (not isinstance(holder, list) or len(holder) > MAX_NODES
            or not all(type(n) is int and 1 <= n <= MAX_NODE_ID for n in holder)):
        raise StateError(f"{path}: \"last_holder\" is not a list of node ids")
    if type(stamp) is not int or not 0 <= stamp <= MAX_SEQ:
        raise StateError(f"{path}: \"newest_stamp\" is not a ring seq")
    return ClusterState(frozenset(holder), stamp)


def save_state(path: Path, state: ClusterState) -> None:
    """Write `state` to `path` durably; StateError when it cannot be written."""
    data = json.dumps({"last_holder": sorted(state.last_holder),
                       "newest_stamp": state.newest_stamp}, separators=(",", ":")).encode()
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_file(path, data, mode=0o600)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from None
