# PeerTube, on nixpkgs' `services.peertube` with local PostgreSQL and Redis, behind nginx with ACME.
# Its secret is generated on the host on first start and never leaves it.
{ config, lib, pkgs, ... }:
let
  cfg = config.fediversity.peertube;
  inherit (lib) mkIf mkOption types;
  secretsFile = "/var/lib/fediversity/peertube-secret";
in
{
  options.fediversity.peertube = import ./common.nix { inherit lib; } "PeerTube" {
    transcoding = mkOption {
      type = types.bool;
      default = true;
      description = "Transcode uploads into several resolutions.";
    };
    liveStreaming = mkOption {
      type = types.bool;
      default = false;
      description = "Allow live streams.";
    };
  };

  config = mkIf cfg.enable {
    services.peertube = {
      enable = true;
      localDomain = cfg.domain;
      listenWeb = 443;
      enableWebHttps = true;
      configureNginx = true;
      database.createLocally = true;
      redis.createLocally = true;
      secrets.secretsFile = secretsFile;
      settings = {
        transcoding.enabled = cfg.settings.transcoding;
        live.enabled = cfg.settings.liveStreaming;
        admin.email = mkIf (cfg.adminEmail != null) cfg.adminEmail;
      };
    };

    services.nginx.virtualHosts.${cfg.domain} = {
      forceSSL = true;
      enableACME = true;
    };

    systemd.services.fediversity-peertube-secret = {
      description = "Generate PeerTube's secret";
      wantedBy = [ "multi-user.target" ];
      before = [ "peertube.service" ];
      requiredBy = [ "peertube.service" ];
      unitConfig.ConditionPathExists = "!${secretsFile}";
      serviceConfig = {
        Type = "oneshot";
        UMask = "0077";
      };
      script = ''
        mkdir -p "$(dirname ${secretsFile})"
        ${pkgs.openssl}/bin/openssl rand -hex 32 > ${secretsFile}
        chown peertube:peertube ${secretsFile}
      '';
    };

    security.acme.defaults.email = mkIf (cfg.adminEmail != null) cfg.adminEmail;
  };
}
