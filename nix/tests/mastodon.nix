# The NixOS VM test of the catalog's mastodon (see ./common.nix). Not run by scripts/test.sh: it needs
# nixpkgs and KVM; providers run it in their CI.
{ pkgs ? import <nixpkgs> { } }:
import ./common.nix {
  inherit pkgs;
  application = "mastodon";
  settings = { registrations = "approval"; };
  healthPath = "/health";
}
