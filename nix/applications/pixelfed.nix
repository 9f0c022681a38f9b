# Pixelfed, on nixpkgs' `services.pixelfed` with local PostgreSQL and Redis, behind nginx with ACME.
# The application key is generated on the host on first start and never leaves it.
{ config, lib, pkgs, ... }:
let
  cfg = config.fediversity.pixelfed;
  env = config.fediversity.environment;
  first = config.fediversity.firstAccount;
  inherit (lib) mkIf mkOption optionalString types;
  stateDir = "/var/lib/fediversity-pixelfed";
  appKeyFile = "${stateDir}/app-key";
  secretFile = "${stateDir}/pixelfed.env";
  # PHP and nginx take the limit in MiB: round the photo limit up, plus room for the form around it.
  uploadLimit = "${toString (cfg.settings.maxPhotoSizeKiB / 1024 + 2)}M";
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
      # nixpkgs' default is MySQL; the Application requires PostgreSQL (and backs it up as such).
      database.type = "pgsql";
      database.createLocally = true;
      redis.createLocally = true;
      # PHP's and nginx's limits (8M by default) must let the largest allowed photo through.
      maxUploadSize = uploadLimit;
      settings =
        {
          OPEN_REGISTRATION = cfg.settings.openRegistration;
          MAX_PHOTO_SIZE = cfg.settings.maxPhotoSizeKiB;
          ADMIN_DOMAIN = cfg.domain;
        }
        // lib.optionalAttrs (env.smtp != null) {
          MAIL_MAILER = "smtp";
          MAIL_HOST = env.smtp.host;
          MAIL_PORT = env.smtp.port;
          MAIL_FROM_ADDRESS = env.smtp.from;
          MAIL_ENCRYPTION = if env.smtp.port == 465 then "ssl" else "tls";
        }
        // lib.optionalAttrs (env.smtp != null && env.smtp.user != null) {
          MAIL_USERNAME = env.smtp.user;
        }
        // lib.optionalAttrs (env.objectStorage != null) {
          PF_ENABLE_CLOUD = true;
          FILESYSTEM_CLOUD = "s3";
          AWS_BUCKET = env.objectStorage.bucket;
          AWS_ENDPOINT = env.objectStorage.endpoint;
          AWS_DEFAULT_REGION = env.objectStorage.region;
          AWS_USE_PATH_STYLE_ENDPOINT = true;
        };
      nginx = {
        forceSSL = true;
        enableACME = true;
      };
    };

    # nixpkgs creates the role without making it the database's owner; PostgreSQL 15 and later then
    # refuse to let it create tables in `public`.
    services.postgresql.ensureUsers = [
      {
        name = "pixelfed";
        ensureDBOwnership = true;
      }
    ];

    # pixelfed-data-setup loads `secretFile` with LoadCredential (as root): root-only files will do.
    fediversity.secretFiles = {
      smtp-password = mkIf (env.smtp != null && env.smtp.passwordFile != null) { };
      object-storage-credentials = mkIf (env.objectStorage != null) { };
    };

    # The environment file Pixelfed reads its secrets from: the application key (made once, kept),
    # then the mail password and the storage credentials delivered by the controller.
    systemd.services.fediversity-pixelfed-secret = {
      description = "Assemble Pixelfed's secret environment file";
      wantedBy = [ "multi-user.target" ];
      before = [ "pixelfed-data-setup.service" "phpfpm-pixelfed.service" ];
      requiredBy = [ "pixelfed-data-setup.service" ];
      serviceConfig = {
        Type = "oneshot";
        UMask = "0077";
      };
      script =
        ''
          install -d -m 0700 ${stateDir}
          if [ ! -s ${appKeyFile} ]; then
            ${pkgs.openssl}/bin/openssl rand -base64 32 > ${appKeyFile}
          fi
          {
            printf 'APP_KEY=base64:%s\n' "$(cat ${appKeyFile})"
        ''
        + optionalString (env.smtp != null && env.smtp.passwordFile != null) ''
          printf 'MAIL_PASSWORD="%s"\n' "$(cat ${env.smtp.passwordFile})"
        ''
        + optionalString (env.objectStorage != null) ''
          cat ${env.objectStorage.credentialsFile}
        ''
        + ''
          } > ${secretFile}.new
          mv ${secretFile}.new ${secretFile}
        '';
    };

    fediversity.firstAccount.enable = cfg.adminEmail != null;

    # The operator's account, once, with a one-time password kept root-only for
    # `fediversity first-password`.
    systemd.services.fediversity-first-account = mkIf (cfg.adminEmail != null) {
      description = "Create the operator's first Pixelfed account";
      after = [ "pixelfed-data-setup.service" ];
      requires = [ "pixelfed-data-setup.service" ];
      wantedBy = [ "multi-user.target" ];
      unitConfig.ConditionPathExists = "!${first.passwordFile}.done";
      serviceConfig = {
        Type = "oneshot";
        UMask = "0077";
        StandardOutput = "null";
      };
      path = [ "/run/current-system/sw" pkgs.openssl ];
      script = ''
        password=$(openssl rand -base64 18)
        printf '%s\n' "$password" > ${first.passwordFile}.new
        pixelfed-manage user:create --name=admin --username=admin \
          --email=${lib.escapeShellArg cfg.adminEmail} --password="$password" \
          --is_admin=1 --confirm_email=1
        mv ${first.passwordFile}.new ${first.passwordFile}
        touch ${first.passwordFile}.done
      '';
    };

    # Held stopped until a restore from a snapshot is done (when the Deployment asks for one).
    fediversity.restoreHold.units = [
      "pixelfed-data-setup.service"
      "phpfpm-pixelfed.service"
      "pixelfed-horizon.service"
      "pixelfed-cron.timer"
    ] ++ lib.optional (cfg.adminEmail != null) "fediversity-first-account.service";

    fediversity.readiness = {
      units = [
        "phpfpm-pixelfed.service"
        "pixelfed-horizon.service"
        "nginx.service"
      ];
      firstDeploySeconds = 600;
    };
  };
}
