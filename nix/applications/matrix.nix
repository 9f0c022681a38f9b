# Matrix (Synapse), on nixpkgs' `services.matrix-synapse` with local PostgreSQL, behind nginx with ACME.
{ config, lib, pkgs, ... }:
let
  cfg = config.fediversity.matrix;
  inherit (lib) mkIf mkOption types;
  synapse = "http://[::1]:8008";
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
      settings = {
        server_name = cfg.domain;
        public_baseurl = "https://${cfg.domain}";
        enable_registration = cfg.settings.enableRegistration;
        registration_requires_token = cfg.settings.enableRegistration;
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

    # Synapse needs its database with the C collation.
    services.postgresql = {
      enable = true;
      initialScript = pkgs.writeText "synapse-init.sql" ''
        CREATE ROLE "matrix-synapse";
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
          "/_matrix".proxyPass = synapse;
          "/_synapse/client".proxyPass = synapse;
          "= /health".proxyPass = synapse;
        };
      };
    };

    security.acme.defaults.email = mkIf (cfg.adminEmail != null) cfg.adminEmail;
  };
}
