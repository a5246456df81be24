"""Links in corosync.conf (issue 15): the model (`NodeEntry.addrs`, interface sections,
`effective_transport`, `link_settings`), corosync 3's link rules, rendering, update rules, and
what `pmxfs config check` says about links, host names and encryption.

Validation rows name a `marker`, the text of the offending line, so LINE:COL is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from pmxfs.cli import main
from pmxfs.core import conf


def config_text(nodes: Sequence[Sequence[str]] = (("10.0.0.1", "10.1.0.1"),
                                                 ("10.0.0.2", "10.1.0.2")),
                *, totem: str = "", names: bool = True, version: int = 3,
                interfaces: Sequence[str] = ()) -> str:
    """Nodes 1..N (pveN) with the given ringX_addr per node (index = link number; "" = none)."""
    out = ["totem {", "  cluster_name: lab", f"  config_version: {version}"]
    out += [f"  {line}" for line in totem.splitlines()]
    for body in interfaces:
        out += ["  interface {", *[f"    {line}" for line in body.splitlines()], "  }"]
    out += ["}", "", "nodelist {"]
    for nid, addrs in enumerate(nodes, 1):
        out.append("  node {")
        if names:
            out.append(f"    name: pve{nid}")
        out.append(f"    nodeid: {nid}")
        out += [f"    ring{n}_addr: {a}" for n, a in enumerate(addrs) if a]
        out.append("  }")
    out += ["}", ""]
    return "\n".join(out)


def located(source: str, marker: str) -> str:
    """LINE:COL of the first line containing `marker` ("text@@N": the N-th such line)."""
    text, _, nth = marker.partition("@@")
    hits = [(i, line) for i, line in enumerate(source.split("\n"), 1) if text in line]
    line_no, line = hits[int(nth or 1) - 1]
    return f"{line_no}:{len(line) - len(line.lstrip()) + 1}"


def problems(result: conf.CheckResult, kind: str = "error") -> list[str]:
    items = result.errors if kind == "error" else result.warnings
    return [f"{e.line}:{e.col}: {e.reason}" for e in items]


# ---------------------------------------------------------------------------------------------
# The model


def test_two_links_model() -> None:
    source = config_text(totem="link_mode: active", interfaces=[
        "linknumber: 0\nknet_link_priority: 10", "linknumber: 1\nmcastport: 6000\n"
        "knet_ping_interval: 200\nknet_ping_timeout: 1000\nknet_pong_count: 3"])
    result = conf.check(source)
    assert result.ok, result.errors
    config = result.config
    assert config is not None
    assert config.nodes[0].addrs == ((0, "10.0.0.1"), (1, "10.1.0.1"))
    assert config.nodes[1].addr(1) == "10.1.0.2"
    assert config.nodes[1].addr(2) is None
    assert conf.effective_transport(config) == "knet"
    assert conf.effective_link_mode(config) == "active"
    assert conf.link_numbers(config) == (0, 1)
    assert [i.link for i in config.totem.interfaces] == [0, 1]
    assert conf.link_settings(config) == (
        conf.LinkSettings(0, 5405, 10, 750, 1500, 2),
        conf.LinkSettings(1, 6000, 1, 200, 1000, 3),
    )
    assert config.port == 5405
    assert config.node_infos()[0] == conf.NodeInfo(1, "pve1", "10.0.0.1", 1)


def test_link_defaults_follow_the_derived_token() -> None:
    nodes = [(f"10.0.0.{i}", f"10.1.0.{i}", "", f"10.3.0.{i}") for i in (1, 2, 3, 4, 5)]
    config = conf.parse(config_text(nodes, totem="token: 1000\nport: 7000"))
    token = conf.totem_params(config).token
    assert token == 1000 + 3 * 650
    assert [(s.number, s.port, s.ping_interval_ms, s.ping_timeout_ms)
            for s in conf.link_settings(config)] == [
        (0, 7000, token // 4, token // 2), (1, 7001, token // 4, token // 2),
        (3, 7003, token // 4, token // 2)]


def test_only_one_of_the_ping_timers_set() -> None:
    config = conf.parse(config_text(interfaces=["linknumber: 0\nknet_ping_timeout: 900"]))
    first = conf.link_settings(config)[0]
    assert (first.ping_interval_ms, first.ping_timeout_ms) == (750, 900)


@pytest.mark.parametrize(("line", "transport"), [
    ("", "knet"), ("transport: knet", "knet"), ("transport: udpu", "udpu"),
    ("transport: udp", "udp")])
def test_effective_transport(line: str, transport: str) -> None:
    config = conf.parse(config_text([("10.0.0.1",)], totem=line))
    assert conf.effective_transport(config) == transport


@pytest.mark.parametrize(("mode", "effective"), [
    ("", "passive"), ("link_mode: passive", "passive"), ("link_mode: active", "active"),
    ("link_mode: rr", "active")])
def test_effective_link_mode(mode: str, effective: str) -> None:
    assert conf.effective_link_mode(conf.parse(config_text(totem=mode))) == effective


def test_ip_versions_and_crypto_options() -> None:
    assert conf.ip_versions(conf.parse(config_text())) == (6, 4)
    assert conf.ip_versions(conf.parse(config_text(totem="ip_version: ipv4-6"))) == (4, 6)
    assert conf.ip_versions(conf.parse(config_text(totem="ip_version: ipv4"))) == (4,)
    assert not conf.uses_crypto_options(conf.parse(config_text()))
    assert conf.uses_crypto_options(conf.parse(config_text(totem="crypto_cipher: aes256")))
    assert conf.uses_crypto_options(conf.parse(config_text(totem="secauth: on")))


def test_a_config_built_in_code_has_links() -> None:
    node = conf.NodeEntry("a", 1, "10.0.0.1", ring1_addr="10.1.0.1")
    config = conf.ClusterConfig(
        totem=conf.TotemSection(cluster_name="lab", config_version=1, interfaces=(
            conf.InterfaceSection(linknumber=1, knet_link_priority=5),)),
        nodes=(node,))
    assert conf.validate(config) == []
    text = conf.render(config)
    assert "  interface {\n    knet_link_priority: 5\n    linknumber: 1\n  }\n" in text
    assert "    ring1_addr: 10.1.0.1\n" in text
    assert conf.parse(text) == config


def test_render_keeps_interfaces_in_place() -> None:
    source = config_text(totem="link_mode: passive", interfaces=[
        "linknumber: 1\nknet_ping_precision: 10", "linknumber: 0"])
    result = conf.check(source)
    assert result.ok, result.errors
    assert result.config is not None
    assert conf.render(result.config) == source


# ---------------------------------------------------------------------------------------------
# Validation: corosync 3's link rules

TWO = (("10.0.0.1", "10.1.0.1"), ("10.0.0.2", "10.1.0.2"))

ERROR_ROWS = [
    ("links differ between nodes", config_text((("10.0.0.1", "10.1.0.1"), ("10.0.0.2",))),
     "node {@@2", "node pve2: ring1_addr missing: every node needs an address on every link "
                  "(corosync: Not all nodes have the same number of links)"),
    ("name needed with two links", config_text(TWO, names=False), "node {",
     "node #1: name is required with more than one link (corosync: for a multi-link "
     "configuration, all nodes must have a 'name' attribute)"),
    ("udpu has one link", config_text(TWO, totem="transport: udpu"), "ring1_addr",
     "node pve1: ring1_addr: transport udpu supports one link only; use transport knet (or "
     "leave the transport line out) for redundant links"),
    ("udp has one link", config_text(TWO, totem="transport: udp"), "ring1_addr@@2",
     "node pve2: ring1_addr: transport udp supports one link only; use transport knet (or "
     "leave the transport line out) for redundant links"),
    ("link address unique", config_text((("10.0.0.1", "10.1.0.1"), ("10.0.0.2", "10.1.0.1"))),
     "ring1_addr: 10.1.0.1@@2", "node pve2: ring1_addr 10.1.0.1 is already used by node pve1 "
                                "(line 7)"),
    ("link family", config_text((("10.0.0.1", "10.1.0.1"), ("10.0.0.2", "fd00::2"))),
     "fd00::2", "node pve2: ring1_addr fd00::2 is IPv6 but node pve1 (line 7) uses IPv4; all "
                "node addresses of link 1 must be of one family"),
    ("link address not multicast", config_text((("10.0.0.1", "239.0.0.1"),
                                                ("10.0.0.2", "10.1.0.2"))),
     "239.0.0.1", "node pve1: ring1_addr 239.0.0.1 cannot be a node address (unspecified or "
                  "multicast)"),
    ("link address garbage", config_text((("10.0.0.1", "1.2.3.999"), ("10.0.0.2", "10.1.0.2"))),
     "1.2.3.999", "node pve1: ring1_addr '1.2.3.999' is neither an IP address nor a valid host "
                  "name"),
    ("link number above 7", config_text([("10.0.0.1",)]).replace(
        "ring0_addr: 10.0.0.1", "ring0_addr: 10.0.0.1\n    ring9_addr: 10.9.0.1"),
     "ring9_addr", "node pve1: ring9_addr: link number 9 is above the maximum 7"),
    ("interface link number above 7", config_text(interfaces=["linknumber: 8"]), "linknumber: 8",
     "totem.interface: link number 8 is above the maximum 7"),
    ("interface twice", config_text(interfaces=["linknumber: 1", "linknumber: 1"]),
     "linknumber: 1@@2", "totem.interface: link 1 is configured twice (line 4)"),
    ("ports collide", config_text(interfaces=["linknumber: 1\nmcastport: 5405"]),
     "mcastport", "link 1: port 5405 is also link 0's port; every link needs its own"),
    ("mcastport range", config_text(interfaces=["linknumber: 0\nmcastport: 70000"]),
     "mcastport", "totem.interface (link 0): mcastport 70000 is not a port number (1-65535)"),
    ("priority range", config_text(interfaces=["linknumber: 0\nknet_link_priority: 256"]),
     "knet_link_priority", "totem.interface (link 0): knet_link_priority 256 is out of range "
                           "(0-255)"),
    ("priority needs knet", config_text([("10.0.0.1",)], totem="transport: udpu", interfaces=[
        "linknumber: 0\nknet_link_priority: 2"]), "knet_link_priority",
     "totem.interface (link 0): knet_link_priority can only be set with transport knet"),
    ("sctp", config_text(interfaces=["linknumber: 0\nknet_transport: sctp"]), "knet_transport",
     "totem.interface (link 0): knet_transport sctp is not supported by pmxfs (use udp)"),
    ("knet_transport unknown", config_text(interfaces=["linknumber: 0\nknet_transport: tcp"]),
     "knet_transport", "totem.interface (link 0): knet_transport 'tcp' is not known (use udp)"),
    ("ping interval below timeout", config_text(interfaces=[
        "linknumber: 0\nknet_ping_interval: 500\nknet_ping_timeout: 500"]), "knet_ping_interval",
     "totem.interface (link 0): the ping interval (500 ms) must be less than the ping timeout "
     "(500 ms)"),
    ("bindnetaddr not an address", config_text(interfaces=["linknumber: 0\nbindnetaddr: lan"]),
     "bindnetaddr", "totem.interface (link 0): bindnetaddr 'lan' is not an IP address"),
    ("link_mode unknown", config_text(totem="link_mode: fastest"), "link_mode",
     "totem.link_mode 'fastest' is not one of passive, active, rr"),
    ("knet node id", config_text([("10.0.0.1",)]).replace("nodeid: 1", "nodeid: 65536"),
     "nodeid", "node pve1: nodeid 65536 is too large for knet (at most 65535)"),
    ("no name, literal address", config_text([("10.0.0.1",)], names=False), "node {",
     "node #1: name is required"),
]


@pytest.mark.parametrize(("source", "marker", "reason"), [r[1:] for r in ERROR_ROWS],
                         ids=[r[0] for r in ERROR_ROWS])
def test_link_errors(source: str, marker: str, reason: str) -> None:
    result = conf.check(source)
    assert not result.ok
    assert f"{located(source, marker)}: {reason}" in problems(result)


WARNING_ROWS = [
    ("rr runs as active", config_text(totem="link_mode: rr"), "link_mode",
     "totem.link_mode: rr (round robin) is not implemented by pmxfs; it runs as active (every "
     "frame on every connected link)"),
    ("knet option not implemented (totem)", config_text(totem="knet_compression_model: zlib"),
     "knet_compression_model", "'totem.knet_compression_model' is a corosync option pmxfs does "
                               "not implement; it is kept and ignored"),
    ("knet option not implemented (interface)", config_text(interfaces=[
        "linknumber: 0\nknet_ping_precision: 64"]), "knet_ping_precision",
     "'totem.interface.knet_ping_precision' is a corosync option pmxfs does not implement; it is "
     "kept and ignored"),
    ("ringnumber", config_text(interfaces=["ringnumber: 1"]), "ringnumber",
     "totem.interface.ringnumber is corosync 2's key: taken as linknumber 1 (as Proxmox VE does; "
     "use linknumber)"),
    ("interface without a link", config_text(interfaces=["linknumber: 2"]), "linknumber: 2",
     "totem.interface: no node has ring2_addr, so link 2 is not used"),
    ("bindnetaddr", config_text(interfaces=["linknumber: 0\nbindnetaddr: 10.0.0.0"]),
     "bindnetaddr", "totem.interface (link 0): bindnetaddr is not used: each node binds the link "
                    "to its own ringX_addr"),
    ("crypto with udpu", config_text([("10.0.0.1",)], totem="transport: udpu\n"
                                                            "crypto_cipher: aes256"),
     "crypto_cipher", "totem.crypto_cipher: corosync accepts it with transport knet only; pmxfs "
                      "encrypts every transport and ignores it"),
    ("knet timers with udpu", config_text([("10.0.0.1",)], totem="transport: udpu", interfaces=[
        "linknumber: 0\nknet_pong_count: 3"]), "knet_pong_count",
     "totem.interface (link 0): knet_pong_count is used with transport knet only"),
    ("no name, host name address", config_text([("pve-a.example",)], names=False), "node {",
     "node pve-a.example: no name; pmxfs names the node after its ring0_addr pve-a.example (as "
     "Proxmox VE does)"),
]


@pytest.mark.parametrize(("source", "marker", "reason"), [r[1:] for r in WARNING_ROWS],
                         ids=[r[0] for r in WARNING_ROWS])
def test_link_warnings(source: str, marker: str, reason: str) -> None:
    result = conf.check(source)
    assert result.ok, problems(result)
    assert f"{located(source, marker)}: {reason}" in problems(result, "warning")


def test_host_names_and_eight_links_are_accepted() -> None:
    nodes = [tuple(f"n{i}-l{link}.example" for link in range(8)) for i in (1, 2)]
    result = conf.check(config_text(nodes))
    assert result.ok, problems(result)
    assert result.config is not None
    assert conf.link_numbers(result.config) == tuple(range(8))
    assert [s.port for s in conf.link_settings(result.config)] == list(range(5405, 5413))


def test_one_link_needs_no_name_with_a_host_name() -> None:
    result = conf.check(config_text([("alpha",), ("beta",)], names=False))
    assert result.ok, problems(result)
    assert result.config is not None
    assert [i.name for i in result.config.node_infos()] == ["alpha", "beta"]
    assert result.config.node_by_name("BETA") is result.config.nodes[1]


# ---------------------------------------------------------------------------------------------
# Update rules: links change at run time


def update(old: str, new: str) -> conf.UpdateResult:
    return conf.validate_update(conf.parse(old), conf.parse(new))


@pytest.mark.parametrize(("new", "runtime"), [
    (config_text(version=4, interfaces=["linknumber: 1\nknet_link_priority: 9"]),
     ["totem.interface"]),
    (config_text((("10.0.0.1", "10.1.0.1", "10.2.0.1"), ("10.0.0.2", "10.1.0.2", "10.2.0.2")),
                 version=4), ["nodelist.1.ring2_addr", "nodelist.2.ring2_addr"]),
    (config_text((("10.0.0.1",), ("10.0.0.2",)), version=4),
     ["nodelist.1.ring1_addr", "nodelist.2.ring1_addr"]),
    (config_text((("10.0.0.1", "10.1.0.9"), ("10.0.0.2", "10.1.0.2")), version=4),
     ["nodelist.1.ring1_addr"]),
    (config_text(version=4, totem="link_mode: active"), ["totem.link_mode"]),
    (config_text(version=4, totem="port: 6000"), ["totem.port"]),
    (config_text(version=4, totem="transport: knet"), []),
])
def test_link_changes_apply_at_run_time(new: str, runtime: list[str]) -> None:
    result = update(config_text(), new)
    assert result.ok, result.errors
    assert [c.key for c in result.runtime_changes] == runtime
    assert not result.needs_restart


def test_port_with_udpu_needs_a_restart() -> None:
    one = [("10.0.0.1",), ("10.0.0.2",)]
    result = update(config_text(one, totem="transport: udpu"),
                    config_text(one, totem="transport: udpu\nport: 6000", version=4))
    assert [c.key for c in result.restart_changes] == ["totem.port"]


def test_transport_change_is_refused() -> None:
    one = [("10.0.0.1",), ("10.0.0.2",)]
    result = update(config_text(one), config_text(one, totem="transport: udpu", version=4))
    assert [e.reason for e in result.errors] == [
        "totem.transport cannot change on a running cluster (current knet, new udpu)"]


# ---------------------------------------------------------------------------------------------
# pmxfs config check: links, host names, encryption


def run_check(tmp_path: Path, capsys: pytest.CaptureFixture[str],
              source: str) -> tuple[int, list[str], list[str]]:
    path = tmp_path / "corosync.conf"
    path.write_text(source)
    code = main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_config_check_shows_links_and_encryption_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = config_text(totem="secauth: on\ncrypto_cipher: aes256\ncrypto_hash: sha256",
                         interfaces=["linknumber: 1\nknet_link_priority: 20"])
    code, out, err = run_check(tmp_path, capsys, source)
    assert code == 0, err
    assert out[1:] == [
        "transport knet, 2 links, link_mode passive",
        "link 0: port 5405, priority 1, ping every 750 ms, down after 1500 ms without a pong, up "
        "after 2 pongs",
        "link 1: port 5406, priority 20, ping every 750 ms, down after 1500 ms without a pong, up "
        "after 2 pongs",
        "pmxfs always encrypts and authenticates cluster traffic with the cluster's authkey; "
        "secauth and crypto_* are accepted and not used",
    ]
    assert err == []


def test_config_check_udpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_check(tmp_path, capsys,
                             config_text([("10.0.0.1",)], totem="transport: udpu"))
    assert code == 0
    assert out[1:] == ["transport udpu, 1 link", "link 0: port 5405"]


def test_config_check_resolves_host_names(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    source = config_text([("localhost", "10.1.0.1"), ("no-such-host.invalid", "10.1.0.2")],
                         totem="ip_version: ipv4")
    code, out, err = run_check(tmp_path, capsys, source)
    assert code == 0
    assert "node pve1 ring0_addr localhost resolves to 127.0.0.1" in out
    path = tmp_path / "corosync.conf"
    assert len(err) == 1
    assert err[0].startswith(f"{path}: warning: node pve2 ring0_addr no-such-host.invalid does "
                             "not resolve here (")
    assert err[0].endswith("); the daemon does not start until it does")
