#!/bin/sh
# Installs, if missing, what the kube-sim fidelity tests need on Debian 12: kubectl (Debian's
# kubernetes-client) and Python 3 with venv. The Python `kubernetes` client itself is installed
# by tests/python/setup.sh into target/kube-sim-venv when the test first runs.
set -eu
missing=""
command -v kubectl >/dev/null 2>&1 || missing="$missing kubernetes-client"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$missing python3 python3-venv"
if [ -n "$missing" ]; then
    apt-get update
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $missing
fi
