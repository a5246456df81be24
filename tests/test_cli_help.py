"""`--help` of every command is written for users (issue 10 §5): what it does, its defaults and an
example -- never a module docstring; `daemon --help` shows the default paths."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from pmxfs import cli
from pmxfs.cli import main
from pmxfs.commands import (
    add,
    config_check,
    control,
    create,
    daemon,
    db,
    debug,
    debug_cpg,
    delnode,
    demo,
    expected,
    join_token,
    keygen,
    links,
    log,
    metrics,
    nodes,
    qdevice,
    qnetd,
    status,
)

COMMANDS = [(), ("daemon",), ("demo",), ("status",), ("nodes",), ("links",), ("expected",),
            ("log",), ("metrics",),
            ("create",), ("join-token",), ("add",), ("delnode",), ("qdevice",),
            ("qdevice", "setup"), ("qdevice", "remove"), ("qnetd",), ("qnetd", "init"),
            ("qnetd", "token"),
            ("keygen",), ("config",), ("config", "check"), ("db",), ("db", "check"),
            ("db", "dump"), ("db", "backup"), ("db", "restore"), ("debug",), ("debug", "cpg"),
            *(("debug", topic) for topic in debug.DEBUG_TOPICS)]
MODULES = [add, cli, config_check, control, create, daemon, db, debug, debug_cpg, delnode, demo,
           expected, join_token, keygen, links, log, metrics, nodes, qdevice, qnetd, status]
DAEMON_DEFAULTS = ["/etc/pmxfs/corosync.conf", "/etc/pmxfs/authkey", "/etc/pve",
                   "/var/lib/pmxfs", "/run/pmxfs"]


def help_text(capsys: pytest.CaptureFixture[str], command: tuple[str, ...]) -> str:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def example_lines(text: str) -> list[str]:
    """The command lines of the text's examples section."""
    _, found, examples = text.partition("\nexamples")
    assert found, "no examples section"
    return [line.strip() for line in examples.splitlines()[1:]
            if line.strip().startswith("pmxfs ")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pmxfs")
def test_help_describes_and_shows_an_example(capsys: pytest.CaptureFixture[str],
                                             command: tuple[str, ...]) -> None:
    text = help_text(capsys, command)
    examples = example_lines(text)
    assert examples, text
    if command:
        assert any(line.startswith(f"pmxfs {' '.join(command)}") or
                   f" {command[-1]}" in line for line in examples), examples
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: pmxfs {' '.join(command)}".rstrip())
    assert len(rest.split("\n\n")[0]) > 40, "no description"  # the first paragraph says what


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pmxfs")
def test_no_module_docstring_is_the_help(capsys: pytest.CaptureFixture[str],
                                         command: tuple[str, ...]) -> None:
    text = " ".join(help_text(capsys, command).split())
    for module in MODULES:
        assert module.__doc__ is not None
        first = " ".join(module.__doc__.strip().splitlines()[0].split())
        assert first not in text, f"{module.__name__}'s docstring is in the help"


def test_daemon_help_shows_the_default_paths(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(help_text(capsys, ("daemon",)).split())
    for path in DAEMON_DEFAULTS:
        assert path in text, path
    assert "(default: /etc/pmxfs/corosync.conf)" in text
    assert "(default: /var/lib/pmxfs)" in text


@pytest.mark.parametrize(("command", "defaults"), [
    (("demo",), ["(default: 3)", "(default: ./pmxfs-demo)", "(default: 5405"]),
    (("keygen",), ["(default: /etc/pmxfs/authkey)"]),
    (("log",), ["(default: pmxfs)", "(default: info)"]),
    (("debug", "cpg"), ["(default: /var/lib/pmxfs)"]),
    ((), ["/run/pmxfs"]),
])
def test_defaults_are_shown(capsys: pytest.CaptureFixture[str], command: tuple[str, ...],
                            defaults: list[str]) -> None:
    text = " ".join(help_text(capsys, command).split())
    for default in defaults:
        assert default in text, default


def test_help_of_the_installed_command() -> None:
    """`python -m pmxfs --help`, as a user runs it: exit 0, the examples, no traceback."""
    result = subprocess.run([sys.executable, "-m", "pmxfs", "daemon", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    assert "pmxfs daemon --local" in result.stdout


def test_keygen_summary_names_the_authkey_size(capsys: pytest.CaptureFixture[str]) -> None:
    """`pmxfs --help` names the key size without importing frame_crypto: the number in
    cli.COMMANDS must be AUTHKEY_BYTES."""
    from pmxfs.runtime.frame_crypto import AUTHKEY_BYTES

    text = " ".join(help_text(capsys, ()).split())
    assert f"write a new {AUTHKEY_BYTES}-byte cluster authkey" in text


HEAVY_MODULES = ("trio", "sqlite3", "pyfuse3", "cryptography", "msgpack", "pmxfs.core.conf",
                 "pmxfs.core.memdb", "pmxfs.runtime.ipc", "pmxfs.runtime.daemon")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    script = f"import sys\n{code}\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)
    return set(result.stdout.split())


def test_the_parser_imports_no_command() -> None:
    """Start-up time is imports: building the parser and the top-level help load no command
    module but `control` (the global --run-dir), and nothing heavy."""
    loaded = modules_after("from pmxfs.cli import build_parser\nbuild_parser().format_help()")
    assert {m for m in loaded if m.startswith("pmxfs.commands.")} == {"pmxfs.commands.control"}
    assert [m for m in HEAVY_MODULES if m in loaded] == []


@pytest.mark.parametrize("argv", [["expected", "1"], ["--run-dir", "/x", "status"],
                                  ["keygen", "./k"], ["config", "check", "f"]], ids=" ".join)
def test_a_command_imports_only_its_own_module(argv: list[str]) -> None:
    """Parsing a command loads its own module and no other command's."""
    loaded = modules_after("from pmxfs.cli import build_parser\n"
                           f"build_parser().parse_args({argv!r})")
    own = {"expected": "expected", "status": "status", "keygen": "keygen", "config": "config_check"}
    name = next(own[a] for a in argv if a in own)
    assert {m for m in loaded if m.startswith("pmxfs.commands.")} == {
        "pmxfs.commands.control", f"pmxfs.commands.{name}"}


@pytest.mark.parametrize("module", [m for _, _, m in cli.COMMANDS if m is not None])
def test_every_command_module_configures_its_parser(module: str) -> None:
    assert callable(importlib.import_module(f"pmxfs.commands.{module}").configure)
