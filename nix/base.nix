# The base of every host the Fediversity controller manages: SSH for the controller, Nix settings,
# nginx defaults, ACME terms and the tools the controller's health checks use.
{ lib, pkgs, ... }:
{
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
  environment.systemPackages = [ pkgs.curl ];

  services.nginx = {
    recommendedTlsSettings = lib.mkDefault true;
    recommendedProxySettings = lib.mkDefault true;
    recommendedGzipSettings = lib.mkDefault true;
    recommendedOptimisation = lib.mkDefault true;
  };

  security.acme.acceptTerms = true;

  system.stateVersion = lib.mkDefault "25.05";
}
