#!/usr/bin/env bash
# Prepare a Debian 12 machine for pmxfs: system packages (when missing) and the virtualenv .venv
# with pmxfs installed in editable mode plus its test and dev tools. Safe to run again: it only
# installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(fuse3 libfuse3-dev pkg-config gcc iproute2 python3-venv python3-dev)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: missing system packages (${missing[*]}); run as root or install them" >&2
        exit 1
    fi
    echo "bootstrap: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.pmxfs-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test,dev]'
    echo "$want" > "$stamp"
fi
