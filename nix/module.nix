# NixOS module for running the Fediversity controller itself, for providers whose management host
# runs NixOS:
#
#   imports = [ ./nix/module.nix ];
#   services.fediversity-controller = {
#     enable = true;
#     package = pkgs.callPackage ./nix/package.nix { };   # or your own build of the `fediversity` binary
#     sources = [ "git+ssh://git@git.example.net/provider/desired-state.git#main" ];
#     environmentFile = "/run/secrets/fediversity-controller.env";
#   };
{ config, lib, pkgs, ... }:

let
  cfg = config.services.fediversity-controller;
  # systemd expands `%` specifiers and `$` variables even inside quotes: double them.
  systemdEscape = lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ];
in
{
  options.services.fediversity-controller = {
    enable = lib.mkEnableOption "the Fediversity controller";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The package providing `bin/fediversity`.";
    };

    sources = lib.mkOption {
      type = lib.types.nonEmptyListOf lib.types.str;
      example = [ "git+https://git.example.net/provider/desired-state.git#main" ];
      description = "Desired-state sources, one `--source` each: folders or git repositories.";
    };

    listen = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:9470";
      description = "Address of the API, `/metrics`, `/healthz` and `/readyz`. Loopback by default.";
    };

    logFormat = lib.mkOption {
      type = lib.types.enum [ "text" "json" ];
      default = "json";
      description = "Log format.";
    };

    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = ''
        A file of `FEDIVERSITY_*` variables (see `fediversity run --help`), e.g. kept by sops-nix or agenix.
        Secrets themselves (Proxmox token, SSH deploy key) are files referenced from the
        RuntimeEnvironment objects; make them readable through `LoadCredential` or group permissions.
      '';
    };

    trustedNixUser = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Make the controller's user a trusted Nix user, which the Nix daemon requires before it uses
        the environment's remote builders and substituters for that user's builds.
      '';
    };

    store = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/fediversity";
      description = ''
        Where the controller keeps its state: `null` for the embedded store under
        /var/lib/fediversity (one controller), or an etcd cluster `etcd://HOST:PORT,…[/PREFIX]` shared
        by several controllers (on several machines) that elect one leader; the others take over when
        it stops. Move an existing installation with `fediversity store copy`.
      '';
    };

    etcd = {
      caFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "The CA certificate (PEM) of the etcd members; enables TLS. An absolute path, not copied to the Nix store.";
      };
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "This controller's client certificate (PEM) for etcd, with `keyFile`.";
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "The client certificate's private key, readable by the `fediversity` user. An absolute path, not copied to the Nix store.";
      };
      user = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "The etcd user, with `passwordFile`.";
      };
      passwordFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "A file holding the etcd user's password, readable by the `fediversity` user.";
      };
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "Extra arguments for `fediversity run`.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.etcd.certFile == null) == (cfg.etcd.keyFile == null);
        message = "services.fediversity-controller.etcd: certFile and keyFile go together.";
      }
      {
        assertion = (cfg.etcd.user == null) == (cfg.etcd.passwordFile == null);
        message = "services.fediversity-controller.etcd: user and passwordFile go together.";
      }
    ];

    # A fixed system user rather than DynamicUser: Nix's `trusted-users` needs a name that exists.
    users.users.fediversity = {
      isSystemUser = true;
      group = "fediversity";
      home = "/var/lib/fediversity";
    };
    users.groups.fediversity = { };

    nix.settings.trusted-users = lib.mkIf cfg.trustedNixUser [ "fediversity" ];

    systemd.services.fediversity-controller = {
      description = "Fediversity controller";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # git for `git+…` sources, ssh for hosts and git over SSH, nix for builds and copies.
      path = [ config.nix.package config.programs.ssh.package pkgs.git ];
      environment = {
        FEDIVERSITY_STATE_DIR = "/var/lib/fediversity";
        # Nix and git write under HOME and XDG_CACHE_HOME; ProtectSystem=strict leaves only these.
        HOME = "/var/lib/fediversity";
        XDG_CACHE_HOME = "/var/cache/fediversity";
        FEDIVERSITY_LISTEN = cfg.listen;
        FEDIVERSITY_LOG_FORMAT = cfg.logFormat;
        RUST_LOG = lib.mkDefault "info";
      };
      serviceConfig = {
        ExecStart = systemdEscape (lib.escapeShellArgs (
          [ "${cfg.package}/bin/fediversity" "run" ]
          ++ lib.concatMap (source: [ "--source" source ]) cfg.sources
          ++ lib.optionals (cfg.store != null) [ "--store" cfg.store ]
          ++ lib.optionals (cfg.etcd.caFile != null) [ "--etcd-ca" cfg.etcd.caFile ]
          ++ lib.optionals (cfg.etcd.certFile != null) [ "--etcd-cert" cfg.etcd.certFile ]
          ++ lib.optionals (cfg.etcd.keyFile != null) [ "--etcd-key" cfg.etcd.keyFile ]
          ++ lib.optionals (cfg.etcd.user != null) [ "--etcd-user" cfg.etcd.user ]
          ++ lib.optionals (cfg.etcd.passwordFile != null) [ "--etcd-password-file" cfg.etcd.passwordFile ]
          ++ cfg.extraArgs
        ));
        EnvironmentFile = lib.mkIf (cfg.environmentFile != null) cfg.environmentFile;
        # Also after a lost leadership (exit 3): the fresh start follows the new leader.
        Restart = "on-failure";
        RestartSec = "5s";
        TimeoutStopSec = "45s";
        User = "fediversity";
        Group = "fediversity";
        StateDirectory = "fediversity";
        StateDirectoryMode = "0700";
        CacheDirectory = "fediversity";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        CapabilityBoundingSet = "";
        UMask = "0077";
      };
    };
  };
}
