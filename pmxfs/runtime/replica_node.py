"""The running node: a `Replica` driven with real time, frames, a database and local files.

`ReplicaNode.run()` drives the replica with a `CoreLoop` (receive and timer tasks in the daemon's
one trio thread, see runtime/core_loop.py): frames are accepted, the frames totem wants sent (the
token) leave, and only then does the replica digest what was delivered. After every core call
the outputs are carried out in their order:
* `Send` → transport; `PersistRingSeq` → the ring seq file (fsynced before later frames leave);
* `Persist` → handed to the persister (runtime/persister.py), a thread that commits whatever is
  queued when it wakes, in one SQLite transaction (group commit), and reports the last one done
  back into the trio thread, where it goes to `Replica.persisted`. The token never waits for
  the disk: a slow fsync delays only the replies that need this node's disk (the replica
  answers a write once every member reported it durable), never the ring's membership;
* `Reply` → wakes the FUSE or control call waiting for it;
* `SaveLost` → files under `<data-dir>/lost+found/<ring>/`;
* `Invalidate` → the FUSE layer drops stale kernel caches; `QuorumChanged` → all of them, when
  the node became quorate or stopped being so (every mode shows it);
* `ConfigChanged` → the local corosync.conf is rewritten atomically, `status`, `nodes` and
  `.members` show the new config (name, config_version, nodelist, votes) from then on, and the
  transport takes the new nodelist's addresses and crypto peers (the replica has already handed
  the node set and timers to totem). What cannot change while running (this node's own address,
  and what `conf.validate_update` sorts as needing a restart) is logged and listed in `status`.
  With knet the transport takes the new links whole (`KnetTransport.set_links`: links added or
  removed, other addresses -- this node's too --, ports, priorities, timers).

Links. `status` and the control command `links` list one entry per peer and link (`links()`):
with knet the transport's link health; with udpu and udp the one link 0, connected while the
peer is in this node's ring. A knet link going down or up is one line in the daemon log and one
in the cluster log, written by `_report_links` (the transport tells it from its receive path,
where nothing may wait).

Attachments. What the node runs as -- its node id and config, the local corosync.conf it keeps in
step (none: standalone), its transport and ring seq store -- is an `Attachment`. `attach()`
replaces it while the node runs, without unmounting: `pmxfs create` turns a standalone node into
the first member of a cluster, `pmxfs add` a standalone node into a member of another cluster
(`wipe`: the joiner takes the cluster's tree whole, after backing up its own). New writes wait
meanwhile, the ones in flight are answered first; then the core loop and the persister stop, the
old transport closes, a new replica is built from the database and everything the kernel caches
is dropped.
An output that cannot be carried out (a database that cannot commit, above all) stops the node:
acknowledging writes that are not on disk would break the one promise the node makes. Whoever
drove the core at that moment -- the core loop, or a FUSE or control request that flushed --
gets `NodeStopped`, so does every call waiting for a reply and every later call, and `run()`
raises the original error, so the daemon stops (leaving its mount dead) instead of answering
from a replica that went on without it.

The node also answers the FUSE layer (`FsNode`) and the control socket (`ControlNode`).

Quorum device. The daemon's device client (runtime/qdevice_client.py) is told every new ring
and every new stamp of the tree (`add_ring_listener`: ring id, members, quorate, and the seq of
the newest quorate ring the tree comes from, which qnetd weighs; checked after every flush;
listeners must not call back into the node from there) and casts or withdraws the device's vote
with `set_qdevice_vote`, which the replica sends through the ring tied to that ring's id.
`status` shows the device while corosync.conf configures one; its flags are this node's, as
votequorum's: `QdeviceAlive` while the client says it is connected and welcomed
(`set_qdevice_alive`), `QdeviceCastVote` while it also casts the vote for the current ring. The
votes table's Qdevice line shows whether the ring counts the device's votes (any member may cast
them).
"""

from __future__ import annotations

import dataclasses
import errno as E
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import trio

from pmxfs.core.conf import ClusterConfig, effective_transport, totem_params, validate_update
from pmxfs.core.conf import check as check_config
from pmxfs.core.entry import guest_config
from pmxfs.core.errors import LocalError
from pmxfs.core.fsop import FsOp, Mkdir, Rename, WriteFile, op_paths
from pmxfs.core.link_health import LinkEvent
from pmxfs.core.memdb import COROSYNC_CONF, MemDB
from pmxfs.core.persist import Persist
from pmxfs.core.qdevice_settings import device_settings
from pmxfs.core.replica import (
    DEFAULT_VERIFY_INTERVAL_MS,
    ConfigChanged,
    Invalidate,
    Output,
    QuorumChanged,
    Replica,
    Reply,
    SaveLost,
    StoredState,
)
from pmxfs.core.status import (
    RRD_CONTENT,
    ChangeCounters,
    ClusterInfo,
    MemberNode,
    render_clusterlog,
    render_debug,
    render_members,
    render_version,
    render_vmlist,
)
from pmxfs.core.totem import ConfChange, ConfChangeKind, PersistRingSeq, Send
from pmxfs.core.totem_params import TotemParams
from pmxfs.core.wire import RingId
from pmxfs.runtime.core_loop import CoreLoop, FrameTransport
from pmxfs.runtime.database import Database
from pmxfs.runtime.durable_file import write_file
from pmxfs.runtime.knet_transport import KnetTransport, link_mode, link_specs
from pmxfs.runtime.node_api import Invalidator
from pmxfs.runtime.node_metrics import NodeStats
from pmxfs.runtime.persister import Persister
from pmxfs.runtime.ring_seq import RingSeqStore

log = logging.getLogger("pmxfs")

NODE_DIRS = ("qemu-server", "lxc", "priv")
# How long a write waits for room among the replica's pending proposals before it is answered
# EAGAIN: back-pressure blocks writers instead of failing them, but not for ever.
ROOM_TIMEOUT_S = 30.0
# How long `attach` waits for the writes in flight to be answered before it gives up.
ATTACH_DRAIN_TIMEOUT_S = 20.0
SWITCHING = "this node is changing its cluster membership; try again"


class NodeStopped(LocalError):
    """The node could not carry out an output of its replica and stopped (module header)."""


class AttachError(LocalError):
    """`attach` could not start: writes still in flight, or another attach under way."""


@dataclass(frozen=True)
class Attachment:
    """What the node runs as (module header)."""

    node_id: int
    config: ClusterConfig
    config_path: Path | None  # the local corosync.conf kept in step; None: standalone
    transport: FrameTransport
    ring_seq_store: RingSeqStore
    incarnation: int


@dataclass(frozen=True)
class RingView:
    """A regular ring as this node's replica took it."""

    ring: RingId
    members: tuple[int, ...]
    quorate: bool  # when the view was taken (the agreed quorum may follow later)
    stamp: int = 0  # the seq of the newest quorate ring the tree comes from


RingListener = Callable[[RingView], None]


@dataclass
class _Switch:
    attachment: Attachment
    wipe: bool
    done: trio.Event


@dataclass
class _AcceptingCore:
    """The replica as the core loop drives it: frames are only accepted on receipt, and the
    loop has the replica digest them once the frames to send have left."""

    replica: Replica

    def receive(self, now: int, src: int, data: bytes) -> None:
        self.replica.accept(now, src, data)

    def on_timer(self, now: int) -> None:
        self.replica.on_timer(now)

    def next_deadline(self) -> int | None:
        return self.replica.next_deadline()


@dataclass
class _Waiter:
    done: trio.Event
    reply: Reply | None = None


def _emptied(database: Database, data_dir: Path) -> Database:
    """`database` closed, its files removed and an empty one opened in their place."""
    database.close()
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"config.db{suffix}").unlink(missing_ok=True)
    return Database.open(data_dir)


class ReplicaNode:
    def __init__(
        self,
        *,
        node_id: int,
        config: ClusterConfig,
        config_path: Path | None,
        params: TotemParams,
        transport: FrameTransport,
        database: Database,
        ring_seq_store: RingSeqStore,
        incarnation: int,
        data_dir: Path,
        verify_interval: int = DEFAULT_VERIFY_INTERVAL_MS,
    ) -> None:
        self.database = database
        self.data_dir = data_dir
        self.verify_interval = verify_interval
        self.debug_enabled = False
        self.started_at = int(time.time())
        self._wall_offset = int(time.time() * 1000)
        self._invalidator: Invalidator = lambda paths, everything: None
        self._tree_listeners: list[Invalidator] = []
        self._ring_listeners: list[RingListener] = []
        self._ring_told: tuple[RingId, int] | None = None  # last (ring, stamp) listeners saw
        self._qdevice_alive = False
        self._qdevice_cast: RingId | None = None  # the ring this node's client casts for
        self._waiters: dict[int, _Waiter] = {}
        self._room = trio.Event()  # set (and replaced) whenever a reply frees a pending slot
        self._failure: Exception | None = None  # the output that could not be carried out
        self._session_over = trio.Event()  # set to end the running attachment's tasks
        self._switch: _Switch | None = None
        self._switch_idle = trio.Event()  # set while no attach is under way
        self._switch_idle.set()
        self._generation = 0  # counts attachments: a report of an earlier persister is stale
        self._running = False  # between the start and the end of `run`: reports are taken
        self._shown_quorate: bool | None = None  # what the kernel's cached attributes show
        self._next_request = 0
        self._members_version = 0
        self._vmlist_version = 0
        self._counters = ChangeCounters()
        self.stats = NodeStats()  # for metrics (runtime/node_metrics.py); kept across attaches
        self.restart_needed: list[str] = []  # config changes this run could not take
        self._joined: dict[int, int] = {}  # node id -> when it joined this node's ring (wall s)
        self.synced_once = trio.Event()
        # set (and replaced) whenever quorate() or the replica's synced() changes
        self._writable_changed = trio.Event()
        self._writable_state = (False, False)
        self._name = next(i.name for i in config.node_infos() if i.nodeid == node_id)
        self._install(Attachment(node_id, config, config_path, transport, ring_seq_store,
                                 incarnation), params)

    def _install(self, attachment: Attachment, params: TotemParams) -> None:
        """Run as `attachment` from now on: a new replica from the database, a new core loop
        and persister (started by `run`)."""
        self.node_id = attachment.node_id
        self.config = attachment.config
        self.config_path = attachment.config_path
        self.transport = attachment.transport
        self.ring_seq_store = attachment.ring_seq_store
        self.infos = attachment.config.node_infos()
        self._generation += 1
        self.loop = CoreLoop(self.transport, self._flush)
        self._persister = Persister(self.database,
                                    functools.partial(self._persisted, self._generation),
                                    on_commit=self.stats.note_commit)
        self._joined = {}
        self._wanted_addresses: dict[int, str] = {}
        self._wanted_links: ClusterConfig | None = None  # knet: the config whose links to take
        self._addresses_changed = trio.Event()  # set when _wanted_addresses is news
        self._link_events: list[LinkEvent] = []
        self._link_news = trio.Event()  # set when _link_events has some
        if isinstance(self.transport, KnetTransport):
            self.transport.set_link_listener(self._on_link_event)
        loaded = self.database.load()
        self.replica = Replica(
            self.node_id, self.config, params, 0, incarnation=attachment.incarnation,
            stored=StoredState(tuple(loaded.entries), loaded.version, loaded.meta),
            ring_seq=self.ring_seq_store.load(), wall_offset=self._wall_offset,
            first_log_uid=attachment.incarnation, verify_interval=self.verify_interval)
        self._flush()

    @property
    def standalone(self) -> bool:
        """Whether this node runs without a cluster (no corosync.conf of its own)."""
        return self.config_path is None

    # ------------------------------------------------------------------ time

    def now(self) -> int:
        return self.loop.now()

    def wall_seconds(self) -> int:
        return int(time.time())

    # ------------------------------------------------------------------ FsNode

    @property
    def node_name(self) -> str:
        return self._name

    @property
    def memdb(self) -> MemDB:
        return self.replica.memdb

    def quorate(self) -> bool:
        return self.replica.writable()

    def set_invalidator(self, invalidator: Invalidator) -> None:
        self._invalidator = invalidator

    def add_tree_listener(self, listener: Invalidator) -> None:
        """`listener` is told the paths of every change of the tree, as the FUSE layer is."""
        self._tree_listeners.append(listener)

    def tree_file(self, path: str) -> bytes | None:
        """The content of the file `path` of the tree; None when there is no such file."""
        entry = self.memdb.lookup(path)
        return None if entry is None or entry.is_dir else entry.data

    def add_ring_listener(self, listener: RingListener) -> None:
        """`listener` is told every regular ring this node takes (module header)."""
        self._ring_listeners.append(listener)

    def ring_view(self) -> RingView:
        """The current ring (the last regular configuration's) and the tree's stamp."""
        replica = self.replica
        return RingView(replica.ring, tuple(replica.members), self.quorate(),
                        replica.quorate_ring_seq)

    def set_qdevice_vote(self, ring: RingId, vote: bool) -> None:
        """This node's device client got or lost the device's vote for `ring` (module
        header); ignored by the replica when `ring` is not its current ring."""
        self._check_running()
        self._qdevice_cast = ring if vote else None
        self.replica.set_qdevice_vote(self.now(), ring, vote)
        self._flush()

    def set_qdevice_alive(self, alive: bool) -> None:
        """Whether the device client is connected to qnetd and welcomed (`status`)."""
        self._qdevice_alive = alive

    async def wait_writable(self, timeout_s: float) -> bool:
        """Wait until the node is quorate and synced; whether it is, after at most
        `timeout_s`."""
        with trio.move_on_after(timeout_s):
            while not (self.quorate() and self.replica.synced()):
                await self._writable_changed.wait()
        return self.quorate() and self.replica.synced()

    async def write(self, op: FsOp) -> Reply:
        self._check_running()
        if not await self._admitted():
            return Reply(0, E.EAGAIN, SWITCHING)
        request = self._new_request()
        started = time.monotonic()
        self.replica.propose(self.now(), request, op)
        self.stats.proposed += 1
        reply = await self._wait(request)
        self.stats.note_reply(reply.errno, time.monotonic() - started)
        if reply.errno == E.EINVAL and COROSYNC_CONF in op_paths(op):
            await self._explain_refused_config(op)
        return reply

    async def _explain_refused_config(self, op: FsOp) -> None:
        """A refused corosync.conf: say why in the daemon log and the cluster log."""
        if isinstance(op, WriteFile):
            text = op.data.decode("utf-8", "replace")
        elif isinstance(op, Rename) and (entry := self.memdb.lookup(op.src)) is not None:
            text = entry.data.decode("utf-8", "replace")
        else:
            return
        current = self.memdb.lookup(COROSYNC_CONF)
        base = None if current is None else check_config(current.data.decode("utf-8", "replace"))
        result = check_config(text, current=None if base is None else base.config)
        reasons = "; ".join(str(e) for e in result.errors) or "the update is not allowed"
        message = f"refused a new corosync.conf: {reasons}"
        log.warning("%s", message)
        await self.log(priority=3, tag="pmxfs", user="root", pid=os.getpid(), msg=message)

    def virtual_file(self, name: str) -> bytes:
        if name == ".members":
            return render_members(self._name, self._members_version, self._cluster_info())
        if name == ".vmlist":
            return render_vmlist(self._vmlist_version, self.memdb.vmlist())
        if name == ".version":
            return render_version(self.started_at, self._members_version,
                                  self._vmlist_version, self._counters, self._name)
        if name == ".clusterlog":
            return render_clusterlog(self.replica.status().recent_log)
        if name == ".debug":
            return render_debug(self.debug_enabled)
        if name == ".rrd":
            return RRD_CONTENT
        raise KeyError(name)

    def set_debug(self, enabled: bool) -> None:
        self.debug_enabled = enabled
        log.setLevel(logging.DEBUG if enabled else logging.INFO)

    # ------------------------------------------------------------------ ControlNode

    def status(self) -> dict[str, Any]:
        now = self.replica.status()
        q = now.quorum
        votes = dict(q.member_votes)
        ring = now.ring
        device = None if self.standalone else device_settings(self.config)
        casting = self._qdevice_alive and self._qdevice_cast == ring
        flags = [f for f in q.flags if f != "QdeviceCastVote"]  # the ring's: shown as this node's
        if device is not None:  # corosync-quorumtool's order, after Qdevice
            at = flags.index("Qdevice") + 1 if "Qdevice" in flags else len(flags)
            flags[at:at] = [name for name, on in (("QdeviceAlive", self._qdevice_alive),
                                                  ("QdeviceCastVote", casting)) if on]
        return {
            "cluster": {"name": self.config.cluster_name,
                        "config_version": self.config.config_version,
                        "transport": effective_transport(self.config)},
            "node": {"name": self._name, "nodeid": self.node_id},
            "quorum": {"quorate": q.quorate, "expected_votes": q.expected_votes,
                       "highest_expected": q.highest_expected, "total_votes": q.total_votes,
                       "quorum": q.quorum, "flags": flags},
            "membership": {
                "ring_id": f"{ring.rep}.{ring.seq}",
                "members": [{"nodeid": m, "name": self._names().get(m, str(m)),
                             "votes": votes.get(m, 0), "local": m == self.node_id}
                            for m in now.members],
            },
            "fs": {"synced": now.synced, "version": self.memdb.version},
            "links": self.links(),
        } | ({"restart_needed": list(self.restart_needed)} if self.restart_needed else {}) | (
            {} if device is None else {"qdevice": {
                "host": device.address, "algorithm": device.algorithm,
                "connected": self._qdevice_alive, "casting_vote": casting}})

    def links(self) -> list[dict[str, Any]]:
        """One entry per peer and link (module header): nodeid, name, link, address,
        connected, active."""
        names = self._names()
        if isinstance(self.transport, KnetTransport):
            return [{"nodeid": s.peer, "name": names.get(s.peer, str(s.peer)), "link": s.link,
                     "address": s.address, "connected": s.connected, "active": s.active}
                    for s in self.transport.links_status()]
        if self.standalone:
            return []
        ring = set(self.replica.status().members)
        return [{"nodeid": i.nodeid, "name": i.name, "link": 0, "address": i.addr,
                 "connected": i.nodeid in ring, "active": i.nodeid in ring}
                for i in self.infos if i.nodeid != self.node_id]

    def pending_writes(self) -> int:
        """Writes and control requests waiting for their answer now (metrics)."""
        return len(self._waiters)

    def nodes(self) -> list[dict[str, Any]]:
        online = set(self.replica.status().members)
        return [{"nodeid": i.nodeid, "votes": i.votes, "name": i.name,
                 "local": i.nodeid == self.node_id, "online": i.nodeid in online,
                 "joined": self._joined.get(i.nodeid) if i.nodeid in online else None}
                for i in self.infos]

    async def _admitted(self) -> bool:
        """Wait, at most ROOM_TIMEOUT_S, until no attach is under way and the replica has room
        for a proposal; whether no attach is under way. The caller proposes right after, with
        no checkpoint between: an attach that starts in that gap would otherwise find no write
        in flight and tear down the replica the proposal went to."""
        with trio.move_on_after(ROOM_TIMEOUT_S):
            while not self._switch_idle.is_set() or self.replica.full():
                await (self._room if self._switch_idle.is_set() else self._switch_idle).wait()
                self._check_running()
        return self._switch_idle.is_set()

    async def set_expected(self, expected: int) -> Reply:
        self._check_running()
        if not await self._admitted():
            return Reply(0, E.EAGAIN, SWITCHING)
        request = self._new_request()
        self.replica.propose_expected(self.now(), request, expected)
        return await self._wait(request)

    async def log(self, *, priority: int, tag: str, user: str, pid: int, msg: str) -> None:
        with trio.move_on_after(ROOM_TIMEOUT_S):
            await self._switch_idle.wait()
        self.replica.log(self.now(), pri=priority, tag=tag, pid=pid, user=user, msg=msg)
        self._flush()

    def debug(self, topic: str) -> dict[str, Any]:
        now = self.replica.status()
        if topic == "ring":
            st = now.totem
            return {"node_id": st.node_id, "state": st.state.value,
                    "ring_id": f"{st.ring_id.rep}.{st.ring_id.seq}", "members": list(st.members),
                    "seq": st.seq, "aru": st.aru, "pending_messages": st.pending_messages,
                    "counters": st.counters,
                    "params": dataclasses.asdict(self.replica.totem.params)}
        if topic == "transport":
            return dict(self.transport.counters)
        if topic == "quorum":
            return now.quorum.to_json()
        if topic == "tree":
            return {"entries": [
                {"path": self.memdb.path_of(e.inode), "type": "dir" if e.is_dir else "file",
                 "size": len(e.data), "version": e.version, "writer": e.writer,
                 "mtime": e.mtime} for e in self.memdb.entries()]}
        if topic == "checksum":
            return {"tree": self.memdb.checksum().hex(),
                    "state": self.replica.state_checksum().hex(),
                    "version": self.memdb.version, "synced": now.synced,
                    "replica": {"mode": now.mode.value, "counters": now.counters}}
        if topic == "verify":
            self.replica.verify_now(self.now())
            self._flush()
            return {"started": True}
        raise KeyError(topic)

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Drive the replica until cancelled, through every attachment; raises the error of an
        output that could not be carried out (module header)."""
        self._running = True
        try:
            while True:
                await self._run_attached()
                if self._failure is not None or self._switch is None:
                    break
                self._take_switch(self._switch)
        finally:
            self._running = False
        if self._failure is not None:
            raise self._failure

    async def _run_attached(self) -> None:
        """The tasks of the current attachment, until the node fails or an attach ends them."""
        self._persister.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.loop.run, _AcceptingCore(self.replica),
                                   self.replica.digest)
                nursery.start_soon(self._first_start_setup)
                nursery.start_soon(self._apply_addresses)
                nursery.start_soon(self._report_links)
                await self._session_over.wait()
                nursery.cancel_scope.cancel()
        except* NodeStopped:
            pass  # the tasks that met the stopped node afterwards: the failure is raised below
        finally:
            self._persister.stop()  # a clean stop commits what was delivered

    async def attach(self, attachment: Attachment, *, wipe: bool,
                     prepare: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run as `attachment` from now on (module header); with `wipe` the tree starts empty
        and is taken from the cluster. New writes wait; `AttachError` when the writes in flight
        are not answered within `ATTACH_DRAIN_TIMEOUT_S` (nothing changed then). `prepare` runs
        once they are, while writes still wait (a backup of the tree, say); when it raises,
        nothing changes either."""
        self._check_running()
        if self._switch is not None or not self._switch_idle.is_set():
            raise AttachError("another change of this node's cluster membership is under way")
        self._switch_idle = trio.Event()
        try:
            with trio.move_on_after(ATTACH_DRAIN_TIMEOUT_S):
                while self._waiters:
                    await self._room.wait()
                    self._check_running()
            if self._waiters:
                raise AttachError("writes are still in flight; try again")
            if prepare is not None:
                await prepare()
            switch = _Switch(attachment, wipe, trio.Event())
            self._switch = switch
            self._session_over.set()
            await switch.done.wait()
            self._check_running()
        finally:
            self._switch_idle.set()

    def _take_switch(self, switch: _Switch) -> None:
        """In `run`, between two attachments: the old transport closes, the database starts
        empty when asked, and the new attachment is installed."""
        try:
            for waiter in self._waiters.values():  # none is left; if one were, it must not hang
                waiter.done.set()
            self.transport.close()
            if switch.wipe:
                self.database = _emptied(self.database, self.data_dir)
            self._install(switch.attachment, totem_params(switch.attachment.config))
            self._members_version += 1
            self._vmlist_version += 1
            self._shown_quorate = None
            self._invalidator((), True)
            for listener in self._tree_listeners:
                listener((), True)
            log.info("now %s: node %s, id %d", "standalone" if self.standalone else
                     f"a member of cluster {self.config.cluster_name}", self._name, self.node_id)
        finally:
            self._switch = None
            self._session_over = trio.Event()
            switch.done.set()

    def _persisted(self, generation: int, last_id: int, error: Exception | None) -> None:
        """The persister's report, in the trio thread: never raises (trio calls it)."""
        if not self._running or self._failure is not None or generation != self._generation:
            return
        try:
            if error is not None:
                self._stop(error)
            self.replica.persisted(self.now(), last_id)
            self._flush()
        except NodeStopped:
            return  # the failure is recorded; run() raises it

    def _check_running(self) -> None:
        if self._failure is not None:
            raise NodeStopped(f"the node stopped: {self._failure}") from self._failure

    async def _first_start_setup(self) -> None:
        """Once this node can write: nodes/<me>/{qemu-server,lxc,priv}, and the cluster's
        corosync.conf in the tree when it is not there yet (taken from the local copy)."""
        await self.synced_once.wait()
        wanted = ["nodes", f"nodes/{self._name}",
                  *(f"nodes/{self._name}/{d}" for d in NODE_DIRS)]
        while not (self.quorate() and self.replica.synced()):
            await self._writable_changed.wait()
        for path in wanted:
            if self.memdb.lookup(path) is None:
                reply = await self.write(Mkdir(path, self.wall_seconds()))
                if reply.errno not in (0, E.EEXIST):
                    log.warning("cannot create %s: %s", path, os.strerror(reply.errno))
                    return
        if self.config_path is not None and self.memdb.lookup(COROSYNC_CONF) is None:
            text = await trio.Path(self.config_path).read_bytes()
            reply = await self.write(WriteFile(COROSYNC_CONF, text, self.wall_seconds(),
                                               create=True))
            if reply.errno not in (0, E.EEXIST):
                log.warning("cannot put %s into the tree: %s", self.config_path,
                            reply.message or os.strerror(reply.errno))

    # ------------------------------------------------------------------ outputs

    def _flush(self) -> None:
        self._check_running()
        try:
            self._carry_out(self.replica.drain())
        except Exception as exc:
            self._stop(exc)
        synced = self.replica.synced()
        if synced:
            self.synced_once.set()
        self.stats.note_synced(synced, time.monotonic())
        state = (self.quorate(), synced)
        if state != self._writable_state:
            self._writable_state = state
            self._writable_changed.set()
            self._writable_changed = trio.Event()
        self.loop.deadline_changed(self.replica.next_deadline())
        told = (self.replica.ring, self.replica.quorate_ring_seq)
        if told != self._ring_told and self.replica.members:
            self._ring_told = told
            view = self.ring_view()
            for listener in self._ring_listeners:
                listener(view)

    def _stop(self, exc: Exception) -> NoReturn:
        """An output could not be carried out: stop the node (module header)."""
        log.error("cannot carry out the replica's outputs; stopping the node", exc_info=exc)
        self._failure = exc
        self._session_over.set()
        for waiter in self._waiters.values():  # no reply will come: they raise NodeStopped
            waiter.done.set()
        self._room.set()
        raise NodeStopped(f"the node stopped: {exc}") from exc

    def _carry_out(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Send):
                self.transport.send(out.to, out.data)
            elif isinstance(out, PersistRingSeq):
                self.ring_seq_store.store(out.ring_seq)
            elif isinstance(out, Persist):
                self._persister.submit(out)
            elif isinstance(out, Reply):
                self._room.set()
                self._room = trio.Event()
                waiter = self._waiters.get(out.request_id)
                if waiter is not None:
                    waiter.reply = out
                    waiter.done.set()
            elif isinstance(out, Invalidate):
                self._on_invalidate(out)
            elif isinstance(out, QuorumChanged):
                self._members_version += 1
                if out.status.quorate != self._shown_quorate:
                    # every file's mode shows quorum (read-only without): all attributes change
                    log.info("quorum: %s", "quorate" if out.status.quorate else "not quorate")
                    self._shown_quorate = out.status.quorate
                    self._invalidator((), True)
            elif isinstance(out, ConfChange):
                self._on_confchg(out)
            elif isinstance(out, SaveLost):
                self._save_lost(out)
            elif isinstance(out, ConfigChanged):
                self._take_config(out.text)
                self._write_local_config(out.text)

    def _on_invalidate(self, inv: Invalidate) -> None:
        if inv.everything:
            self._counters.note_reload()
            self._vmlist_version += 1
        else:
            self._counters.note_changed(inv.paths)
            if any(guest_config(p) is not None for p in inv.paths):
                self._vmlist_version += 1
        self._invalidator(inv.paths, inv.everything)
        for listener in self._tree_listeners:
            listener(inv.paths, inv.everything)

    def _on_confchg(self, c: ConfChange) -> None:
        if c.kind is ConfChangeKind.REGULAR:
            self.stats.membership_changes += 1
            now = self.wall_seconds()
            self._joined = {m: self._joined.get(m, now) for m in c.members}
            self._members_version += 1
            log.info("membership %s.%d: %s", c.ring_id.rep, c.ring_id.seq,
                     ", ".join(self._names().get(m, str(m)) for m in c.members))
            self._invalidator((), False)

    def _save_lost(self, lost: SaveLost) -> None:
        base = self.data_dir / "lost+found" / f"{lost.ring_id.rep}.{lost.ring_id.seq}"
        for path, data in lost.files:
            target = base / path
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, data, mode=0o600)  # it may be a copy of a private file
        log.warning("saved %d file(s) replaced by a sync under %s", len(lost.files), base)

    def _take_config(self, text: str) -> None:
        """The cluster took a new corosync.conf (memdb validated it): status, nodes and .members
        show it, the transport takes its addresses, and what this run cannot take is logged
        and listed in `status` (module header)."""
        config = check_config(text).config
        if config is None:
            return
        old, self.config = self.config, config
        self.infos = config.node_infos()
        self._members_version += 1
        if self.standalone:
            return
        if old == config:
            return
        addresses = {i.nodeid: i.addr for i in self.infos}
        mine = {i.nodeid: i.addr for i in old.node_infos()}.get(self.node_id)
        knet = isinstance(self.transport, KnetTransport)
        self._note_restart_needed(old, config, mine, addresses.get(self.node_id),
                                  own_address_fixed=not knet)
        if knet and self.node_id in addresses:
            self._wanted_links = config
            self._addresses_changed.set()
        elif not knet and mine is not None:  # this node's own address changes only with a restart
            self._wanted_addresses = {**addresses, self.node_id: mine}
            self._addresses_changed.set()

    def _note_restart_needed(self, old: ClusterConfig, new: ClusterConfig, mine_old: str | None,
                             mine_new: str | None, *, own_address_fixed: bool) -> None:
        needs = [c.description for c in validate_update(old, new).restart_changes]
        if mine_new is None:
            needs.append(f"this node ({self._name}) is no longer in the nodelist")
        elif own_address_fixed and mine_old != mine_new:
            needs.append(f"this node's address {mine_old} -> {mine_new}")
        for reason in needs:
            if reason not in self.restart_needed:
                log.warning("the new corosync.conf needs a restart of pmxfs on this node to "
                            "take effect: %s", reason)
                self.restart_needed.append(reason)

    async def _apply_addresses(self) -> None:
        """Hand the transport the newest nodelist's addresses (knet: its links), one change at a
        time: the last config taken wins even when its addresses resolve faster than an earlier
        one's."""
        while True:
            await self._addresses_changed.wait()
            self._addresses_changed = trio.Event()
            if isinstance(self.transport, KnetTransport) and self._wanted_links is not None:
                await self._apply_links(self.transport, self._wanted_links)
                continue
            wanted = self._wanted_addresses
            try:
                await self.transport.set_addresses(wanted)
            except (OSError, ValueError) as exc:
                log.error("cannot take the new nodelist's addresses: %s", exc)
                continue
            log.info("transport: nodelist now %s", ", ".join(
                f"{nid}={addr}" for nid, addr in sorted(wanted.items())))

    async def _apply_links(self, transport: KnetTransport, config: ClusterConfig) -> None:
        """The config's links into the transport; one it cannot take (a name that does not
        resolve, a port in use) leaves the links as they were and is named in `status` as
        needing a restart, besides the log."""
        try:
            specs = link_specs(config)
            await transport.set_links(specs, link_mode(config))
        except (OSError, ValueError) as exc:
            log.error("cannot take the new corosync.conf's links: %s", exc)
            reason = f"links of config_version {config.config_version} not taken: {exc}"
            if reason not in self.restart_needed:
                self.restart_needed.append(reason)
            return
        log.info("transport: links now %s", "; ".join(
            f"link {s.number} port {s.port}: " + ", ".join(
                f"{nid}={addr}" for nid, addr in sorted(s.addresses.items())) for s in specs))

    def _on_link_event(self, event: LinkEvent) -> None:
        """From the transport's receive path: queued for `_report_links` (never waits)."""
        self._link_events.append(event)
        self._link_news.set()

    async def _report_links(self) -> None:
        """Each link going down or up: a line in the daemon log and in the cluster log."""
        while True:
            await self._link_news.wait()
            self._link_news = trio.Event()
            events, self._link_events = self._link_events, []
            for event in events:
                name = self._names().get(event.peer, str(event.peer))
                message = (f"link {event.link} to node {name} (nodeid {event.peer}) is "
                           f"{'up' if event.up else 'down'}")
                if event.up:
                    log.info("%s", message)
                else:
                    log.warning("%s", message)
                await self.log(priority=6 if event.up else 4, tag="pmxfs", user="root",
                               pid=os.getpid(), msg=message)

    def _write_local_config(self, text: str) -> None:
        if self.config_path is None:
            return
        try:
            current = self.config_path.read_text(encoding="utf-8")
        except OSError:
            current = None
        if current != text:
            write_file(self.config_path, text.encode("utf-8"))
            log.info("took a new corosync.conf from the cluster into %s", self.config_path)

    # ------------------------------------------------------------------ helpers

    def _names(self) -> dict[int, str]:
        return {i.nodeid: i.name for i in self.infos}

    def _cluster_info(self) -> ClusterInfo | None:
        """What .members shows of the cluster; None in local mode (no corosync.conf of its own),
        where pmxcfs shows only the node name and the version."""
        if self.config_path is None:
            return None
        return ClusterInfo(
            name=self.config.cluster_name, config_version=self.config.config_version,
            nodes=[MemberNode(i.name, i.nodeid, i.addr) for i in self.infos],
            online=set(self.replica.status().members), quorate=self.replica.writable())

    def _new_request(self) -> int:
        self._next_request += 1
        self._waiters[self._next_request] = _Waiter(trio.Event())
        return self._next_request

    async def _wait(self, request: int) -> Reply:
        self._flush()
        waiter = self._waiters[request]
        try:
            await waiter.done.wait()
        finally:
            del self._waiters[request]
            if not self._waiters:  # an attach waits for this
                self._room.set()
                self._room = trio.Event()
        if waiter.reply is None:  # woken by the node stopping, or by an attach
            self._check_running()
            return Reply(request, E.EIO, "the outcome is unknown here: the node changed its "
                                         "cluster membership meanwhile")
        return waiter.reply
