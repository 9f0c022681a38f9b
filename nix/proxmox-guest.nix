# The ground of every VM cloned from the project's Proxmox template (nix/template.nix): root file
# system, boot loader, QEMU guest agent, cloud-init and a root partition that grows with the disk.
# The values are those nixpkgs' `nixos/modules/virtualisation/proxmox-image.nix` gives the image it
# builds (SeaBIOS, `legacy` partition table, ext4 labelled `nixos` on the virtio disk), so that the
# template and every system deployed onto its clones agree. Without this module a generated host
# fails NixOS' file-system and boot-loader assertions and, after its first switch, would lose the
# guest agent that Proxmox needs to shut it down, restart or resize it.
{ lib, modulesPath, ... }:
{
  imports = [ (modulesPath + "/profiles/qemu-guest.nix") ];

  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
    autoResize = true;
  };

  boot = {
    growPartition = true;
    kernelParams = [ "console=ttyS0" ];
    loader.grub.device = lib.mkDefault "/dev/vda";
    loader.timeout = 0;
    initrd.availableKernelModules = [ "uas" "virtio_blk" "virtio_pci" ];
  };

  # Proxmox asks the agent for addresses, shutdowns and file-system freezes.
  services.qemuGuest.enable = true;

  # Proxmox's cloud-init drive gives the network, the host name and the first SSH key.
  services.cloud-init = {
    enable = true;
    network.enable = true;
  };
  networking.useDHCP = false;
}
