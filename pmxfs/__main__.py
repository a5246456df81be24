"""`python -m pmxfs`: the `pmxfs` command (the demo starts its daemons this way, so their command
line works without the console script)."""

import sys

from pmxfs.cli import main

sys.exit(main())
