"""corosync.conf parsing, validation, defaults and update rules (pmxfs.core.conf).

Tables: one row per situation. Validation rows name a `marker`, the text of the offending line, so
the expected LINE:COL is computed from the fixture instead of being counted by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core import conf
from pmxfs.core.totem_params import TotemParams

# A corosync.conf as Proxmox VE writes it (keys sorted, two-space indentation).
PROXMOX = """\
logging {
  debug: off
  to_syslog: yes
}

nodelist {
  node {
    name: pve1
    nodeid: 1
    quorum_votes: 1
    ring0_addr: 10.0.0.1
  }
  node {
    name: pve2
    nodeid: 2
    quorum_votes: 1
    ring0_addr: 10.0.0.2
  }
  node {
    name: pve3
    nodeid: 3
    quorum_votes: 1
    ring0_addr: 10.0.0.3
  }
}

quorum {
  provider: corosync_votequorum
}

totem {
  cluster_name: lab
  config_version: 3
  interface {
    linknumber: 0
  }
  ip_version: ipv4-6
  link_mode: passive
  secauth: on
  version: 2
}
"""


def node(nid: int, *, name: str | None = None, addr: str | None = None,
         votes: int | None = 1, extra: str = "") -> str:
    lines = ["  node {"]
    lines.append(f"    name: {name if name is not None else f'pve{nid}'}")
    lines.append(f"    nodeid: {nid}")
    if votes is not None:
        lines.append(f"    quorum_votes: {votes}")
    lines.append(f"    ring0_addr: {addr if addr is not None else f'10.0.0.{nid}'}")
    lines += [f"    {x}" for x in extra.splitlines()]
    lines.append("  }")
    return "\n".join(lines) + "\n"


def text(*, totem: str = "", quorum: str = "", nodes: Sequence[str] | None = None,
         top: str = "", version: int | None = 3) -> str:
    """A valid 3-node config with extra lines spliced into each section."""
    node_blocks = nodes if nodes is not None else [node(1), node(2), node(3)]
    out = "totem {\n  cluster_name: lab\n"
    if version is not None:
        out += f"  config_version: {version}\n"
    out += "".join(f"  {x}\n" for x in totem.splitlines())
    out += "}\n\nnodelist {\n" + "".join(node_blocks) + "}\n\n"
    out += "quorum {\n  provider: corosync_votequorum\n"
    out += "".join(f"  {x}\n" for x in quorum.splitlines())
    out += "}\n"
    if top:
        out += "\n" + top
    return out


def located(source: str, marker: str) -> str:
    """`LINE:COL` of the first line containing `marker` (`marker@@N`: of the N-th such line)."""
    text_part, _, nth = marker.partition("@@")
    wanted = int(nth) if nth else 1
    for lineno, line in enumerate(source.splitlines(), 1):
        if text_part in line:
            wanted -= 1
            if wanted == 0:
                return f"{lineno}:{len(line) - len(line.lstrip()) + 1}"
    raise AssertionError(f"marker {marker!r} not in the text")


def problems(result: conf.CheckResult, severity: str = "error") -> list[str]:
    items = result.errors if severity == "error" else result.warnings
    return [f"{e.line}:{e.col}: {e.reason}" for e in items]


# ---------------------------------------------------------------------------------------------
# The Proxmox file


def test_proxmox_config_validates_and_renders_back_identically() -> None:
    result = conf.check(PROXMOX)
    assert result.ok, result.errors
    assert result.warnings == ()
    config = result.config
    assert config is not None
    assert config.cluster_name == "lab"
    assert config.config_version == 3
    assert config.transport == "knet"  # no transport line: knet, as corosync 3
    assert [n.name for n in config.nodes] == ["pve1", "pve2", "pve3"]
    assert config.node_infos()[1] == conf.NodeInfo(2, "pve2", "10.0.0.2", 1)
    assert config.expected_votes == 3
    assert conf.render(config) == PROXMOX
    assert conf.parse(conf.render(config)) == config


def test_proxmox_config_with_two_links_and_crypto() -> None:
    source = PROXMOX
    for nid in (1, 2, 3):
        source = source.replace(f"    ring0_addr: 10.0.0.{nid}\n",
                                f"    ring0_addr: 10.0.0.{nid}\n    ring1_addr: 10.1.0.{nid}\n")
    source = source.replace("  secauth: on\n", "  crypto_cipher: aes256\n  crypto_hash: sha256\n"
                                               "  secauth: on\n  knet_pmtud_interval: 30\n")
    result = conf.check(source)
    assert result.ok, result.errors
    assert problems(result, "warning") == [
        "45:3: 'totem.knet_pmtud_interval' is a corosync option pmxfs does not implement; it is "
        "kept and ignored"]
    assert result.config is not None
    assert result.config.nodes[0].addrs == ((0, "10.0.0.1"), (1, "10.1.0.1"))
    assert conf.render(result.config) == source


def test_comments_blank_lines_crlf_bom_and_tabs() -> None:
    source = ("\ufeff# corosync.conf\r\n\r\ntotem {\r\n\t# the name\r\n\tcluster_name: lab # x\r\n"
              "\tconfig_version: 1\r\n}\r\nnodelist {\r\n\tnode {\r\n\t\tname: a\r\n"
              "\t\tnodeid: 1\r\n\t\tring0_addr: 127.0.0.10\r\n\t}\r\n}\r\n")
    config = conf.parse(source)
    # as in corosync, '#' after a value is part of the value
    assert config.totem.cluster_name == "lab # x"
    assert conf.validate(config)[0].reason.startswith("totem.cluster_name 'lab # x' is not valid")
    assert config.nodes[0].ring0_addr == "127.0.0.10"


# ---------------------------------------------------------------------------------------------
# Syntax and value errors: FILE:LINE:COL: reason, every error collected


SYNTAX_ROWS = [
    ("stray closing brace", "totem {\n  cluster_name: lab\n}\n}\n", ["4:1: unknown section end"]),
    ("unclosed section", "totem {\n  cluster_name: lab\n",
     ["1:1: missing closing brace for section 'totem'"]),
    ("unclosed nested sections", "nodelist {\n  node {\n    nodeid: 1\n",
     ["1:1: missing closing brace for section 'nodelist'",
      "2:3: missing closing brace for section 'node'"]),
    ("line without colon", "totem {\n  cluster_name lab\n}\n",
     ["2:3: expected 'key: value', 'name {' or '}', got 'cluster_name lab'"]),
    ("hex number", "totem {\n  token: 0x10\n}\n",
     ["2:3: totem.token: '0x10' is not a decimal number"]),
    ("negative number", "totem {\n  token: -5\n}\n",
     ["2:3: totem.token: '-5' is not a decimal number"]),
    ("fraction", "totem {\n  join: 3.5\n}\n", ["2:3: totem.join: '3.5' is not a decimal number"]),
    ("exponent", "quorum {\n  expected_votes: 1e3\n}\n",
     ["2:3: quorum.expected_votes: '1e3' is not a decimal number"]),
    ("number out of range", "totem {\n  token: 99999999999\n}\n",
     ["2:3: totem.token: 99999999999 is out of range (at most 4294967295)"]),
    ("unicode digits", "nodelist {\n  node {\n    nodeid: ٣\n  }\n}\n",
     ["3:5: nodelist.node.nodeid: '٣' is not a decimal number"]),
    ("bad boolean", "quorum {\n  two_node: maybe\n}\n",
     ["2:3: quorum.two_node: 'maybe' is not a boolean (use yes/no, on/off or 1/0)"]),
    ("bad boolean in a kept key", "totem {\n  secauth: sometimes\n}\n",
     ["2:3: totem.secauth: 'sometimes' is not a boolean (use yes/no, on/off or 1/0)"]),
    ("bad kept enum", "totem {\n  ip_version: ipv5\n}\n",
     ["2:3: totem.ip_version: 'ipv5' is not one of ipv4, ipv4-6, ipv6, ipv6-4"]),
    ("config version 1", "totem {\n  version: 1\n}\n", ["2:3: totem.version: '1' is not one of 2"]),
    ("bad tie-breaker node", "quorum {\n  auto_tie_breaker_node: first\n}\n",
     ["2:3: quorum.auto_tie_breaker_node: 'first' is not 'lowest', 'highest' or a "
      "space-separated list of node ids"]),
    ("duplicate key", "totem {\n  token: 1000\n  token: 2000\n}\n",
     ["3:3: duplicate key 'totem.token' (first at line 2)"]),
    ("duplicate section", "totem {\n}\nquorum {\n}\ntotem {\n}\n",
     ["5:1: duplicate section 'totem' (first at line 1)"]),
    ("duplicate device", "quorum {\n  device {\n  }\n  device {\n  }\n}\n",
     ["4:3: duplicate section 'quorum.device' (first at line 2)"]),
    ("section used as a key", "totem: lab\n", ["1:1: 'totem' is a section ('totem { ... }'), "
                                               "not a key"]),
    ("key used as a section", "totem {\n  token {\n  }\n}\n",
     ["2:3: 'totem.token' is a key ('token: value'), not a section"]),
    ("node as a key", "nodelist {\n  node: pve1\n}\n",
     ["2:3: 'nodelist.node' is a section ('node { ... }'), not a key"]),
    ("one-line section", "nodelist {\n  node { ring0_addr: 10.0.0.1 }\n}\n",
     ["2:3: '{' and '}' must end or stand on a line of their own (one 'key: value' per line)"]),
    ("brace after a value", "totem {\n  cluster_name: lab }\n}\n",
     ["2:3: '{' and '}' must end or stand on a line of their own (one 'key: value' per line)"]),
    ("invalid key", "totem {\n  to ken: 5\n}\n", ["2:3: invalid key name 'to ken'"]),
    ("missing key", "totem {\n  : 5\n}\n", ["2:3: missing key name before ':'"]),
    ("missing value", "totem {\n  token:\n}\n", ["2:3: missing value for 'token'"]),
    ("invalid section name", "bad name {\n}\n", ["1:1: invalid section name 'bad name'"]),
    ("missing section name", "{\n}\n", ["1:1: section name missing before '{'"]),
    ("control character", "totem {\n  cluster_name: l\x01b\n}\n",
     ["2:18: control character U+0001 is not allowed"]),
    ("several errors at once", "totem {\n  token: x\n  join: y\n}\n}\nquorum {\n  two_node: 2\n}\n",
     ["2:3: totem.token: 'x' is not a decimal number",
      "3:3: totem.join: 'y' is not a decimal number",
      "5:1: unknown section end",
      "7:3: quorum.two_node: '2' is not a boolean (use yes/no, on/off or 1/0)"]),
]


@pytest.mark.parametrize(("source", "expected"), [r[1:] for r in SYNTAX_ROWS],
                         ids=[r[0] for r in SYNTAX_ROWS])
def test_syntax_errors(source: str, expected: list[str]) -> None:
    with pytest.raises(conf.ConfigSyntaxError) as info:
        conf.parse(source, "corosync.conf")
    assert [f"{e.line}:{e.col}: {e.reason}" for e in info.value.errors] == expected
    result = conf.check(source)
    assert not result.ok
    assert problems(result) == expected


def test_error_format_matches_the_issue_example() -> None:
    source = "totem {\n  cluster_name: lab\n}\n" + "\n" * 10 + "  }\n"
    result = conf.check(source)
    assert [str(e) for e in result.errors] == ["corosync.conf:14:3: unknown section end"]
    warning = conf.ConfigError("f.conf", 2, 5, "something", "warning")
    assert str(warning) == "f.conf:2:5: warning: something"


# ---------------------------------------------------------------------------------------------
# Validation rules


def _ipv6_nodes() -> list[str]:
    return [node(i, addr=f"fd00::{i}") for i in (1, 2, 3)]


VALIDATION_ROWS: list[tuple[str, str, str, str]] = [
    # (name, source, marker of the offending line, reason)
    ("unknown transport", text(totem="transport: tcp"), "transport: tcp",
     "totem.transport: unknown transport 'tcp' (use knet, the default, udpu or udp)"),
    ("link number 8", text(nodes=[node(1, extra="ring8_addr: 10.1.0.1")]), "ring8_addr",
     "node pve1: ring8_addr: link number 8 is above the maximum 7"),
    ("cluster_name required", text().replace("  cluster_name: lab\n", ""), "totem {",
     "totem.cluster_name is required"),
    ("cluster_name well-formed", text().replace("cluster_name: lab", "cluster_name: my lab"),
     "cluster_name", "totem.cluster_name 'my lab' is not valid: use letters, digits, '-', '_' "
                     "and '.' (at most 64 characters)"),
    ("totem section required", "nodelist {\n" + node(1) + "}\n", "nodelist {",
     "the totem section is missing (totem { cluster_name: ... })"),
    ("at least one node", text(nodes=[]), "nodelist {",
     "the nodelist needs at least one node (nodelist { node { name, nodeid, ring0_addr } })"),
    ("no nodelist at all", "totem {\n  cluster_name: lab\n  config_version: 1\n}\n", "totem {",
     "the nodelist needs at least one node (nodelist { node { name, nodeid, ring0_addr } })"),
    ("node ids unique", text(nodes=[node(1), node(2), node(2, name="pve3", addr="10.0.0.3")]),
     "nodeid: 2@@2", "node pve3: nodeid 2 is already used by node pve2 (line 13)"),
    ("node id > 0", text(nodes=[node(0), node(2)]), "nodeid: 0",
     "node pve0: nodeid must be greater than 0"),
    ("node id required", text(nodes=[node(1), "  node {\n    name: x\n    ring0_addr: 1.2.3.4\n"
                                               "  }\n"]), "node {@@2",
     "node x: nodeid is required"),
    ("node name required", text(nodes=[node(1), "  node {\n    nodeid: 2\n"
                                                "    ring0_addr: 1.2.3.4\n  }\n"]),
     "node {@@2", "node #2: name is required"),
    ("ring0_addr required", text(nodes=[node(1), "  node {\n    name: b\n    nodeid: 2\n  }\n"]),
     "node {@@2", "node b: ring0_addr is required"),
    ("names unique (case-insensitive)", text(nodes=[node(1), node(2, name="PVE1")]), "PVE1",
     "node PVE1: name is already used by node pve1 (line 7)"),
    ("name is a host name: underscore", text(nodes=[node(1, name="pve_1")]), "pve_1",
     "node pve_1: name 'pve_1' is not a valid host name"),
    ("name is a host name: leading hyphen", text(nodes=[node(1, name="-pve")]), "-pve",
     "node -pve: name '-pve' is not a valid host name"),
    ("name is a host name: label too long", text(nodes=[node(1, name="a" * 64)]), "a" * 64,
     f"node {'a' * 64}: name '{'a' * 37}...' is not a valid host name"),
    ("addresses unique", text(nodes=[node(1), node(2, addr="10.0.0.1")]), "ring0_addr: 10.0.0.1@@2",
     "node pve2: ring0_addr 10.0.0.1 is already used by node pve1 (line 7)"),
    ("addresses of one family", text(nodes=[node(1), node(2, addr="fd00::2")]), "fd00::2",
     "node pve2: ring0_addr fd00::2 is IPv6 but node pve1 (line 7) uses IPv4; all node "
     "addresses of link 0 must be of one family"),
    ("address not unspecified", text(nodes=[node(1, addr="0.0.0.0")]), "0.0.0.0",
     "node pve1: ring0_addr 0.0.0.0 cannot be a node address (unspecified or multicast)"),
    ("address not multicast", text(nodes=[node(1, addr="239.1.1.1")]), "239.1.1.1",
     "node pve1: ring0_addr 239.1.1.1 cannot be a node address (unspecified or multicast)"),
    ("address neither IP nor host name", text(nodes=[node(1, addr="10.0.0.300")]), "10.0.0.300",
     "node pve1: ring0_addr '10.0.0.300' is neither an IP address nor a valid host name"),
    ("votes out of range", text(nodes=[node(1, votes=1001), node(2)]), "1001",
     "node pve1: quorum_votes 1001 is out of range (0-1000)"),
    ("votes add up to 0", text(nodes=[node(1, votes=0)]), "nodelist {",
     "the nodes' quorum_votes add up to 0; at least one vote is needed"),
    ("provider", text(quorum="").replace("corosync_votequorum", "other"), "provider",
     "quorum.provider: 'other' is not supported (use corosync_votequorum)"),
    ("expected_votes >= 1", text(quorum="expected_votes: 0"), "expected_votes",
     "quorum.expected_votes must be at least 1"),
    ("two_node needs two nodes", text(quorum="two_node: 1"), "two_node",
     "quorum.two_node needs exactly two nodes in the nodelist (found 3)"),
    ("two_node not with auto_tie_breaker",
     text(nodes=[node(1), node(2)], quorum="two_node: 1\nauto_tie_breaker: 1"), "two_node",
     "quorum.two_node cannot be combined with auto_tie_breaker"),
    ("device not with two_node",
     text(nodes=[node(1), node(2)], quorum="two_node: 1\ndevice {\n  model: net\n  net {\n"
                                           "    host: qnetd\n  }\n}"), "two_node",
     "quorum.device cannot be combined with two_node"),
    ("device not with last_man_standing",
     text(quorum="last_man_standing: 1\ndevice {\n  model: net\n  votes: 1\n  net {\n"
                 "    host: qnetd\n  }\n}"), "last_man_standing",
     "quorum.device cannot be combined with last_man_standing"),
    ("device not with auto_tie_breaker",
     text(quorum="auto_tie_breaker: 1\nwait_for_all: 1\ndevice {\n  model: net\n  votes: 1\n"
                 "  net {\n    host: qnetd\n  }\n}"), "auto_tie_breaker",
     "quorum.device cannot be combined with auto_tie_breaker"),
    ("device model required", text(quorum="device {\n  votes: 1\n}"), "device {",
     "quorum.device.model is required (model: net)"),
    ("device model net only", text(quorum="device {\n  model: disk\n}"), "model: disk",
     "quorum.device.model: 'disk' is not supported (use net)"),
    ("device net section required", text(quorum="device {\n  model: net\n}"), "device {",
     "quorum.device.net { host: ... } is required for model net"),
    ("device host required", text(quorum="device {\n  model: net\n  net {\n"
                                         "    algorithm: ffsplit\n  }\n}"), "net {",
     "quorum.device.net.host is required"),
    ("device algorithm", text(quorum="device {\n  model: net\n  net {\n    host: q\n"
                                     "    algorithm: coin\n  }\n}"), "algorithm",
     "quorum.device.net.algorithm: 'coin' is not one of ffsplit, lms"),
    ("device port", text(quorum="device {\n  model: net\n  net {\n    host: q\n"
                                "    port: 70000\n  }\n}"), "port: 70000",
     "quorum.device.net.port: 70000 is not a port number (1-65535)"),
    ("device tie_breaker", text(quorum="device {\n  model: net\n  net {\n    host: q\n"
                                       "    tie_breaker: 9\n  }\n}"), "tie_breaker",
     "quorum.device.net.tie_breaker: '9' is not lowest, highest or a node id of the nodelist"),
    ("device votes needed with expected_votes",
     text(quorum="expected_votes: 5\ndevice {\n  model: net\n  net {\n    host: q\n  }\n}"),
     "device {", "quorum.device.votes must be set when quorum.expected_votes is set"),
    ("device votes needed with uneven votes",
     text(nodes=[node(1, votes=2), node(2), node(3)],
          quorum="device {\n  model: net\n  net {\n    host: q\n  }\n}"),
     "device {", "quorum.device.votes must be set when not every node has quorum_votes 1"),
    ("device votes too high", text(quorum="expected_votes: 4\ndevice {\n  model: net\n"
                                          "  votes: 3\n  net {\n    host: q\n  }\n}"),
     "votes: 3", "quorum.device.votes is too high for quorum.expected_votes 4"),
    ("last_man_standing needs votes 1", text(nodes=[node(1, votes=2), node(2), node(3)],
                                             quorum="last_man_standing: 1"),
     "last_man_standing", "quorum.last_man_standing needs every node to have quorum_votes 1"),
    ("last_man_standing_window >= 1", text(quorum="last_man_standing_window: 0"),
     "last_man_standing_window", "quorum.last_man_standing_window must be at least 1 ms"),
    ("auto_tie_breaker + last_man_standing, odd votes, no wait_for_all",
     text(quorum="auto_tie_breaker: 1\nlast_man_standing: 1"), "auto_tie_breaker",
     "quorum.auto_tie_breaker with last_man_standing needs wait_for_all when the votes add up to "
     "an odd number"),
    ("auto_tie_breaker_node unknown id", text(quorum="auto_tie_breaker: 1\nwait_for_all: 1\n"
                                                     "auto_tie_breaker_node: 1 7"),
     "auto_tie_breaker_node", "quorum.auto_tie_breaker_node: node id 7 is not in the nodelist"),
    ("auto_tie_breaker_node duplicate id", text(quorum="auto_tie_breaker: 1\nwait_for_all: 1\n"
                                                       "auto_tie_breaker_node: 2 2"),
     "auto_tie_breaker_node", "quorum.auto_tie_breaker_node lists a node id twice"),
    ("token >= 30 ms", text(totem="token: 20"), "token: 20",
     "totem.token: 20 ms is below the minimum of 30 ms"),
    ("hold >= 30 ms", text(totem="hold: 29"), "hold: 29",
     "totem.hold: 29 ms is below the minimum of 30 ms"),
    ("join >= 30 ms", text(totem="join: 10"), "join: 10",
     "totem.join: 10 ms is below the minimum of 30 ms"),
    ("consensus >= join", text(totem="consensus: 40\njoin: 50"), "consensus: 40",
     "totem.consensus (40 ms) must be at least join (50 ms)"),
    ("hold < token", text(totem="hold: 5000"), "hold: 5000",
     "totem.hold (5000 ms) must be less than token (3650 ms)"),
    ("hold < token with derived values", text(nodes=[node(1), node(2)], totem="token: 30"),
     "token: 30", "totem.hold (30 ms) must be less than token (30 ms)"),
    ("token_retransmit < token", text(totem="token_retransmit: 4000"), "token_retransmit",
     "totem.token_retransmit (4000 ms) must be less than token (3650 ms)"),
    ("counts >= 1", text(totem="window_size: 0"), "window_size",
     "totem.window_size must be at least 1"),
    ("port range", text(totem="port: 70000"), "port: 70000",
     "totem.port: 70000 is not a port number (1-65535)"),
    ("netmtu range", text(totem="netmtu: 100"), "netmtu",
     "totem.netmtu: 100 is out of range (576-65507)"),
    ("mcastaddr is multicast", text(totem="transport: udp\nmcastaddr: 10.0.0.9"), "mcastaddr",
     "totem.mcastaddr: '10.0.0.9' is not a multicast IP address"),
    ("udp with IPv6 nodes needs an IPv6 mcastaddr", text(totem="transport: udp",
                                                         nodes=_ipv6_nodes()), "transport: udp",
     "transport udp with IPv6 node addresses needs an explicit IPv6 totem.mcastaddr"),
    ("mcastaddr family matches the nodes", text(totem="transport: udp\nmcastaddr: ff15::1"),
     "mcastaddr", "totem.mcastaddr ff15::1 is IPv6 but the node addresses are IPv4"),
]


@pytest.mark.parametrize(("source", "marker", "reason"), [r[1:] for r in VALIDATION_ROWS],
                         ids=[r[0] for r in VALIDATION_ROWS])
def test_validation_rules(source: str, marker: str, reason: str) -> None:
    result = conf.check(source)
    assert not result.ok
    assert f"{located(source, marker)}: {reason}" in problems(result)


def test_validation_collects_every_error() -> None:
    source = text(totem="transport: tcp\ntoken: 10",
                  nodes=[node(1), node(1, name="pve_2", addr="10.0.0.1")],
                  quorum="two_node: 1\nexpected_votes: 0")
    result = conf.check(source)
    assert [e.reason for e in result.errors] == [
        "totem.transport: unknown transport 'tcp' (use knet, the default, udpu or udp)",
        "totem.token: 10 ms is below the minimum of 30 ms",
        "node pve_2: name 'pve_2' is not a valid host name",
        "node pve_2: nodeid 1 is already used by node pve1 (line 9)",
        "node pve_2: ring0_addr 10.0.0.1 is already used by node pve1 (line 9)",
        "quorum.expected_votes must be at least 1",
    ]
    assert [e.line for e in result.errors] == sorted(e.line for e in result.errors)


def test_validate_returns_errors_for_a_parsed_config() -> None:
    config = conf.parse(text(totem="transport: tcp"))
    errors = conf.validate(config)
    assert [str(e) for e in errors] == [
        "corosync.conf:4:3: totem.transport: unknown transport 'tcp' (use knet, the default, "
        "udpu or udp)"]
    assert conf.validate(conf.parse(text())) == []


def test_validate_a_config_built_in_code() -> None:
    config = conf.ClusterConfig(
        totem=conf.TotemSection(cluster_name="lab", config_version=1),
        nodes=(conf.NodeEntry("a", 1, "127.0.0.10"), conf.NodeEntry("b", 1, "127.0.0.11")))
    assert [str(e) for e in conf.validate(config)] == [
        "corosync.conf:1:1: node b: nodeid 1 is already used by node a"]


# ---------------------------------------------------------------------------------------------
# Warnings: unknown keys are kept, warned about, and rendered back

WARNING_ROWS = [
    ("unknown totem key", text(totem="frobnicate: yes"), "frobnicate",
     "unknown key 'totem.frobnicate' is kept but not used by pmxfs"),
    ("unknown node key", text(nodes=[node(1, extra="weight: 3")]), "weight",
     "unknown key 'nodelist.node.weight' is kept but not used by pmxfs"),
    ("unknown top-level section", text(top="system {\n  qb_ipc_type: native\n}\n"), "system {",
     "unknown top-level section 'system' is kept but not used by pmxfs"),
    ("node outside the nodelist", text(top="node {\n  nodeid: 9\n}\n"), "node {@@4",
     "unknown top-level section 'node' is kept but not used by pmxfs (node {} belongs inside "
     "nodelist {})"),
    ("unknown nodelist key", text(nodes=[node(1), "  colour: blue\n"]), "colour",
     "unknown key 'nodelist.colour' is kept but not used by pmxfs"),
    ("allow_downscale", text(quorum="allow_downscale: 1"), "allow_downscale",
     "'quorum.allow_downscale' is not supported by pmxfs and is ignored"),
    ("mcastaddr with udpu", text(totem="transport: udpu\nmcastaddr: 239.192.1.1"), "mcastaddr",
     "totem.mcastaddr is ignored with transport udpu"),
    ("mcastaddr with knet", text(totem="mcastaddr: 239.192.1.1"), "mcastaddr",
     "totem.mcastaddr is ignored with transport knet"),
    ("config_version missing", text(version=None), "totem {",
     "totem.config_version is not set (taken as 0); an update must set a greater one"),
    ("auto_tie_breaker odd votes", text(quorum="auto_tie_breaker: 1"), "auto_tie_breaker",
     "quorum.auto_tie_breaker has no effect with an odd number of votes unless wait_for_all is "
     "set"),
    ("auto_tie_breaker_node without auto_tie_breaker", text(quorum="auto_tie_breaker_node: 1"),
     "auto_tie_breaker_node", "quorum.auto_tie_breaker_node has no effect without "
                              "auto_tie_breaker: 1"),
    ("auto_tie_breaker_node list", text(nodes=[node(i) for i in (1, 2, 3, 4)],
                                        quorum="auto_tie_breaker: 1\nauto_tie_breaker_node: 3 1"),
     "auto_tie_breaker_node", "quorum.auto_tie_breaker_node: a list relies on each node's "
                              "previous membership (as in votequorum), so after a node was cut "
                              "off two partitions can each hold a listed node; 'lowest' or "
                              "'highest' cannot"),
    ("expected_votes below the nodelist's votes", text(quorum="expected_votes: 2"),
     "expected_votes", "quorum.expected_votes (2) is lower than the nodelist's votes (3): two "
                       "partitions could be quorate"),
    ("max_messages above window_size", text(totem="max_messages: 60"), "max_messages",
     "totem.max_messages (60) is larger than window_size (50); window_size limits it"),
    ("hold not below token_retransmit", text(totem="hold: 2000"), "hold: 2000",
     "totem.hold (2000 ms) is not below token_retransmit (869 ms): an idle ring's held token "
     "is retransmitted before it moves on"),
]


@pytest.mark.parametrize(("source", "marker", "reason"), [r[1:] for r in WARNING_ROWS],
                         ids=[r[0] for r in WARNING_ROWS])
def test_warnings(source: str, marker: str, reason: str) -> None:
    result = conf.check(source)
    assert result.ok, problems(result)
    assert f"{located(source, marker)}: {reason}" in problems(result, "warning")
    assert result.config is not None
    assert conf.parse(conf.render(result.config)) == result.config


def test_unknown_content_is_rendered_back_in_place() -> None:
    source = text(totem="frobnicate: yes\nblock {\n  inner: 1\n}",
                  nodes=[node(1, extra="weight: 3"), node(2)],
                  top="system {\n  qb_ipc_type: native\n}\n")
    config = conf.parse(source)
    assert conf.render(config) == source
    assert config.totem.extras == (
        conf.RawEntry("frobnicate", "yes"),
        conf.RawSection("block", (conf.RawEntry("inner", "1"),)),
    )


# ---------------------------------------------------------------------------------------------
# Defaults and derived timers (docs/design.md §2), through totem_params -> derive_params

TIMER_ROWS = [
    ("1 node, defaults", 1, "", (3000, 714, 561, 3600)),
    ("2 nodes, defaults", 2, "", (3000, 714, 561, 3600)),
    ("3 nodes: + 650 per node above 2", 3, "", (3650, 869, 685, 4380)),
    ("5 nodes", 5, "", (4950, 1178, 932, 5940)),
    ("16 nodes", 16, "", (12100, 2880, 2294, 14520)),
    ("3 nodes, token 1000", 3, "token: 1000", (1650, 392, 303, 1980)),
    ("3 nodes, token_coefficient 0", 3, "token_coefficient: 0", (3000, 714, 561, 3600)),
    ("explicit values win", 3, "token_retransmit: 500\nhold: 100\nconsensus: 9000",
     (3650, 500, 100, 9000)),
]


@pytest.mark.parametrize(("count", "totem", "expected"), [r[1:] for r in TIMER_ROWS],
                         ids=[r[0] for r in TIMER_ROWS])
def test_derived_timers(count: int, totem: str, expected: tuple[int, int, int, int]) -> None:
    config = conf.parse(text(totem=totem, nodes=[node(i) for i in range(1, count + 1)]))
    assert conf.validate(config) == []
    params = conf.totem_params(config)
    assert (params.token, params.token_retransmit, params.hold, params.consensus) == expected


def test_other_totem_defaults() -> None:
    params = conf.totem_params(conf.parse(text()))
    assert (params.join, params.merge, params.window_size, params.max_messages,
            params.miss_count_const, params.fail_recv_const, params.seqno_unchanged_const,
            params.downcheck, params.netmtu) == (50, 200, 50, 17, 5, 2500, 30, 1000, 1500)
    custom = conf.totem_params(conf.parse(text(totem="join: 60\nmerge: 300\nwindow_size: 20\n"
                                                     "max_messages: 10\nnetmtu: 9000")))
    assert isinstance(custom, TotemParams)
    assert (custom.join, custom.merge, custom.window_size, custom.max_messages,
            custom.netmtu) == (60, 300, 20, 10, 9000)


def test_transport_defaults() -> None:
    config = conf.parse(text())
    assert config.transport == "knet"
    assert config.port == 5405
    udp = conf.parse(text(totem="transport: udp"))
    assert conf.validate(udp) == []
    assert udp.transport == "udp"
    assert udp.mcastaddr == conf.default_mcastaddr("lab")
    assert udp.mcastaddr.startswith("239.192.")
    assert conf.default_mcastaddr("lab") == conf.default_mcastaddr("lab")
    assert conf.default_mcastaddr("lab") != conf.default_mcastaddr("prod")
    explicit = conf.parse(text(totem="transport: udp\nmcastaddr: 239.255.1.2\nport: 6000"))
    assert (explicit.mcastaddr, explicit.port) == ("239.255.1.2", 6000)
    ipv6 = conf.parse(text(totem="transport: udp\nmcastaddr: ff15::1", nodes=_ipv6_nodes()))
    assert conf.validate(ipv6) == []


def test_booleans_as_corosync() -> None:
    for word, value in [("yes", True), ("on", True), ("1", True), ("no", False), ("off", False),
                        ("0", False), ("YES", True)]:
        config = conf.parse(text(quorum=f"wait_for_all: {word}"))
        assert config.quorum.wait_for_all is value


def test_host_names_as_addresses() -> None:
    config = conf.parse(text(nodes=[node(1, addr="pve1.example.com"), node(2, addr="fd00::2"),
                                    node(3, addr="PVE1.example.com")]))
    assert [e.reason for e in conf.validate(config)] == [
        "node pve3: ring0_addr PVE1.example.com is already used by node pve1 (line 7)"]


def test_device_votes_default() -> None:
    config = conf.parse(text(quorum="device {\n  model: net\n  net {\n    host: 10.9.9.9\n"
                                    "    algorithm: ffsplit\n  }\n}"))
    assert conf.validate(config) == []
    assert conf.device_votes(config) == 2
    assert config.expected_votes == 5


def test_node_infos_needs_a_valid_config() -> None:
    config = conf.parse(text(nodes=["  node {\n    nodeid: 1\n  }\n"]))
    with pytest.raises(ValueError, match="validated"):
        config.node_infos()


# ---------------------------------------------------------------------------------------------
# Updates of a running cluster

BASE = text(version=3)


def _update(new: str) -> conf.UpdateResult:
    return conf.validate_update(conf.parse(BASE), conf.parse(new))


UPDATE_REFUSALS = [
    ("same config_version", text(version=3), "config_version",
     "totem.config_version must be greater than the current 3 (got 3)"),
    ("lower config_version", text(version=2), "config_version",
     "totem.config_version must be greater than the current 3 (got 2)"),
    ("no config_version", text(version=None), "totem {",
     "totem.config_version must be greater than the current 3 (got 0)"),
    ("cluster_name changes", text(version=4).replace("cluster_name: lab", "cluster_name: prod"),
     "cluster_name", "totem.cluster_name cannot change on a running cluster (current 'lab', "
                     "new 'prod')"),
    ("transport changes", text(version=4, totem="transport: udp"), "transport",
     "totem.transport cannot change on a running cluster (current knet, new udp)"),
]


@pytest.mark.parametrize(("source", "marker", "reason"), [r[1:] for r in UPDATE_REFUSALS],
                         ids=[r[0] for r in UPDATE_REFUSALS])
def test_update_refusals(source: str, marker: str, reason: str) -> None:
    result = _update(source)
    assert not result.ok
    assert f"{located(source, marker)}: {reason}" in [f"{e.line}:{e.col}: {e.reason}"
                                                      for e in result.errors]
    checked = conf.check(source, "new.conf", conf.parse(BASE))
    assert not checked.ok
    assert checked.config is None
    assert any(e.reason == reason for e in checked.errors)


UPDATE_CHANGES: list[tuple[str, str, list[str], list[str]]] = [
    # (name, new text, run-time change keys, restart change keys)
    ("only the version", text(version=4), [], []),
    ("explicit knet is the same transport", text(version=4, totem="transport: knet"), [], []),
    ("node added", text(version=4, nodes=[node(1), node(2), node(3), node(4)]),
     ["nodelist.4"], []),
    ("node removed", text(version=4, nodes=[node(1), node(2)]), ["nodelist.3"], []),
    ("votes changed", text(version=4, nodes=[node(1, votes=2), node(2), node(3)]),
     ["nodelist.1.quorum_votes"], []),
    ("expected votes", text(version=4, quorum="expected_votes: 4"),
     ["quorum.expected_votes"], []),
    ("timeouts", text(version=4, totem="token: 5000\nconsensus: 7000"),
     ["totem.token", "totem.consensus"], []),
    ("address of a node", text(version=4, nodes=[node(1), node(2, addr="10.0.0.22"), node(3)]),
     ["nodelist.2.ring0_addr"], []),
    ("name of a node", text(version=4, nodes=[node(1), node(2, name="pve22"), node(3)]),
     [], ["nodelist.2.name"]),
    ("netmtu", text(version=4, totem="netmtu: 9000"), [], ["totem.netmtu"]),
    ("wait_for_all", text(version=4, quorum="wait_for_all: 1"), [], ["quorum.wait_for_all"]),
    ("last_man_standing", text(version=4, quorum="last_man_standing: 1"), [],
     ["quorum.last_man_standing"]),
    ("quorum device", text(version=4, quorum="device {\n  model: net\n  net {\n    host: q\n"
                                             "  }\n}"), ["quorum.device"], []),
    ("kept keys", text(version=4, totem="secauth: on"), [], ["totem"]),
    ("logging", text(version=4, top="logging {\n  debug: on\n}\n"), ["logging"], []),
]


@pytest.mark.parametrize(("source", "runtime", "restart"), [r[1:] for r in UPDATE_CHANGES],
                         ids=[r[0] for r in UPDATE_CHANGES])
def test_update_changes(source: str, runtime: list[str], restart: list[str]) -> None:
    result = _update(source)
    assert result.ok, result.errors
    assert [c.key for c in result.runtime_changes] == runtime
    assert [c.key for c in result.restart_changes] == restart
    assert result.needs_restart is bool(restart)


def test_update_two_node_applies_at_run_time() -> None:
    two = text(version=3, nodes=[node(1), node(2)])
    result = conf.validate_update(conf.parse(two),
                                  conf.parse(text(version=4, nodes=[node(1), node(2)],
                                                  quorum="two_node: 1")))
    assert [c.description for c in result.runtime_changes] == ["quorum.two_node: (default) -> 1"]
    assert not result.needs_restart


def test_check_with_current() -> None:
    current = conf.parse(BASE)
    result = conf.check(text(version=4, nodes=[node(1), node(2), node(3), node(4)]), "new",
                        current)
    assert result.ok
    assert result.update is not None
    assert [c.description for c in result.update.changes] == [
        "nodelist: node 4 (pve4) added"]
    invalid = conf.check(text(version=4, totem="transport: tcp"), "new", current)
    assert not invalid.ok
    assert invalid.update is None


# ---------------------------------------------------------------------------------------------
# No input makes the checker raise


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_check_never_raises_on_text(source: str) -> None:
    result = conf.check(source)
    assert result.ok or result.errors


corosyncish = st.lists(
    st.sampled_from(["totem {", "}", "nodelist {", "node {", "quorum {", "device {", "net {",
                     "cluster_name: lab", "nodeid: 1", "nodeid: x", "ring0_addr: 10.0.0.1",
                     "name: pve1", "two_node: 1", "token: 10", "transport: knet", "# c", "",
                     "model: net", "host: q", "votes: 2", "quorum_votes: 0", "logging {",
                     "expected_votes: 2", "auto_tie_breaker: 1", "last_man_standing: 1",
                     "config_version: 1", "junk", "a: {", ": :"]),
    max_size=40,
).map("\n".join)


@settings(max_examples=500, deadline=None)
@given(corosyncish)
def test_check_never_raises_on_config_like_text(source: str) -> None:
    result = conf.check(source)
    assert result.ok or result.errors
    if result.config is not None:
        assert conf.parse(conf.render(result.config)) == result.config
