# syntax=docker/dockerfile:1
#
# One image, two entrypoints: `dnsd` and `kpx` (and the dnsd init step `dnsd-link-addresses`).
# Both daemons are the same Python package with the same dependencies (kwatch is shared), so
# one image means one build, one `kind load`, one version to roll out and one set of CVEs to
# track; the only extra kpx needs is nftables (~1 MB), harmless in dnsd's container, which has
# no NET_ADMIN to use it with.
#
#   docker build -t kpx-dnsd:dev .
#
# Capabilities without root: Kubernetes adds a container's capabilities to its bounding and
# permitted sets but not to the ambient set, so a non-root process loses them at execve
# unless the executed file carries them. Two files here do, each with the one capability it
# needs (see deploy/README.md, "Privileges"):
#   /opt/kpx-dnsd/bin/python-dnsd  cap_net_bind_service  dnsd binds :53
#   /opt/kpx-dnsd/bin/python-kpx   cap_net_admin         kpx: IP_TRANSPARENT, policy routing
#   /usr/sbin/nft                  cap_net_admin         kpx programs its nftables table
# A file capability is only granted while the container's bounding set holds it, so each
# works only in the container that adds that capability (exec fails with EPERM elsewhere).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the pinned dependencies and the package ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/kpx-dnsd \
 && /opt/kpx-dnsd/bin/pip install --no-deps setuptools==84.2.1
COPY deploy/image/requirements.lock /src/requirements.lock
# Wheels only, so no compiler in this stage (every pin has a CPython 3.11 manylinux wheel for
# x86_64: checked by installing them so; arm64 builds are untried).
RUN /opt/kpx-dnsd/bin/pip install --no-deps --only-binary=:all: -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY kwatch /src/kwatch
COPY dnsd /src/dnsd
COPY kpx /src/kpx
RUN /opt/kpx-dnsd/bin/pip install --no-deps --no-build-isolation /src \
 && /opt/kpx-dnsd/bin/pip uninstall -y setuptools pip \
 && /opt/kpx-dnsd/bin/python -m compileall -q /opt/kpx-dnsd/lib

# ---- runtime ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kpx-dnsd" \
      org.opencontainers.image.description="dnsd (cluster DNS) and kpx (userspace kube-proxy)" \
      org.opencontainers.image.licenses="Apache-2.0"
# nftables: kpx's steering; iproute2: kpx lists local addresses (`ip -j addr`) and the dnsd
# init container adds the DNS addresses; libcap2-bin: setcap below. Versions come from the
# base image's Debian release (pin the base by digest for a byte-reproducible image): exact
# apt pins break the build as soon as Debian ships a security update and drops the old one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 libcap2-bin \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/kpx-dnsd /opt/kpx-dnsd
COPY deploy/image/dnsd-link-addresses deploy/image/kpx-keep-rules /usr/local/bin/
# The capability-carrying interpreter is a copy (a symlink cannot hold file capabilities)
# inside the virtualenv's bin/, so it finds the venv's site-packages through pyvenv.cfg.
# No setuid/setgid files stay in the image, so the only privilege a process here can gain is
# the one capability its container adds (kpx needs allowPrivilegeEscalation: true for that).
RUN cp "$(readlink -f /usr/local/bin/python3.11)" /opt/kpx-dnsd/bin/python-dnsd \
 && cp "$(readlink -f /usr/local/bin/python3.11)" /opt/kpx-dnsd/bin/python-kpx \
 && setcap cap_net_bind_service+ep /opt/kpx-dnsd/bin/python-dnsd \
 && setcap cap_net_admin+ep /opt/kpx-dnsd/bin/python-kpx \
 && setcap cap_net_admin+ep /usr/sbin/nft \
 && chmod 0755 /usr/local/bin/dnsd-link-addresses /usr/local/bin/kpx-keep-rules \
 && find / -xdev -perm /6000 -type f -exec chmod a-s {} + \
 && groupadd --system --gid 65532 kpx \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kpx
ENV PATH=/opt/kpx-dnsd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# dnsd by default; the kpx DaemonSet sets its own command (kpx-keep-rules kpx ...).
ENTRYPOINT ["/opt/kpx-dnsd/bin/python-dnsd", "-m", "dnsd.main"]
CMD ["--help"]
