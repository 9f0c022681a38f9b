# Mastodon, on nixpkgs' `services.mastodon` with local PostgreSQL and Redis, behind nginx with ACME.
{ config, lib, ... }:
let
  cfg = config.fediversity.mastodon;
  inherit (lib) mkIf mkOption types;
  registrationsCommand = {
    open = "open";
    approval = "approved";
    closed = "close";
  };
in
{
  options.fediversity.mastodon = import ./common.nix { inherit lib; } "Mastodon" {
    singleUserMode = mkOption {
      type = types.bool;
      default = false;
      description = "Run the instance for one account only.";
    };
    registrations = mkOption {
      type = types.enum [ "open" "approval" "closed" ];
      default = "approval";
      description = "Who may sign up.";
    };
    maxTootChars = mkOption {
      type = types.ints.between 500 10000;
      default = 500;
      description = "Longest post, in characters (honoured by forks such as glitch-soc; upstream keeps 500).";
    };
  };

  config = mkIf cfg.enable {
    services.mastodon = {
      enable = true;
      localDomain = cfg.domain;
      # Creates the nginx virtual host with `forceSSL` and `enableACME`.
      configureNginx = true;
      streamingProcesses = 1;
      database.createLocally = true;
      redis.createLocally = true;
      smtp.fromAddress = "notifications@${cfg.domain}";
      extraConfig = {
        SINGLE_USER_MODE = lib.boolToString cfg.settings.singleUserMode;
        MAX_TOOT_CHARS = toString cfg.settings.maxTootChars;
      };
    };

    # The registrations mode lives in Mastodon's database: set it once the schema exists.
    systemd.services.fediversity-mastodon-registrations = {
      description = "Set Mastodon's registrations mode";
      after = [ "mastodon-init-db.service" ];
      requires = [ "mastodon-init-db.service" ];
      wantedBy = [ "multi-user.target" ];
      serviceConfig.Type = "oneshot";
      path = [ "/run/current-system/sw" ];
      script = "mastodon-tootctl settings registrations ${registrationsCommand.${cfg.settings.registrations}}";
    };

    security.acme.defaults.email = mkIf (cfg.adminEmail != null) cfg.adminEmail;
  };
}
