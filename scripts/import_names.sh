#!/usr/bin/env bash
# The import names of a source checkout: DIR/sloth_serve -> server/ and DIR/sloth_kernels -> kernels/
# (symbolic links), for runs that use the folders without installing them: put DIR on PYTHONPATH (or
# MYPYPATH). An install (`pip install -e .`, the Makefile's venv) maps the names itself.
#
#   bash scripts/import_names.sh /tmp/site && export PYTHONPATH=/tmp/site
set -euo pipefail
dir=${1:?usage: scripts/import_names.sh DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir"
ln -sfn "$root/server" "$dir/sloth_serve"
ln -sfn "$root/kernels" "$dir/sloth_kernels"
