#!/usr/bin/env bash
# Installs what the test suite needs when it is missing, then runs every check and test.
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

log "checking test tools"
command -v git >/dev/null || apt_install git
if ! command -v promtool >/dev/null; then
  log "installing prometheus (promtool checks the metrics; the service itself is not started)"
  # Keep Debian's maintainer scripts from starting the packaged service.
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
  apt_install prometheus
fi
if ! python3 -c 'import proxmoxer, requests' 2>/dev/null; then
  log "installing proxmoxer (the real Proxmox API client the simulator is tested against)"
  python3 -m pip install --quiet --disable-pip-version-check proxmoxer requests
fi
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
