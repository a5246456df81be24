"""`pmxfs status` with a quorum device: the `qdevice` object of `--json` (only while a device is
configured, every other key kept) and the text form's Qdevice line and flags, as `pvecm
status` shows them."""

from __future__ import annotations

import copy
from typing import Any

from pmxfs.commands.status import check_status_shape, render_status_text

STATUS: dict[str, Any] = {
    "cluster": {"name": "lab", "config_version": 4, "transport": "udpu"},
    "node": {"name": "pve1", "nodeid": 1},
    "quorum": {"quorate": True, "expected_votes": 3, "highest_expected": 3, "total_votes": 2,
               "quorum": 2, "flags": ["Quorate", "Qdevice", "QdeviceAlive",
                                      "QdeviceCastVote"]},
    "membership": {"ring_id": "1.30", "members": [
        {"nodeid": 1, "name": "pve1", "votes": 1, "local": True},
    ]},
    "fs": {"synced": True, "version": 17},
    "qdevice": {"host": "192.0.2.10:5403", "algorithm": "ffsplit", "connected": True,
                "casting_vote": True},
}


def members_section(text: str) -> list[str]:
    return text.split("Membership information\n", 1)[1].splitlines()[2:]


def test_the_qdevice_object_is_part_of_the_shape() -> None:
    assert check_status_shape(STATUS) == []
    without = {k: v for k, v in STATUS.items() if k != "qdevice"}
    assert check_status_shape(without) == []
    bad = copy.deepcopy(STATUS)
    bad["qdevice"]["algorithm"] = "coinflip"
    del bad["qdevice"]["connected"]
    assert check_status_shape(bad) == [
        "status.qdevice: missing key 'connected'",
        "status.qdevice.algorithm: expected one of ffsplit, lms, got 'coinflip'",
    ]


def test_a_counted_device_has_its_line_and_flags() -> None:
    text = render_status_text(STATUS, date="Sat Dec  5 03:00:00 2026")
    assert "Flags:            Quorate Qdevice QdeviceAlive QdeviceCastVote\n" in text
    assert members_section(text) == [
        "0x00000001          1 pve1 (local)",
        "0x00000000          1 Qdevice",
    ]


def test_a_device_without_its_vote_shows_zero_votes() -> None:
    status = copy.deepcopy(STATUS)
    status["quorum"].update(quorate=False, total_votes=1,
                            flags=["Qdevice", "QdeviceAlive"])
    status["qdevice"]["casting_vote"] = False
    text = render_status_text(status, date="now")
    assert "Flags:            Qdevice QdeviceAlive\n" in text
    assert "Quorum:           2 Activity blocked" in text
    assert members_section(text)[-1] == "0x00000000          0 Qdevice"


def test_no_device_no_line() -> None:
    status = {k: v for k, v in copy.deepcopy(STATUS).items() if k != "qdevice"}
    status["quorum"]["flags"] = ["Quorate"]
    assert "Qdevice" not in render_status_text(status, date="now")
