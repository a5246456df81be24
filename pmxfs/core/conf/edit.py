"""The corosync.conf edits of a cluster's life: the first config (`pmxfs create`), a node added
(`pmxfs add`), a node removed (`pmxfs delnode`) and a quorum device added or removed (`pmxfs
qdevice setup` / `remove`), each a whole new text that `check` accepts.

Every edit goes from text to text through the model and `render`, so the result is canonical and
passes the same validation the tree applies to any write of corosync.conf (an edit that would be
refused raises `EditError` here first, with the validator's reason). An edit of a running
cluster's config raises config_version by exactly one, as pvecm does, so a concurrent edit made
from the same base loses in the tree's update rule instead of silently overwriting.

Links (`pvecm create/add --link0 .. --link7`): a node's address on link 0 is `address`, its
addresses on further links (1-7) are `links`. A new cluster with one link runs udpu unless knet
is asked for; more links need knet, written as `transport: knet` with `link_mode: passive` and
one `interface { linknumber: N }` per link. A joining node must bring exactly the cluster's links
(corosync: every node lists the same ones), each on an address no other node uses. Over the wire
(control socket, join request) `links` travel as an object {"N": "ADDR"} (`links_to_wire`,
`links_from_wire`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from pmxfs.core.conf.model import (
    ClusterConfig,
    DeviceNetSection,
    DeviceSection,
    NodeEntry,
    link_numbers,
)
from pmxfs.core.conf.render import render
from pmxfs.core.conf.syntax import RawEntry
from pmxfs.core.conf.validate import check, is_hostname, parse_address
from pmxfs.core.errors import LocalError

# pvecm's rule for a cluster name (corosync's is looser): it becomes part of paths and keys.
CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]{0,14}\Z")
MAX_NODE_ID = 2**32 - 1
MAX_VOTES = 255  # votequorum's limit per node
QDEVICE_ALGORITHMS = ("ffsplit", "lms")
MAX_LINK = 7  # knet: links 0-7
NEW_CLUSTER_TRANSPORTS = ("knet", "udpu")


class EditError(LocalError):
    """Why an edit cannot be made: one line for the admin."""


def check_node_name(name: str) -> None:
    """A node name as corosync.conf and the tree's `nodes/NAME` need it: a host name label."""
    if "." in name or not is_hostname(name):
        raise EditError(f"node name {name!r} is not valid: use letters, digits and inner "
                        "hyphens (a host name without domain)")


def check_address(address: str) -> None:
    if parse_address(address) is None:
        raise EditError(f"address {address!r} is not an IPv4 or IPv6 address")


def check_votes(votes: int) -> None:
    if not 1 <= votes <= MAX_VOTES:
        raise EditError(f"votes must be 1-{MAX_VOTES} (got {votes})")


def check_nodeid(nodeid: int) -> None:
    if not 1 <= nodeid <= MAX_NODE_ID:
        raise EditError(f"node id must be 1-{MAX_NODE_ID} (got {nodeid})")


def new_cluster(cluster_name: str, node_name: str, nodeid: int, votes: int, address: str, *,
                port: int | None = None, links: Mapping[int, str] | None = None,
                transport: str | None = None) -> str:
    """The first corosync.conf of a cluster: this node only, config_version 1, `address` on
    link 0 and `links` on further links. Transport `transport`, else udpu for one link and knet
    for more (module header); udpu with more than one link is refused."""
    if not CLUSTER_NAME_RE.match(cluster_name):
        raise EditError(f"cluster name {cluster_name!r} is not valid: 1-15 letters, digits and "
                        "hyphens, starting with a letter or digit")
    check_node_name(node_name)
    check_nodeid(nodeid)
    check_votes(votes)
    addrs = node_links(address, links)
    if transport is not None and transport not in NEW_CLUSTER_TRANSPORTS:
        raise EditError(f"transport {transport!r} is not one of "
                        f"{', '.join(NEW_CLUSTER_TRANSPORTS)}")
    if transport == "udpu" and len(addrs) > 1:
        raise EditError(f"transport udpu carries one link only, but {_links_text(addrs)} were "
                        "given: use knet (the default with more than one link)")
    knet = transport == "knet" or len(addrs) > 1
    port_line = "" if port is None else f"  port: {port}\n"
    if knet:
        link_lines = "".join(f"  interface {{\n    linknumber: {n}\n  }}\n" for n in addrs)
        totem_lines = f"  transport: knet\n  link_mode: passive\n{port_line}{link_lines}"
    else:
        totem_lines = f"  transport: udpu\n{port_line}"
    addr_lines = "".join(f"    ring{n}_addr: {a}\n" for n, a in addrs.items())
    text = (f"totem {{\n  version: 2\n  cluster_name: {cluster_name}\n  config_version: 1\n"
            f"{totem_lines}}}\n"
            f"nodelist {{\n  node {{\n    name: {node_name}\n    nodeid: {nodeid}\n"
            f"    quorum_votes: {votes}\n{addr_lines}  }}\n}}\n"
            f"quorum {{\n  provider: corosync_votequorum\n}}\n")
    return _checked(render(_parsed(text)), None)


def node_links(address: str, links: Mapping[int, str] | None) -> dict[int, str]:
    """A node's addresses by link number: `address` on link 0, `links` on links 1-7; each an IP
    address."""
    addrs = {0: address}
    for number, value in sorted((links or {}).items()):
        if not 1 <= number <= MAX_LINK:
            raise EditError(f"link {number}: further links are numbered 1-{MAX_LINK} (link 0's "
                            "address is the node's address)")
        addrs[number] = value
    for value in addrs.values():
        check_address(value)
    return addrs


def links_to_wire(links: Mapping[int, str]) -> dict[str, str]:
    """`links` as a JSON or msgpack object: {"N": "ADDR"}."""
    return {str(number): address for number, address in sorted(links.items())}


def links_from_wire(value: object) -> dict[int, str]:
    """`links_to_wire`'s object back (None: no further links); `EditError` when malformed. The
    link numbers and addresses themselves are checked by the edit that uses them."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EditError("links must be an object of link numbers and addresses")
    links = {}
    for key, address in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) == 1
                and isinstance(address, str)):
            raise EditError("links must be an object of link numbers (0-7) and addresses")
        links[int(key)] = address
    return links


def free_nodeid(config: ClusterConfig) -> int:
    """The lowest node id the nodelist does not use (pvecm's choice for a new node)."""
    used = {n.nodeid for n in config.nodes}
    nodeid = 1
    while nodeid in used:
        nodeid += 1
    return nodeid


def with_node(current_text: str, node_name: str, address: str, *, nodeid: int | None = None,
              votes: int = 1, replace: bool = False,
              links: Mapping[int, str] | None = None) -> tuple[str, int]:
    """`current_text` with a node added (config_version + 1) and the node id it got; `address`
    is its link 0 address, `links` its addresses on further links. Refused: links other than
    the cluster's (naming the missing and the unknown ones), a name, address or node id already
    in use -- except, with `replace`, a node of the same name, whose entry (and node id, unless
    another is asked for) the new one takes. A third node ends `two_node` (as pvecm's add
    does), which only a two-node cluster may use."""
    config = _parsed(current_text)
    check_node_name(node_name)
    addrs = node_links(address, links)
    check_votes(votes)
    if nodeid is not None:
        check_nodeid(nodeid)
    _check_same_links(config, node_name, addrs)
    same_name = next((n for n in config.nodes if n.name == node_name), None)
    if same_name is not None and not replace:
        raise EditError(f"a node named {node_name} is already in the cluster (node id "
                        f"{same_name.nodeid}); --force re-adds a node of that name")
    others = tuple(n for n in config.nodes if n is not same_name)
    several = len(addrs) > 1
    for node in others:
        for number, theirs in node.addrs:
            mine = next((a for a in addrs.values() if _same_address(theirs, a)), None)
            if mine is not None:
                where = f" (its link {number})" if several else ""
                raise EditError(f"address {mine} is already used by node {node.name}{where}")
        if nodeid is not None and node.nodeid == nodeid:
            raise EditError(f"node id {nodeid} is already used by node {node.name}")
    if nodeid is None:
        nodeid = (same_name.nodeid if same_name is not None and same_name.nodeid is not None
                  else free_nodeid(dataclasses.replace(config, nodes=others)))
    entry = NodeEntry(name=node_name, nodeid=nodeid, quorum_votes=votes,
                      ring0_addr=addrs.get(0), ring1_addr=addrs.get(1), ring2_addr=addrs.get(2),
                      ring3_addr=addrs.get(3), ring4_addr=addrs.get(4), ring5_addr=addrs.get(5),
                      ring6_addr=addrs.get(6), ring7_addr=addrs.get(7))
    nodes = tuple(sorted((*others, entry), key=lambda n: n.nodeid or 0))
    grown = dataclasses.replace(config, nodes=nodes)
    if len(nodes) > 2 and config.quorum.two_node:  # votequorum's two_node is for two nodes only
        grown = dataclasses.replace(grown, quorum=dataclasses.replace(config.quorum,
                                                                      two_node=None))
    return _checked(render(_bumped(grown)), config), nodeid


def _check_same_links(config: ClusterConfig, node_name: str, addrs: Mapping[int, str]) -> None:
    """Refuse a node whose link numbers are not the cluster's, naming what differs."""
    cluster = set(link_numbers(config))
    missing = sorted(cluster - set(addrs))
    unknown = sorted(set(addrs) - cluster)
    if not (missing or unknown):
        return
    reasons = []
    if missing:
        reasons.append(f"{node_name} needs an address on {_links_text(missing)} too ("
                       + ", ".join(f"--link{n} ADDR" for n in missing) + ")")
    if unknown:
        reasons.append(f"the cluster has no {_links_text(unknown)} (leave out "
                       + ", ".join(f"--link{n}" for n in unknown) + ")")
    raise EditError(f"the cluster's nodes have {_links_text(sorted(cluster))} (corosync: every "
                    "node lists the same links): " + "; ".join(reasons))


def _links_text(numbers: Mapping[int, str] | list[int]) -> str:
    ordered = sorted(numbers)
    word = "link" if len(ordered) == 1 else "links"
    return f"{word} {', '.join(map(str, ordered))}"


def without_node(current_text: str, node_name: str) -> tuple[str, NodeEntry]:
    """`current_text` without the node `node_name` (config_version + 1), and its old entry."""
    config = _parsed(current_text)
    gone = next((n for n in config.nodes if n.name == node_name), None)
    if gone is None:
        raise EditError(f"there is no node {node_name} in the nodelist")
    if len(config.nodes) == 1:
        raise EditError(f"{node_name} is the last node of the cluster")
    nodes = tuple(n for n in config.nodes if n is not gone)
    return _checked(render(_bumped(dataclasses.replace(config, nodes=nodes))), config), gone


def qdevice_algorithm(config: ClusterConfig, algorithm: str | None, *, force: bool) -> str:
    """The algorithm `with_qdevice` uses: pvecm's rule -- an even node count takes ffsplit, an
    odd one is refused unless forced, then takes lms; an explicit `algorithm` overrides the
    choice, never the refusal."""
    count = len(config.nodes)
    if count % 2 and not force:
        raise EditError(f"the cluster has an odd number of nodes ({count}): a QDevice helps "
                        "only with an even count; --force sets one up anyway (algorithm lms)")
    chosen = algorithm or ("lms" if count % 2 else "ffsplit")
    if chosen not in QDEVICE_ALGORITHMS:
        raise EditError(f"algorithm {chosen!r} is not one of {', '.join(QDEVICE_ALGORITHMS)}")
    return chosen


def with_qdevice(current_text: str, host: str, port: int, algorithm: str | None,
                 tie_breaker: str, *, force: bool) -> str:
    """`current_text` with `quorum.device` (model net, config_version + 1), as `pvecm qdevice
    setup` writes it: ffsplit gives the device one vote, lms leaves `votes` out (votequorum's
    node count - 1). Refused: a device already configured, two_node, last_man_standing or
    auto_tie_breaker set, an odd node count without `force` (`qdevice_algorithm`)."""
    config = _parsed(current_text)
    q = config.quorum
    if q.device is not None:
        where = "" if q.device.net is None or q.device.net.host is None else \
            f" (qnetd {q.device.net.host})"
        raise EditError(f"a quorum device is already configured{where}: `pmxfs qdevice remove` "
                        "first")
    for name, value in (("two_node", q.two_node), ("last_man_standing", q.last_man_standing),
                        ("auto_tie_breaker", q.auto_tie_breaker)):
        if value:
            raise EditError(f"quorum.{name} is set: a QDevice cannot be combined with it; "
                            f"remove {name} from corosync.conf first")
    chosen = qdevice_algorithm(config, algorithm, force=force)
    if not 1 <= port <= 65535:
        raise EditError(f"port {port} is not a port number (1-65535)")
    if parse_address(host) is None and not is_hostname(host):
        raise EditError(f"qnetd host {host!r} is neither an IP address nor a host name")
    net = DeviceNetSection(host=host, port=port, algorithm=chosen, tie_breaker=tie_breaker,
                           extras=(RawEntry("tls", "on"),))
    device = DeviceSection(model="net", votes=1 if chosen == "ffsplit" else None, net=net)
    changed = dataclasses.replace(config, quorum=dataclasses.replace(q, device=device))
    return _checked(render(_bumped(changed)), config)


def without_qdevice(current_text: str) -> str:
    """`current_text` without `quorum.device` (config_version + 1)."""
    config = _parsed(current_text)
    if config.quorum.device is None:
        raise EditError("no quorum device is configured")
    changed = dataclasses.replace(config, quorum=dataclasses.replace(config.quorum, device=None))
    return _checked(render(_bumped(changed)), config)


def _same_address(a: str, b: str) -> bool:
    pa, pb = parse_address(a.split("%", 1)[0]), parse_address(b.split("%", 1)[0])
    return a == b if pa is None or pb is None else pa == pb


def _parsed(text: str) -> ClusterConfig:
    result = check(text)
    if result.config is None:
        reasons = "; ".join(str(e) for e in result.errors) or "it cannot be read"
        raise EditError(f"the cluster's corosync.conf is not valid: {reasons}")
    return result.config


def _bumped(config: ClusterConfig) -> ClusterConfig:
    totem = dataclasses.replace(config.totem, config_version=config.config_version + 1)
    return dataclasses.replace(config, totem=totem)


def _checked(text: str, current: ClusterConfig | None) -> str:
    result = check(text, current=current)
    if not result.ok:
        raise EditError("the edited corosync.conf would be refused: "
                        + "; ".join(str(e) for e in result.errors))
    return text
