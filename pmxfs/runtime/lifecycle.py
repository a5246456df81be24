"""A cluster's life from the command line, in the running daemon: `pmxfs create`, `join-token`,
`add` and `delnode` (the control socket's lifecycle commands). The member's side of a join is
`runtime/join_service.py`; the tree's files they share, `runtime/cluster_tree.py`.

How it works
------------
* One lifecycle change at a time on a node (`lock`, shared with the join service): a `create`
  racing an `add`, or two joins, would otherwise build from the same state and overwrite each
  other's files or configs.
* `create` (on a standalone node): builds the first corosync.conf (`edit.new_cluster`: link 0 on
  --link0 or the host name's address, further links on --link1..7, each an address of this
  host; more than one link runs knet), switches the running node to a one-member ring
  (`ReplicaNode.attach`, no unmount), writes the new authkey and the cluster's first
  corosync.conf to the daemon's `--authkey` and `--config` paths, and puts into the tree what
  every member needs: the corosync.conf, the authkey (`TREE_AUTHKEY`, so a node restored from a
  database backup comes back with its identity) and the join service's TLS key and certificate
  (`TREE_JOIN_PEM`, one for the whole cluster, so any member can serve a token and the token's
  fingerprint pins the cluster, not one host).
* `join-token` (on a quorate member): stores a fresh token's hash and expiry in the tree and
  prints the token once this member's join service listens.
* `add` (on the new, standalone node): asks the member named in the token (or HOST) over TLS,
  pinning the token's fingerprint (`join_tls.request_join`: a mismatch sends nothing), with its
  name, its address per link (link 0's in "address" as before, further links in "links" --
  --link0 defaults to the address that reaches the member, others must be given; each an
  address of this host) and the VMIDs of its guest configs. With the member's answer it
  attaches to the cluster with an empty tree, which the cluster's sync fills: while writes wait
  (nothing written after the backup can be lost), the database is backed up to
  `<data-dir>/backup/config-<unix time>.sql.gz`; only after the switch are the authkey and
  corosync.conf written, so a crash in between leaves a standalone node (whose old tree is in
  the backup), never one that brings its old tree into the cluster. Once quorate it puts its
  guest configs into the cluster's tree (their VMIDs were checked, so nothing of the cluster's
  is replaced).
* `delnode`: refuses this node itself and a node that is in the ring ("power it off first",
  checked again right before the write), else writes corosync.conf without it (config_version
  + 1). Every member's totem and transport drop the node from then on; `nodes/NAME` stays, as
  pvecm leaves it.
Every wait is bounded; every refusal is a `LifecycleError` with one line for the admin, and a
failed `add` is logged on the joiner too (a wrong fingerprint never reaches the member).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from pmxfs.core import conf
from pmxfs.core.conf import edit
from pmxfs.core.entry import guest_config
from pmxfs.core.fsop import Unlink
from pmxfs.core.join_token import (
    TokenError,
    TokenRecord,
    decode_token,
    encode_record,
    encode_token,
    format_host_port,
    new_token,
    parse_host_port,
    token_path,
)
from pmxfs.core.memdb import COROSYNC_CONF
from pmxfs.runtime import attachments
from pmxfs.runtime.cluster_tree import (
    ClusterTree,
    LifecycleError,
)
from pmxfs.runtime.database import DatabaseError, backup_before_join
from pmxfs.runtime.durable_file import write_file
from pmxfs.runtime.join_service import JoinService
from pmxfs.runtime.join_tls import JoinError, fingerprint, request_join
from pmxfs.runtime.replica_node import AttachError, ReplicaNode

log = logging.getLogger("pmxfs")

AUTHKEY_BYTES = 256
LISTEN_TIMEOUT_S = 5.0  # join-token: how long it waits for the join service to listen
JOIN_TIMEOUT_S = 75.0  # add: the exchange with the member (its writes are bounded by the ring)
GUESTS_TIMEOUT_S = 90.0  # add: how long the joiner waits for quorum to put its guests back


@dataclass(frozen=True)
class LifecycleSettings:
    """The daemon's options the lifecycle commands use."""

    config: Path
    authkey: Path
    data_dir: Path
    join_port: int
    local: bool  # `--local`: standalone whatever --config holds; create and add are refused


class Lifecycle:
    """The control socket's lifecycle commands (module header); each returns the answer shown
    by the CLI or raises `LifecycleError`."""

    def __init__(self, node: ReplicaNode, settings: LifecycleSettings) -> None:
        self.node = node
        self.settings = settings
        self.tree = ClusterTree(node)
        self.lock = trio.Lock()
        self.join_service = JoinService(node, settings.authkey, settings.join_port, self.lock)

    # ------------------------------------------------------------------ create

    async def create(self, cluster_name: str, *, link0: str | None, nodeid: int, votes: int,
                     port: int | None, links: Mapping[int, str] | None = None,
                     transport: str | None = None) -> dict[str, Any]:
        """`links`: this node's addresses on links 1-7 (link 0's is `link0`); `transport`:
        knet or udpu, None for udpu with one link and knet with more (`edit.new_cluster`)."""
        async with self.lock:
            self._require_standalone()
            if self.node.memdb.lookup(COROSYNC_CONF) is not None:
                raise LifecycleError("the tree already holds a corosync.conf: this node was in "
                                     "a cluster; remove /corosync.conf from the tree first")
            address = link0 or await _host_address()
            addrs = _local_links(address, links)
            try:
                text = edit.new_cluster(cluster_name, self.node.node_name, nodeid, votes,
                                        address, port=port, links=links, transport=transport)
            except edit.EditError as exc:
                raise LifecycleError(str(exc)) from None
            config = _config_of(text)
            authkey = secrets.token_bytes(AUTHKEY_BYTES)
            await self._become_member(config, nodeid, text, authkey, wipe=False)
            try:
                await self.tree.wait_writable("to put the new cluster's files into the tree")
                if self.tree.file(COROSYNC_CONF) is None:
                    await self.tree.put(COROSYNC_CONF, text.encode())
                await self.tree.keep_authkey(authkey)
                await self.tree.join_pem()
            except LifecycleError as exc:
                raise LifecycleError(f"cluster {cluster_name} was created, but: {exc}; "
                                     "`pmxfs join-token` completes the tree") from None
        log.info("created cluster %s: node %s, id %d, %s (transport %s)", cluster_name,
                 self.node.node_name, nodeid, _addresses_text(addrs), config.transport)
        return {"cluster": cluster_name, "nodeid": nodeid, "address": address,
                "links": edit.links_to_wire(addrs), "transport": config.transport,
                "config_version": config.config_version}

    # ------------------------------------------------------------------ join-token

    async def join_token(self, ttl: int) -> dict[str, Any]:
        async with self.lock:
            self._require_member()
            if not self.node.quorate():
                raise LifecycleError("this node is not quorate: make a token on a quorate "
                                     "member")
            address = self.tree.my_address()
            if address is None:
                raise LifecycleError("this node is not in the cluster's nodelist")
            await self.tree.wait_writable("to store the token")
            await self.tree.keep_authkey(await trio.Path(self.settings.authkey).read_bytes())
            pem = await self.tree.join_pem()
            where = (address, self.settings.join_port)
            token = new_token(address, self.settings.join_port, fingerprint(pem))
            expires = int(time.time()) + ttl
            await self.tree.put(token_path(token.secret),
                                encode_record(TokenRecord(expires, self.node.node_name)))
            await self.join_service.forget_old_tokens()
            self.join_service.tokens_changed()
            if not await self.join_service.wait_listening(where, LISTEN_TIMEOUT_S):
                await self.tree.write(Unlink(token_path(token.secret)))
                raise LifecycleError(f"the join service does not listen on "
                                     f"{format_host_port(*where)} (see the daemon log); the "
                                     "token was withdrawn")
        log.info("made a join token valid until %s", time.ctime(expires))
        return {"token": encode_token(token), "expires": expires}

    # ------------------------------------------------------------------ add (the joiner)

    async def add(self, host: str | None, token_text: str, *, link0: str | None,
                  nodeid: int | None, votes: int, force: bool,
                  links: Mapping[int, str] | None = None) -> dict[str, Any]:
        """Join (module header); `links`: this node's addresses on links 1-7 (link 0's is
        `link0`). A failure is logged here too."""
        try:
            async with self.lock:
                return await self._add(host, token_text, link0=link0, nodeid=nodeid,
                                       votes=votes, force=force, links=links or {})
        except LifecycleError as exc:
            message = f"joining a cluster failed: {exc}"
            log.warning("%s", message)
            await self.node.log(priority=4, tag="pmxfs", user="root", pid=os.getpid(),
                                msg=message)
            raise

    async def _add(self, host: str | None, token_text: str, *, link0: str | None,
                   nodeid: int | None, votes: int, force: bool,
                   links: Mapping[int, str]) -> dict[str, Any]:
        self._require_standalone()
        try:
            token = decode_token(token_text)
            target, port = ((token.host, token.port) if host is None
                            else parse_host_port(host, token.port))
        except TokenError as exc:
            raise LifecycleError(str(exc)) from None
        address = link0 or await _source_address(target, port)
        addrs = _local_links(address, links)
        guests = self._guest_configs()
        request = {"secret": base64.b64encode(token.secret).decode(),
                   "name": self.node.node_name, "address": address,
                   "links": edit.links_to_wire(links), "nodeid": nodeid,
                   "votes": votes, "vmids": sorted({guest.vmid for guest in (
                       guest_config(path) for path, _ in guests) if guest is not None}),
                   "force": force}
        try:
            answer = await request_join(target, port, token.fingerprint, request,
                                        timeout=JOIN_TIMEOUT_S)
        except JoinError as exc:
            raise LifecycleError(str(exc)) from None
        if answer.get("ok") is not True:
            raise LifecycleError(f"the cluster refused the join: "
                                 f"{answer.get('error', 'no reason given')}")
        text, authkey, my_id = _joined_files(answer, self.node.node_name, addrs)
        config = _config_of(text)
        backup: list[Path] = []

        async def back_up() -> None:  # while writes wait: nothing acknowledged is left out
            try:
                backup.append(await trio.to_thread.run_sync(
                    backup_before_join, self.settings.data_dir, self.node.database,
                    int(time.time())))
            except DatabaseError as exc:
                raise LifecycleError(f"cannot back up this node's database: {exc}") from None

        try:
            await self._become_member(config, my_id, text, authkey, wipe=True, prepare=back_up)
        except LifecycleError as exc:
            raise LifecycleError(
                f"{exc}; the cluster lists {self.node.node_name} now and the token is used: fix "
                f"that and run `pmxfs add --force` with a new token, or `pmxfs delnode "
                f"{self.node.node_name}` on a member") from None
        log.info("joined cluster %s as node %d; the old database is backed up in %s",
                 config.cluster_name, my_id, backup[0])
        await self._bring_guests(guests, backup[0])
        return {"cluster": config.cluster_name, "nodeid": my_id, "backup": str(backup[0])}

    def _guest_configs(self) -> list[tuple[str, bytes]]:
        """This node's guest configs, whose VMIDs the member checks against the cluster's."""
        memdb = self.node.memdb
        return [(path, entry.data) for entry in memdb.entries()
                if guest_config(path := memdb.path_of(entry.inode)) is not None]

    async def _bring_guests(self, guests: list[tuple[str, bytes]], backup: Path) -> None:
        """Put this node's guest configs into the cluster's tree, which replaced its own."""
        if not guests:
            return
        if not await self.node.wait_writable(GUESTS_TIMEOUT_S):
            raise LifecycleError(f"joined, but no quorum within {GUESTS_TIMEOUT_S:g} s to put "
                                 f"this node's {len(guests)} guest config(s) back: they are in "
                                 f"{backup}")
        for path, data in guests:
            try:
                await self.tree.put(path, data)
            except LifecycleError as exc:
                log.error("cannot put guest config %s back after the join (%s); it is in %s",
                          path, exc, backup)
        log.info("put %d guest config(s) of this node into the cluster's tree", len(guests))

    # ------------------------------------------------------------------ delnode

    async def delnode(self, name: str) -> dict[str, Any]:
        async with self.lock:
            self._require_member()
            if name == self.node.node_name:
                raise LifecycleError("cannot remove this node itself: run delnode on another "
                                     "member")
            entry = next((i for i in self.node.infos if i.name == name), None)
            if entry is None:
                raise LifecycleError(f"there is no node {name} in the nodelist")
            await self.tree.wait_writable("to change corosync.conf")
            if entry.nodeid in self.node.replica.status().members:
                raise LifecycleError(f"node {name} is a member of the ring: power it off first")
            try:
                text, _ = edit.without_node(self.tree.config_text(), name)
            except edit.EditError as exc:
                raise LifecycleError(str(exc)) from None
            await self.tree.write_config(text)
        quorum = self.node.replica.status().quorum
        log.info("removed node %s (id %d) from the nodelist", name, entry.nodeid)
        return {"removed": name, "nodeid": entry.nodeid,
                "config_version": _config_of(text).config_version,
                "expected_votes": quorum.expected_votes, "kept": f"nodes/{name}"}

    # ------------------------------------------------------------------ helpers

    async def _become_member(self, config: conf.ClusterConfig, nodeid: int, text: str,
                             authkey: bytes, *, wipe: bool,
                             prepare: Callable[[], Awaitable[None]] | None = None) -> None:
        """Attach the node to the cluster, then write the cluster's files (module header)."""
        try:
            attachment = await attachments.cluster_member(
                config, nodeid, config_path=self.settings.config, authkey=authkey,
                data_dir=self.settings.data_dir)
        except attachments.AttachmentError as exc:
            raise LifecycleError(str(exc)) from None
        try:
            await self.node.attach(attachment, wipe=wipe, prepare=prepare)
        except AttachError as exc:
            raise LifecycleError(str(exc)) from None
        except BaseException:
            attachment.transport.close()
            raise
        try:
            self.settings.config.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_file(self.settings.authkey, authkey, mode=0o400, replace=True)
            write_file(self.settings.config, text.encode(), mode=0o644)
        except FileExistsError:
            pass  # the node already took a newer corosync.conf from the cluster
        except OSError as exc:
            raise LifecycleError(f"this node runs as node {nodeid} of cluster "
                                 f"{config.cluster_name}, but cannot write its files: {exc}; "
                                 "fix that before pmxfs restarts") from None

    def _require_standalone(self) -> None:
        if self.settings.local:
            raise LifecycleError("this daemon runs with --local: restart it without --local "
                                 "to create or join a cluster")
        if not self.node.standalone or self.settings.config.exists():
            raise LifecycleError(f"this node is already in a cluster ({self.settings.config} "
                                 "exists)")

    def _require_member(self) -> None:
        if self.node.standalone:
            raise LifecycleError("this node is not in a cluster: `pmxfs create` or `pmxfs add` "
                                 "first")


def _config_of(text: str) -> conf.ClusterConfig:
    config = conf.check(text).config
    if config is None:
        raise LifecycleError("the cluster's corosync.conf is not valid")
    return config


def _joined_files(answer: dict[str, Any], name: str,
                  addrs: Mapping[int, str]) -> tuple[str, bytes, int]:
    """(corosync.conf, authkey, this node's id) from the member's answer, checked: the
    corosync.conf lists this node with that id and the addresses it asked for."""
    try:
        text, nodeid = answer["corosync_conf"], answer["nodeid"]
        authkey = base64.b64decode(answer["authkey"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise LifecycleError("the member's answer is malformed") from None
    if not isinstance(text, str) or not isinstance(nodeid, int) or not authkey:
        raise LifecycleError("the member's answer is malformed")
    me = _config_of(text).node_by_name(name)
    if me is None or me.nodeid != nodeid or dict(me.addrs) != dict(addrs):
        raise LifecycleError("the member's corosync.conf does not list this node as agreed")
    return text, authkey, nodeid


async def _host_address() -> str:
    """This host's address for a new cluster: the first non-loopback address its name
    resolves to."""
    host = socket.gethostname()
    try:
        infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        infos = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if not address.startswith("127.") and address != "::1":
            return address
    raise LifecycleError(f"cannot tell this host's cluster address ({host} resolves to no "
                         "address but loopback): give --link0 ADDR")


async def _source_address(host: str, port: int) -> str:
    """The local address this host uses to reach `host` (no packet is sent)."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return str(probe.getsockname()[0])
    except (OSError, IndexError) as exc:
        raise LifecycleError(f"cannot tell which address of this host reaches {host}: {exc}; "
                             "give --link0 ADDR") from None


def _local_links(address: str, links: Mapping[int, str] | None) -> dict[int, str]:
    """This node's addresses by link number (`edit.node_links`), each one of this host's."""
    try:
        addrs = edit.node_links(address, links)
    except edit.EditError as exc:
        raise LifecycleError(str(exc)) from None
    for value in addrs.values():
        _require_local(value)
    return addrs


def _addresses_text(addrs: Mapping[int, str]) -> str:
    """"10.0.0.1", or with more links "10.0.0.1 (link 0), 10.1.0.1 (link 1)"."""
    if len(addrs) == 1:
        return next(iter(addrs.values()))
    return ", ".join(f"{value} (link {number})" for number, value in sorted(addrs.items()))


def _require_local(address: str) -> None:
    """Refuse an address that is not one of this host's."""
    parsed = conf.parse_address(address)
    if parsed is None:
        raise LifecycleError(f"{address!r} is not an IPv4 or IPv6 address")
    family = socket.AF_INET6 if parsed.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            raise LifecycleError(f"{address} is not an address of this host") from None
