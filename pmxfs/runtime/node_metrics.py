"""The node's metrics: what `pmxfs metrics` prints and `--metrics-listen` serves.

How it works. `NodeStats` holds what only the running node can measure (write latency, the
outcome of every local write by errno, membership changes, sync durations, database commit
latency); `ReplicaNode` owns one for its whole life (attachments keep it) and feeds it. `families`
reads a node at one moment -- its status (quorum, ring, links), the totem, replica and transport
counters, and the stats -- into `core.metrics.Family` values; `render_node` is the text a scrape
gets. Nothing here keeps a history: every counter is read where it is counted, so a scrape costs
one pass over a few dicts.

Names follow Prometheus' conventions: `pmxfs_` prefix, counters `_total`, seconds and bytes.
A counter the totem or the transport has not counted yet (they add names when a thing first
happens) is shown as 0 when it is one of the named ones, so a dashboard finds every series.
"""

from __future__ import annotations

import errno as E
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pmxfs.core.metrics import (
    SYNC_BUCKETS,
    Family,
    Histogram,
    counter,
    gauge,
    labelled,
    render,
)
from pmxfs.core.totem_membership import State

if TYPE_CHECKING:
    from pmxfs.runtime.replica_node import ReplicaNode

# totem counters with a family of their own: (counter name, metric name, help)
TOTEM_NAMED = (
    ("tokens", "pmxfs_totem_token_rotations_total", "Tokens this node received and passed on."),
    ("token_lost", "pmxfs_totem_token_lost_total", "Token timeouts (the ring re-forms)."),
    ("token_retransmits", "pmxfs_totem_token_retransmits_total",
     "Tokens sent again because the next node did not answer in time."),
    ("retransmitted", "pmxfs_totem_messages_retransmitted_total",
     "Messages this node multicast again on a retransmission request."),
    ("rtr_requested", "pmxfs_totem_retransmissions_requested_total",
     "Messages this node asked the ring to retransmit."),
    ("delivered", "pmxfs_totem_messages_delivered_total", "Messages delivered in agreed order."),
    ("rings_installed", "pmxfs_totem_rings_installed_total", "Rings this node installed."),
)
# transport counters that are not drops, with their own family
TRANSPORT_TRAFFIC = ("datagrams_sent", "datagrams_received", "frames_sealed", "frames_opened",
                     "pings_sent", "pongs_sent", "pongs_received")
TRANSPORT_ERRORS = ("send_failed", "recv_failed")
# every drop reason of frame_crypto, transport and knet (counted before the totem sees a frame)
TRANSPORT_DROPS = ("bad_magic", "bad_version", "short", "unknown_sender", "self_sender",
                   "wrong_receiver", "auth_failed", "replay", "address_mismatch",
                   "duplicate_frames", "link_mismatch", "bad_payload")


@dataclass
class NodeStats:
    """What the running node measures for metrics (module header)."""

    write_seconds: Histogram = field(default_factory=Histogram)
    proposed: int = 0
    applied: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # errno name -> local writes
    membership_changes: int = 0
    sync_seconds: Histogram = field(default_factory=lambda: Histogram(SYNC_BUCKETS))
    commit_seconds: Histogram = field(default_factory=Histogram)
    committed_operations: int = 0
    _unsynced_since: float | None = None

    def note_reply(self, errno: int, seconds: float) -> None:
        """A local write was answered `errno` after `seconds`."""
        self.write_seconds.observe(seconds)
        if errno == 0:
            self.applied += 1
        else:
            name = E.errorcode.get(errno, str(errno))
            self.refused[name] = self.refused.get(name, 0) + 1

    def note_synced(self, synced: bool, now: float) -> None:
        """The replica is synced (or not) at `now` (monotonic seconds): a sync ends when it
        turns synced after having been not."""
        if not synced and self._unsynced_since is None:
            self._unsynced_since = now
        elif synced and self._unsynced_since is not None:
            self.sync_seconds.observe(now - self._unsynced_since)
            self._unsynced_since = None

    def note_commit(self, seconds: float, operations: int) -> None:
        """The persister committed `operations` Persists in one transaction."""
        self.commit_seconds.observe(seconds)
        self.committed_operations += operations


def render_node(node: ReplicaNode) -> str:
    """The text exposition of `node`'s metrics."""
    return render(families(node))


def families(node: ReplicaNode) -> list[Family]:
    return [*_node_families(node), *_ring_families(node), *_totem_families(node),
            *_transport_families(node), *_operation_families(node), *_quorum_families(node),
            *_link_families(node)]


def _node_families(node: ReplicaNode) -> Iterator[Family]:
    status = node.status()
    yield gauge("pmxfs_node_info", "This node: cluster, name, node id, transport (value 1).", 1,
                {"cluster": status["cluster"]["name"], "node": node.node_name,
                 "nodeid": str(node.node_id), "transport": status["cluster"]["transport"]})
    yield gauge("pmxfs_start_time_seconds", "When the daemon started (Unix time).",
                node.started_at)
    yield gauge("pmxfs_config_version", "config_version of the corosync.conf in force.",
                node.config.config_version)


def _ring_families(node: ReplicaNode) -> Iterator[Family]:
    now = node.replica.status()
    ring = now.ring
    yield gauge("pmxfs_ring_info", "The ring of the last regular configuration (value 1).", 1,
                {"ring_id": f"{ring.rep}.{ring.seq}", "rep": str(ring.rep)})
    yield gauge("pmxfs_ring_seq", "The ring id's sequence number.", ring.seq)
    yield gauge("pmxfs_ring_members", "Members of the current ring.", len(now.members))
    yield counter("pmxfs_membership_changes_total",
                  "Regular configuration changes this node took.",
                  node.stats.membership_changes)
    yield gauge("pmxfs_tree_synced", "1 while the tree is synced with the ring.",
                int(now.synced))
    yield gauge("pmxfs_tree_version", "The tree's version (operations applied).",
                node.memdb.version)
    yield counter("pmxfs_syncs_total", "Syncs the replica completed (membership changes).",
                  now.counters.get("syncs", 0))
    yield node.stats.sync_seconds.family(
        "pmxfs_sync_duration_seconds", "From the tree turning unsynced to synced again.")
    yield labelled("pmxfs_replica_events_total", "The replica's counters, by event.", "counter",
                   (({"event": name}, n) for name, n in sorted(now.counters.items())))


def _totem_families(node: ReplicaNode) -> Iterator[Family]:
    st = node.replica.status().totem
    c = st.counters
    yield labelled("pmxfs_totem_state", "1 for the membership state totem is in.", "gauge",
                   (({"state": s.value}, int(s is st.state)) for s in State))
    for key, name, help_text in TOTEM_NAMED:
        yield counter(name, help_text, c.get(key, 0))
    yield labelled("pmxfs_totem_frames_dropped_total",
                   "Authentic frames the totem dropped, by reason.", "counter",
                   (({"reason": k.removeprefix("dropped_")}, n) for k, n in sorted(c.items())
                    if k.startswith("dropped_")))
    named = {key for key, _, _ in TOTEM_NAMED}
    yield labelled("pmxfs_totem_events_total", "Other totem counters, by event.", "counter",
                   (({"event": k}, n) for k, n in sorted(c.items())
                    if k not in named and not k.startswith("dropped_")))
    yield gauge("pmxfs_totem_pending_messages", "Messages waiting to be multicast.",
                st.pending_messages)


def _transport_families(node: ReplicaNode) -> Iterator[Family]:
    c = dict(node.transport.counters)
    yield labelled("pmxfs_transport_frames_dropped_total",
                   "Datagrams the transport dropped before the totem, by reason.", "counter",
                   (({"reason": r}, c.get(r, 0)) for r in TRANSPORT_DROPS if r in c))
    yield labelled("pmxfs_transport_events_total", "Datagrams and frames, by event.",
                   "counter", (({"event": k}, c[k]) for k in TRANSPORT_TRAFFIC if k in c))
    yield labelled("pmxfs_transport_errors_total", "Socket errors, by operation.", "counter",
                   (({"op": k.removesuffix("_failed")}, c[k]) for k in TRANSPORT_ERRORS
                    if k in c))
    links = sorted({int(k[4:].split("_")[0]) for k in c
                    if k.startswith("link") and k.endswith(("_sent", "_received"))})
    yield labelled("pmxfs_link_datagrams_sent_total", "Datagrams sent, by knet link.",
                   "counter", (({"link": str(n)}, c.get(f"link{n}_sent", 0)) for n in links))
    yield labelled("pmxfs_link_datagrams_received_total", "Datagrams received, by knet link.",
                   "counter", (({"link": str(n)}, c.get(f"link{n}_received", 0))
                               for n in links))


def _operation_families(node: ReplicaNode) -> Iterator[Family]:
    s = node.stats
    yield counter("pmxfs_operations_proposed_total",
                  "Writes this node proposed to the ring (FUSE and control).", s.proposed)
    yield counter("pmxfs_operations_applied_total",
                  "Writes this node proposed that were applied (answered 0).", s.applied)
    yield labelled("pmxfs_operations_refused_total",
                   "Writes this node proposed that were refused, by errno.", "counter",
                   (({"errno": k}, n) for k, n in sorted(s.refused.items())))
    yield gauge("pmxfs_operations_pending", "Writes waiting for their answer now.",
                node.pending_writes())
    yield s.write_seconds.family("pmxfs_write_duration_seconds",
                                 "From a write's proposal to its answer.")
    yield s.commit_seconds.family("pmxfs_database_commit_duration_seconds",
                                  "One SQLite transaction of the persister (group commit).")
    yield counter("pmxfs_database_committed_operations_total",
                  "Persists committed to config.db.", s.committed_operations)


def _quorum_families(node: ReplicaNode) -> Iterator[Family]:
    q = node.replica.status().quorum
    yield gauge("pmxfs_quorum_quorate", "1 while the ring is quorate.", int(q.quorate))
    yield gauge("pmxfs_quorum_expected_votes", "Expected votes.", q.expected_votes)
    yield gauge("pmxfs_quorum_highest_expected_votes", "Highest expected votes in the ring.",
                q.highest_expected)
    yield gauge("pmxfs_quorum_total_votes", "Votes of the ring (the device's included).",
                q.total_votes)
    yield gauge("pmxfs_quorum_votes_needed", "Votes needed for quorum.", q.quorum)
    yield gauge("pmxfs_quorum_qdevice_votes", "Votes of the quorum device the ring counts.",
                q.qdevice_votes)
    device = node.status().get("qdevice")
    if device is not None:  # only while corosync.conf configures a quorum device
        labels = {"host": str(device["host"]), "algorithm": str(device["algorithm"])}
        yield gauge("pmxfs_qdevice_connected",
                    "1 while this node's device client is connected to qnetd and welcomed.",
                    int(bool(device["connected"])), labels)
        yield gauge("pmxfs_qdevice_casting_vote",
                    "1 while this node casts the device's vote for its ring.",
                    int(bool(device["casting_vote"])), labels)


def _link_families(node: ReplicaNode) -> Iterator[Family]:
    links = node.links()

    def labels(entry: dict[str, object]) -> dict[str, str]:
        return {"nodeid": str(entry["nodeid"]), "name": str(entry["name"]),
                "link": str(entry["link"])}

    yield labelled("pmxfs_link_up", "1 while the link to the peer is connected.", "gauge",
                   ((labels(e), int(bool(e["connected"]))) for e in links))
    yield labelled("pmxfs_link_active", "1 while the link carries the traffic to the peer.",
                   "gauge", ((labels(e), int(bool(e["active"]))) for e in links))
