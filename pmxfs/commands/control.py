"""What the subcommands that talk to the local daemon share: where its control socket is, how
a refusal or a missing daemon becomes one line and an exit status, JSON output, and the check of
an answer's shape.

The socket is `<run-dir>/pmxfs.sock` (`--run-dir`, else $PMXFS_RUN_DIR, else /run/pmxfs; the
option lives on the top-level parser as `global_run_dir`). No daemon listening: `pmxfs: no daemon
at <socket> (is pmxfs running?)`, exit 2. A refusal or any other failure: `pmxfs: <reason>`,
exit 1.

`pmxfs.cli` imports this module for every command (the global --run-dir), so it imports the
control socket's client (`pmxfs.runtime.ipc`) only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

DEFAULT_RUN_DIR = "/run/pmxfs"
SOCKET_NAME = "pmxfs.sock"
ASKS_THE_DAEMON = f"""

It asks the local daemon over RUN_DIR/pmxfs.sock (`pmxfs --run-dir RUN_DIR ...`, default
$PMXFS_RUN_DIR, else {DEFAULT_RUN_DIR}): exit 2 when no daemon answers, 1 when it refuses.
root may do everything, members of group www-data may only read."""

Action: TypeAlias = Callable[[argparse.Namespace, Path], int]

# A shape: a type (int excludes bool), a set of allowed strings, [shape] for a list of them, or
# a dict of exactly these keys.
Shape: TypeAlias = "type | tuple[type, ...] | frozenset[str] | list[Shape] | dict[str, Shape]"


def socket_path(args: argparse.Namespace) -> Path:
    """The control socket chosen by the global --run-dir (or its default)."""
    run_dir = getattr(args, "global_run_dir", None) or default_run_dir()
    return Path(run_dir) / SOCKET_NAME


def default_run_dir() -> str:
    return os.environ.get("PMXFS_RUN_DIR") or DEFAULT_RUN_DIR


def handler(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from pmxfs.runtime.ipc_client import ControlError, NoDaemonError

        try:
            return action(args, socket_path(args))
        except NoDaemonError as exc:
            print(f"pmxfs: {exc}", file=sys.stderr)
            return 2
        except ControlError as exc:
            print(f"pmxfs: {exc}", file=sys.stderr)
            return 1
    return run


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def shape_problems(obj: object, shape: Shape, where: str) -> Iterator[str]:
    if isinstance(shape, dict):
        if not isinstance(obj, dict):
            yield f"{where}: expected an object, got {type(obj).__name__}"
            return
        for key in sorted(set(shape) - set(obj)):
            yield f"{where}: missing key {key!r}"
        for key in sorted(set(obj) - set(shape), key=str):
            yield f"{where}: unexpected key {key!r}"
        for key, sub in shape.items():
            if key in obj:
                yield from shape_problems(obj[key], sub, f"{where}.{key}")
    elif isinstance(shape, list):
        if not isinstance(obj, list):
            yield f"{where}: expected a list, got {type(obj).__name__}"
            return
        for index, item in enumerate(obj):
            yield from shape_problems(item, shape[0], f"{where}[{index}]")
    elif isinstance(shape, frozenset):
        if obj not in shape:
            yield f"{where}: expected one of {', '.join(sorted(shape))}, got {obj!r}"
    else:
        kinds = shape if isinstance(shape, tuple) else (shape,)
        if not isinstance(obj, kinds) or (isinstance(obj, bool) and bool not in kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            yield f"{where}: expected {names}, got {type(obj).__name__}"
