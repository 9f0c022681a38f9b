# The Proxmox VE template every VM of a RuntimeEnvironment is cloned from, built as a VMA backup
# that `qmrestore` imports (see "NixOS hosts on Proxmox VE" in the README):
#
#   nix-build nix/template.nix -I nixpkgs=https://github.com/NixOS/nixpkgs/archive/nixos-25.11.tar.gz
#   # → result/vzdump-qemu-fediversity-template.vma.zst
#
# It is nixpkgs' own Proxmox image (nixos/modules/virtualisation/proxmox-image.nix) with the same
# ground as every generated host (./proxmox-guest.nix): same root file system, boot loader, guest
# agent and cloud-init, so that the first deploy onto a clone changes none of them. Cloud-init gives
# the clone its name, address and the controller's SSH key; the controller does the rest.
{
  nixpkgs ? <nixpkgs>,
  system ? "x86_64-linux",
}:
let
  evaluated = import (nixpkgs + "/nixos/lib/eval-config.nix") {
    inherit system;
    modules = [
      (nixpkgs + "/nixos/modules/virtualisation/proxmox-image.nix")
      ./proxmox-guest.nix
      ./template-config.nix
    ];
  };
in
evaluated.config.system.build.VMA
