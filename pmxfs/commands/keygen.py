"""`pmxfs keygen [PATH] [--force]`: write a new cluster authkey (256 random bytes, mode 0400).

Every node of a cluster needs the same authkey: the frame key is derived from it and the cluster
name (see `pmxfs.runtime.frame_crypto`). The file is written atomically (runtime/durable_file.py),
so a reader never sees a partial key and a crash never leaves one behind: the bytes go to a
temporary file in the target directory, created with mode 0400, which is fsynced and then linked
(or, with --force, renamed) into place; the directory is fsynced after. Missing directories
above PATH are created with mode 0700, and `keygen` says so on stderr
(`pmxfs keygen: created directory DIR (mode 0700)`). Without --force an existing PATH is left
alone -- also when it appears between the check and the final step, because the temporary file
is hard-linked to PATH, which fails if PATH exists (on a file system without hard links it
falls back to rename after the check).

Success prints PATH on stdout, exit 0. User errors (PATH exists, permission denied, ...) print one
line `pmxfs: reason` on stderr, exit 1; no tracebacks.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from pmxfs.core.errors import LocalError
from pmxfs.runtime.durable_file import write_file
from pmxfs.runtime.frame_crypto import AUTHKEY_BYTES

DEFAULT_AUTHKEY_PATH = "/etc/pmxfs/authkey"


class KeygenError(LocalError):
    """Why the key was not written; one line."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs keygen` (see `pmxfs.cli`)."""
    parser.description = f"""\
Write a new cluster authkey of {AUTHKEY_BYTES} random bytes to PATH, mode 0400. Every node of
a cluster needs the same file: copy it to each node (as {DEFAULT_AUTHKEY_PATH}, where
`pmxfs daemon` reads it). The key is written atomically: PATH holds the whole key or does not
exist. An existing PATH is never replaced without --force. Missing directories above PATH are
created with mode 0700, and each one is reported on stderr.

Prints PATH on success (exit 0); a problem is one line `pmxfs: reason`, exit 1."""
    parser.epilog = f"""\
examples:
  pmxfs keygen                      # {DEFAULT_AUTHKEY_PATH}
  pmxfs keygen ./authkey
  pmxfs keygen --force {DEFAULT_AUTHKEY_PATH}   # a new key: every node needs the new file"""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("path", metavar="PATH", nargs="?", default=DEFAULT_AUTHKEY_PATH,
                        help=f"where to write the key (default: {DEFAULT_AUTHKEY_PATH})")
    parser.add_argument("--force", action="store_true", help="replace an existing PATH")
    parser.set_defaults(handler=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    """Handler of `pmxfs keygen`; returns the exit status."""
    path: str = args.path
    try:
        created = write_authkey(path, force=args.force)
    except KeygenError as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 1
    for directory in created:
        print(f"pmxfs keygen: created directory {directory} (mode 0700)", file=sys.stderr)
    print(path)
    return 0


def write_authkey(path: str | os.PathLike[str], *, force: bool = False) -> list[str]:
    """Write AUTHKEY_BYTES fresh random bytes to `path` atomically, mode 0400. Returns the
    directories it had to create for it (mode 0700), outermost first."""
    name = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(name))
    if os.path.isdir(name):
        raise KeygenError(f"{name} is a directory")
    if not force and os.path.lexists(name):
        raise KeygenError(f"{name} exists (use --force to replace it)")
    created = _make_directories(parent)
    try:
        write_file(name, secrets.token_bytes(AUTHKEY_BYTES), mode=0o400, replace=force)
    except FileExistsError:
        raise KeygenError(f"{name} exists (use --force to replace it)") from None
    except OSError as exc:
        raise KeygenError(f"cannot write {name}: {exc.strerror or exc}") from None
    return created


def _make_directories(directory: str) -> list[str]:
    """Create `directory` and the missing ones above it, mode 0700; the ones created."""
    missing: list[str] = []
    while not os.path.isdir(directory) and directory not in missing:
        missing.append(directory)
        directory = os.path.dirname(directory)
    created: list[str] = []
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # whatever the umask
        except OSError as exc:
            raise KeygenError(f"cannot create directory {path}: {exc.strerror or exc}") from None
        created.append(path)
    return created
