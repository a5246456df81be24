"""`pmxfs config check FILE [--against CURRENT]`: exit codes and the exact lines it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pmxfs.cli import main

VALID = """\
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

INVALID = (VALID.replace("  version: 2\n", "  version: 2\n  transport: tcp\n")
           .replace("nodeid: 3", "nodeid: 2")
           .replace("    quorum_votes: 1\n    ring0_addr: 10.0.0.1",
                    "    quorum_votes: x\n    ring0_addr: 10.0.0.1"))

LINK_LINES = [
    "transport knet, 1 link, link_mode passive",
    "link 0: port 5405, priority 1, ping every 912 ms, down after 1825 ms without a pong, up "
    "after 2 pongs",
    "pmxfs always encrypts and authenticates cluster traffic with the cluster's authkey; secauth "
    "and crypto_* are accepted and not used",
]


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    code = main(["config", "check", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "corosync.conf", VALID)
    code, out, err = run(capsys, path)
    assert code == 0
    assert out == [f"{path}: ok: cluster lab, config_version 3, 3 nodes, expected votes 3, "
                   "token 3650 ms, consensus 4380 ms", *LINK_LINES]
    assert err == []


def test_two_node_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = VALID.replace("  node {\n    name: pve3\n    nodeid: 3\n    quorum_votes: 1\n"
                           "    ring0_addr: 10.0.0.3\n  }\n", "")
    source = source.replace("provider: corosync_votequorum\n",
                            "provider: corosync_votequorum\n  two_node: 1\n")
    code, out, _ = run(capsys, write(tmp_path, "c.conf", source))
    assert code == 0
    assert out[0].endswith(": ok: cluster lab, config_version 3, 2 nodes, expected votes 2, "
                           "token 3000 ms, consensus 3600 ms")


def test_invalid_file_lists_every_error(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "corosync.conf", INVALID)
    code, out, err = run(capsys, path)
    assert code == 1
    assert out == []
    # the parse error is found first; validation needs a parsed file
    assert err == [f"{path}:10:5: nodelist.node.quorum_votes: 'x' is not a decimal number"]
    fixed = INVALID.replace("quorum_votes: x", "quorum_votes: 1")
    path = write(tmp_path, "corosync.conf", fixed)
    code, out, err = run(capsys, path)
    assert code == 1
    assert err == [
        f"{path}:21:5: node pve3: nodeid 2 is already used by node pve2 (line 13)",
        f"{path}:41:3: totem.transport: unknown transport 'tcp' (use knet, the default, udpu "
        "or udp)",
    ]


def test_warnings_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "c.conf", VALID.replace("  version: 2\n", "  version: 2\n  foo: 1\n"))
    code, out, err = run(capsys, path)
    assert code == 0
    assert len(out) == 1 + len(LINK_LINES)
    assert err == [f"{path}:41:3: warning: unknown key 'totem.foo' is kept but not used by pmxfs"]


def test_against_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    current = write(tmp_path, "current.conf", VALID)
    new_text = VALID.replace("config_version: 3", "config_version: 4").replace(
        "  version: 2\n", "  token: 5000\n  version: 2\n").replace(
        "    ring0_addr: 10.0.0.3", "    ring0_addr: 10.0.0.33").replace(
        "    name: pve3", "    name: pve33")
    new = write(tmp_path, "new.conf", new_text)
    code, out, err = run(capsys, new, "--against", current)
    assert code == 0, err
    assert out == [f"{new}: ok: cluster lab, config_version 4, 3 nodes, expected votes 3, "
                   "token 5650 ms, consensus 6780 ms; update from config_version 3: run time: "
                   "totem.token, nodelist.3.ring0_addr; needs restart: nodelist.3.name",
                   "transport knet, 1 link, link_mode passive",
                   "link 0: port 5405, priority 1, ping every 1412 ms, down after 2825 ms without "
                   "a pong, up after 2 pongs", LINK_LINES[2]]


def test_against_refuses_an_old_version(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    current = write(tmp_path, "current.conf", VALID)
    new = write(tmp_path, "new.conf", VALID.replace("cluster_name: lab", "cluster_name: prod"))
    code, out, err = run(capsys, new, "--against", current)
    assert code == 1
    assert out == []
    assert err == [
        f"{new}:32:3: totem.cluster_name cannot change on a running cluster (current 'lab', "
        "new 'prod')",
        f"{new}:33:3: totem.config_version must be greater than the current 3 (got 3)",
    ]


def test_against_an_invalid_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    current = write(tmp_path, "current.conf", "totem {\n")
    new = write(tmp_path, "new.conf", VALID)
    code, out, err = run(capsys, new, "--against", current)
    assert code == 1
    assert out == []
    assert err == [f"{current}:1:1: missing closing brace for section 'totem'",
                   f"pmxfs: the current config {current} is not valid"]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "nope.conf")
    code, out, err = run(capsys, path)
    assert code == 2
    assert out == []
    assert err == [f"pmxfs: cannot read {path}: No such file or directory"]


def test_missing_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = write(tmp_path, "new.conf", VALID)
    code, _, err = run(capsys, new, "--against", str(tmp_path / "gone.conf"))
    assert code == 2
    assert err == [f"pmxfs: cannot read {tmp_path / 'gone.conf'}: No such file or directory"]


def test_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, str(tmp_path))
    assert code == 2
    assert err == [f"pmxfs: cannot read {tmp_path}: Is a directory"]


BAD_BYTES = [
    ("binary with NUL", b"totem {\n  cluster_name: \x00\x01\x02\n}\n",
     "2:17: binary data (NUL byte): not a text file"),
    ("latin-1 text", b"totem {\n  cluster_name: caf\xe9\n}\n", "2:20: not UTF-8 text (byte 0xe9)"),
    ("random bytes", bytes(range(255, 0, -1)), "1:1: not UTF-8 text (byte 0xff)"),
    ("too large", b"#" * (1024 * 1024 + 1), "1:1: file is too large (1048577 bytes; at most "
                                           "1048576)"),
]


@pytest.mark.parametrize(("data", "reason"), [r[1:] for r in BAD_BYTES],
                         ids=[r[0] for r in BAD_BYTES])
def test_not_a_text_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes,
                         reason: str) -> None:
    path = write(tmp_path, "bad.conf", data)
    code, out, err = run(capsys, path)
    assert code == 1
    assert out == []
    assert err == [f"{path}:{reason}"]


def test_garbage_text_has_no_traceback(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "junk.conf", "}}}\n{{{\nhello world\n: :\n\t\x0b\n")
    code, out, err = run(capsys, path)
    assert code == 1
    assert out == []
    assert err
    assert all(line.startswith(f"{path}:") for line in err)


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "empty.conf", "")
    code, _, err = run(capsys, path)
    assert code == 1
    assert f"{path}:1:1: totem.cluster_name is required" in err


def test_config_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["config"])
    assert info.value.code == 2


# ---------------------------------------------------------------------------------------------
# The installed console script, as an administrator runs it

PMXFS = Path(sys.executable).parent / "pmxfs"


@pytest.mark.skipif(not PMXFS.exists(), reason="the pmxfs console script is not installed")
@pytest.mark.parametrize(
    ("name", "content", "code", "stdout", "stderr"),
    [
        ("valid", VALID, 0, "{path}: ok: cluster lab, config_version 3, 3 nodes, expected votes "
                            "3, token 3650 ms, consensus 4380 ms\n" + "\n".join(LINK_LINES) + "\n",
         ""),
        ("invalid", VALID.replace("  version: 2\n", "  version: 2\n  transport: tcp\n"), 1, "",
         "{path}:41:3: totem.transport: unknown transport 'tcp' (use knet, the default, udpu or "
         "udp)\n"),
        ("binary", b"\x7fELF\x02\x01\x01\x00\x00\x00", 1, "",
         "{path}:1:8: binary data (NUL byte): not a text file\n"),
        ("missing", None, 2, "", "pmxfs: cannot read {path}: No such file or directory\n"),
    ],
)
def test_console_script(tmp_path: Path, name: str, content: str | bytes | None, code: int,
                        stdout: str, stderr: str) -> None:
    path = str(tmp_path / f"{name}.conf")
    if content is not None:
        write(tmp_path, f"{name}.conf", content)
    proc = subprocess.run([str(PMXFS), "config", "check", path], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == code
    assert proc.stdout == stdout.format(path=path)
    assert proc.stderr == stderr.format(path=path)
    assert "Traceback" not in proc.stderr
