# The NixOS VM test of the catalog's matrix (see ./common.nix). Not run by scripts/test.sh: it needs
# nixpkgs and KVM; providers run it in their CI.
{ pkgs ? import <nixpkgs> { } }:
import ./common.nix {
  inherit pkgs;
  application = "matrix";
  settings = { enableRegistration = false; federation = true; };
  healthPath = "/health";
  # Federation over 443: other servers find it through the well-known file.
  extraScript = ''
    with subtest("federation is announced on 443"):
        machine.succeed(
            "curl --silent --insecure --fail --resolve matrix.fediversity.test:443:127.0.0.1 "
            "https://matrix.fediversity.test/.well-known/matrix/server "
            "| grep --fixed-strings '\"matrix.fediversity.test:443\"'"
        )
  '';
}
