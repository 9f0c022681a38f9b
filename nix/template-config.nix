# The template's own settings, on top of nixpkgs' proxmox-image.nix and ./proxmox-guest.nix (see
# ./template.nix): the VM's defaults in the backup, and what the controller needs to reach a fresh
# clone (root over SSH, with the key cloud-init installs, never a password).
{ lib, ... }:
{
  proxmox = {
    qemuConf = {
      name = "fediversity-template";
      cores = 2;
      memory = 2048;
    };
    filenameSuffix = "fediversity-template";
  };

  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "prohibit-password";
    };
  };

  nix.settings = {
    experimental-features = [ "nix-command" ];
    trusted-users = [ "root" ];
  };

  system.stateVersion = lib.mkDefault "25.05";
}
