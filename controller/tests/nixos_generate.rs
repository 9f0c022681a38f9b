//! Generated host configurations: golden files, parsing with Nix and rnix, and escaping round trips
//! through `nix-instantiate --eval`.

use std::path::{Path, PathBuf};
use std::process::Command;

use fediversity::api::{Application, Object, ObjectStorageSpec, SmtpSpec};
use fediversity::nixos::{HostConfig, HostEnvironment, check_syntax, escape, generate};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// Nix without a daemon, a network or the `nixbld` group (see the NixOS notes in the README).
const NIX_CONFIG: &str = "substituters =\nexperimental-features = nix-command\nbuild-users-group =";

/// The hostile setting of the issue: it must arrive as exactly this text.
const HOSTILE: &str = r#""; ${builtins.readFile "/etc/passwd"} ""#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn require(tool: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is missing: these tests need Nix (Debian package nix-bin); scripts/test.sh installs it"
    );
    tool.to_owned()
}

fn application(name: &str) -> Application {
    let text = std::fs::read_to_string(repo().join(format!("examples/quickstart/applications/{name}.yaml")))
        .unwrap();
    let docs = fediversity::yaml::parse_documents(&text, &fediversity::yaml::Limits::default()).unwrap();
    match fediversity::api::parse_object(&docs[0].1).unwrap() {
        Object::Application(app) => app,
        other => panic!("examples/quickstart/applications/{name}.yaml is not an Application: {other:?}"),
    }
}

/// The controller's public key, as root's configuration declares it.
const ROOT_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFediversityControllerKeyForGoldenFiles";

/// What the example environment provides: an ACME account, an SMTP relay and object storage.
fn environment() -> HostEnvironment {
    HostEnvironment {
        acme_email: Some("hostmaster@uu.nl".into()),
        smtp: Some(SmtpSpec {
            host: "smtp.uu.nl".into(),
            port: 587,
            user: Some("fediversity".into()),
            password_file: Some("/etc/fediversity/smtp-password".into()),
            from: "noreply@social.uu.nl".into(),
        }),
        object_storage: Some(ObjectStorageSpec {
            endpoint: "https://s3.uu.nl".into(),
            bucket: "social-media".into(),
            region: None,
            credentials_file: "/etc/fediversity/s3.env".into(),
        }),
        ..HostEnvironment::default()
    }
}

/// The example host of each catalog application, with settings an operator would give.
fn examples() -> Vec<(&'static str, HostConfig)> {
    let cases = [
        (
            "mastodon",
            json!({"singleUserMode": false, "registrations": "approval", "maxTootChars": 1000}),
        ),
        (
            "pixelfed",
            json!({"openRegistration": false, "maxPhotoSizeKiB": 20000}),
        ),
        ("peertube", json!({"transcoding": true, "liveStreaming": false})),
        ("matrix", json!({"enableRegistration": false, "federation": true})),
        ("mastodon-hostile", json!({"registrations": HOSTILE})),
    ];
    cases
        .into_iter()
        .map(|(name, settings)| {
            let app_name = name.split('-').next().unwrap();
            let app = application(app_name);
            let mut config = HostConfig::new(
                Path::new("/catalog"),
                &format!("uni-utrecht-{app_name}"),
                app_name,
                &format!("{app_name}.social.uu.nl"),
                &app.spec.nixos_module,
                Some("social@uu.nl"),
                settings.as_object().unwrap(),
            );
            config.environment = environment();
            config.root_keys = vec![ROOT_KEY.into()];
            (name, config)
        })
        .collect()
}

#[test]
fn generated_configurations_match_their_golden_files() {
    let dir = repo().join("controller/tests/golden/nixos");
    for (name, config) in examples() {
        let text = generate(&config).unwrap();
        let golden = dir.join(format!("{name}.nix"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &text).unwrap();
        }
        let expected = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to write it)", golden.display()));
        assert_eq!(
            text, expected,
            "{name}: run with UPDATE_GOLDEN=1 and review the diff"
        );
    }
}

#[test]
fn every_generated_configuration_and_catalog_module_parses_with_nix_and_rnix() {
    let nix = require("nix-instantiate");
    let scratch = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, config) in examples() {
        let text = generate(&config).unwrap();
        check_syntax(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = scratch.path().join(format!("{name}.nix"));
        std::fs::write(&file, text).unwrap();
        files.push(file);
    }
    for module in [
        "base",
        "environment",
        "proxmox-guest",
        "applications/common",
        "applications/mastodon",
        "applications/pixelfed",
    ]
    .into_iter()
    .chain(["applications/peertube", "applications/matrix"])
    {
        let file = repo().join(format!("nix/{module}.nix"));
        check_syntax(&std::fs::read_to_string(&file).unwrap()).unwrap_or_else(|e| panic!("{module}: {e}"));
        files.push(file);
    }
    let out = Command::new(&nix)
        .arg("--parse")
        .args(&files)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn rnix_reports_a_broken_configuration() {
    let err = check_syntax("{ a = \"x\" }").unwrap_err();
    assert!(err.to_string().contains("does not parse"), "{err}");
}

#[test]
fn the_hostile_setting_evaluates_to_exactly_its_literal_text() {
    let nix = require("nix-instantiate");
    let (_, config) = examples().pop().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("host.nix");
    std::fs::write(&file, generate(&config).unwrap()).unwrap();
    let expr = format!("(import {}).fediversity.mastodon.settings", file.display());
    let out = Command::new(&nix)
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value, json!({"registrations": HOSTILE}));
}

#[test]
fn arbitrary_strings_come_back_unchanged_from_nix_evaluation() {
    let nix = require("nix-instantiate");
    // 64 cases, evaluated in one nix-instantiate call: any Unicode text without NUL, plus text built
    // from the characters that matter to the Nix lexer.
    let special = prop::collection::vec(
        prop::sample::select(vec![
            "$", "{", "}", "\\", "\"", "'", "''", "\n", "\r", "\t", "${", "$${", "a", "é",
        ]),
        0..24,
    )
    .prop_map(|parts| parts.concat());
    let any = "[^\u{0}]{0,40}";
    let strategy = prop::collection::vec(prop_oneof![any.prop_map(String::from), special], 64);
    let mut runner = TestRunner::new(Config {
        cases: 1,
        ..Config::default()
    });
    runner
        .run(&strategy, |strings| {
            let list: Vec<String> = strings.iter().map(|s| escape::string(s).unwrap()).collect();
            let expr = format!("[ {} ]", list.join(" "));
            let out = Command::new(&nix)
                .args(["--eval", "--strict", "--json", "-E", &expr])
                .env("NIX_CONFIG", NIX_CONFIG)
                .output()
                .unwrap();
            prop_assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let back: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
            prop_assert_eq!(back, strings);
            Ok(())
        })
        .unwrap();
}

#[test]
fn settings_with_every_json_type_evaluate_back_to_the_same_json() {
    let nix = require("nix-instantiate");
    let settings = json!({
        "a b": [1, -2, 2.5, "x", null, true, {"with": "${x}"}],
        "nested": {"list": [], "set": {}, "big": 9_007_199_254_740_993_i64},
    });
    let expr = escape::value(&settings).unwrap();
    let out = Command::new(&nix)
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(back, settings);
}

/// The few nixpkgs `lib` functions `nix/environment.nix` and the catalog modules use for the restore
/// hold, written out (nixpkgs itself cannot be fetched here); `mkIf` is applied at once.
const STUB_LIB: &str = r#"{
  mkIf = cond: value: if cond then value else { };
  optional = cond: value: if cond then [ value ] else [ ];
  listToAttrs = builtins.listToAttrs;
  nameValuePair = name: value: { inherit name value; };
  filter = builtins.filter;
  concatStringsSep = builtins.concatStringsSep;
  hasSuffix = suffix: s:
    let n = builtins.stringLength s; k = builtins.stringLength suffix;
    in k <= n && builtins.substring (n - k) k s == suffix;
  removeSuffix = suffix: s:
    let n = builtins.stringLength s; k = builtins.stringLength suffix;
    in if k <= n && builtins.substring (n - k) k s == suffix then builtins.substring 0 (n - k) s else s;
}"#;

#[test]
fn a_host_restored_from_a_snapshot_conditions_each_held_unit_of_its_application_on_the_restore_marker() {
    let nix = require("nix-instantiate");
    let scratch = tempfile::tempdir().unwrap();
    let marker = fediversity::nixos::restore_marker();
    let mut checked = 0;
    for (name, mut config) in examples() {
        if name.contains('-') {
            continue;
        }
        config.restore_hold = Some(marker.clone());
        let file = scratch.path().join(format!("{name}.nix"));
        std::fs::write(&file, generate(&config).unwrap()).unwrap();
        // The generated host's hold, the units its catalog module holds, and what environment.nix
        // makes of them, evaluated by Nix.
        let expr = format!(
            "let
  lib = {STUB_LIB};
  host = import {host};
  appConfig = {{ fediversity = {{
    {name} = {{ enable = true; adminEmail = \"social@uu.nl\"; domain = \"x.example\"; settings = {{ }}; }};
    environment = host.fediversity.environment; firstAccount = {{ passwordFile = \"/p\"; }};
  }}; }};
  app = (import {module} {{ config = appConfig; inherit lib; pkgs = {{ }}; }}).config.fediversity;
  env = (import {env} {{
    config.fediversity.restoreHold = host.fediversity.restoreHold // {{ inherit (app.restoreHold) units; }};
    inherit lib;
  }}).config;
in {{
  inherit (host.fediversity) restoreHold;
  units = app.restoreHold.units;
  ready = app.readiness.units;
  services = env.systemd.services;
  timers = env.systemd.timers;
  published = env.environment.etc.\"fediversity/restore-hold\".text;
}}",
            host = file.display(),
            module = repo().join(format!("nix/applications/{name}.nix")).display(),
            env = repo().join("nix/environment.nix").display(),
        );
        let out = Command::new(&nix)
            .args(["--eval", "--strict", "--json", "-E", &expr])
            .env("NIX_CONFIG", NIX_CONFIG)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let value: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            value["restoreHold"],
            json!({"enable": true, "marker": marker}),
            "{name}"
        );
        let units: Vec<&str> = value["units"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        // Every unit of the application that means "ready" (nginx aside) and every service or timer
        // the Application stops for a restore is held.
        let app = application(name);
        let stopped = app
            .spec
            .data
            .as_ref()
            .map(|d| d.services.clone())
            .unwrap_or_default();
        for unit in value["ready"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap().to_owned())
            .filter(|u| u != "nginx.service")
            .chain(stopped.into_iter().filter(|u| !u.ends_with(".target")))
        {
            assert!(
                units.contains(&unit.as_str()),
                "{name}: {unit} is not held: {units:?}"
            );
        }
        // Each held unit starts only once the marker exists; the list is published for the deploy gate.
        for unit in &units {
            let (base, kind) = unit.rsplit_once('.').unwrap();
            let table = match kind {
                "service" => &value["services"],
                "timer" => &value["timers"],
                other => panic!("{name}: {unit}: only services and timers can be held, not {other}"),
            };
            assert_eq!(
                table[base],
                json!({"unitConfig": {"ConditionPathExists": marker}}),
                "{name}: {unit}"
            );
        }
        assert_eq!(
            value["published"].as_str().unwrap(),
            format!("{marker}\n{}\n", units.join("\n")),
            "{name}"
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
}
