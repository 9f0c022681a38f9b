# PeerTube, on nixpkgs' `services.peertube` with local PostgreSQL and Redis, behind nginx with ACME.
# Its secret and the root account's first password are generated on the host and never leave it.
{ config, lib, pkgs, ... }:
let
  cfg = config.fediversity.peertube;
  env = config.fediversity.environment;
  first = config.fediversity.firstAccount;
  inherit (lib) mkIf mkOption optionalString types;
  stateDir = "/var/lib/fediversity-peertube";
  secretsFile = "${stateDir}/secret";
  # Read by systemd (as root) for the service's environment: PT_INITIAL_ROOT_PASSWORD and storage keys.
  environmentFile = "${stateDir}/service.env";
  rtmpPort = 1935;
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
      serviceEnvironmentFile = environmentFile;
      smtp.passwordFile = mkIf (env.smtp != null) env.smtp.passwordFile;
      settings = {
        transcoding.enabled = cfg.settings.transcoding;
        live = {
          enabled = cfg.settings.liveStreaming;
          rtmp.port = rtmpPort;
        };
        admin.email = mkIf (cfg.adminEmail != null) cfg.adminEmail;
        smtp = mkIf (env.smtp != null) {
          transport = "smtp";
          hostname = env.smtp.host;
          port = env.smtp.port;
          username = env.smtp.user;
          tls = env.smtp.port == 465;
          disable_starttls = false;
          from_address = env.smtp.from;
        };
        object_storage = mkIf (env.objectStorage != null) {
          enabled = true;
          endpoint = env.objectStorage.endpoint;
          region = env.objectStorage.region;
          web_videos.bucket_name = env.objectStorage.bucket;
          web_videos.prefix = "web-videos/";
          streaming_playlists.bucket_name = env.objectStorage.bucket;
          streaming_playlists.prefix = "streaming-playlists/";
        };
      };
    };

    # Live streams arrive over RTMP.
    networking.firewall.allowedTCPPorts = mkIf cfg.settings.liveStreaming [ rtmpPort ];

    services.nginx.virtualHosts.${cfg.domain} = {
      forceSSL = true;
      enableACME = true;
    };

    # The peertube service reads the mail password itself, as peertube.
    fediversity.secretFiles = {
      smtp-password = mkIf (env.smtp != null && env.smtp.passwordFile != null) {
        owner = "peertube";
        group = "peertube";
      };
      object-storage-credentials = mkIf (env.objectStorage != null) { };
    };

    fediversity.firstAccount.enable = cfg.adminEmail != null;

    # The folder is traversable (0711) but not listable, the secret readable by peertube only, the
    # environment file by root (systemd) only. The root account's first password is set through
    # PT_INITIAL_ROOT_PASSWORD, so PeerTube never prints one to the journal.
    systemd.services.fediversity-peertube-secret = {
      description = "Generate PeerTube's secrets";
      wantedBy = [ "multi-user.target" ];
      before = [ "peertube.service" ];
      requiredBy = [ "peertube.service" ];
      serviceConfig = {
        Type = "oneshot";
        UMask = "0077";
      };
      script =
        ''
          install -d -m 0711 -o root -g root ${stateDir}
          if [ ! -s ${secretsFile} ]; then
            ${pkgs.openssl}/bin/openssl rand -hex 32 > ${secretsFile}
          fi
          chown peertube:peertube ${secretsFile}
          chmod 0400 ${secretsFile}
          if [ ! -s ${stateDir}/root-password ]; then
            ${pkgs.openssl}/bin/openssl rand -base64 18 > ${stateDir}/root-password
        ''
        + optionalString (cfg.adminEmail != null) ''
          install -d -m 0700 "$(dirname ${first.passwordFile})"
          cp ${stateDir}/root-password ${first.passwordFile}
          touch ${first.passwordFile}.done
        ''
        + ''
          fi
          {
            printf 'PT_INITIAL_ROOT_PASSWORD=%s\n' "$(cat ${stateDir}/root-password)"
        ''
        + optionalString (env.objectStorage != null) ''
          cat ${env.objectStorage.credentialsFile}
        ''
        + ''
          } > ${environmentFile}.new
          mv ${environmentFile}.new ${environmentFile}
        '';
    };

    # Held stopped until a restore from a snapshot is done (when the Deployment asks for one).
    fediversity.restoreHold.units = [ "peertube.service" ];

    fediversity.readiness = {
      units = [
        "peertube.service"
        "nginx.service"
      ];
      firstDeploySeconds = 600;
    };
  };
}
