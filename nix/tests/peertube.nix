# The NixOS VM test of the catalog's peertube (see ./common.nix). Not run by scripts/test.sh: it needs
# nixpkgs and KVM; providers run it in their CI.
{ pkgs ? import <nixpkgs> { } }:
import ./common.nix {
  inherit pkgs;
  application = "peertube";
  settings = { transcoding = false; liveStreaming = true; };
  healthPath = "/api/v1/ping";
}
