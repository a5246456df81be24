"""Totem timing and flow-control parameters, with corosync's names, defaults and derivations.

All durations are milliseconds. `derive_params` turns what a `totem {}` section sets (any subset)
plus the node count into the full set the protocol runs with, exactly as corosync 3 does:

* token = token_ms + token_coefficient * (nodes - 2) when there are more than two nodes and
  `token` came from the defaults or the file (corosync adds the coefficient in both cases);
* token_retransmit = token / (token_retransmits_before_loss_const + 0.2);
* hold = 0.8 * token_retransmit - 10;
* consensus = 1.2 * token;
* every timeout is at least MIN_TIMEOUT_MS.
An explicit value in the file always wins over a derived one.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_TIMEOUT_MS = 30

DEFAULT_TOKEN_MS = 3000
DEFAULT_TOKEN_COEFFICIENT_MS = 650
DEFAULT_TOKEN_RETRANSMITS_BEFORE_LOSS = 4
DEFAULT_JOIN_MS = 50
DEFAULT_MERGE_MS = 200
DEFAULT_DOWNCHECK_MS = 1000
DEFAULT_FAIL_RECV_CONST = 2500
DEFAULT_SEQNO_UNCHANGED_CONST = 30
DEFAULT_WINDOW_SIZE = 50
DEFAULT_MAX_MESSAGES = 17
DEFAULT_MISS_COUNT_CONST = 5
DEFAULT_NETMTU = 1500


@dataclass(frozen=True)
class TotemParams:
    """The complete, derived parameter set a totem instance runs with (durations in ms).
    The defaults are corosync's for two nodes; `derive_params` scales them to a cluster."""

    token: int = DEFAULT_TOKEN_MS  # no token for this long: the ring is lost
    token_retransmit: int = 714  # a token passed on is sent again after this long unseen
    # token retransmissions that fit into `token`; only used to derive token_retransmit
    token_retransmits_before_loss_const: int = DEFAULT_TOKEN_RETRANSMITS_BEFORE_LOSS
    hold: int = 561  # how long the representative holds the token of an idle ring
    consensus: int = int(1.2 * DEFAULT_TOKEN_MS)  # gathering: members not agreeing by then fail
    join: int = DEFAULT_JOIN_MS  # gathering: a join is multicast again this often
    merge: int = DEFAULT_MERGE_MS  # the representative multicasts MERGE_DETECT this often
    downcheck: int = DEFAULT_DOWNCHECK_MS  # corosync's interface check; accepted, not used
    fail_recv_const: int = DEFAULT_FAIL_RECV_CONST  # visits with a stuck aru: member fails
    seqno_unchanged_const: int = DEFAULT_SEQNO_UNCHANGED_CONST  # idle visits before a hold
    window_size: int = DEFAULT_WINDOW_SIZE  # frames per token rotation, all members together
    max_messages: int = DEFAULT_MAX_MESSAGES  # frames one member sends per visit
    miss_count_const: int = DEFAULT_MISS_COUNT_CONST  # visits a frame is missed before rtr
    netmtu: int = DEFAULT_NETMTU  # bytes; a frame with its headers and sealing fits into it


def derive_params(
    node_count: int,
    *,
    token: int | None = None,
    token_coefficient: int | None = None,
    token_retransmits_before_loss_const: int | None = None,
    token_retransmit: int | None = None,
    hold: int | None = None,
    consensus: int | None = None,
    join: int | None = None,
    merge: int | None = None,
    downcheck: int | None = None,
    fail_recv_const: int | None = None,
    seqno_unchanged_const: int | None = None,
    window_size: int | None = None,
    max_messages: int | None = None,
    miss_count_const: int | None = None,
    netmtu: int | None = None,
) -> TotemParams:
    """Fill in defaults and derived timers; explicit values are taken as they are."""
    base_token = DEFAULT_TOKEN_MS if token is None else token
    coefficient = DEFAULT_TOKEN_COEFFICIENT_MS if token_coefficient is None else token_coefficient
    effective_token = base_token + coefficient * max(0, node_count - 2)
    effective_token = max(MIN_TIMEOUT_MS, effective_token)
    retransmits = (
        DEFAULT_TOKEN_RETRANSMITS_BEFORE_LOSS
        if token_retransmits_before_loss_const is None
        else token_retransmits_before_loss_const
    )
    if token_retransmit is None:
        token_retransmit = max(MIN_TIMEOUT_MS, int(effective_token / (retransmits + 0.2)))
    if hold is None:
        hold = max(MIN_TIMEOUT_MS, int(0.8 * token_retransmit - 10))
    if consensus is None:
        consensus = max(MIN_TIMEOUT_MS, int(1.2 * effective_token))
    return TotemParams(
        token=effective_token,
        token_retransmit=token_retransmit,
        token_retransmits_before_loss_const=retransmits,
        hold=hold,
        consensus=consensus,
        join=DEFAULT_JOIN_MS if join is None else join,
        merge=DEFAULT_MERGE_MS if merge is None else merge,
        downcheck=DEFAULT_DOWNCHECK_MS if downcheck is None else downcheck,
        fail_recv_const=DEFAULT_FAIL_RECV_CONST if fail_recv_const is None else fail_recv_const,
        seqno_unchanged_const=(
            DEFAULT_SEQNO_UNCHANGED_CONST
            if seqno_unchanged_const is None
            else seqno_unchanged_const
        ),
        window_size=DEFAULT_WINDOW_SIZE if window_size is None else window_size,
        max_messages=DEFAULT_MAX_MESSAGES if max_messages is None else max_messages,
        miss_count_const=DEFAULT_MISS_COUNT_CONST if miss_count_const is None else miss_count_const,
        netmtu=DEFAULT_NETMTU if netmtu is None else netmtu,
    )
