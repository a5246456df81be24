"""The member's side of `pmxfs add`: the join service, and the checks and writes of one join.

How it works
------------
* Every member listens (TLS, `runtime/join_tls.py`) on its ring0 address and `--join-port` while
  an unexpired, unused token is stored in the tree (`TOKEN_DIR`), and only then. It watches the
  tree for token changes and re-reads the expiry whenever it wakes, so a newer token keeps it
  listening. When it stops, the listener closes and the exchanges under way still get their
  answers.
* One join, in this order: the rate limit of failed attempts (per source and in total), the token
  (known, unused, unexpired; each failure counts towards the limit), this member's quorum, then
  the request (name, addresses and node id free, exactly the cluster's links, no VMID that
  exists in the cluster). Then, under the lifecycle lock (one lifecycle change at a time on this
  member), the token is marked used -- an exclusive create through the ring, so of two
  concurrent uses exactly one wins -- and corosync.conf is written with the new node
  (config_version + 1; built again from the newest config when another member's change came
  first). From the mark on, the work is not cancelled: a write already on the ring may commit,
  so it is waited for and, if it failed, the token is given back. The answer carries the
  corosync.conf and the authkey.
* The request carries the joiner's link 0 address in "address" and its addresses on further
  links in "links" ({"N": "ADDR"}); a request without "links" (an older joiner) has link 0 only,
  which a one-link cluster takes as before.
* Logging cannot be turned into a flood: a refusal by the rate limit is logged (daemon log and
  cluster log, which reaches every member) once per source and window, other refusals only
  when the limit let the attempt through, and names are shortened and escaped.
"""

from __future__ import annotations

import base64
import binascii
import errno as E
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from pmxfs.core.conf import edit
from pmxfs.core.fsop import CreateFile, Unlink
from pmxfs.core.join_limit import FailureLimiter
from pmxfs.core.join_token import (
    TOKEN_DIR,
    TokenError,
    decode_record,
    format_host_port,
    token_path,
    used_path,
)
from pmxfs.runtime.cluster_tree import TREE_JOIN_PEM, ClusterTree, LifecycleError
from pmxfs.runtime.join_tls import JoinError, serve_join
from pmxfs.runtime.quiet_log import QuietSources
from pmxfs.runtime.replica_node import ReplicaNode

log = logging.getLogger("pmxfs")

CONFIG_ATTEMPTS = 3  # a join's corosync.conf is built again when another change came first
SHOWN_NAME_CHARS = 64  # of a joiner's name in a log line


@dataclass(frozen=True)
class JoinRequest:
    """What a joiner sends (`Lifecycle.add`)."""

    secret: bytes
    name: str
    address: str
    nodeid: int | None
    votes: int
    vmids: tuple[int, ...]
    force: bool
    links: tuple[tuple[int, str], ...] = ()  # (link number, address) for links 1-7


def parse_request(request: dict[str, Any]) -> JoinRequest:
    """The request's fields, checked for type; `LifecycleError` when malformed."""
    try:
        secret = base64.b64decode(request["secret"], validate=True)
        name, address, nodeid = request["name"], request["address"], request["nodeid"]
        votes, vmids, force = request["votes"], request["vmids"], request["force"]
        links = edit.links_from_wire(request.get("links"))
    except (KeyError, TypeError, ValueError, binascii.Error, edit.EditError):
        raise LifecycleError("malformed join request") from None
    if not (isinstance(name, str) and isinstance(address, str) and _is_int(votes)
            and isinstance(force, bool) and (nodeid is None or _is_int(nodeid))
            and isinstance(vmids, list) and all(_is_int(v) for v in vmids)):
        raise LifecycleError("malformed join request")
    return JoinRequest(secret, name, address, nodeid, votes, tuple(vmids), force,
                       tuple(sorted(links.items())))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _addresses(request: JoinRequest) -> str:
    """The joiner's addresses for a log line: "10.0.0.4", or "10.0.0.4, link 1 10.1.0.4"."""
    return ", ".join([request.address, *(f"link {n} {a}" for n, a in request.links)])


def shown(name: object) -> str:
    """A joiner's name as a log line may show it: short and escaped."""
    return repr(str(name)[:SHOWN_NAME_CHARS])


class JoinService:
    def __init__(self, node: ReplicaNode, authkey: Path, join_port: int,
                 lock: trio.Lock) -> None:
        self.node = node
        self.tree = ClusterTree(node)
        self.authkey = authkey
        self.join_port = join_port
        self.lock = lock
        self.limiter = FailureLimiter()
        self.listening: tuple[str, int] | None = None
        self._listening_changed = trio.Event()
        self._tokens_changed = trio.Event()
        self._quiet = QuietSources()  # rate-limit lines logged
        node.add_tree_listener(self._on_tree_change)

    def tokens_changed(self) -> None:
        self._tokens_changed.set()

    async def wait_listening(self, where: tuple[str, int], timeout_s: float) -> bool:
        """Whether the service listens on `where` within `timeout_s`."""
        with trio.move_on_after(timeout_s):
            while self.listening != where:
                await self._listening_changed.wait()
        return self.listening == where

    async def run(self) -> None:
        """Serve joins while a valid token exists (module header); until cancelled."""
        while True:
            self._tokens_changed = trio.Event()
            where = self._where()
            pem = self.tree.file(TREE_JOIN_PEM)
            if where is None or pem is None or self._last_expiry() is None:
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
                await self._serve_while_valid(where, pem)
                stop.set()  # no new connections; the exchanges under way get their answers
            self._set_listening(None)
            log.info("stopped serving joins on %s", format_host_port(*where))

    async def _serve_while_valid(self, where: tuple[str, int], pem: bytes) -> None:
        """Until no valid token is left, or the address or certificate changed."""
        while True:
            until = self._last_expiry()
            if until is None or self._where() != where or self.tree.file(TREE_JOIN_PEM) != pem:
                return
            with trio.move_on_after(max(0.0, until - time.time())):
                await self._tokens_changed.wait()
            self._tokens_changed = trio.Event()

    def _where(self) -> tuple[str, int] | None:
        if self.node.standalone:
            return None
        address = self.tree.my_address()
        return None if address is None else (address, self.join_port)

    async def _serve_one(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        wait = self.limiter.retry_after(time.monotonic(), peer)
        if wait is not None:
            message = (f"too many failed join attempts from {peer}: refused; try again in "
                       f"{math.ceil(wait)} s")
            await self._log_rate_limited(peer, message, wait)
            return {"ok": False, "error": message}
        try:
            return await self._join(request, peer)
        except LifecycleError as exc:
            message = f"join refused ({peer}, node {shown(request.get('name'))}): {exc}"
            log.warning("%s", message)
            await self.node.log(priority=4, tag="pmxfs", user="root", pid=os.getpid(),
                                msg=message)
            return {"ok": False, "error": str(exc)}

    async def _log_rate_limited(self, peer: str, message: str, wait: float) -> None:
        """In the daemon log and the cluster log, once per source and window: a client
        hammering the service must not flood them (the refusal is answered every time)."""
        if not self._quiet.should_log(peer, time.monotonic(), wait):
            return
        log.warning("%s (logged once until then)", message)
        await self.node.log(priority=4, tag="pmxfs", user="root", pid=os.getpid(), msg=message)

    async def _join(self, raw: dict[str, Any], peer: str) -> dict[str, Any]:
        try:
            request = parse_request(raw)
        except LifecycleError:
            self.limiter.failed(time.monotonic(), peer)
            raise
        self._check_token(request.secret, peer)  # before anything else is said or logged
        if self.node.standalone or not self.node.quorate():
            raise LifecycleError("the member asked is not quorate; try another member")
        clash = sorted(set(request.vmids) & set(self.node.memdb.vmlist()))
        if clash:
            raise LifecycleError(
                "this node holds guests whose VMIDs exist in the cluster: "
                + ", ".join(map(str, clash)) + "; move or remove their configs, then join")
        async with self.lock:
            same = next((i for i in self.node.infos if i.name == request.name), None)
            if (same is not None and request.force
                    and same.nodeid in self.node.replica.status().members):
                raise LifecycleError(f"a node named {request.name} is a member of the ring now")
            self._new_config(request)  # refuses a name, address or node id in use first
            with trio.CancelScope(shield=True):  # once spent, the token's join finishes
                await self._use_token(request.secret)
                text, nodeid = await self._add_to_config(request)
        authkey = await trio.Path(self.authkey).read_bytes()
        message = (f"node {shown(request.name)} (id {nodeid}, {_addresses(request)}) joined "
                   f"from {peer}")
        log.info("%s", message)
        await self.node.log(priority=5, tag="pmxfs", user="root", pid=os.getpid(), msg=message)
        return {"ok": True, "corosync_conf": text, "nodeid": nodeid,
                "authkey": base64.b64encode(authkey).decode()}

    def _new_config(self, request: JoinRequest) -> tuple[str, int]:
        try:
            return edit.with_node(self.tree.config_text(), request.name, request.address,
                                  nodeid=request.nodeid, votes=request.votes,
                                  replace=request.force, links=dict(request.links))
        except edit.EditError as exc:
            raise LifecycleError(str(exc)) from None

    async def _add_to_config(self, request: JoinRequest) -> tuple[str, int]:
        """corosync.conf with the joiner, written; built again from the newest config when a
        change of another member came first. On failure the token works again."""
        try:
            for _ in range(CONFIG_ATTEMPTS):
                base = self.tree.config_text()
                text, nodeid = self._new_config(request)
                try:
                    await self.tree.write_config(text)
                    return text, nodeid
                except LifecycleError:
                    if self.tree.config_text() == base:
                        raise
            raise LifecycleError("corosync.conf kept changing meanwhile; try again")
        except LifecycleError:
            await self.node.write(Unlink(used_path(request.secret)))
            raise

    def _check_token(self, secret: bytes, peer: str) -> None:
        """Refuse (and count) a token this cluster did not issue or may not use any more."""
        reason = None
        record_data = self.tree.file(token_path(secret))
        if self.tree.file(used_path(secret)) is not None:
            reason = "this join token was already used"
        elif record_data is None:
            reason = "unknown join token (wrong secret, or made for another cluster)"
        else:
            try:
                expires = decode_record(record_data).expires
            except TokenError:
                reason = "the stored join token is damaged"
            else:
                if expires <= time.time():
                    reason = f"this join token expired at {time.ctime(expires)}"
        if reason is not None:
            self.limiter.failed(time.monotonic(), peer)
            raise LifecycleError(reason)

    async def _use_token(self, secret: bytes) -> None:
        reply = await self.node.write(CreateFile(used_path(secret), int(time.time()),
                                                 exclusive=True))
        if reply.errno:
            raise LifecycleError("this join token was already used" if reply.errno == E.EEXIST
                                 else f"cannot mark the token used: {os.strerror(reply.errno)}")

    def _set_listening(self, where: tuple[str, int] | None) -> None:
        self.listening = where
        self._listening_changed.set()
        self._listening_changed = trio.Event()

    def _on_tree_change(self, paths: tuple[str, ...], everything: bool) -> None:
        if everything or any(p.startswith(TOKEN_DIR) or p in (TREE_JOIN_PEM, "corosync.conf")
                             for p in paths):
            self._tokens_changed.set()

    def _last_expiry(self) -> int | None:
        """When the last valid token expires (unix s); None when there is none."""
        directory = self.node.memdb.lookup(TOKEN_DIR)
        if directory is None or not directory.is_dir:
            return None
        now = time.time()
        entries = self.node.memdb.children(directory.inode)
        names = {e.name for e in entries}
        expiries = []
        for entry in entries:
            if entry.is_dir or entry.name.endswith(".used") or f"{entry.name}.used" in names:
                continue
            try:
                expires = decode_record(entry.data).expires
            except TokenError:
                continue
            if expires > now:
                expiries.append(expires)
        return max(expiries, default=None)

    async def forget_old_tokens(self) -> None:
        """Remove the records (and used marks) of tokens that expired."""
        directory = self.node.memdb.lookup(TOKEN_DIR)
        if directory is None:
            return
        now = time.time()
        for entry in self.node.memdb.children(directory.inode):
            if entry.is_dir or entry.name.endswith(".used"):
                continue
            try:
                expired = decode_record(entry.data).expires <= now
            except TokenError:
                expired = True
            if expired:
                for path in (f"{TOKEN_DIR}/{entry.name}", f"{TOKEN_DIR}/{entry.name}.used"):
                    if self.node.memdb.lookup(path) is not None:
                        await self.node.write(Unlink(path))
