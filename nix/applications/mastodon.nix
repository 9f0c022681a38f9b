# Mastodon, on nixpkgs' `services.mastodon` with local PostgreSQL and Redis, behind nginx with ACME.
# Mail goes through the environment's SMTP relay; the operator's first account is created once.
{ config, lib, pkgs, ... }:
let
  cfg = config.fediversity.mastodon;
  env = config.fediversity.environment;
  first = config.fediversity.firstAccount;
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
      smtp =
        if env.smtp != null then
          {
            # The relay replaces the local Postfix nixpkgs sets up by default.
            createLocally = false;
            host = env.smtp.host;
            port = env.smtp.port;
            fromAddress = env.smtp.from;
            authenticate = env.smtp.user != null;
            user = env.smtp.user;
            passwordFile = env.smtp.passwordFile;
          }
        else
          { fromAddress = "notifications@${cfg.domain}"; };
      extraConfig = {
        SINGLE_USER_MODE = lib.boolToString cfg.settings.singleUserMode;
        MAX_TOOT_CHARS = toString cfg.settings.maxTootChars;
      };
    };

    # mastodon-init-dirs, running as mastodon, reads the password into Mastodon's own secrets file.
    fediversity.secretFiles.smtp-password = mkIf (env.smtp != null && env.smtp.passwordFile != null) {
      owner = "mastodon";
      group = "mastodon";
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

    fediversity.firstAccount.enable = cfg.adminEmail != null;

    # The operator's account, once: tootctl prints its password on stdout, which goes to a root-only
    # file instead of the journal; `fediversity first-password` fetches it once and deletes it.
    systemd.services.fediversity-first-account = mkIf (cfg.adminEmail != null) {
      description = "Create the operator's first Mastodon account";
      after = [ "mastodon-init-db.service" ];
      requires = [ "mastodon-init-db.service" ];
      wantedBy = [ "multi-user.target" ];
      unitConfig.ConditionPathExists = "!${first.passwordFile}.done";
      serviceConfig = {
        Type = "oneshot";
        UMask = "0077";
        StandardOutput = "null";
      };
      path = [ "/run/current-system/sw" pkgs.gnused ];
      script = ''
        out=$(mastodon-tootctl accounts create admin --email ${lib.escapeShellArg cfg.adminEmail} --confirmed --role Owner)
        printf '%s\n' "$out" | sed -n 's/^New password: //p' > ${first.passwordFile}.new
        mv ${first.passwordFile}.new ${first.passwordFile}
        touch ${first.passwordFile}.done
      '';
    };

    # Held stopped until a restore from a snapshot is done (when the Deployment asks for one).
    fediversity.restoreHold.units = [
      # init-dirs mints new secrets when they are missing: never before the restore put them back.
      "mastodon-init-dirs.service"
      "mastodon-init-db.service"
      "mastodon-web.service"
      "mastodon-streaming-1.service"
      "mastodon-sidekiq-all.service"
      "mastodon-media-auto-remove.timer"
      "fediversity-mastodon-registrations.service"
    ] ++ lib.optional (cfg.adminEmail != null) "fediversity-first-account.service";

    fediversity.readiness = {
      units = [
        "mastodon-web.service"
        "mastodon-streaming-1.service"
        "mastodon-sidekiq-all.service"
        "nginx.service"
      ];
      # The first start precompiles assets and loads the schema.
      firstDeploySeconds = 1200;
    };
  };
}
