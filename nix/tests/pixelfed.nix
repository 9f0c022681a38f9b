# The NixOS VM test of the catalog's pixelfed (see ./common.nix). Not run by scripts/test.sh: it needs
# nixpkgs and KVM; providers run it in their CI.
{ pkgs ? import <nixpkgs> { } }:
import ./common.nix {
  inherit pkgs;
  application = "pixelfed";
  settings = { openRegistration = false; maxPhotoSizeKiB = 20000; };
  healthPath = "/api/service/health-check";
}
