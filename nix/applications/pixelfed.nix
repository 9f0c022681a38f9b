# Pixelfed, on nixpkgs' `services.pixelfed` with local MySQL-compatible database and Redis, behind
# nginx with ACME. The application key is generated on the host on first start and never leaves it.
{ config, lib, pkgs, ... }:
let
  cfg = config.fediversity.pixelfed;
  inherit (lib) mkIf mkOption types;
  secretFile = "/var/lib/fediversity/pixelfed.env";
in
{
  options.fediversity.pixelfed = import ./common.nix { inherit lib; } "Pixelfed" {
    openRegistration = mkOption {
      type = types.bool;
      default = true;
      description = "Whether anyone may sign up.";
    };
    maxPhotoSizeKiB = mkOption {
      type = types.ints.between 1024 102400;
      default = 15000;
      description = "Largest photo upload, in KiB.";
    };
  };

  config = mkIf cfg.enable {
    services.pixelfed = {
      enable = true;
      domain = cfg.domain;
      inherit secretFile;
      database.createLocally = true;
      redis.createLocally = true;
      settings = {
        OPEN_REGISTRATION = cfg.settings.openRegistration;
        MAX_PHOTO_SIZE = cfg.settings.maxPhotoSizeKiB;
        ADMIN_DOMAIN = cfg.domain;
      };
      nginx = {
        forceSSL = true;
        enableACME = true;
      };
    };

    systemd.services.fediversity-pixelfed-secret = {
      description = "Generate Pixelfed's application key";
      wantedBy = [ "multi-user.target" ];
      before = [ "pixelfed-data-setup.service" "phpfpm-pixelfed.service" ];
      requiredBy = [ "pixelfed-data-setup.service" ];
      unitConfig.ConditionPathExists = "!${secretFile}";
      serviceConfig = {
        Type = "oneshot";
        UMask = "0077";
      };
      script = ''
        mkdir -p "$(dirname ${secretFile})"
        printf 'APP_KEY=base64:%s\n' "$(${pkgs.openssl}/bin/openssl rand -base64 32)" > ${secretFile}
      '';
    };

    security.acme.defaults.email = mkIf (cfg.adminEmail != null) cfg.adminEmail;
  };
}
