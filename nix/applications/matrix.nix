# Matrix (Synapse), on nixpkgs' `services.matrix-synapse` with local PostgreSQL, behind nginx with
# ACME. Federation goes over 443 (announced in /.well-known/matrix/server); the operator's first
# account is an admin registered with a shared secret generated on the host.
{ config, lib, pkgs, ... }:
let
  cfg = config.fediversity.matrix;
  env = config.fediversity.environment;
  first = config.fediversity.firstAccount;
  inherit (lib) mkIf mkOption optionalString types;
  synapse = "http://[::1]:8008";
  stateDir = "/var/lib/fediversity-matrix";
  # Synapse merges extra configuration files key by key: secrets live in their own file.
  secretConfig = "${stateDir}/secrets.yaml";
  maxUpload = "100M";
  wellKnown = value: {
    extraConfig = ''
      default_type application/json;
      add_header Access-Control-Allow-Origin "*";
      return 200 '${builtins.toJSON value}';
    '';
  };
in
{
  options.fediversity.matrix = import ./common.nix { inherit lib; } "Matrix (Synapse)" {
    enableRegistration = mkOption {
      type = types.bool;
      default = false;
      description = "Allow sign-up (with a registration token, so that the server is not open to spam).";
    };
    federation = mkOption {
      type = types.bool;
      default = true;
      description = "Talk to other Matrix servers.";
    };
  };

  config = mkIf cfg.enable {
    services.matrix-synapse = {
      enable = true;
      extraConfigFiles = [ secretConfig ];
      settings = {
        server_name = cfg.domain;
        public_baseurl = "https://${cfg.domain}";
        enable_registration = cfg.settings.enableRegistration;
        registration_requires_token = cfg.settings.enableRegistration;
        max_upload_size = maxUpload;
        # An empty whitelist turns federation off.
        federation_domain_whitelist = mkIf (!cfg.settings.federation) [ ];
        admin_contact = mkIf (cfg.adminEmail != null) "mailto:${cfg.adminEmail}";
        listeners = [
          {
            port = 8008;
            bind_addresses = [ "::1" ];
            type = "http";
            tls = false;
            x_forwarded = true;
            resources = [
              {
                names = [ "client" "federation" ];
                compress = true;
              }
            ];
          }
        ];
      };
    };

    # Synapse needs its database with the C collation, and a role that may log in.
    services.postgresql = {
      enable = true;
      initialScript = pkgs.writeText "synapse-init.sql" ''
        CREATE ROLE "matrix-synapse" WITH LOGIN;
        CREATE DATABASE "matrix-synapse" WITH OWNER "matrix-synapse"
          TEMPLATE template0 LC_COLLATE = "C" LC_CTYPE = "C";
      '';
    };

    services.nginx = {
      enable = true;
      virtualHosts.${cfg.domain} = {
        forceSSL = true;
        enableACME = true;
        locations = {
          # nginx's default body limit (1M or the global one) must not undercut Synapse's uploads.
          "/_matrix" = {
            proxyPass = synapse;
            extraConfig = "client_max_body_size ${maxUpload};";
          };
          "/_synapse/client".proxyPass = synapse;
          "= /health".proxyPass = synapse;
          # Port 8448 stays closed: other servers are told to federate over 443.
          "= /.well-known/matrix/server" = wellKnown { "m.server" = "${cfg.domain}:443"; };
          "= /.well-known/matrix/client" = wellKnown {
            "m.homeserver".base_url = "https://${cfg.domain}";
          };
        };
      };
    };

    fediversity.secretFiles.smtp-password = mkIf (env.smtp != null && env.smtp.passwordFile != null) { };

    # The registration secret (made once, kept) and the mail settings with their password, in a file
    # matrix-synapse alone reads.
    systemd.services.fediversity-matrix-secret = {
      description = "Assemble Synapse's secret configuration";
      wantedBy = [ "multi-user.target" ];
      before = [ "matrix-synapse.service" ];
      requiredBy = [ "matrix-synapse.service" ];
      serviceConfig = {
        Type = "oneshot";
        UMask = "0077";
      };
      script =
        ''
          install -d -m 0711 -o root -g root ${stateDir}
          if [ ! -s ${stateDir}/registration-secret ]; then
            ${pkgs.openssl}/bin/openssl rand -hex 32 > ${stateDir}/registration-secret
          fi
          {
            printf 'registration_shared_secret: "%s"\n' "$(cat ${stateDir}/registration-secret)"
        ''
        + optionalString (env.smtp != null) ''
          printf 'email:\n'
          printf '  smtp_host: %s\n' ${lib.escapeShellArg (builtins.toJSON env.smtp.host)}
          printf '  smtp_port: %s\n' ${toString env.smtp.port}
          printf '  notif_from: %s\n' ${lib.escapeShellArg (builtins.toJSON "%(app)s <${env.smtp.from}>")}
          printf '  require_transport_security: %s\n' ${if env.smtp.port == 465 then "false" else "true"}
          printf '  force_tls: %s\n' ${if env.smtp.port == 465 then "true" else "false"}
        ''
        + optionalString (env.smtp != null && env.smtp.user != null) ''
          printf '  smtp_user: %s\n' ${lib.escapeShellArg (builtins.toJSON env.smtp.user)}
        ''
        + optionalString (env.smtp != null && env.smtp.passwordFile != null) ''
          printf '  smtp_pass: "%s"\n' "$(cat ${env.smtp.passwordFile})"
        ''
        + ''
          } > ${secretConfig}.new
          chown matrix-synapse:matrix-synapse ${secretConfig}.new
          chmod 0400 ${secretConfig}.new
          mv ${secretConfig}.new ${secretConfig}
        '';
    };

    fediversity.firstAccount.enable = cfg.adminEmail != null;

    # The operator's admin account, once Synapse answers, with a one-time password kept root-only.
    systemd.services.fediversity-first-account = mkIf (cfg.adminEmail != null) {
      description = "Register the operator's first Matrix account";
      after = [ "matrix-synapse.service" ];
      requires = [ "matrix-synapse.service" ];
      wantedBy = [ "multi-user.target" ];
      unitConfig.ConditionPathExists = "!${first.passwordFile}.done";
      serviceConfig = {
        Type = "oneshot";
        UMask = "0077";
        StandardOutput = "null";
        TimeoutStartSec = "10min";
      };
      path = [ "/run/current-system/sw" pkgs.curl pkgs.openssl ];
      script = ''
        until curl --silent --fail http://[::1]:8008/health >/dev/null; do sleep 2; done
        password=$(openssl rand -base64 18)
        printf '%s\n' "$password" > ${first.passwordFile}.new
        matrix-synapse-register_new_matrix_user --user admin --password "$password" --admin
        mv ${first.passwordFile}.new ${first.passwordFile}
        touch ${first.passwordFile}.done
      '';
    };

    # Held stopped until a restore from a snapshot is done (when the Deployment asks for one).
    fediversity.restoreHold.units = [
      "matrix-synapse.service"
    ] ++ lib.optional (cfg.adminEmail != null) "fediversity-first-account.service";

    fediversity.readiness = {
      units = [
        "matrix-synapse.service"
        "nginx.service"
      ];
      firstDeploySeconds = 300;
    };
  };
}
