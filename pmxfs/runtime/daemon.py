"""One node assembled and run: the ring, the replicated tree, the FUSE mount, the control socket
(what `pmxfs daemon` starts, from the settings commands/daemon.py makes of its options).

Start-up, in an order where every failure is one clear line and leaves nothing behind:
0. SCHED_RR for the whole process, before any thread exists (runtime/scheduling.py: busy cores
   must not delay the token; refused by the kernel, it runs on at normal priority);
1. the data and run directories (created, and logged, when missing -- their parents never are: a
   mistyped path is refused, not built), the data directory's lock (a second daemon on the same
   data is refused) and a first look at the mount point (the refusals below);
2. the database (checked; a damaged one is refused, never rewritten), then what the node runs
   as (runtime/attachments.py): with `--local`, or when `--config` does not exist, standalone --
   a one-node tree of this host, always quorate, as pmxcfs on a fresh host -- until `pmxfs
   create` or `pmxfs add` makes it a cluster node; else a member of the cluster `--config`
   describes, with the authkey. A missing `--config` is first taken from the tree when the
   tree holds a corosync.conf naming this node and the cluster's authkey (a node whose data
   directory was restored from a backup comes back with its identity, as pmxcfs does);
3. the transport, the replica node, the mount point (below), the mount;
4. the control socket and the quorum-device client (runtime/qdevice_client.py, idle unless
   corosync.conf configures a device), then `READY=1` to systemd once the mount answers. With
   `--metrics-listen` its socket is bound before the mount (a refusal leaves nothing behind)
   and serves /metrics (runtime/metrics_http.py) from step 4 on.

The mount point never shows the plain directory underneath while the daemon is meant to serve it:
* only an orderly stop, SIGTERM or SIGINT, unmounts (exit 0);
* any other end -- an exception (a database that cannot commit, say) or SIGKILL -- leaves the
  mount dead: it answers ENOTCONN, so a write fails instead of landing beside the cluster. An
  exception is logged and exits 1, which systemd's Restart=on-failure restarts;
* at start a dead pmxfs mount is unmounted (the crash case above); a mount that answers, a mount
  of something else, a mount point that is not a directory and a non-empty directory are
  refused, the last one naming (some of) what the mount would hide.
"""

from __future__ import annotations

import errno
import functools
import grp
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from pmxfs.core import conf
from pmxfs.core.errors import LocalError
from pmxfs.core.join_token import JOIN_PORT
from pmxfs.core.memdb import COROSYNC_CONF, MemDB
from pmxfs.runtime import attachments, metrics_http
from pmxfs.runtime.cluster_tree import TREE_AUTHKEY
from pmxfs.runtime.config_file import load_checked
from pmxfs.runtime.data_dir_lock import DataDirLocked, lock_data_dir
from pmxfs.runtime.database import Database, DatabaseError
from pmxfs.runtime.durable_file import write_file
from pmxfs.runtime.fuse_ops import MOUNT_OPTIONS, PmxfsOperations
from pmxfs.runtime.ipc import serve_control
from pmxfs.runtime.lifecycle import Lifecycle, LifecycleSettings
from pmxfs.runtime.metrics_http import serve_metrics
from pmxfs.runtime.node_metrics import render_node
from pmxfs.runtime.qdevice_client import QdeviceClient
from pmxfs.runtime.qdevice_setup import QdeviceSetup
from pmxfs.runtime.replica_node import Attachment, ReplicaNode
from pmxfs.runtime.ring_seq import RingSeqFileError
from pmxfs.runtime.scheduling import use_realtime
from pmxfs.runtime.transport import AuthkeyError, load_authkey

log = logging.getLogger("pmxfs")


FSNAME = next(o.split("=", 1)[1] for o in MOUNT_OPTIONS if o.startswith("fsname="))
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)
SHOWN_ENTRIES = 3  # how many entries a refusal to mount over a non-empty directory names

class StartupError(LocalError):
    """Why the daemon cannot start: printed as one line."""


@dataclass(frozen=True)
class DaemonSettings:
    """What `pmxfs daemon` was told (commands/daemon.py); paths absolute."""

    config: Path  # the cluster's corosync.conf (missing: standalone; not read with `local`)
    authkey: Path
    node: str | None  # this node's name in the nodelist; None: the host name
    mount: Path  # as the mount table names it (symlinks resolved)
    data_dir: Path
    run_dir: Path
    local: bool  # a one-node cluster without network, always quorate
    verify_interval_ms: int
    realtime: bool = True  # run under SCHED_RR (runtime/scheduling.py), as corosync does
    join_port: int = JOIN_PORT  # TCP port of the join service (runtime/lifecycle.py)
    metrics_listen: tuple[str, int] | None = None  # (host, port) of /metrics; None: off


def serve(settings: DaemonSettings) -> int:
    """Run the node until SIGTERM or SIGINT (0); 1 with one line on stderr when it cannot start,
    1 after logging the error when it stops on one (module header)."""
    if settings.realtime:
        use_realtime()  # before any thread exists: they all take the policy
    try:
        return trio.run(_serve, settings)
    except StartupError as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a crash; a mount made before it is left dead (see _mounted)
        log.critical("stopped by an error: %s", _reasons(exc), exc_info=exc)
        return 1


def _reasons(exc: BaseException) -> str:
    """The innermost exceptions of `exc` (trio wraps a task's in groups), on one line."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reasons(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _check_parent(path: Path, what: str) -> None:
    """Refuse a missing `path` whose parent is missing too: it is not created (`_make_dir`)."""
    if not os.path.lexists(path) and not os.path.isdir(path.parent):
        raise StartupError(f"cannot create {what} {path}: {path.parent} does not exist "
                           "(create it first, or check the path)")


def _make_dir(path: Path, mode: int, what: str) -> None:
    """Create the directory `path` when it is missing, never its parents, and say so."""
    if os.path.isdir(path):
        return
    _check_parent(path, what)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        raise StartupError(f"{what} {path} is not a directory") from None
    except OSError as exc:
        raise StartupError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    log.info("created %s %s", what, path)


def _lock_data_dir(data_dir: Path) -> int:
    try:
        return lock_data_dir(data_dir)
    except DataDirLocked as busy:
        raise StartupError(f"another pmxfs daemon (pid {busy.holder}) is using {data_dir}"
                           ) from None
    except OSError as exc:
        raise StartupError(f"cannot use data directory {data_dir}: {exc.strerror}") from None


def _attachment_files(settings: DaemonSettings, name: str, database: Database) -> bool:
    """Whether this node starts as a cluster member: `--config` exists, or was just written
    from the tree with the authkey (module header)."""
    if settings.local:
        return False
    if settings.config.exists():
        return True
    loaded = database.load()
    tree = MemDB(loaded.entries, loaded.version)
    conf_row, key_row = tree.lookup(COROSYNC_CONF), tree.lookup(TREE_AUTHKEY)
    if conf_row is None or conf_row.is_dir:
        return False
    config = conf.check(conf_row.data.decode("utf-8", "replace")).config
    if config is None or config.node_by_name(name) is None:
        return False
    if key_row is None or key_row.is_dir:
        if not settings.authkey.exists():
            log.warning("the tree holds the corosync.conf of cluster %s, but neither it nor %s "
                        "holds the authkey: running standalone", config.cluster_name,
                        settings.authkey)
            return False
    else:
        _restore_file(settings.authkey, key_row.data, 0o400)
    _restore_file(settings.config, conf_row.data, 0o644)
    log.info("restored %s (cluster %s) from the tree", settings.config, config.cluster_name)
    return True


def _restore_file(path: Path, data: bytes, mode: int) -> None:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_file(path, data, mode=mode)
    except OSError as exc:
        raise StartupError(f"cannot write {path}: {exc.strerror or exc}") from None


async def _attachment(settings: DaemonSettings, name: str,
                      database: Database) -> Attachment:
    try:
        if not _attachment_files(settings, name, database):
            if not settings.local:
                log.info("no %s: running standalone (a one-node tree, always quorate); "
                         "`pmxfs create` or `pmxfs add` makes this node a cluster member",
                         settings.config)
            return attachments.standalone(name, settings.data_dir)
        config = load_checked(str(settings.config))
        if config is None:
            raise StartupError(f"cannot start without a valid {settings.config}")
        node_id = attachments.node_id_of(config, name, settings.config)
        return await attachments.cluster_member(config, node_id, config_path=settings.config,
                                                authkey=load_authkey(settings.authkey),
                                                data_dir=settings.data_dir)
    except (attachments.AttachmentError, AuthkeyError) as exc:
        raise StartupError(str(exc)) from None


def _www_data_gid() -> int:
    try:
        return grp.getgrnam("www-data").gr_gid
    except KeyError:
        return 0


# ---------------------------------------------------------------------------- the mount point


def mount_table() -> dict[str, tuple[str, str]]:
    """Mount point -> (file system type, source) in this mount namespace, the visible mount of
    each point. From /proc/self/mountinfo, which never touches the mounted file systems, so a
    dead or hung mount cannot block it."""
    table: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-", 6) + 1:]
            table[_unescape(fields[4])] = (rest[0], _unescape(rest[1]))
    return table


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def answers(mount: Path) -> bool:
    """Whether the file system mounted at `mount` is served: a FUSE mount whose daemon is gone
    answers ENOTCONN. statfs always goes to the file system; a stat of the mount point may be
    answered from the kernel's cache."""
    try:
        os.statvfs(mount)
    except OSError as exc:
        return exc.errno not in DEAD_MOUNT_ERRNOS
    return True


def unmount(mount: Path) -> bool:
    """Lazily unmount `mount` (fusermount3, else umount -l); whether it is gone."""
    commands = [["fusermount3", "-u", "-z", str(mount)], ["umount", "-l", str(mount)]]
    for command in commands:
        if str(mount) not in mount_table():
            return True
        if shutil.which(command[0]) is not None:
            subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                           check=False)
    return str(mount) not in mount_table()


def _check_mount_point(mount: Path) -> None:
    """Refuse early, before anything is started, a mount point `_prepare_mount_point` would
    refuse; a dead pmxfs mount is left for it to take away."""
    mounted = mount_table().get(str(mount))
    if mounted is not None:
        _refuse_unless_dead_pmxfs(mount, *mounted)
    elif os.path.lexists(mount):
        _refuse_unless_empty_directory(mount)


def _prepare_mount_point(mount: Path) -> None:
    """Make `mount` an empty directory to mount on: a dead pmxfs mount is taken away, anything
    else that would be hidden or broken is refused."""
    mounted = mount_table().get(str(mount))
    if mounted is not None:
        _refuse_unless_dead_pmxfs(mount, *mounted)
        log.warning("unmounting the dead mount at %s left by a daemon that did not stop cleanly",
                    mount)
        if not unmount(mount):
            raise StartupError(f"cannot unmount the dead mount at {mount}")
    _make_dir(mount, 0o755, "mount point")
    _refuse_unless_empty_directory(mount)


def _refuse_unless_dead_pmxfs(mount: Path, fstype: str, source: str) -> None:
    if answers(mount):
        raise StartupError(f"{mount} is already mounted ({source}, type {fstype}) and answers; "
                           "stop what serves it first")
    if source != FSNAME or not fstype.startswith("fuse"):
        raise StartupError(f"{mount} holds a dead mount of {source} (type {fstype}), not of "
                           "pmxfs; unmount it first")


def _refuse_unless_empty_directory(mount: Path) -> None:
    if not os.path.isdir(mount):
        raise StartupError(f"mount point {mount} is not a directory")
    hidden = sorted(os.listdir(mount))
    if hidden:
        shown = ", ".join(repr(name) for name in hidden[:SHOWN_ENTRIES])
        more = f" and {len(hidden) - SHOWN_ENTRIES} more" if len(hidden) > SHOWN_ENTRIES else ""
        raise StartupError(f"mount point {mount} is not empty: mounting would hide {shown}{more}; "
                           "move them away first")


def _notify_systemd(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


async def _serve(settings: DaemonSettings) -> int:
    """The daemon, from its checks to the end of its mount."""
    data_dir, run_dir, mount = settings.data_dir, settings.run_dir, settings.mount
    name = settings.node or socket.gethostname().split(".")[0]
    for path, what in ((data_dir, "data directory"), (run_dir, "run directory"),
                       (mount, "mount point")):
        _check_parent(path, what)
    _make_dir(data_dir, 0o700, "data directory")
    _make_dir(run_dir, 0o755, "run directory")
    lock_fd = _lock_data_dir(data_dir)
    try:
        _check_mount_point(mount)
        try:
            database = Database.open(data_dir)
        except DatabaseError as exc:
            raise StartupError(str(exc)) from None
        node = await _node(settings, name, database)
        try:
            return await _mounted(node, settings)
        finally:
            node.transport.close()
            node.database.close()
    finally:
        os.close(lock_fd)


async def _node(settings: DaemonSettings, name: str, database: Database) -> ReplicaNode:
    """The node, as what `_attachment` finds; the database is closed when it cannot start."""
    try:
        attachment = await _attachment(settings, name, database)
        try:
            return ReplicaNode(
                node_id=attachment.node_id, config=attachment.config,
                config_path=attachment.config_path,
                params=conf.totem_params(attachment.config), transport=attachment.transport,
                database=database, ring_seq_store=attachment.ring_seq_store,
                incarnation=attachment.incarnation, data_dir=settings.data_dir,
                verify_interval=settings.verify_interval_ms)
        except (DatabaseError, RingSeqFileError) as exc:
            attachment.transport.close()
            raise StartupError(str(exc)) from None
    except BaseException:
        database.close()
        raise


async def _mounted(node: ReplicaNode, settings: DaemonSettings) -> int:
    """Serve the mount until SIGTERM or SIGINT, which unmount (0). Anything else raises and
    leaves the mount dead (module docstring)."""
    gid = _www_data_gid()
    ops = PmxfsOperations(node, gid=gid)
    metrics_listeners: list[trio.SocketListener] = []
    if settings.metrics_listen is not None:
        try:
            metrics_listeners = await metrics_http.listen(*settings.metrics_listen)
        except metrics_http.MetricsListenError as exc:
            raise StartupError(str(exc)) from None
    try:
        return await _mounted_with(node, settings, ops, gid, metrics_listeners)
    finally:
        for listener in metrics_listeners:
            await trio.aclose_forcefully(listener)


async def _mounted_with(node: ReplicaNode, settings: DaemonSettings, ops: PmxfsOperations,
                        gid: int, metrics_listeners: list[trio.SocketListener]) -> int:
    """`_mounted` once the metrics socket (if any) is bound."""
    mount = settings.mount
    _prepare_mount_point(mount)
    options = set(pyfuse3.default_options) | set(MOUNT_OPTIONS)
    try:
        pyfuse3.init(ops, str(mount), options)
    except (RuntimeError, OSError) as exc:
        raise StartupError(f"cannot mount at {mount}: {exc}") from None
    lifecycle = Lifecycle(node, LifecycleSettings(
        config=settings.config, authkey=settings.authkey, data_dir=settings.data_dir,
        join_port=settings.join_port, local=settings.local))
    stopped = False
    try:
        await _serve_until_signal(node, ops, lifecycle, settings.run_dir / "pmxfs.sock", mount,
                                  gid, metrics_listeners)
        stopped = True
    finally:
        if not stopped:
            log.error("leaving %s mounted but dead: it answers \"Transport endpoint is not "
                      "connected\" until pmxfs starts again, so nothing is written beside the "
                      "cluster", mount)
        pyfuse3.close(unmount=stopped)
    return 0


async def _serve_until_signal(node: ReplicaNode, ops: PmxfsOperations, lifecycle: Lifecycle,
                              socket_path: Path, mount: Path, gid: int,
                              metrics_listeners: list[trio.SocketListener]) -> None:
    qdevice = QdeviceSetup(node, lifecycle.tree, lifecycle.lock)
    metrics = functools.partial(render_node, node)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.run)
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(ops.run_invalidations)
            nursery.start_soon(lifecycle.join_service.run)
            nursery.start_soon(QdeviceClient(node).run)
            await nursery.start(functools.partial(
                serve_control, socket_path, node, lifecycle=lifecycle, qdevice=qdevice,
                www_data_gid=gid or None, metrics=metrics))
            if metrics_listeners:
                await nursery.start(serve_metrics, metrics_listeners, metrics)
            nursery.start_soon(_ready_when_mounted, mount, node)
            async for signum in signals:
                log.info("signal %d: unmounting %s and stopping", signum, mount)
                break
            pyfuse3.terminate()
            nursery.cancel_scope.cancel()


async def _ready_when_mounted(mount: Path, node: ReplicaNode) -> None:
    """Tell systemd READY=1 once the mount answers. The stat runs in a child process: a thread of
    the daemon waiting on its own mount would hold the FUSE device open if the daemon were
    killed meanwhile, and the mount would hang instead of going dead."""
    probe = "import os, sys; os.stat(sys.argv[1])"
    await trio.run_process([sys.executable, "-I", "-S", "-c", probe, str(mount / ".members")],
                           stdin=subprocess.DEVNULL)
    log.info("node %s mounted %s", node.node_name, mount)
    _notify_systemd("READY=1")
