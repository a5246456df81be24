"""`pmxfs daemon`: one node — the ring, the replicated tree, the FUSE mount, the control socket.

Start-up, in an order where every failure is one clear line and leaves nothing behind:
1. the data directory and its lock (a second daemon on the same data is refused);
2. the cluster config (`--local`: a one-node cluster of this host, always quorate), the node,
   the authkey, the database (checked; a damaged one is refused, never rewritten);
3. the transport, the replica node, a stale mount left by a crash is unmounted, the mount;
4. the control socket, then `READY=1` to systemd once the mount answers.
SIGTERM or SIGINT unmounts and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import grp
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyfuse3
import trio

from pmxfs import config_check
from pmxfs.core import conf
from pmxfs.core.replica import DEFAULT_VERIFY_INTERVAL_MS
from pmxfs.runtime.boot_id import BootIdFileError, next_boot_id
from pmxfs.runtime.core_loop import FrameTransport
from pmxfs.runtime.database import Database, DatabaseError
from pmxfs.runtime.frame_crypto import FrameCrypto
from pmxfs.runtime.fuse_ops import MOUNT_OPTIONS, PmxfsOperations
from pmxfs.runtime.ipc import serve_control
from pmxfs.runtime.memory_transport import MemoryHub
from pmxfs.runtime.replica_node import ReplicaNode
from pmxfs.runtime.totem_node import RingSeqFileError, RingSeqStore
from pmxfs.runtime.transport import AuthkeyError, UdpTransport, load_authkey

log = logging.getLogger("pmxfs")


class StartupError(Exception):
    """Why the daemon cannot start: printed as one line."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("daemon", help="run this node: ring, replicated tree, mount",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="/etc/pmxfs/corosync.conf")
    p.add_argument("--authkey", default="/etc/pmxfs/authkey")
    p.add_argument("--node", help="this node's name in the nodelist (default: the host name)")
    p.add_argument("--mount", default="/etc/pve")
    p.add_argument("--data-dir", default="/var/lib/pmxfs")
    p.add_argument("--run-dir", default=None,
                   help="where the control socket lives (default: the global --run-dir)")
    p.add_argument("--local", action="store_true",
                   help="run as a one-node cluster without network, always quorate")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.add_argument("--verify-interval", type=int, default=DEFAULT_VERIFY_INTERVAL_MS // 1000,
                   metavar="SECONDS", help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s pmxfs[%(process)d]: %(message)s",
                        level=logging.DEBUG if args.debug else logging.INFO)
    run_dir = Path(args.run_dir or args.global_run_dir)
    try:
        return trio.run(_serve, args, run_dir)
    except StartupError as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 1


def _lock_data_dir(data_dir: Path) -> int:
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(data_dir / "pmxfs.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot use data directory {data_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(f"another pmxfs daemon (pid {holder}) is using {data_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _local_config(name: str) -> conf.ClusterConfig:
    text = (f"totem {{\n  version: 2\n  cluster_name: local\n  config_version: 1\n}}\n"
            f"nodelist {{\n  node {{\n    name: {name}\n    nodeid: 1\n"
            f"    ring0_addr: 127.0.0.1\n  }}\n}}\n"
            f"quorum {{\n  provider: corosync_votequorum\n}}\n")
    return conf.parse(text)


def _load_config(args: argparse.Namespace, name: str) -> tuple[conf.ClusterConfig, int]:
    if args.local:
        return _local_config(name), 1
    config = config_check.load_checked(args.config)
    if config is None:
        raise StartupError(f"cannot start without a valid {args.config}")
    me = config.node_by_name(name)
    if me is None or me.nodeid is None:
        raise StartupError(f"node {name!r} is not in the nodelist of {args.config} "
                           "(use --node NAME)")
    return config, me.nodeid


def _www_data_gid() -> int:
    try:
        return grp.getgrnam("www-data").gr_gid
    except KeyError:
        return 0


def _unmount_stale(mount: Path) -> None:
    """A mount left by a crashed daemon answers ENOTCONN; take it away before mounting."""
    try:
        os.stat(mount)
        mounted = os.path.ismount(mount)
    except OSError as exc:
        mounted = exc.errno == errno.ENOTCONN
    if mounted:
        log.warning("unmounting a stale mount at %s", mount)
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
    try:
        mount.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create mount point {mount}: {exc.strerror}") from None


def _notify_systemd(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


async def _transport(config: conf.ClusterConfig, node_id: int, args: argparse.Namespace,
                     boot_id: bytes) -> FrameTransport:
    if args.local:
        return MemoryHub().transport(node_id)
    try:
        authkey = load_authkey(args.authkey)
    except AuthkeyError as exc:
        raise StartupError(str(exc)) from None
    infos = config.node_infos()
    crypto = FrameCrypto(authkey, config.cluster_name, node_id, [i.nodeid for i in infos],
                         boot_id=boot_id)
    try:
        return await UdpTransport.open(
            node_id=node_id, addresses={i.nodeid: i.addr for i in infos}, port=config.port,
            mode=config.transport,
            mcastaddr=config.mcastaddr if config.transport == "udp" else None, crypto=crypto)
    except OSError as exc:
        raise StartupError(f"cannot open the cluster network: {exc}") from None


async def _serve(args: argparse.Namespace, run_dir: Path) -> int:
    data_dir = Path(args.data_dir).absolute()
    mount = Path(args.mount).absolute()
    name = args.node or socket.gethostname().split(".")[0]
    lock_fd = _lock_data_dir(data_dir)
    try:
        config, node_id = _load_config(args, name)
        store = RingSeqStore(data_dir, node_id)
        try:
            store.load()
            boot_id = next_boot_id(data_dir, node_id)
            database = Database.open(data_dir)
        except (RingSeqFileError, BootIdFileError, DatabaseError) as exc:
            raise StartupError(str(exc)) from None
        transport = await _transport(config, node_id, args, boot_id)
        try:
            incarnation = int.from_bytes(boot_id, "big")
            node = ReplicaNode(
                node_id=node_id, config=config,
                config_path=None if args.local else Path(args.config).absolute(),
                params=conf.totem_params(config), transport=transport, database=database,
                ring_seq_store=store, incarnation=incarnation, data_dir=data_dir,
                verify_interval=args.verify_interval * 1000)
        except DatabaseError as exc:
            raise StartupError(str(exc)) from None
        try:
            return await _mounted(node, mount, run_dir)
        finally:
            transport.close()
            database.close()
    finally:
        os.close(lock_fd)


async def _mounted(node: ReplicaNode, mount: Path, run_dir: Path) -> int:
    gid = _www_data_gid()
    ops = PmxfsOperations(node, gid=gid)
    _unmount_stale(mount)
    options = set(pyfuse3.default_options) | set(MOUNT_OPTIONS)
    try:
        pyfuse3.init(ops, str(mount), options)
    except (RuntimeError, OSError) as exc:
        raise StartupError(f"cannot mount at {mount}: {exc}") from None
    socket_path = run_dir / "pmxfs.sock"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.run)
                nursery.start_soon(pyfuse3.main)
                nursery.start_soon(ops.run_invalidations)
                await nursery.start(functools.partial(
                    serve_control, socket_path, node, www_data_gid=gid or None))
                nursery.start_soon(_ready_when_mounted, mount, node)
                async for signum in signals:
                    log.info("signal %d: unmounting %s and stopping", signum, mount)
                    break
                pyfuse3.terminate()
                nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        socket_path.unlink(missing_ok=True)
    return 0


async def _ready_when_mounted(mount: Path, node: ReplicaNode) -> None:
    await trio.to_thread.run_sync(os.stat, mount / ".members")
    log.info("node %s mounted %s", node.node_name, mount)
    _notify_systemd("READY=1")
