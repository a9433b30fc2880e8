#!/usr/bin/env bash
# Both daemons on the bundled demo cluster (deploy/demo/), no Kubernetes needed.
# Installs what it needs on first use; add --once to show the answers and stop.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
