# A NixOS VM test (`runNixOSTest`) of one catalog application: the modules a generated host imports
# (without ./proxmox-guest.nix: the test VM has its own disks), the values the controller writes,
# then the checks the controller's deploy gate makes, plus the first account. For providers' CI, on
# a machine with KVM and nixpkgs:
#
#   nix-build nix/tests/mastodon.nix --arg pkgs 'import <nixpkgs> { }'
{ pkgs, application, settings, healthPath, extraScript ? "" }:
let
  domain = "${application}.fediversity.test";
in
pkgs.testers.runNixOSTest {
  name = "fediversity-${application}";

  nodes.machine =
    { ... }:
    {
      imports = [
        ../base.nix
        (../applications + "/${application}.nix")
      ];
      virtualisation = {
        memorySize = 4096;
        cores = 2;
        diskSize = 8192;
      };
      networking.hosts."127.0.0.1" = [ domain ];
      fediversity.environment.acme = {
        email = "hostmaster@fediversity.test";
        # No CA answers in the sandbox: nginx keeps its self-signed placeholder, as on a host whose
        # DNS does not point at it yet, and the deploy gate must not mind.
        server = "https://127.0.0.1:1/directory";
      };
      fediversity.${application} = {
        enable = true;
        inherit domain settings;
        adminEmail = "admin@fediversity.test";
      };
    };

  testScript =
    { nodes, ... }:
    let
      cfg = nodes.machine.fediversity;
    in
    ''
      import shlex

      machine.start()
      with subtest("the ready units come up"):
          for unit in ${builtins.toJSON cfg.readiness.units}:
              machine.wait_for_unit(unit, timeout=${toString cfg.readiness.firstDeploySeconds})

      with subtest("the health endpoint answers as the controller asks it"):
          machine.wait_until_succeeds(
              "curl --silent --insecure --fail --output /dev/null "
              "--resolve ${domain}:443:127.0.0.1 https://${domain}:443${healthPath}",
              timeout=${toString cfg.readiness.firstDeploySeconds},
          )

      with subtest("the first account exists once, its password root-only and not in the journal"):
          machine.wait_until_succeeds("test -s ${cfg.firstAccount.passwordFile}", timeout=600)
          machine.succeed("test -e ${cfg.firstAccount.passwordFile}.done")
          machine.succeed("test \"$(stat -c %a ${cfg.firstAccount.passwordFile})\" = 600")
          password = machine.succeed("cat ${cfg.firstAccount.passwordFile}").strip()
          assert password, "the first password is empty"
          machine.fail("journalctl --boot | grep --fixed-strings -- " + shlex.quote(password))

      with subtest("the secrets folder is root-owned and traversable only"):
          machine.succeed("test \"$(stat -c %U:%a ${cfg.environment.secretsDir})\" = root:711")
    ''
    + extraScript;
}
