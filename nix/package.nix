# Builds the `fediversity` binary from this repository: `pkgs.callPackage ./nix/package.nix { }`.
# The workspace's `rust-version` is the oldest rustc that builds it: nixpkgs releases whose rustc is
# older (nixos-25.05 ships 1.86) are refused here with a message, not deep inside cargo.
{ lib, rustPlatform, rustc, protobuf }:

let
  workspace = (lib.importTOML ../Cargo.toml).workspace.package;
  # What goes into the store: the sources, not build output (target/), editor or VCS files.
  src = lib.cleanSourceWith {
    src = lib.cleanSource ../.;
    filter =
      path: type:
      let
        name = baseNameOf path;
      in
      !(type == "directory" && (name == "target" || name == "result"));
  };
in
assert lib.assertMsg (lib.versionAtLeast rustc.version workspace.rust-version) ''
  fediversity-controller needs rustc ${workspace.rust-version} or newer, and this nixpkgs has
  ${rustc.version}: build with a newer nixpkgs (nixos-25.11 or later) or give
  `rustPlatform`/`rustc` from an overlay such as rust-overlay.
'';
rustPlatform.buildRustPackage {
  pname = "fediversity-controller";
  inherit (workspace) version;
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--package" "fediversity" ];
  # The etcd client's gRPC code is generated from .proto files at build time.
  nativeBuildInputs = [ protobuf ];
  # The test suite needs a Proxmox simulator, sshd, Nix and Prometheus: it runs in the project's CI
  # (scripts/test.sh), not in the sandbox.
  doCheck = false;
  meta = {
    description = "Declarative hosting of Fediverse applications on Proxmox VE and NixOS";
    license = lib.licenses.eupl12;
    mainProgram = "fediversity";
  };
}
