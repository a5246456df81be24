"""`quorum.device` written and removed by `pmxfs qdevice setup` / `remove`
(pmxfs/core/conf/edit.py): pvecm's rules, config_version + 1 exactly, and a result the tree's
update rule accepts."""

from __future__ import annotations

import dataclasses

import pytest

from pmxfs.core import conf
from pmxfs.core.conf.edit import (
    EditError,
    new_cluster,
    with_node,
    with_qdevice,
    without_qdevice,
)


def _config(text: str) -> conf.ClusterConfig:
    config = conf.check(text).config
    assert config is not None
    return config


def _cluster(nodes: int) -> str:
    text = new_cluster("lab", "pve1", 1, 1, "10.0.0.1")
    for n in range(2, nodes + 1):
        text, _ = with_node(text, f"pve{n}", f"10.0.0.{n}")
    return text


def _device(text: str) -> tuple[conf.DeviceSection, conf.DeviceNetSection]:
    device = _config(text).quorum.device
    assert device is not None
    assert device.net is not None
    return device, device.net


def _quorum_line(text: str, key: str, value: str) -> str:
    """`text` with `key: value` added to its quorum section."""
    return text.replace("quorum {\n", f"quorum {{\n  {key}: {value}\n", 1)


def test_an_even_cluster_gets_ffsplit_with_one_vote() -> None:
    before = _cluster(2)
    after = with_qdevice(before, "10.0.0.9", 5403, None, "lowest", force=False)
    result = conf.check(after, current=_config(before))
    assert result.ok, result.errors
    config = _config(after)
    assert config.config_version == _config(before).config_version + 1
    device, net = _device(after)
    assert (device.model, device.votes) == ("net", 1)
    assert (net.host, net.port, net.algorithm, net.tie_breaker) == (
        "10.0.0.9", 5403, "ffsplit", "lowest")
    assert [(e.key, e.value) for e in net.extras] == [("tls", "on")]  # type: ignore[union-attr]
    assert conf.device_votes(config) == 1
    assert config.expected_votes == 3


def test_an_odd_cluster_is_refused_without_force() -> None:
    with pytest.raises(EditError, match=r"odd number of nodes \(3\).*--force"):
        with_qdevice(_cluster(3), "10.0.0.9", 5403, None, "lowest", force=False)
    with pytest.raises(EditError, match="odd number"):
        with_qdevice(_cluster(3), "10.0.0.9", 5403, "lms", "lowest", force=False)


def test_an_odd_cluster_with_force_gets_lms_without_votes() -> None:
    after = with_qdevice(_cluster(3), "qnetd.example", 5403, None, "highest", force=True)
    config = _config(after)
    device, net = _device(after)
    assert (device.votes, net.algorithm, net.tie_breaker) == (None, "lms", "highest")
    assert conf.device_votes(config) == 2  # votequorum: node count - 1
    assert "votes" not in after.split("device {", 1)[1]


def test_an_explicit_algorithm_overrides_the_choice() -> None:
    after = with_qdevice(_cluster(2), "10.0.0.9", 5500, "lms", "2", force=False)
    device, net = _device(after)
    assert (net.algorithm, net.port, net.tie_breaker, device.votes) == ("lms", 5500, "2", None)
    forced = with_qdevice(_cluster(3), "10.0.0.9", 5403, "ffsplit", "lowest", force=True)
    assert _device(forced)[0].votes == 1


@pytest.mark.parametrize("key", ["two_node", "last_man_standing", "auto_tie_breaker"])
def test_votequorum_options_that_exclude_a_device_are_refused_by_name(key: str) -> None:
    text = _quorum_line(_cluster(2), key, "1")
    assert conf.check(text).ok
    with pytest.raises(EditError, match=f"quorum.{key} is set"):
        with_qdevice(text, "10.0.0.9", 5403, None, "lowest", force=False)


def test_a_second_device_is_refused() -> None:
    once = with_qdevice(_cluster(2), "10.0.0.9", 5403, None, "lowest", force=False)
    with pytest.raises(EditError, match=r"already configured \(qnetd 10\.0\.0\.9\)"):
        with_qdevice(once, "10.0.0.8", 5403, None, "lowest", force=True)


@pytest.mark.parametrize(("host", "port", "tie_breaker", "reason"), [
    ("not a host", 5403, "lowest", "neither an IP address nor a host name"),
    ("10.0.0.9", 0, "lowest", "not a port number"),
    ("10.0.0.9", 70000, "lowest", "not a port number"),
    ("10.0.0.9", 5403, "7", "tie_breaker"),
    ("10.0.0.9", 5403, "middle", "tie_breaker"),
])
def test_bad_settings_are_refused(host: str, port: int, tie_breaker: str, reason: str) -> None:
    with pytest.raises(EditError, match=reason):
        with_qdevice(_cluster(2), host, port, None, tie_breaker, force=False)


def test_uneven_votes_with_lms_say_why() -> None:
    text, _ = with_node(new_cluster("lab", "pve1", 1, 2, "10.0.0.1"), "pve2", "10.0.0.2")
    text, _ = with_node(text, "pve3", "10.0.0.3")
    with pytest.raises(EditError, match="votes must be set"):
        with_qdevice(text, "10.0.0.9", 5403, None, "lowest", force=True)


def test_removing_the_device_raises_the_version_by_one() -> None:
    base = _cluster(2)
    once = with_qdevice(base, "10.0.0.9", 5403, None, "lowest", force=False)
    gone = without_qdevice(once)
    result = conf.check(gone, current=_config(once))
    assert result.ok, result.errors
    config = _config(gone)
    assert config.quorum.device is None
    assert config.config_version == _config(base).config_version + 2
    assert dataclasses.replace(config, totem=_config(base).totem) == _config(base)
    with pytest.raises(EditError, match="no quorum device"):
        without_qdevice(gone)


def test_adding_or_removing_the_device_needs_no_restart() -> None:
    base = _cluster(2)
    once = with_qdevice(base, "10.0.0.9", 5403, None, "lowest", force=False)
    added = conf.validate_update(_config(base), _config(once))
    removed = conf.validate_update(_config(once), _config(without_qdevice(once)))
    assert [c.description for c in (*added.restart_changes, *removed.restart_changes)] == []
