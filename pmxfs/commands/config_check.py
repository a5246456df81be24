"""`pmxfs config check FILE [--against CURRENT]`: validate a corosync.conf, and an update of one.

The command reads the file(s) and hands the text to `pmxfs.core.conf.check` -- the same code path
the file system uses for writes to /etc/pve/corosync.conf -- then reports:

* valid: exit 0 and one line on stdout: cluster name, config_version, node count, expected
  votes, the derived token and consensus timeouts (and, with --against, which changes apply at
  run time and which need a restart); warnings, if any, go to stderr as `FILE:LINE:COL: warning:`.
* invalid: exit 1 and every problem on stderr, one per line, `FILE:LINE:COL: reason`.
* a file that cannot be read: exit 2 and one line `pmxfs: cannot read FILE: reason`.

Bytes that are not UTF-8 text (or contain NUL) are reported as one error at their position; no
input produces a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pmxfs.core import conf
from pmxfs.core.errors import LocalError
from pmxfs.core.quorum import QuorumConfig

MAX_CONFIG_BYTES = 1024 * 1024  # a file in the tree is at most 1 MiB


class _Unreadable(LocalError):
    """The file to check cannot be read."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `config` with its `check` subcommand to the `pmxfs` parser."""
    config = subparsers.add_parser(
        "config", help="cluster configuration (corosync.conf) tools",
        description="Cluster configuration (corosync.conf) tools; they work on files and need "
                    "no daemon.",
        epilog="examples:\n  pmxfs config check /etc/pmxfs/corosync.conf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = commands.add_parser(
        "check", help="validate a corosync.conf (and an update of one)",
        description="""\
Parse and validate FILE as pmxfs does when corosync.conf is written in the tree (/etc/pve).
With --against, also check FILE as an update of the running config CURRENT (config_version
must grow); the summary then says which changes apply at run time and which need a restart.

Valid: exit 0 and one line on stdout (cluster name, config_version, nodes, expected votes,
token and consensus timeouts); warnings on stderr. Invalid: exit 1 and every problem on stderr,
one per line, FILE:LINE:COL: reason. A file that cannot be read: exit 2.""",
        epilog="""\
examples:
  pmxfs config check /etc/pmxfs/corosync.conf
  pmxfs config check new.conf --against /etc/pmxfs/corosync.conf
  cp new.conf /etc/pve/corosync.conf     # then take it: every node rewrites its own copy""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("file", metavar="FILE", help="the corosync.conf to check")
    check.add_argument("--against", metavar="CURRENT",
                       help="the current corosync.conf; FILE must be a valid update of it "
                            "(default: FILE is checked on its own)")
    check.set_defaults(handler=run_check)


def _decode(data: bytes, filename: str) -> tuple[str | None, conf.ConfigError | None]:
    """Text of a file, or the one error that says why it is not text."""

    def where(offset: int) -> tuple[int, int]:
        line = data.count(b"\n", 0, offset) + 1
        col = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        return line, col

    if len(data) > MAX_CONFIG_BYTES:
        return None, conf.ConfigError(filename, 1, 1, f"file is too large ({len(data)} bytes; "
                                                      f"at most {MAX_CONFIG_BYTES})")
    nul = data.find(b"\0")
    if nul >= 0:
        line, col = where(nul)
        return None, conf.ConfigError(filename, line, col, "binary data (NUL byte): not a text "
                                                           "file")
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line, col = where(exc.start)
        return None, conf.ConfigError(filename, line, col, f"not UTF-8 text (byte "
                                                           f"0x{data[exc.start]:02x})")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _Unreadable(f"cannot read {path}: {exc.strerror or exc}") from None


def _load(path: str, current: conf.ClusterConfig | None) -> conf.CheckResult:
    text, error = _decode(_read(path), path)
    if text is None:
        assert error is not None
        return conf.CheckResult(None, (error,), ())
    return conf.check(text, path, current)


def _report(problems: tuple[conf.ConfigError, ...]) -> None:
    for problem in sorted(problems, key=lambda p: (p.filename, p.line, p.col)):
        print(problem, file=sys.stderr)


def summary(config: conf.ClusterConfig, update: conf.UpdateResult | None,
            current: conf.ClusterConfig | None) -> str:
    """The one-line description of a valid config (and of the update, with `current`)."""
    params = conf.totem_params(config)
    expected = QuorumConfig.from_config(config).configured_expected
    count = len(config.nodes)
    line = (f"{config.filename}: ok: cluster {config.cluster_name}, config_version "
            f"{config.config_version}, {count} node{'s' if count != 1 else ''}, expected votes "
            f"{expected}, token {params.token} ms, consensus {params.consensus} ms")
    if update is not None and current is not None:
        runtime = ", ".join(c.key for c in update.runtime_changes) or "none"
        restart = ", ".join(c.key for c in update.restart_changes) or "none"
        line += (f"; update from config_version {current.config_version}: run time: {runtime}; "
                 f"needs restart: {restart}")
    return line


def run_check(args: argparse.Namespace) -> int:
    """Handler of `pmxfs config check`; returns the exit status."""
    try:
        current: conf.ClusterConfig | None = None
        if args.against is not None:
            base = _load(args.against, None)
            if base.config is None:
                _report(base.errors + base.warnings)
                print(f"pmxfs: the current config {args.against} is not valid", file=sys.stderr)
                return 1
            current = base.config
        result = _load(args.file, current)
    except _Unreadable as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 2
    if result.config is None:
        _report(result.errors + result.warnings)
        return 1
    _report(result.warnings)
    print(summary(result.config, result.update, current))
    return 0


def load_checked(path: str) -> conf.ClusterConfig | None:
    """Read and check the corosync.conf a command runs from, reporting problems exactly as
    `pmxfs config check` does (warnings included); None when it cannot be used."""
    try:
        result = _load(path, None)
    except _Unreadable as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return None
    _report(result.errors + result.warnings)
    return result.config
