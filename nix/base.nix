# The base of every host the Fediversity controller manages: SSH for the controller, Nix settings,
# nginx defaults, ACME and what the environment provides (./environment.nix), and the tools the
# controller's health checks use. A VM also imports ./proxmox-guest.nix (the generated host says so).
{ lib, pkgs, ... }:
{
  imports = [ ./environment.nix ];

  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "prohibit-password";
    };
  };

  networking.firewall.allowedTCPPorts = [ 22 80 443 ];

  nix.settings = {
    experimental-features = [ "nix-command" ];
    # The controller copies closures as root over SSH (`nix copy --to ssh://`).
    trusted-users = [ "root" ];
  };

  # The controller's HTTP health check runs curl on the host against its own web server.
  # restic: the controller backs up and restores the applications' data on the host (pg_dump comes with
  # each application's PostgreSQL).
  environment.systemPackages = [ pkgs.curl pkgs.restic ];

  services.nginx = {
    recommendedTlsSettings = lib.mkDefault true;
    recommendedProxySettings = lib.mkDefault true;
    recommendedGzipSettings = lib.mkDefault true;
    recommendedOptimisation = lib.mkDefault true;
  };

  # The account e-mail (and the CA) come from the RuntimeEnvironment: see ./environment.nix.
  security.acme.acceptTerms = true;

  system.stateVersion = lib.mkDefault "25.05";
}
