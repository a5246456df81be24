"""A cluster's life from the command line, in the running daemon: `pmxfs create`, `join-token`,
`add` and `delnode` (the control socket's lifecycle commands), and the join service.

How it works
------------
* `create` (on a standalone node): writes a new authkey and the cluster's first corosync.conf to
  the daemon's `--authkey` and `--config` paths, switches the running node to a one-member ring
  (`ReplicaNode.attach`, no unmount) and puts into the tree what every member needs: the
  corosync.conf, the authkey (`TREE_AUTHKEY`, so a node restored from a database backup comes
  back with its identity) and the join service's TLS key and certificate (`TREE_JOIN_PEM`, one
  for the whole cluster, so any member can serve a token and the token's fingerprint pins the
  cluster, not one host).
* `join-token` (on a quorate member): stores a fresh token's hash and expiry in the tree
  (`join_token.token_path`) and prints the token. Every member runs the join service on its own
  ring0 address and `--join-port` while an unexpired, unused token exists -- and only then.
* `add` (on the new, standalone node): asks the member named in the token (or HOST) over TLS,
  pinning the token's fingerprint (`join_tls.request_join`: a mismatch sends nothing), with its
  name, address and the VMIDs of its guest configs. The member checks, in this order: the rate
  limit of failed attempts, its own quorum, the token (known, unused, unexpired -- each failure
  counts towards the limit and is logged in the daemon log and the cluster log), then the
  request (name, address and node id free, no VMID that exists in the cluster). It then marks
  the token used (an exclusive create through the ring: of two concurrent uses exactly one wins),
  writes corosync.conf with the new node (config_version + 1; if that fails the token is given
  back) and answers with the corosync.conf and the authkey. The joiner backs up its database
  (`<data-dir>/backup/config-<unix time>.sql.gz`), writes the two files, attaches with an
  empty tree, which the cluster's sync fills, and once quorate writes its guest configs into
  it (their VMIDs were checked, so nothing of the cluster's is replaced).
* `delnode`: refuses this node itself and a node that is in the ring ("power it off first"),
  else writes corosync.conf without it (config_version + 1). Every member's totem and transport
  drop the node from then on; `nodes/NAME` stays, as pvecm leaves it.
Every wait is bounded; every refusal is a `LifecycleError` with one line for the admin.
"""

from __future__ import annotations

import base64
import binascii
import errno as E
import functools
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from pmxfs.core import conf
from pmxfs.core.conf import edit
from pmxfs.core.entry import guest_config
from pmxfs.core.errors import LocalError
from pmxfs.core.fsop import CreateFile, FsOp, Mkdir, Unlink, WriteFile
from pmxfs.core.join_limit import FailureLimiter
from pmxfs.core.join_token import (
    TOKEN_DIR,
    TokenError,
    TokenRecord,
    decode_record,
    decode_token,
    encode_record,
    encode_token,
    format_host_port,
    new_token,
    parse_host_port,
    token_path,
    used_path,
)
from pmxfs.core.memdb import COROSYNC_CONF
from pmxfs.runtime import attachments
from pmxfs.runtime.database import DatabaseError, backup_before_join
from pmxfs.runtime.durable_file import write_file
from pmxfs.runtime.join_tls import (
    JoinError,
    fingerprint,
    make_certificate,
    request_join,
    serve_join,
)
from pmxfs.runtime.replica_node import AttachError, ReplicaNode

log = logging.getLogger("pmxfs")

TREE_AUTHKEY = "priv/corosync.authkey"
TREE_JOIN_PEM = "priv/join-tls.pem"
AUTHKEY_BYTES = 256
WRITABLE_TIMEOUT_S = 30.0  # how long a lifecycle command waits for a quorate, synced tree
LISTEN_TIMEOUT_S = 5.0  # join-token: how long it waits for the join service to listen
JOIN_TIMEOUT_S = 30.0  # add: the whole exchange with the member
GUESTS_TIMEOUT_S = 90.0  # add: how long the joiner waits for quorum to put its guests back
JOIN_WORK_TIMEOUT_S = 10.0  # the member's work on one join (within join_tls's deadline)


class LifecycleError(LocalError):
    """Why a lifecycle command was refused or failed: one line."""


@dataclass(frozen=True)
class LifecyclePaths:
    """Where this node's cluster files live (the daemon's options)."""

    config: Path
    authkey: Path
    data_dir: Path
    join_port: int


class Lifecycle:
    def __init__(self, node: ReplicaNode, paths: LifecyclePaths) -> None:
        self.node = node
        self.paths = paths
        self.limiter = FailureLimiter()
        self._tokens_changed = trio.Event()
        self._listening: tuple[str, int] | None = None
        self._listening_changed = trio.Event()
        node.add_tree_listener(self._on_tree_change)

    # ------------------------------------------------------------------ create

    async def create(self, cluster_name: str, *, link0: str | None, nodeid: int, votes: int,
                     port: int | None) -> dict[str, Any]:
        self._require_standalone()
        if self.node.memdb.lookup(COROSYNC_CONF) is not None:
            raise LifecycleError("the tree already holds a corosync.conf: this node was in a "
                                 "cluster; remove /corosync.conf from the tree first")
        address = link0 or _host_address()
        _require_local(address)
        try:
            text = edit.new_cluster(cluster_name, self.node.node_name, nodeid, votes, address,
                                    port=port)
        except edit.EditError as exc:
            raise LifecycleError(str(exc)) from None
        config = _config_of(text)
        authkey = secrets.token_bytes(AUTHKEY_BYTES)
        await self._become_member(config, nodeid, text, authkey, wipe=False)
        await self._wait_writable("to put the new cluster's files into the tree")
        await self._put(COROSYNC_CONF, text.encode())
        await self._put(TREE_AUTHKEY, authkey)
        await self._join_pem()
        log.info("created cluster %s: node %s, id %d, %s", cluster_name, self.node.node_name,
                 nodeid, address)
        return {"cluster": cluster_name, "nodeid": nodeid, "address": address,
                "config_version": config.config_version}

    # ------------------------------------------------------------------ join-token

    async def join_token(self, ttl: int) -> dict[str, Any]:
        self._require_member()
        if not self.node.quorate():
            raise LifecycleError("this node is not quorate: make a token on a quorate member")
        await self._wait_writable("to store the token")
        pem = await self._join_pem()
        host = self._my_address()
        token = new_token(host, self.paths.join_port, fingerprint(pem))
        expires = int(time.time()) + ttl
        await self._mkdirs(TOKEN_DIR)
        await self._put(token_path(token.secret),
                        encode_record(TokenRecord(expires, self.node.node_name)))
        await self._forget_old_tokens()
        self._tokens_changed.set()
        with trio.move_on_after(LISTEN_TIMEOUT_S):
            while self._listening != (host, self.paths.join_port):
                await self._listening_changed.wait()
        if self._listening != (host, self.paths.join_port):
            raise LifecycleError(f"the token is stored, but the join service does not listen "
                                 f"on {format_host_port(host, self.paths.join_port)} (see the "
                                 "daemon log)")
        log.info("made a join token valid until %s", time.ctime(expires))
        return {"token": encode_token(token), "expires": expires}

    # ------------------------------------------------------------------ add (the joiner)

    async def add(self, host: str | None, token_text: str, *, link0: str | None,
                  nodeid: int | None, votes: int, force: bool) -> dict[str, Any]:
        """Join (module header); a failure is logged here too -- the member may never have
        heard of it (a wrong fingerprint sends nothing)."""
        try:
            return await self._add(host, token_text, link0=link0, nodeid=nodeid, votes=votes,
                                   force=force)
        except LifecycleError as exc:
            await self._log_refusal(f"joining a cluster failed: {exc}")
            raise

    async def _add(self, host: str | None, token_text: str, *, link0: str | None,
                   nodeid: int | None, votes: int, force: bool) -> dict[str, Any]:
        self._require_standalone()
        try:
            token = decode_token(token_text)
            target, port = ((token.host, token.port) if host is None
                            else parse_host_port(host, token.port))
        except TokenError as exc:
            raise LifecycleError(str(exc)) from None
        address = link0 or _source_address(target, port)
        _require_local(address)
        vmids = sorted(self.node.memdb.vmlist())
        request = {"secret": base64.b64encode(token.secret).decode(),
                   "name": self.node.node_name, "address": address, "nodeid": nodeid,
                   "votes": votes, "vmids": vmids, "force": force}
        try:
            answer = await request_join(target, port, token.fingerprint, request,
                                        timeout=JOIN_TIMEOUT_S)
        except JoinError as exc:
            raise LifecycleError(str(exc)) from None
        if answer.get("ok") is not True:
            raise LifecycleError(f"the cluster refused the join: "
                                 f"{answer.get('error', 'no reason given')}")
        text, authkey, my_id = _joined_files(answer, self.node.node_name)
        config = _config_of(text)
        try:
            backup = await trio.to_thread.run_sync(
                backup_before_join, self.paths.data_dir, self.node.database, int(time.time()))
        except DatabaseError as exc:
            raise LifecycleError(f"cannot back up this node's database before joining: {exc}; "
                                 f"the cluster already lists {self.node.node_name}: run `pmxfs "
                                 "add --force` again, or `pmxfs delnode` on a member") from None
        guests = self._guest_configs()
        await self._become_member(config, my_id, text, authkey, wipe=True)
        log.info("joined cluster %s as node %d; the old database is backed up in %s",
                 config.cluster_name, my_id, backup)
        await self._bring_guests(guests, backup)
        return {"cluster": config.cluster_name, "nodeid": my_id, "backup": str(backup)}

    def _guest_configs(self) -> list[tuple[str, bytes]]:
        """This node's guest configs (their VMIDs were checked against the cluster's)."""
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
                await self._put(path, data)
            except LifecycleError as exc:
                log.error("cannot put guest config %s back after the join (%s); it is in %s",
                          path, exc, backup)
        log.info("put %d guest config(s) of this node into the cluster's tree", len(guests))

    # ------------------------------------------------------------------ delnode

    async def delnode(self, name: str) -> dict[str, Any]:
        self._require_member()
        if name == self.node.node_name:
            raise LifecycleError("cannot remove this node itself: run delnode on another member")
        entry = next((i for i in self.node.infos if i.name == name), None)
        if entry is None:
            raise LifecycleError(f"there is no node {name} in the nodelist")
        if entry.nodeid in self.node.replica.status().members:
            raise LifecycleError(f"node {name} is a member of the ring: power it off first")
        await self._wait_writable("to change corosync.conf")
        try:
            text, _ = edit.without_node(self._tree_config_text(), name)
        except edit.EditError as exc:
            raise LifecycleError(str(exc)) from None
        await self._write_config(text)
        quorum = self.node.replica.status().quorum
        log.info("removed node %s (id %d) from the nodelist", name, entry.nodeid)
        return {"removed": name, "nodeid": entry.nodeid,
                "config_version": _config_of(text).config_version,
                "expected_votes": quorum.expected_votes, "kept": f"nodes/{name}"}

    # ------------------------------------------------------------------ the join service

    async def run_join_service(self) -> None:
        """Serve joins while an unexpired, unused token exists (module header); until
        cancelled."""
        while True:
            self._tokens_changed = trio.Event()
            until = None if self.node.standalone else self._last_expiry()
            if until is None:
                await self._tokens_changed.wait()
                continue
            where = (self._my_address(), self.paths.join_port)
            pem = self._tree_file(TREE_JOIN_PEM)
            if pem is None:
                await self._tokens_changed.wait()
                continue
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(functools.partial(
                        serve_join, where[0], where[1], pem, self._serve_one, stop=stop))
                except (OSError, JoinError) as exc:
                    log.error("cannot serve joins on %s: %s", format_host_port(*where), exc)
                    await self._tokens_changed.wait()
                    continue
                log.info("serving joins on %s", format_host_port(*where))
                self._set_listening(where)
                with trio.move_on_after(max(0.0, until - time.time())):
                    while True:
                        await self._tokens_changed.wait()
                        self._tokens_changed = trio.Event()
                        if (self.node.standalone or self._last_expiry() is None
                                or (self._my_address(), self.paths.join_port) != where):
                            break
                stop.set()  # no new connections; the exchanges under way get their answers
            self._set_listening(None)
            log.info("no valid join token left: stopped serving joins on %s",
                     format_host_port(*where))

    async def _serve_one(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        wait = self.limiter.retry_after(time.monotonic(), peer)
        if wait is not None:
            message = (f"too many failed join attempts from {peer}: refused; try again in "
                       f"{math.ceil(wait)} s")
            await self._log_refusal(message)
            return {"ok": False, "error": message}
        try:
            # A join that marked its token used finishes (or undoes its steps) even when the
            # daemon stops meanwhile: the token is gone, and the joiner waits for the answer.
            with trio.CancelScope(shield=True), trio.move_on_after(JOIN_WORK_TIMEOUT_S):
                return await self._join(request, peer)
            raise LifecycleError("the join took too long here; ask again")
        except LifecycleError as exc:
            await self._log_refusal(f"join refused ({peer}, node {request.get('name')!r}): "
                                    f"{exc}")
            return {"ok": False, "error": str(exc)}

    async def _join(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        if self.node.standalone or not self.node.quorate():
            raise LifecycleError("the member asked is not quorate; try another member")
        secret = self._checked_secret(request, peer)
        try:
            name, address, nodeid, votes, vmids, force = _join_fields(request)
        except (KeyError, TypeError, ValueError):
            raise LifecycleError("malformed join request") from None
        clash = sorted(set(vmids) & set(self.node.memdb.vmlist()))
        if clash:
            raise LifecycleError(
                "this node holds guests whose VMIDs exist in the cluster: "
                + ", ".join(map(str, clash)) + "; move or remove their configs, then join")
        same = next((i for i in self.node.infos if i.name == name), None)
        if same is not None and force and same.nodeid in self.node.replica.status().members:
            raise LifecycleError(f"a node named {name} is a member of the ring now")
        try:
            text, my_id = edit.with_node(self._tree_config_text(), name, address,
                                         nodeid=nodeid, votes=votes, replace=force)
        except edit.EditError as exc:
            raise LifecycleError(str(exc)) from None
        await self._use_token(secret)
        try:
            await self._write_config(text)
        except LifecycleError:
            await self._write(Unlink(used_path(secret)))  # the token works again
            raise
        authkey = await trio.Path(self.paths.authkey).read_bytes()
        message = f"node {name} (id {my_id}, {address}) joined from {peer}"
        log.info("%s", message)
        await self.node.log(priority=5, tag="pmxfs", user="root", pid=os.getpid(), msg=message)
        return {"ok": True, "corosync_conf": text, "nodeid": my_id,
                "authkey": base64.b64encode(authkey).decode()}

    def _checked_secret(self, request: dict[str, Any], peer: str) -> bytes:
        """The request's secret, if it is a token this cluster issued and may still use;
        else the failure is counted and refused."""
        now = time.time()
        reason = None
        try:
            secret = base64.b64decode(request["secret"], validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error):
            secret, reason = b"", "malformed join request"
        if reason is None:
            record_data = self._tree_file(token_path(secret))
            if self._tree_file(used_path(secret)) is not None:
                reason = "this join token was already used"
            elif record_data is None:
                reason = "unknown join token (wrong secret, or made for another cluster)"
            else:
                try:
                    record = decode_record(record_data)
                except TokenError:
                    reason = "the stored join token is damaged"
                else:
                    if record.expires <= now:
                        reason = f"this join token expired at {time.ctime(record.expires)}"
        if reason is not None:
            self.limiter.failed(time.monotonic(), peer)
            raise LifecycleError(reason)
        return secret

    async def _use_token(self, secret: bytes) -> None:
        reply = await self.node.write(CreateFile(used_path(secret), int(time.time()),
                                                 exclusive=True))
        if reply.errno == E.EEXIST:
            raise LifecycleError("this join token was already used")
        if reply.errno:
            raise LifecycleError("cannot mark the token used: "
                                 f"{_reason(reply.errno, reply.message)}")

    async def _log_refusal(self, message: str) -> None:
        log.warning("%s", message)
        await self.node.log(priority=4, tag="pmxfs", user="root", pid=os.getpid(), msg=message)

    def _set_listening(self, where: tuple[str, int] | None) -> None:
        self._listening = where
        self._listening_changed.set()
        self._listening_changed = trio.Event()

    def _on_tree_change(self, paths: tuple[str, ...], everything: bool) -> None:
        if everything or any(p.startswith(TOKEN_DIR) for p in paths):
            self._tokens_changed.set()

    def _last_expiry(self) -> int | None:
        """When the last valid token expires (unix s); None when there is none."""
        now = time.time()
        directory = self.node.memdb.lookup(TOKEN_DIR)
        if directory is None or not directory.is_dir:
            return None
        names = {e.name for e in self.node.memdb.children(directory.inode)}
        expiries = []
        for name in names:
            if name.endswith(".used") or f"{name}.used" in names:
                continue
            data = self._tree_file(f"{TOKEN_DIR}/{name}")
            try:
                record = None if data is None else decode_record(data)
            except TokenError:
                continue
            if record is not None and record.expires > now:
                expiries.append(record.expires)
        return max(expiries, default=None)

    async def _forget_old_tokens(self) -> None:
        """Remove the records (and used marks) of tokens that expired."""
        directory = self.node.memdb.lookup(TOKEN_DIR)
        if directory is None:
            return
        now = time.time()
        for entry in self.node.memdb.children(directory.inode):
            if entry.name.endswith(".used") or entry.is_dir:
                continue
            try:
                expired = decode_record(entry.data).expires <= now
            except TokenError:
                expired = True
            if expired:
                for path in (f"{TOKEN_DIR}/{entry.name}", f"{TOKEN_DIR}/{entry.name}.used"):
                    if self.node.memdb.lookup(path) is not None:
                        await self.node.write(Unlink(path))

    # ------------------------------------------------------------------ helpers

    async def _become_member(self, config: conf.ClusterConfig, nodeid: int, text: str,
                             authkey: bytes, *, wipe: bool) -> None:
        """Write the cluster's files and attach the node to the cluster; a failure removes
        the files again, so the node stays standalone."""
        paths = self.paths
        try:
            paths.config.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_file(paths.authkey, authkey, mode=0o400, replace=True)
            write_file(paths.config, text.encode(), mode=0o644)
        except OSError as exc:
            self._remove_files()
            raise LifecycleError(f"cannot write the cluster's files: {exc}") from None
        try:
            attachment = await attachments.cluster(config, nodeid, config_path=paths.config,
                                                   authkey_path=paths.authkey,
                                                   data_dir=paths.data_dir)
        except attachments.AttachmentError as exc:
            self._remove_files()
            raise LifecycleError(str(exc)) from None
        try:
            await self.node.attach(attachment, wipe=wipe)
        except AttachError as exc:
            attachment.transport.close()
            self._remove_files()
            raise LifecycleError(str(exc)) from None

    def _remove_files(self) -> None:
        for path in (self.paths.config, self.paths.authkey):
            path.unlink(missing_ok=True)

    def _require_standalone(self) -> None:
        if not self.node.standalone or self.paths.config.exists():
            raise LifecycleError(f"this node is already in a cluster ({self.paths.config} "
                                 "exists)")

    def _require_member(self) -> None:
        if self.node.standalone:
            raise LifecycleError("this node is not in a cluster: `pmxfs create` or `pmxfs add` "
                                 "first")

    def _my_address(self) -> str:
        return next(i.addr for i in self.node.infos if i.nodeid == self.node.node_id)

    def _tree_file(self, path: str) -> bytes | None:
        entry = self.node.memdb.lookup(path)
        return None if entry is None or entry.is_dir else entry.data

    def _tree_config_text(self) -> str:
        data = self._tree_file(COROSYNC_CONF)
        if data is None:
            raise LifecycleError("the tree holds no corosync.conf")
        return data.decode("utf-8", "replace")

    async def _wait_writable(self, what: str) -> None:
        if not await self.node.wait_writable(WRITABLE_TIMEOUT_S):
            raise LifecycleError(f"the tree did not become writable within "
                                 f"{WRITABLE_TIMEOUT_S:g} s {what}")

    async def _join_pem(self) -> bytes:
        """The cluster's join key and certificate, made and stored the first time."""
        pem = self._tree_file(TREE_JOIN_PEM)
        if pem is None:
            pem = make_certificate(f"pmxfs join {self.node.config.cluster_name}")
            await self._put(TREE_JOIN_PEM, pem)
        return pem

    async def _mkdirs(self, path: str) -> None:
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if self.node.memdb.lookup(directory) is None:
                reply = await self.node.write(Mkdir(directory, int(time.time())))
                if reply.errno not in (0, E.EEXIST):
                    raise LifecycleError(f"cannot create {directory} in the tree: "
                                         f"{_reason(reply.errno, reply.message)}")

    async def _put(self, path: str, data: bytes) -> None:
        if "/" in path:
            await self._mkdirs(path.rsplit("/", 1)[0])
        await self._write(WriteFile(path, data, int(time.time()), create=True))

    async def _write_config(self, text: str) -> None:
        await self._write(WriteFile(COROSYNC_CONF, text.encode(), int(time.time())))

    async def _write(self, op: FsOp) -> None:
        reply = await self.node.write(op)
        if reply.errno:
            raise LifecycleError(f"cannot write to the tree: {_reason(reply.errno, reply.message)}")


def _reason(errno: int, message: str) -> str:
    return message or os.strerror(errno)


def _config_of(text: str) -> conf.ClusterConfig:
    config = conf.check(text).config
    if config is None:
        raise LifecycleError("the cluster's corosync.conf is not valid")
    return config


def _join_fields(request: dict[str, Any]) -> tuple[str, str, int | None, int, list[int], bool]:
    name, address, nodeid = request["name"], request["address"], request["nodeid"]
    votes, vmids, force = request["votes"], request["vmids"], request["force"]
    if not (isinstance(name, str) and isinstance(address, str) and isinstance(votes, int)
            and isinstance(force, bool) and (nodeid is None or isinstance(nodeid, int))
            and isinstance(vmids, list) and all(isinstance(v, int) for v in vmids)):
        raise TypeError("malformed join request")
    return name, address, nodeid, votes, vmids, force


def _joined_files(answer: dict[str, Any], name: str) -> tuple[str, bytes, int]:
    """(corosync.conf, authkey, this node's id) from the member's answer, checked."""
    try:
        text, nodeid = answer["corosync_conf"], answer["nodeid"]
        authkey = base64.b64decode(answer["authkey"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise LifecycleError("the member's answer is malformed") from None
    if not isinstance(text, str) or not isinstance(nodeid, int) or not authkey:
        raise LifecycleError("the member's answer is malformed")
    me = _config_of(text).node_by_name(name)
    if me is None or me.nodeid != nodeid:
        raise LifecycleError("the member's corosync.conf does not list this node as agreed")
    return text, authkey, nodeid


def _host_address() -> str:
    """This host's address for a new cluster: the first non-loopback address its name
    resolves to."""
    host = socket.gethostname()
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        infos = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if not address.startswith("127.") and address != "::1":
            return address
    raise LifecycleError(f"cannot tell this host's cluster address ({host} resolves to no "
                         "address but loopback): give --link0 ADDR")


def _source_address(host: str, port: int) -> str:
    """The local address this host uses to reach `host` (no packet is sent)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return str(probe.getsockname()[0])
    except (OSError, IndexError) as exc:
        raise LifecycleError(f"cannot tell which address of this host reaches {host}: {exc}; "
                             "give --link0 ADDR") from None


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

