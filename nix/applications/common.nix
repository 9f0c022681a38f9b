# Options every catalog application shares: `fediversity.<name>.{enable, domain, adminEmail, settings}`.
# `settings` is a submodule of the options given, so an unknown setting is an evaluation error, as it
# is in the Application's JSON Schema.
{ lib }:
name: settingsOptions: {
  enable = lib.mkEnableOption name;

  domain = lib.mkOption {
    type = lib.types.str;
    example = "${name}.example.org";
    description = "The public host name the application is served under.";
  };

  adminEmail = lib.mkOption {
    type = lib.types.nullOr lib.types.str;
    default = null;
    description = "The e-mail address of the operator's first account (created on first start).";
  };

  settings = lib.mkOption {
    type = lib.types.submodule { options = settingsOptions; };
    default = { };
    description = "The operator's settings, as the Application's settings schema allows them.";
  };
}
