#!/usr/bin/env bash
# Builds the controller's container image, fediversity-controller:<version>, and writes it as an OCI archive
# to target/image/fediversity-controller-<version>.tar. Needs no container daemon and downloads no base
# image: a minimal Debian root filesystem is made from Debian packages with mmdebstrap (git,
# openssh-client, nix-bin, ca-certificates and what they depend on), the release binary is added, and
# buildah (storage driver vfs, isolation chroot) assembles and commits the image.
#
# Usage: scripts/build-image.sh
#
# Environment:
#   CARGO_TARGET_DIR           where the release binary is built (default: target)
#   DEBIAN_SUITE               the Debian release of the root filesystem (default: bookworm)
#   DEBIAN_MIRROR              (default: http://deb.debian.org/debian)
#   DEBIAN_SECURITY_MIRROR     (default: http://deb.debian.org/debian-security)
#   SOURCE_DATE_EPOCH          timestamps of the files and the image (default: the last commit's time)
#   FEDIVERSITY_IMAGE_REFRESH  set to 1 to make the root filesystem again (e.g. for security updates);
#                              otherwise a root filesystem made from the same package list is reused
#
# The build's storage (buildah's images and the cached root filesystem) lives under target/image/, so the
# build depends on nothing else on the machine. Load the result with
#   podman load -i target/image/fediversity-controller-<version>.tar
# or push it with
#   skopeo copy oci-archive:target/image/fediversity-controller-<version>.tar docker://REGISTRY/fediversity-controller:<version>
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v objcopy >/dev/null; then
  log "installing buildah, mmdebstrap and binutils"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah mmdebstrap uidmap binutils >/dev/null
fi

name=fediversity-controller
uid=65532
state_dir=/var/lib/fediversity
port=9470
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
packages=ca-certificates,git,nix-bin,openssh-client
out=target/image
work=$out/work
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
work=$(cd "$work" && pwd)

# The files' and the image's timestamps. Not exported: cargo would rebuild crates whose build scripts
# watch SOURCE_DATE_EPOCH, and the release build is shared with everything else.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}

started=$(date +%s)

# 1. The root filesystem: Debian packages only, no documentation, manuals or translations (the copyright
# files stay), no apt, the controller's user, a Nix store that user can write to.
read -r -d '' customize <<EOF || true
set -e
chroot "\$1" groupadd --key GID_MAX=$uid --gid $uid fediversity
chroot "\$1" useradd --key UID_MAX=$uid --uid $uid --gid $uid --home-dir $state_dir --no-create-home --shell /usr/sbin/nologin fediversity
install -d -m 0750 -o $uid -g $uid "\$1$state_dir"
install -d -m 0755 -o $uid -g $uid "\$1/nix" "\$1/nix/store" "\$1/nix/var" "\$1/nix/var/nix"
install -d -m 0755 "\$1/etc/nix"
printf '%s\n' '# Single-user Nix for the controller: no build users, no sandbox (a container has no user namespaces to give).' 'build-users-group =' 'sandbox = false' > "\$1/etc/nix/nix.conf"
# No password ageing (every account is locked): the root filesystem does not depend on the day it was made.
sed -i 's/^\([^:]*:[^:]*\):[0-9]*:/\1::/' "\$1/etc/shadow"
rm -f "\$1"/etc/passwd- "\$1"/etc/group- "\$1"/etc/shadow- "\$1"/etc/gshadow-
rm -f "\$1"/var/cache/debconf/*-old "\$1"/var/lib/dpkg/*-old "\$1"/var/cache/ldconfig/aux-cache
rm -rf "\$1"/var/log/* "\$1"/var/cache/apt/* "\$1"/var/lib/apt/lists/*
EOF
mmdebstrap_args=(
  --variant=essential
  --format=tar
  --include="$packages"
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
  --customize-hook="$customize"
  "$suite"
)
sources=(
  "deb $mirror $suite main"
  "deb $mirror $suite-updates main"
  "deb $security_mirror $suite-security main"
)
key=$(printf '%s\n' "${mmdebstrap_args[@]}" "${sources[@]}" | sha256sum | cut -c1-16)
rootfs="$out/rootfs-$suite-$key.tar"
if [ "${FEDIVERSITY_IMAGE_REFRESH:-0}" = 1 ] || [ ! -s "$rootfs" ]; then
  log "mmdebstrap: $suite with $packages"
  rm -f "$out"/rootfs-*.tar
  SOURCE_DATE_EPOCH=$epoch mmdebstrap --quiet "${mmdebstrap_args[@]}" "$rootfs.partial" "${sources[@]}"
  mv "$rootfs.partial" "$rootfs"
else
  log "reusing the root filesystem $(basename "$rootfs")"
fi

# 2. The release binary (a no-op when it is up to date).
log "cargo build --release"
cargo build --release --locked --quiet -p fediversity
binary="${CARGO_TARGET_DIR:-target}/release/fediversity"
version=$("$binary" --version | awk '{print $2}')
[ -n "$version" ] || { echo "cannot read the version of $binary" >&2; exit 1; }
# The release profile keeps line tables for backtraces; the image's copy drops them (89 MB -> 19 MB) and
# keeps the symbols, so a backtrace still names the functions.
objcopy --strip-debug "$binary" "$work/fediversity"

# 3. The image.
bh() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }
export BUILDAH_ISOLATION=chroot
builder=$name-build
bh rm "$builder" >/dev/null 2>&1 || true
bh from --quiet --name "$builder" scratch >/dev/null
trap 'bh rm "$builder" >/dev/null 2>&1 || true' EXIT
log "buildah: $name:$version"
bh add --quiet "$builder" "$rootfs" /
bh copy --quiet --chown 0:0 --chmod 0755 "$builder" "$work/fediversity" /usr/bin/fediversity
source_url=$(sed -n 's/^repository *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
licence=$(sed -n 's/^license *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then revision="$revision-dirty"; fi
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
bh config \
  --os linux --arch "$(dpkg --print-architecture)" \
  --user "$uid:$uid" \
  --workingdir "$state_dir" \
  --volume "$state_dir" \
  --port "$port/tcp" \
  --env HOME="$state_dir" \
  --env FEDIVERSITY_STATE_DIR="$state_dir" \
  --env FEDIVERSITY_LISTEN="0.0.0.0:$port" \
  --env FEDIVERSITY_LOG_FORMAT=json \
  --entrypoint '["/usr/bin/fediversity"]' \
  --cmd '["run"]' \
  --label org.opencontainers.image.title="Fediversity controller" \
  --label org.opencontainers.image.description="Declarative hosting of Fediverse applications on Proxmox VE and NixOS" \
  --label org.opencontainers.image.source="$source_url" \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.revision="$revision" \
  --label org.opencontainers.image.licenses="$licence" \
  --label org.opencontainers.image.created="$created" \
  "$builder"
bh commit --quiet --format oci --timestamp "$epoch" --rm "$builder" "localhost/$name:$version" >/dev/null
trap - EXIT

archive="$out/$name-$version.tar"
rm -f "$archive"
bh push --quiet "localhost/$name:$version" "oci-archive:$archive:$name:$version"
# Only the latest image is kept in the build's storage.
bh rmi --prune >/dev/null 2>&1 || true

size=$(bh images --noheading --format '{{.Size}}' "localhost/$name:$version")
log "$name:$version: image $size, archive $(du -h "$archive" | cut -f1), built in $(($(date +%s) - started)) s"
echo "$archive"
