#!/bin/sh
# Creates (once) a virtual environment with the official Python `kubernetes` client for the
# kube-sim fidelity tests. Usage: setup.sh VENV_DIR. Idempotent: does nothing when the client
# already imports.
set -eu
venv="$1"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import kubernetes' 2>/dev/null; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'kubernetes>=31,<40'
