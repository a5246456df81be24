"""What a node runs as, built from files: standalone, or a member of the cluster a corosync.conf
describes (`replica_node.Attachment`). The daemon builds one at start; `pmxfs create` and
`pmxfs add` build the cluster one while the node runs and hand it to `ReplicaNode.attach`.

A standalone node (no corosync.conf yet, or `--local`) is a one-node cluster of this host on an
in-process transport: always quorate, no network. A cluster attachment takes the node's ring seq
file and a new boot id (both per node id in the data directory), the authkey, and opens the
cluster network the config's transport names (`conf.effective_transport`): knet (also when the
transport line is missing, as in corosync 3) opens `KnetTransport` on every link of the nodelist,
host names resolved here; udpu and udp open `UdpTransport` on the ring0 addresses. A name that
does not resolve or an address that cannot be bound is one line (`AttachmentError`).
"""

from __future__ import annotations

from pathlib import Path

from pmxfs.core import conf
from pmxfs.core.errors import LocalError
from pmxfs.runtime.boot_id import BootIdFileError, next_boot_id
from pmxfs.runtime.frame_crypto import FrameCrypto
from pmxfs.runtime.knet_transport import KnetTransport, link_mode, link_specs
from pmxfs.runtime.memory_transport import MemoryHub
from pmxfs.runtime.replica_node import Attachment
from pmxfs.runtime.ring_seq import RingSeqFileError, RingSeqStore
from pmxfs.runtime.transport import UdpTransport

STANDALONE_NODE_ID = 1


class AttachmentError(LocalError):
    """Why the node cannot run as asked: one line."""


def standalone_config(name: str) -> conf.ClusterConfig:
    """The one-node config a standalone node runs with (never written anywhere)."""
    text = (f"totem {{\n  version: 2\n  cluster_name: local\n  config_version: 1\n}}\n"
            f"nodelist {{\n  node {{\n    name: {name}\n    nodeid: {STANDALONE_NODE_ID}\n"
            f"    ring0_addr: 127.0.0.1\n  }}\n}}\n"
            f"quorum {{\n  provider: corosync_votequorum\n}}\n")
    return conf.parse(text)


def standalone(name: str, data_dir: Path) -> Attachment:
    return Attachment(
        node_id=STANDALONE_NODE_ID, config=standalone_config(name), config_path=None,
        transport=MemoryHub().transport(STANDALONE_NODE_ID),
        ring_seq_store=RingSeqStore(data_dir, STANDALONE_NODE_ID),
        incarnation=int.from_bytes(_boot_id(data_dir, STANDALONE_NODE_ID), "big"))


def node_id_of(config: conf.ClusterConfig, name: str, config_path: Path) -> int:
    me = config.node_by_name(name)
    if me is None or me.nodeid is None:
        raise AttachmentError(f"node {name!r} is not in the nodelist of {config_path} "
                              "(use --node NAME)")
    return me.nodeid


async def cluster_member(config: conf.ClusterConfig, node_id: int, *, config_path: Path,
                         authkey: bytes, data_dir: Path) -> Attachment:
    """A member of `config`'s cluster as node `node_id`, its transport open."""
    store = RingSeqStore(data_dir, node_id)
    try:
        store.load()
    except RingSeqFileError as exc:
        raise AttachmentError(str(exc)) from None
    boot_id = _boot_id(data_dir, node_id)
    infos = config.node_infos()
    crypto = FrameCrypto(authkey, config.cluster_name, node_id, [i.nodeid for i in infos],
                         boot_id=boot_id)
    try:
        transport = await open_cluster_transport(config, node_id, crypto)
    except (OSError, ValueError) as exc:
        raise AttachmentError(f"cannot open the cluster network: {exc}") from None
    return Attachment(node_id=node_id, config=config, config_path=config_path,
                      transport=transport, ring_seq_store=store,
                      incarnation=int.from_bytes(boot_id, "big"))


async def open_cluster_transport(config: conf.ClusterConfig, node_id: int,
                                 crypto: FrameCrypto) -> KnetTransport | UdpTransport:
    """The cluster network of `config` for node `node_id`: knet's links (also without a
    transport line), or udpu / udp. OSError or ValueError when it cannot be opened."""
    kind = conf.effective_transport(config)
    if kind == "knet":
        return await KnetTransport.open(node_id=node_id, links=link_specs(config),
                                        mode=link_mode(config), crypto=crypto)
    return await UdpTransport.open(
        node_id=node_id, addresses={i.nodeid: i.addr for i in config.node_infos()},
        port=config.port, mode=kind, mcastaddr=config.mcastaddr if kind == "udp" else None,
        crypto=crypto)


def _boot_id(data_dir: Path, node_id: int) -> bytes:
    try:
        return next_boot_id(data_dir, node_id)
    except BootIdFileError as exc:
        raise AttachmentError(str(exc)) from None
