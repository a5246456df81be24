"""The `pmxfs` subcommands, one module each; `pmxfs/cli.py` builds the parser from them.

Each module has `configure(parser)`, which fills in its subcommand's parser (description,
examples, arguments) and sets the handler that runs it; `pmxfs/cli.py` holds each subcommand's
one-line summary and imports the module only when that subcommand is used. The subcommands of
`debug` come from `debug_cpg` and `debug` (`register(debug_commands)`). Those that ask the
running daemon (status, nodes, expected, log, debug) share `control` (the control socket, exit
statuses, JSON output); `daemon` starts a node, whose assembly is `pmxfs.runtime.daemon`.
"""
