//! Every validation case names the file, the line, the column and the field of the problem.

use std::path::Path;

use fediversity::load::Diagnostic;
use fediversity::source::dir::DirSource;
use fediversity::yaml::Limits;

const ENV: &str = "apiVersion: fediversity.eu/v1alpha1
kind: RuntimeEnvironment
metadata:
  name: ams
spec:
  proxmox:
    endpoint: https://pve1.example.net:8006
    credentials:
      tokenId: \"fediversity@pve!controller\"
      secretFile: /run/secrets/pve-token
    nodes: [pve1]
    template: { vmid: 9000 }
    storage: local-zfs
    bridge: vmbr0
    vmidRange: { start: 20000, end: 29999 }
  ssh:
    privateKeyFile: /run/secrets/deploy-key
";

const APP: &str = "apiVersion: fediversity.eu/v1alpha1
kind: Application
metadata:
  name: mastodon
spec:
  displayName: Mastodon
  nixosModule: nix/applications/mastodon.nix
  sizes:
    small: { cores: 2, memoryMiB: 4096, diskGiB: 40 }
";

const DEPLOY: &str = "apiVersion: fediversity.eu/v1alpha1
kind: Deployment
metadata:
  name: uni-utrecht
spec:
  domain: social.uu.nl
  runtimeEnvironment: ams
  applications:
    mastodon:
      enabled: true
";

/// Loads `files` (name, content) from a fresh folder and returns the problems found.
fn problems(files: &[(&str, &str)]) -> Vec<Diagnostic> {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let snapshot = DirSource::new(vec![dir.path().to_path_buf()], Limits::default()).scan(true);
    assert!(snapshot.is_complete());
    snapshot.errors
}

/// Asserts that exactly one problem was found and that it names `file`, `line`, `path` and `words`.
#[track_caller]
fn assert_one(found: &[Diagnostic], file: &str, line: usize, path: &str, words: &str) {
    assert_eq!(found.len(), 1, "expected one problem, got: {found:#?}");
    let problem = &found[0];
    assert_eq!(problem.file.file_name().unwrap(), Path::new(file), "{problem}");
    assert_eq!(problem.line, line, "{problem}");
    assert!(problem.column >= 1, "{problem}");
    let shown_path = problem.path.as_ref().map(ToString::to_string).unwrap_or_default();
    assert_eq!(shown_path, path, "{problem}");
    assert!(problem.message.contains(words), "`{words}` not in: {problem}");
    let text = problem.to_string();
    assert!(
        text.starts_with(&format!("{}:{line}:", problem.file.display())),
        "{text}"
    );
    if !path.is_empty() && path != "(document)" {
        assert!(text.contains(&format!("{path}: ")), "{text}");
    }
}

#[test]
fn the_complete_examples_are_valid() {
    assert_eq!(
        problems(&[("env.yaml", ENV), ("app.yaml", APP), ("d.yaml", DEPLOY)]),
        vec![]
    );
}

#[test]
fn a_yaml_syntax_error_names_file_line_and_document() {
    let broken = format!(
        "{APP}---\n{}",
        DEPLOY.replace("applications:\n", "applications: [\n")
    );
    let found = problems(&[("catalog.yaml", &broken)]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].document, Some(1));
    assert!(found[0].line > 10, "{}", found[0]);
    assert!(found[0].message.starts_with("invalid YAML"), "{}", found[0]);
    assert!(found[0].to_string().contains("document 2"), "{}", found[0]);
}

#[test]
fn an_unknown_kind_is_named_with_a_suggestion() {
    let found = problems(&[("d.yaml", &DEPLOY.replace("kind: Deployment", "kind: Deploymnet"))]);
    assert_one(
        &found,
        "d.yaml",
        2,
        "kind",
        "unknown kind `Deploymnet` (did you mean `Deployment`?)",
    );
}

#[test]
fn an_unknown_api_version_is_named() {
    let found = problems(&[("d.yaml", &DEPLOY.replace("v1alpha1", "v2"))]);
    assert_one(
        &found,
        "d.yaml",
        1,
        "apiVersion",
        "unknown apiVersion `fediversity.eu/v2`",
    );
}

#[test]
fn an_unknown_field_is_an_error_not_silently_dropped() {
    let found = problems(&[("d.yaml", &DEPLOY.replace("  domain:", "  domian: x\n  domain:"))]);
    assert_one(
        &found,
        "d.yaml",
        6,
        "spec.domian",
        "unknown field `domian` (did you mean `domain`?)",
    );
}

#[test]
fn a_wrong_type_names_what_was_expected_and_found() {
    let found = problems(&[("d.yaml", &DEPLOY.replace("enabled: true", "enabled: \"yes\""))]);
    assert_one(
        &found,
        "d.yaml",
        10,
        "spec.applications.mastodon.enabled",
        "expected a boolean, found the string \"yes\"",
    );
}

#[test]
fn a_name_that_is_not_a_dns_label_is_refused() {
    let found = problems(&[(
        "d.yaml",
        &DEPLOY.replace("name: uni-utrecht", "name: Uni_Utrecht"),
    )]);
    assert_one(
        &found,
        "d.yaml",
        4,
        "metadata.name",
        "`Uni_Utrecht` is not a valid name",
    );
}

#[test]
fn an_invalid_domain_is_refused() {
    let found = problems(&[("d.yaml", &DEPLOY.replace("social.uu.nl", "social..uu.nl"))]);
    assert_one(&found, "d.yaml", 6, "spec.domain", "is not a valid domain name");
}

#[test]
fn an_inverted_vmid_range_is_refused() {
    let found = problems(&[(
        "env.yaml",
        &ENV.replace("start: 20000, end: 29999", "start: 29999, end: 20000"),
    )]);
    assert_one(
        &found,
        "env.yaml",
        15,
        "spec.proxmox.vmidRange",
        "the range is inverted",
    );
}

#[test]
fn a_vmid_outside_what_proxmox_allows_is_refused() {
    let found = problems(&[("env.yaml", &ENV.replace("end: 29999", "end: 1000000000"))]);
    assert_one(
        &found,
        "env.yaml",
        15,
        "spec.proxmox.vmidRange.end",
        "VMID 1000000000 is outside what Proxmox VE allows",
    );
}

#[test]
fn a_template_inside_the_vmid_range_is_refused() {
    let found = problems(&[("env.yaml", &ENV.replace("vmid: 9000", "vmid: 20005"))]);
    assert_one(
        &found,
        "env.yaml",
        12,
        "spec.proxmox.template.vmid",
        "lies inside vmidRange",
    );
}

#[test]
fn zero_cores_are_impossible() {
    let found = problems(&[("app.yaml", &APP.replace("cores: 2", "cores: 0"))]);
    assert_one(
        &found,
        "app.yaml",
        9,
        "spec.sizes.small.cores",
        "0 cores is impossible",
    );
}

#[test]
fn zero_memory_is_impossible() {
    let found = problems(&[("app.yaml", &APP.replace("memoryMiB: 4096", "memoryMiB: 0"))]);
    assert_one(
        &found,
        "app.yaml",
        9,
        "spec.sizes.small.memoryMiB",
        "0 MiB is too little memory",
    );
}

#[test]
fn an_inline_secret_is_refused_and_points_to_the_file_reference() {
    let inline = ENV.replace(
        "secretFile: /run/secrets/pve-token",
        "secret: 0f1e2d3c-aaaa-bbbb-cccc-1234567890ab",
    );
    let found = problems(&[("env.yaml", &inline)]);
    assert_one(
        &found,
        "env.yaml",
        10,
        "spec.proxmox.credentials.secret",
        "secrets are never written inline",
    );
    assert!(
        !found[0].to_string().contains("0f1e2d3c"),
        "the secret leaked into the message: {}",
        found[0]
    );
}

#[test]
fn a_secret_pasted_where_its_file_belongs_is_refused_without_echoing_it() {
    let pasted = ENV.replace(
        "secretFile: /run/secrets/pve-token",
        "secretFile: 0f1e2d3c-aaaa-bbbb",
    );
    let found = problems(&[("env.yaml", &pasted)]);
    assert_one(
        &found,
        "env.yaml",
        10,
        "spec.proxmox.credentials.secretFile",
        "absolute path to a file",
    );
    assert!(
        !found[0].to_string().contains("0f1e2d3c"),
        "the secret leaked into the message: {}",
        found[0]
    );
}

#[test]
fn the_same_object_twice_in_one_file_is_refused() {
    let twice = format!("{DEPLOY}---\n{DEPLOY}");
    let found = problems(&[("d.yaml", &twice)]);
    assert_one(
        &found,
        "d.yaml",
        15,
        "metadata.name",
        "Deployment/uni-utrecht is defined twice in this file",
    );
    assert_eq!(found[0].document, Some(1));
}

#[test]
fn the_same_object_in_two_files_is_refused_naming_both() {
    let found = problems(&[("a.yaml", DEPLOY), ("b/copy.yaml", DEPLOY)]);
    assert_one(
        &found,
        "copy.yaml",
        1,
        "metadata.name",
        "Deployment/uni-utrecht is already defined in",
    );
    assert!(found[0].message.contains("a.yaml:1"), "{}", found[0]);
}

#[test]
fn a_status_written_in_a_file_is_refused() {
    let found = problems(&[("d.yaml", &format!("{DEPLOY}status: {{}}\n"))]);
    assert_one(
        &found,
        "d.yaml",
        11,
        "status",
        "status is written by the controller",
    );
}

#[test]
fn a_missing_required_field_names_its_mapping() {
    let found = problems(&[("d.yaml", &DEPLOY.replace("  domain: social.uu.nl\n", ""))]);
    assert_one(&found, "d.yaml", 6, "spec", "missing required field `domain`");
}

#[test]
fn one_invalid_document_does_not_hide_the_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{APP}---\n{}", DEPLOY.replace("social.uu.nl", "not a domain"));
    std::fs::write(dir.path().join("all.yaml"), text).unwrap();
    let snapshot = DirSource::new(vec![dir.path().to_path_buf()], Limits::default()).scan(true);
    assert_eq!(snapshot.objects.len(), 1);
    assert_eq!(snapshot.errors.len(), 1);
    assert_eq!(snapshot.errors[0].document, Some(1));
}

const DNS: &str = "  dns:
    zone: hosting.example
    server: { host: 127.0.0.1, port: 5353 }
    tsig: { keyName: fediversity-key, secretFile: /run/secrets/tsig }
";

#[test]
fn a_dns_section_with_defaults_is_valid() {
    let env = format!("{ENV}{DNS}");
    assert_eq!(problems(&[("env.yaml", &env)]), vec![]);
}

#[test]
fn a_tsig_secret_pasted_where_its_file_belongs_is_refused_without_echoing_it() {
    let env = format!("{ENV}{DNS}").replace("secretFile: /run/secrets/tsig", "secretFile: c2VjcmV0c2VjcmV0");
    let found = problems(&[("env.yaml", &env)]);
    assert_one(
        &found,
        "env.yaml",
        21,
        "spec.dns.tsig.secretFile",
        "absolute path to a file",
    );
    assert!(
        !found[0].to_string().contains("c2VjcmV0"),
        "the secret leaked: {}",
        found[0]
    );
}

#[test]
fn an_unknown_tsig_algorithm_is_refused() {
    let env = format!("{ENV}{DNS}").replace("keyName: fediversity-key,", "keyName: k, algorithm: hmac-md5,");
    let found = problems(&[("env.yaml", &env)]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].to_string().contains("hmac-sha256"), "{}", found[0]);
}

#[test]
fn nat_addresses_must_be_ips_and_come_with_the_nat_source() {
    let env = format!("{ENV}{DNS}    addressSource: Nat\n    nat: {{ \"10.0.0.5\": public-host }}\n");
    let found = problems(&[("env.yaml", &env)]);
    assert_one(
        &found,
        "env.yaml",
        23,
        "spec.dns.nat[\"10.0.0.5\"]",
        "`public-host` is not an IP address",
    );
    let env = format!("{ENV}{DNS}    addressSource: Nat\n");
    let found = problems(&[("env.yaml", &env)]);
    assert_one(
        &found,
        "env.yaml",
        22,
        "spec.dns.addressSource",
        "map each private address",
    );
}

#[test]
fn a_dns_zone_that_is_not_a_domain_is_refused() {
    let env = format!("{ENV}{DNS}").replace("zone: hosting.example", "zone: hosting_example");
    let found = problems(&[("env.yaml", &env)]);
    assert_one(&found, "env.yaml", 19, "spec.dns.zone", "not a valid domain name");
}
