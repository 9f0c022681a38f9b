# What a RuntimeEnvironment provides to every host (ACME account, SMTP relay, object storage), where
# the controller delivers secrets, the keys root accepts, and the readiness signal the controller's
# deploy gate reads. The controller writes `fediversity.environment` in each generated host; the
# application modules say which secret files they read and as whom.
{ config, lib, ... }:
let
  inherit (lib) mkOption types;
  cfg = config.fediversity;
  secretPath = name: "${cfg.environment.secretsDir}/${name}";
  hold = cfg.restoreHold;
  # The held units of one type (`service`, `timer`): each starts only once the restore marker exists.
  # A condition is checked when the unit is about to start, so nothing that pulls the unit in (a
  # target, a timer, `requires`) starts it early; a skipped unit is not failed.
  heldUnits =
    type:
    lib.listToAttrs (
      map (unit: lib.nameValuePair (lib.removeSuffix ".${type}" unit) {
        unitConfig.ConditionPathExists = hold.marker;
      }) (lib.filter (lib.hasSuffix ".${type}") hold.units)
    );
in
{
  options.fediversity = {
    environment = {
      secretsDir = mkOption {
        type = types.str;
        default = "/var/lib/fediversity-secrets";
        description = "Root-owned folder the controller writes secret files into (never the Nix store).";
      };

      acme = {
        email = mkOption {
          type = types.str;
          description = "The ACME account's e-mail address (required: nixpkgs' ACME module asserts it).";
        };
        server = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "The ACME directory URL, e.g. Let's Encrypt's staging one; null for the default.";
        };
      };

      smtp = mkOption {
        default = null;
        description = "The SMTP relay applications send mail through (confirmations, password resets).";
        type = types.nullOr (types.submodule {
          options = {
            host = mkOption { type = types.str; };
            port = mkOption { type = types.port; default = 587; };
            user = mkOption { type = types.nullOr types.str; default = null; };
            passwordFile = mkOption {
              type = types.nullOr types.str;
              default = null;
              description = "The password's file on the host, under `secretsDir`.";
            };
            from = mkOption { type = types.str; };
          };
        });
      };

      objectStorage = mkOption {
        default = null;
        description = "S3-compatible storage for media, for the applications that can use it.";
        type = types.nullOr (types.submodule {
          options = {
            endpoint = mkOption { type = types.str; };
            bucket = mkOption { type = types.str; };
            region = mkOption { type = types.str; default = "us-east-1"; };
            credentialsFile = mkOption {
              type = types.str;
              description = "A file on the host with `AWS_ACCESS_KEY_ID=` and `AWS_SECRET_ACCESS_KEY=` lines.";
            };
          };
        });
      };
    };

    secretFiles = mkOption {
      default = { };
      description = ''
        The secret files under `environment.secretsDir` this host reads, with the owner and mode each
        must have. Published in `/etc/fediversity/secrets.json` for the controller, which uploads with
        that owner and mode, and kept by systemd-tmpfiles once the users exist.
      '';
      type = types.attrsOf (types.submodule {
        options = {
          owner = mkOption { type = types.str; default = "root"; };
          group = mkOption { type = types.str; default = "root"; };
          mode = mkOption { type = types.strMatching "0[0-7]{3}"; default = "0400"; };
        };
      });
    };

    restoreHold = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          The host starts from a snapshot (the Deployment's `spec.restore`): the application's units stay
          stopped, from the very first activation and across reboots, until the controller has restored
          and verified the data and written `marker`; then it starts them. The application never runs on
          empty data.
        '';
      };
      marker = mkOption {
        type = types.str;
        default = "/var/lib/fediversity-backup/restored";
        description = "The file the controller writes once the restore is done and verified.";
      };
      units = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = ''
          The application's services and timers that write its data, with their suffix (set by each
          application module; only units the system defines).
        '';
      };
    };

    rootAuthorizedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "The SSH keys root accepts: the controller's, declared rather than left to cloud-init.";
    };

    readiness = {
      units = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = ''
          The units that must be active for the application to be ready. Units that wait on DNS or
          ACME are left out: a certificate that cannot be issued yet is no reason to roll back.
        '';
      };
      firstDeploySeconds = mkOption {
        type = types.ints.between 60 7200;
        default = 300;
        description = "How long the first deploy of the host may take to become ready (migrations, seeding).";
      };
    };

    firstAccount = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = "Create the operator's first account (with `adminEmail`) on first start.";
      };
      passwordFile = mkOption {
        type = types.str;
        default = "/var/lib/fediversity-first-account/password";
        description = ''
          Where the first account's one-time password waits, root-only, until the provider fetches it
          once with `fediversity first-password` (which deletes it). It never reaches the journal.
        '';
      };
    };
  };

  config = {
    security.acme.defaults.email = cfg.environment.acme.email;
    security.acme.defaults.server = lib.mkIf (cfg.environment.acme.server != null) cfg.environment.acme.server;

    users.users.root.openssh.authorizedKeys.keys = cfg.rootAuthorizedKeys;

    systemd.services = lib.mkIf hold.enable (heldUnits "service");
    systemd.timers = lib.mkIf hold.enable (heldUnits "timer");
    # The controller's health check leaves held units out until the marker exists (first line).
    environment.etc."fediversity/restore-hold" = lib.mkIf hold.enable {
      text = lib.concatStringsSep "\n" ([ hold.marker ] ++ hold.units) + "\n";
    };

    environment.etc."fediversity/readiness.json".text = builtins.toJSON {
      inherit (cfg.readiness) units firstDeploySeconds;
    };
    # The controller's health check asks systemd about these units, one per word.
    environment.etc."fediversity/ready-units".text = lib.concatStringsSep " " cfg.readiness.units + "\n";
    environment.etc."fediversity/secrets.json".text = builtins.toJSON (
      lib.mapAttrsToList (name: f: {
        inherit name;
        inherit (f) owner group mode;
        path = secretPath name;
      }) cfg.secretFiles
    );

    systemd.tmpfiles.rules =
      [
        "d ${cfg.environment.secretsDir} 0711 root root - -"
        "d ${builtins.dirOf cfg.firstAccount.passwordFile} 0700 root root - -"
      ]
      ++ lib.mapAttrsToList (
        name: f: "z ${secretPath name} ${f.mode} ${f.owner} ${f.group} - -"
      ) cfg.secretFiles;
  };
}
