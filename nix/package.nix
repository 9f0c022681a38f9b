# Builds the `fediversity` binary from this repository: `pkgs.callPackage ./nix/package.nix { }`.
{ lib, rustPlatform }:

rustPlatform.buildRustPackage {
  pname = "fediversity-controller";
  version = "0.1.0";
  src = lib.cleanSource ../.;
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--package" "fediversity" ];
  # The test suite needs a Proxmox simulator, sshd, Nix and Prometheus: it runs in the project's CI
  # (scripts/test.sh), not in the sandbox.
  doCheck = false;
  meta = {
    description = "Declarative hosting of Fediverse applications on Proxmox VE and NixOS";
    license = lib.licenses.eupl12;
    mainProgram = "fediversity";
  };
}
