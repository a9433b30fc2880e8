#!/usr/bin/env bash
# Builds the image from the repository's Dockerfile with podman and tags it kpx-dnsd:dev, then
# prints its size, the versions inside it and the file capabilities it carries.
#
#   bash scripts/image.sh            # as root on Debian 12 (installs podman/debootstrap if missing)
#
# The Dockerfile is built unchanged, as a docker user builds it. Its base (build-arg
# PYTHON_IMAGE, python:3.11-slim-bookworm) comes from a registry; where none can be reached this
# script builds an equivalent base from Debian's own packages instead (debootstrap of bookworm
# with python3.11 and its venv module, `podman import`ed, python on PATH at /usr/local/bin as
# in the python image) and passes it as PYTHON_IMAGE. That base is kept in podman's storage,
# keyed by a hash of its recipe, so a second run only rebuilds the layers that changed.
#
# What cannot work on every host (the script reports what it sees): `podman run` fails where the
# container runtime may not set RLIMIT_NPROC (crun: "setrlimit RLIMIT_NPROC: operation not
# permitted", whatever --ulimit says, on a sandboxed root without CAP_SYS_RESOURCE), so the
# image is then run from its mounted root by scripts/cluster-e2e.sh instead; and podman's
# default RLIMIT_NOFILE for RUN steps can exceed the host's hard limit (20000 on such a host),
# hence --ulimit nofile below.
#
# Environment: KPX_IMAGE_TAG (kpx-dnsd:dev), KPX_IMAGE_BASE ("pull", the default: try the
# Dockerfile's base first; "local": go straight to the Debian-built one), KPX_DEBIAN_MIRROR
# (the host's apt mirror), KPX_NOFILE (ulimit for podman: the default is above some hosts' hard
# limit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TAG=${KPX_IMAGE_TAG:-kpx-dnsd:dev}
BASE_MODE=${KPX_IMAGE_BASE:-pull}
say() { echo "image: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (podman build --isolation chroot and debootstrap need it)"

need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v getcap >/dev/null || need+=(libcap2-bin)
if ((${#need[@]})); then
  say "installing ${need[*]} from Debian's packages"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
    || die "apt-get install ${need[*]}"
fi

# podman's default RLIMIT_NOFILE for build containers (1048576) is above the hard limit of
# some hosts (20000 here), and raising a hard limit needs CAP_SYS_RESOURCE in the host's
# user namespace, which a sandboxed root may lack: ask for what the host allows.
hard_nofile=$(ulimit -Hn)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
NOFILE=${KPX_NOFILE:-$hard_nofile}

# ---- the base ---------------------------------------------------------------------------
python_image=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
[ -n "$python_image" ] || die "the Dockerfile has no ARG PYTHON_IMAGE=... default"
build_args=()

mirror=${KPX_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' \
  /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}
# What the python:3.11-slim image gives a Dockerfile, from Debian's packages: python3.11 with
# venv/ensurepip (pip in a venv; debootstrap does not resolve the virtual python3.11-distutils itself), CA certificates for pip, apt, and python/python3/python3.11
# in /usr/local/bin (the Dockerfile copies the interpreter found through that path).
BASE_PACKAGES=python3.11,python3.11-venv,python3-distutils,python3-setuptools-whl,ca-certificates,libcap2-bin
# The host's CA bundle goes into the local base (and so into images built on it) with a pip.conf
# pointing at it: where HTTPS goes through a TLS-inspecting proxy (as here), pip in a RUN step
# must trust what the host trusts. A base pulled from a registry is used as it is.
HOST_CA=/etc/ssl/certs/ca-certificates.crt
ca_hash=$( (cat "$HOST_CA" 2>/dev/null || true) | sha256sum | cut -c1-12)
base_recipe="bookworm minbase $BASE_PACKAGES usr-local-python apt-clean ca=$ca_hash v2"
base_tag="localhost/kpx-dnsd-base:bookworm-py311-$(printf %s "$base_recipe" | sha256sum | cut -c1-12)"

build_local_base() {
  if podman image exists "$base_tag"; then
    say "base: $base_tag (cached)"
    return
  fi
  say "base: debootstrap Debian 12 (bookworm, $BASE_PACKAGES) from $mirror"
  local work
  work=$(mktemp -d /var/tmp/kpx-dnsd-base.XXXXXX)
  # shellcheck disable=SC2064  # expand $work now
  trap "rm -rf '$work'" EXIT
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$work/root" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap"; }
  local root=$work/root
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
  if [ -s "$HOST_CA" ]; then
    cp "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  fi
  # As Docker's Debian images: apt keeps no package caches or downloaded .debs in a layer
  # (else the Dockerfile's apt-get install leaves ~80 MB in /var/cache), and no translations.
  local clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<EOF
DPkg::Post-Invoke { "$clean"; };
APT::Update::Post-Invoke { "$clean"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  for name in python3.11 python3 python; do
    ln -sf /usr/bin/python3.11 "$root/usr/local/bin/$name"
  done
  # as the slim images: no apt lists or caches in the layer
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" --numeric-owner --xattrs --xattrs-include='security.capability' -cf "$work/root.tar" .
  podman import -q \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "Debian 12 + python3.11 from Debian's packages, standing in for $python_image" \
    "$work/root.tar" "$base_tag" >/dev/null || die "podman import"
  rm -rf "$work"
  trap - EXIT
  say "base: built $base_tag"
  # older recipes' bases are not needed any more
  podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/kpx-dnsd-base:' \
    | grep -vxF "$base_tag" | xargs -r podman rmi >/dev/null 2>&1 || true
}

if podman image exists "$python_image" 2>/dev/null; then
  say "base: $python_image (already in podman's storage)"
elif [ "$BASE_MODE" = pull ] && pull_error=$(timeout 60 podman pull -q "docker.io/library/$python_image" 2>&1 >/dev/null); then
  say "base: pulled $python_image"
else
  if [ "$BASE_MODE" = pull ]; then
    say "base: $python_image cannot be pulled here: $(echo "${pull_error:-timed out}" | tail -n 1)"
  fi
  build_local_base
  build_args+=(--build-arg "PYTHON_IMAGE=$base_tag")
fi

# ---- the image --------------------------------------------------------------------------
say "building $TAG from Dockerfile (podman build --isolation chroot)"
start=$SECONDS
log=$(mktemp)
if ! podman build --isolation chroot --ulimit "nofile=$NOFILE:$NOFILE" \
    "${build_args[@]}" -t "$TAG" -f Dockerfile . >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  rm -f "$log"
  die "podman build"
fi
rm -f "$log"
say "built $TAG in $((SECONDS - start)) s"

# ---- what is inside ---------------------------------------------------------------------
size=$(podman image inspect --format '{{.Size}}' "$TAG")
echo "image $TAG: $(podman image inspect --format '{{.Id}}' "$TAG" | cut -c1-12)," \
  "$((size / 1000000)) MB"
root=$(podman image mount "$TAG")
# shellcheck disable=SC2064
trap "podman image unmount '$TAG' >/dev/null 2>&1 || true" EXIT
echo "  python      $(chroot "$root" /opt/kpx-dnsd/bin/python -c 'import sys; print(sys.version.split()[0])')"
site=$(echo "$root"/opt/kpx-dnsd/lib/python3.*/site-packages)
for dist in kpx_dnsd aiohttp dnslib kubernetes orjson pydantic structlog uvloop; do
  meta=$(echo "$site"/"$dist"-*.dist-info)
  [ -d "$meta" ] || die "$dist is not installed in the image"
  printf '  %-11s %s\n' "$dist" "$(sed -n 's/^Version: //p' "$meta/METADATA")"
done
for pkg in nftables iproute2 libc6; do
  printf '  %-11s %s\n' "$pkg" "$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Version}' "$pkg")"
done
echo "  file capabilities:"
for file in /opt/kpx-dnsd/bin/python-dnsd /usr/sbin/nft; do
  caps=$(getcap "$root$file" | awk '{print $2}')
  [ -n "$caps" ] || die "$file carries no file capability"
  printf '    %-30s %s\n' "$file" "$caps"
done

# ---- what cannot work here --------------------------------------------------------------
# `podman run` needs a runtime that may set rlimits; report what happens on this machine.
if out=$(timeout 60 podman run --rm --network none --ulimit "nofile=$NOFILE:$NOFILE" \
    --ulimit "nproc=$(ulimit -Hu):$(ulimit -Hu)" "$TAG" --help 2>&1 | head -n 1); then
  echo "  podman run: works ($out)"
else
  echo "  podman run: does not work on this machine: $(echo "$out" | tail -n 1)"
  echo "    (the containers are then run from the mounted image root: scripts/cluster-e2e.sh)"
fi
