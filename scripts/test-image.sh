#!/usr/bin/env bash
# Builds the container image (scripts/build-image.sh), then runs it from its OCI archive with
# `buildah run --isolation chroot` as the image's own user, never root: `fediversity --version`,
# `fediversity validate` on the examples, git, ssh, Nix and the CA certificates, and `fediversity demo`
# until everything is Ready. Also checks the image's configuration and that the Helm chart names the
# built image. Exits non-zero on the first failed check.
# Usage: scripts/test-image.sh   (HELM may name the helm binary)
set -euo pipefail
cd "$(dirname "$0")/.."

name=fediversity-controller
uid=65532
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
pass() { printf 'ok: %s\n' "$*"; }

build_started=$(date +%s)
archive=$(scripts/build-image.sh | tail -1)
build_seconds=$(($(date +%s) - build_started))
[ -s "$archive" ] || fail "scripts/build-image.sh wrote no archive"
version=$(basename "$archive" .tar)
version=${version#"$name-"}
pass "built $archive in $build_seconds s"
manifest() { tar -xOf "$archive" index.json | grep -o 'sha256:[0-9a-f]*' | head -1; }
digest=$(manifest)

# A storage of the test's own, fed only from the archive: what is tested is what a provider loads.
work=target/image/test
rm -rf "$work"
mkdir -p "$work"
work=$(cd "$work" && pwd)
bh() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }
export BUILDAH_ISOLATION=chroot
cleanup() {
  bh rm --all >/dev/null 2>&1 || true
  bh rmi --all --force >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

ctr=$(bh from --quiet --name "$name-test" "oci-archive:$archive")
# buildah stores an image pulled from an archive under the reference written in the archive.
image=$(bh images --noheading --format '{{.Name}}:{{.Tag}}' | head -1)
case "$image" in
  */"$name:$version" | "$name:$version") pass "the archive holds $name:$version" ;;
  *) fail "the archive holds $image, not $name:$version" ;;
esac

inspect() { bh inspect --type image --format "$1" "$image"; }
[ "$(inspect '{{.OCIv1.Config.User}}')" = "$uid:$uid" ] || fail "the image's user is $(inspect '{{.OCIv1.Config.User}}')"
[ "$(inspect '{{range $k, $v := .OCIv1.Config.ExposedPorts}}{{$k}} {{end}}')" = "9470/tcp " ] || fail "the image does not expose exactly 9470/tcp"
[ "$(inspect '{{range $k, $v := .OCIv1.Config.Volumes}}{{$k}} {{end}}')" = "/var/lib/fediversity " ] || fail "the state directory is not the image's volume"
for label in source version licenses revision created; do
  value=$(inspect "{{index .OCIv1.Config.Labels \"org.opencontainers.image.$label\"}}")
  [ -n "$value" ] || fail "label org.opencontainers.image.$label is missing"
done
[ "$(inspect '{{index .OCIv1.Config.Labels "org.opencontainers.image.version"}}')" = "$version" ] || fail "the version label is not $version"
[ "$(inspect '{{index .OCIv1.Config.Labels "org.opencontainers.image.licenses"}}')" = "EUPL-1.2" ] || fail "the licence label is not EUPL-1.2"
pass "user $uid:$uid, port 9470/tcp, volume /var/lib/fediversity, OCI labels"

# Every command below runs as the image's configured user: no --user.
in_image() { bh run --isolation chroot "$ctr" -- "$@"; }
[ "$(in_image id -u)" = "$uid" ] || fail "the image runs as uid $(in_image id -u), not $uid"
[ "$(in_image id -un)" = fediversity ] || fail "uid $uid has no name in the image"
if in_image touch /usr/bin/fediversity 2>/dev/null; then fail "the image's user can write /usr"; fi
pass "runs as fediversity ($uid), which cannot write /usr"

out=$(in_image fediversity --version)
[ "$out" = "fediversity $version" ] || fail "fediversity --version said: $out"
pass "$out"

in_image git --version >/dev/null || fail "git does not run"
in_image ssh -V >/dev/null 2>&1 || fail "ssh does not run"
in_image test -s /etc/ssl/certs/ca-certificates.crt || fail "no CA certificates"
out=$(in_image nix-instantiate --eval --expr '6 * 7') || fail "nix-instantiate does not run as $uid"
[ "$out" = 42 ] || fail "nix-instantiate evaluated 6 * 7 to $out"
pass "git, ssh, CA certificates, and Nix evaluating as the image's user"

# Nothing else: no package manager front end, no compiler, no documentation.
for absent in /usr/bin/apt-get /usr/bin/gcc /usr/bin/cc /usr/share/man/man1; do
  if in_image test -e "$absent" 2>/dev/null; then fail "$absent is in the image"; fi
done
pass "no apt, no compiler, no manuals"

# The repository's examples and Nix catalog, copied in (the demo's catalog root is its working folder).
bh run --isolation chroot --user 0:0 "$ctr" -- mkdir -p /srv/fediversity
bh copy --quiet --chown "$uid:$uid" "$ctr" examples /srv/fediversity/examples
bh copy --quiet --chown "$uid:$uid" "$ctr" nix /srv/fediversity/nix
in_ws() { bh run --isolation chroot --workingdir /srv/fediversity "$ctr" -- "$@"; }

out=$(in_ws fediversity validate examples) || fail "fediversity validate examples failed: $out"
pass "fediversity validate examples: $(printf '%s' "$out" | tail -1)"
bad='apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: {name: Not_A_Label}\nspec: {}\n'
if out=$(in_ws sh -c "printf '$bad' > /tmp/bad.yaml && fediversity validate /tmp/bad.yaml" 2>&1); then
  fail "fediversity validate accepted an invalid Deployment: $out"
fi
printf '%s\n' "$out" | grep -q 'bad.yaml' || fail "fediversity validate did not name the invalid file: $out"
pass "fediversity validate refuses an invalid Deployment"

demo_started=$(date +%s)
if ! out=$(in_ws fediversity demo --listen 127.0.0.1:0 --timeout 3m 2>&1); then
  printf '%s\n' "$out" >&2
  fail "fediversity demo did not reach Ready inside the image"
fi
printf '%s\n' "$out" | grep -q 'objects are Ready after' || { printf '%s\n' "$out" >&2; fail "the demo did not report everything Ready"; }
printf '%s\n' "$out" | grep -q 'Stopped cleanly' || { printf '%s\n' "$out" >&2; fail "the demo did not stop cleanly"; }
pass "fediversity demo inside the image: $(printf '%s\n' "$out" | grep 'objects are Ready after' | sed 's/:.*//') (demo run $(($(date +%s) - demo_started)) s)"

# The chart names the image the script built.
helm=${HELM:-helm}
command -v "$helm" >/dev/null || fail "helm is missing: scripts/test.sh installs it (or set HELM)"
rendered=$("$helm" template rel charts/fediversity --kube-version 1.33)
printf '%s\n' "$rendered" | grep -q "image: \"$name:$version\"" || fail "helm template does not name $name:$version"
pass "helm template names $name:$version"
# The same root filesystem and binary give the same image, byte for byte.
scripts/build-image.sh >/dev/null
[ "$(manifest)" = "$digest" ] || fail "a second build gave manifest $(manifest), the first $digest"
pass "a second build gives the same manifest $digest"
echo "image checks passed ($(du -h "$archive" | cut -f1) archive, build $build_seconds s)"
