"""The simulator's network and processing faults (pmxfs/sim/network.py, pmxfs/sim/faults.py):
one-way cuts, lossy directions, bridges, clock jumps, slow nodes and a stalled token holder do
what they say; each seed draws its own fault mix and replays exactly; and for each new kind a
bug it targets, put into the core on purpose, is caught by the checkers within a few seeds
with that kind forced on, while the same seeds are clean without the bug."""

from __future__ import annotations

import dataclasses
import errno as E
import random
from collections.abc import Iterator

import pytest

from pmxfs.core import totem_token
from pmxfs.core.replica import Replica
from pmxfs.core.replica_msgs import OpId
from pmxfs.core.totem import Send
from pmxfs.core.wire import Token, decode
from pmxfs.sim import faults, replica_sim, totem_sim
from pmxfs.sim.faults import EVERY_FAULT, FaultKind, FaultMix, Swarm, draw_mix, only, token_holders
from pmxfs.sim.network import Network
from pmxfs.sim.totem_sim import TotemCluster, run_chaos, sim_params

NODES = (3, 5)
NEW_KINDS = (FaultKind.BRIDGE, FaultKind.ONE_WAY, FaultKind.LINK_LOSS, FaultKind.CLOCK_JUMP,
             FaultKind.SLOW, FaultKind.STALL_TOKEN_HOLDER)


class FakeCore:
    """A core that records what it is told, answers each packet (but an echo) with an echo to
    everyone and has one timer (`deadline`)."""

    def __init__(self, node_id: int, deadline: int | None = None) -> None:
        self.node_id = node_id
        self.deadline = deadline
        self.received: list[tuple[int, int, bytes]] = []  # (now, src, data)
        self.timers: list[int] = []
        self.outputs: list[object] = []

    def receive(self, now: int, src: int, data: bytes) -> None:
        self.received.append((now, src, data))
        if not data.startswith(b"echo:"):
            self.outputs.append(Send(None, b"echo:" + data))

    def on_timer(self, now: int) -> None:
        self.timers.append(now)
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None

    def next_deadline(self) -> int | None:
        return self.deadline

    def drain(self) -> list[object]:
        out, self.outputs = self.outputs, []
        return out


def _net(*ids: int) -> tuple[Network, dict[int, FakeCore]]:
    lines: list[str] = []
    net = Network(random.Random(1), lambda node, out: None, lines.append)
    cores = {n: FakeCore(n) for n in ids}
    for n, core in cores.items():
        net.add(n, core)
    return net, cores


def _got(core: FakeCore, data: bytes) -> bool:
    return any(d == data for _, _, d in core.received)


# ---------------------------------------------------------------------- the network's faults


def test_a_one_way_cut_blocks_one_direction_only() -> None:
    net, cores = _net(1, 2, 3)
    net.cut([(1, 2)])
    net.send(1, Send(None, b"from1"))
    net.send(2, Send(1, b"from2"))
    net.run_until(10)
    assert not _got(cores[2], b"from1")
    assert _got(cores[3], b"from1")
    assert _got(cores[1], b"from2")
    net.heal()
    net.send(1, Send(2, b"again"))
    net.run_until(20)
    assert _got(cores[2], b"again")


def test_a_bridge_node_hears_both_sides_which_do_not_hear_each_other() -> None:
    net, cores = _net(1, 2, 3)
    net.bridge([1], 2, [3])
    net.send(1, Send(None, b"left"))
    net.send(3, Send(None, b"right"))
    net.run_until(10)
    assert _got(cores[2], b"left")
    assert _got(cores[2], b"right")
    assert not _got(cores[3], b"left")
    assert not _got(cores[1], b"right")


def test_link_loss_is_per_direction() -> None:
    net, cores = _net(1, 2)
    net.set_link_loss((1, 2), 0.9)
    for i in range(200):
        net.send(1, Send(2, b"a%d" % i))
        net.send(2, Send(1, b"b%d" % i))
    net.run_until(10)
    assert sum(1 for _, _, d in cores[2].received if d.startswith(b"a")) < 60
    assert sum(1 for _, _, d in cores[1].received if d.startswith(b"b")) == 200


def test_a_clock_jump_fires_the_timers_within_it_at_once() -> None:
    net, cores = _net(1, 2)
    cores[1].deadline = 5_000
    cores[2].deadline = 5_000
    net.run_until(100)
    net.jump_clock(1, 6_000)
    net.run_until(101)
    assert cores[1].timers == [6_100]
    assert cores[2].timers == []
    assert net.local_now(1) == 6_101
    net.send(2, Send(1, b"x"))
    net.run_until(102)
    assert cores[1].received[-1][0] == 6_101, "a receive passes the node's own clock"
    net.crash(1)
    assert net.local_now(1) == net.now, "a new process starts its clock afresh"


def test_a_slow_node_is_busy_after_each_event_and_its_packets_wait() -> None:
    net, cores = _net(1, 2)
    net.slow(2, 1_000, (10, 10))
    for i in range(3):
        net.send(1, Send(2, b"p%d" % i))
    net.run_until(5)
    assert [now for now, _, _ in cores[2].received] == [0]
    net.run_until(100)
    assert [now for now, _, _ in cores[2].received] == [0, 10, 20]
    echoes = [d for _, _, d in cores[1].received]
    assert echoes == [b"echo:p0", b"echo:p1", b"echo:p2"], "outputs leave after the work"


def test_the_token_holder_is_found_and_stalled() -> None:
    cluster = TotemCluster([1, 2, 3], sim_params(3), random.Random(4))
    assert cluster.wait_one_ring(timeout=10_000)
    for _ in range(20):
        cluster.mcast(1, 40)
        cluster.run_for(1)
        holders = token_holders(cluster.net, [1, 2, 3])
        assert len(holders) == 1
        (holder,) = holders
        core = cluster.core(holder)
        held = core.held_token is not None
        in_flight = any(isinstance(m, Token) for m in _tokens_to(cluster, holder))
        assert held or in_flight, f"n{holder} neither holds the token nor is it on its way"


def _tokens_to(cluster: TotemCluster, node: int) -> Iterator[object]:
    for n in cluster.node_ids:
        forwarded = cluster.core(n).relay.forwarded
        if forwarded is not None and forwarded.to == node:
            yield decode(forwarded.data)


# ---------------------------------------------------------------------- the swarm


def test_two_seeds_draw_different_mixes_and_the_trace_says_which() -> None:
    mixes = {draw_mix(random.Random(seed), EVERY_FAULT, 400) for seed in range(20)}
    assert len(mixes) == 20
    assert len({m.weights for m in mixes}) > 10, "the enabled kinds differ from seed to seed"
    first, second = (run_chaos(seed, NODES, keep_trace=True) for seed in (1, 2))
    heads = [next(line for line in r.trace if line.startswith("fault mix")) for r in
             (first, second)]
    assert heads[0] != heads[1]


def test_the_same_seed_gives_the_same_trace_with_the_new_faults() -> None:
    swarm = only(*NEW_KINDS, FaultKind.CRASH)
    first = run_chaos(4, NODES, keep_trace=True, swarm=swarm)
    second = run_chaos(4, NODES, keep_trace=True, swarm=swarm)
    assert first.violation is None, first.violation
    assert first.trace_hash == second.trace_hash
    assert first.trace == second.trace
    for mark in (" cut n", " loss n", " bridge ", " jumps ", " slow n", "stall token holder"):
        assert any(mark in line for line in first.trace), f"no {mark!r} in the trace"


# ---------------------------------------------------------------------- sabotage


def _calm(monkeypatch: pytest.MonkeyPatch, module: object) -> None:
    """Runs of `module` draw no loss and no duplication on every link: what remains is the
    forced fault kind."""
    real = faults.draw_mix

    def calm_draw(rng: random.Random, swarm: Swarm, token: int) -> FaultMix:
        return dataclasses.replace(real(rng, swarm, token), loss=0.0, duplicate=0.0)

    monkeypatch.setattr(module, "draw_mix", calm_draw)


def _accept_duplicate_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug: a token sent again (its sender saw no sign it arrived) is taken as new."""
    def fresh(self: totem_token.Rotation, token: Token) -> bool:
        self.last_token_seq = max(self.last_token_seq, token.token_seq)
        return True

    monkeypatch.setattr(totem_token.Rotation, "fresh", fresh)


def _first_totem_violation(seeds: range, swarm: Swarm) -> int | None:
    return next((s for s in seeds if run_chaos(s, NODES, swarm=swarm).violation), None)


@pytest.mark.parametrize("kind", [FaultKind.STALL_TOKEN_HOLDER, FaultKind.SLOW,
                                  FaultKind.ONE_WAY, FaultKind.LINK_LOSS, FaultKind.BRIDGE])
def test_faults_that_delay_the_token_catch_a_totem_that_takes_a_resent_token_twice(
        monkeypatch: pytest.MonkeyPatch, kind: FaultKind) -> None:
    """Stalls, slow nodes and cut or lossy directions make senders send the token again while
    the first copy is still on its way: a member that handles both runs two tokens, and the
    order or virtual synchrony checks break. With no faults at all the same bug goes unseen."""
    _calm(monkeypatch, totem_sim)
    with monkeypatch.context() as sabotage:
        _accept_duplicate_tokens(sabotage)
        found = _first_totem_violation(range(25), only(kind))
        assert found is not None, f"25 seeds with {kind.value} did not notice the bug"
        assert _first_totem_violation(range(found + 1), only()) is None, (
            "the bug is visible without faults: this test shows nothing about the fault")
    assert run_chaos(found, NODES, swarm=only(kind)).violation is None


def _fs_violation(seed: int) -> str | None:
    return replica_sim.run_fs_chaos(seed, NODES).violation


def test_clock_jumps_catch_a_replica_that_answers_a_timed_out_write_as_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose outcome is unknown 60 s after its last change of state must be answered
    ETIMEDOUT (it may still be applied); the bug answers EAGAIN, a refusal. Chaos runs are
    shorter than 60 s, so only a clock jump of that size brings the timeout on, while the
    write is in flight."""
    _calm(monkeypatch, replica_sim)
    monkeypatch.setattr(replica_sim, "REPLICA_SWARM", only(FaultKind.CLOCK_JUMP))
    original = Replica._answer

    def refuse_on_timeout(self: Replica, op_id: OpId, errno: int, message: str = "") -> None:
        original(self, op_id, E.EAGAIN if errno == E.ETIMEDOUT else errno, message)

    with monkeypatch.context() as sabotage:
        sabotage.setattr(Replica, "_answer", refuse_on_timeout)
        found = next((s for s in range(25) if _fs_violation(s)), None)
        assert found is not None, "25 seeds with clock jumps did not notice the bug"
        monkeypatch.setattr(replica_sim, "REPLICA_SWARM", only(FaultKind.PAUSE))
        assert not any(_fs_violation(s) for s in range(found + 1)), (
            "the bug is visible without clock jumps: this test shows nothing about them")
    monkeypatch.setattr(replica_sim, "REPLICA_SWARM", only(FaultKind.CLOCK_JUMP))
    assert _fs_violation(found) is None

