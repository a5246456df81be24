"""One writer process of the liveness tests: creates files on a pmxfs mount, one after another,
and says on stdout how each one went.

    python tests/liveness_writer.py MOUNT PREFIX --files N [--seconds S] [--gap G]

Writes MOUNT/PREFIX-<i>.cfg for i = 0, 1, ... with a content naming the file and a random tag,
each with open+write+close (the close returns once the cluster has the file), until N files are
written or S seconds have passed, waiting G seconds between two files. One JSON line per file,
flushed: `{"event": "write", "name": ..., "content": ..., "ok": true, "ms": ...}` or, when the
write failed, `"ok": false` and the error. A write that never returns is the caller's to bound:
it kills this process by PID.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mount", type=Path)
    parser.add_argument("prefix")
    parser.add_argument("--files", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=float("inf"))
    parser.add_argument("--gap", type=float, default=0.0)
    args = parser.parse_args()
    end = time.monotonic() + args.seconds
    for i in range(args.files):
        if i and time.monotonic() >= end:
            break
        name = f"{args.prefix}-{i}.cfg"
        content = f"{name} {secrets.token_hex(8)}\n"
        start = time.monotonic()
        try:
            with open(args.mount / name, "w", encoding="ascii") as f:
                f.write(content)
        except OSError as exc:
            report = {"ok": False, "error": str(exc)}
        else:
            report = {"ok": True}
        ms = round((time.monotonic() - start) * 1000, 2)
        print(json.dumps({"event": "write", "name": name, "content": content, "ms": ms,
                          **report}), flush=True)
        if args.gap > 0:
            time.sleep(args.gap)  # pacing the load, not synchronising with anything
    return 0


if __name__ == "__main__":
    sys.exit(main())
