"""The `pmxfs` subcommands, one module each; `pmxfs/cli.py` builds the parser from them.

Each module has `register(subparsers)`, which adds its subcommand with user-facing help and sets
the handler that runs it. Those that ask the running daemon (status, nodes, expected, log, debug)
share `control` (the control socket, exit statuses, JSON output); `daemon` starts a node, whose
assembly is `pmxfs.runtime.daemon`.
"""
