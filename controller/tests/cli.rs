//! The `fediversity` binary's offline commands: `validate` and `schema`.

use std::path::Path;
use std::process::{Command, Output};

fn fediversity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(args)
        .output()
        .unwrap()
}

fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .display()
        .to_string()
}

#[test]
fn validate_passes_on_the_shipped_examples() {
    let out = fediversity(&["validate", &examples()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("valid: 10 objects (3 RuntimeEnvironment, 4 Application, 3 Deployment)"),
        "{stdout}"
    );
}

#[test]
fn validate_prints_every_problem_and_exits_one() {
    let dir = tempfile::tempdir().unwrap();
    let deployment =
        std::fs::read_to_string(Path::new(&examples()).join("deployments/uni-utrecht.yaml")).unwrap();
    let broken = deployment
        .replace(
            "enabled: true            # no size",
            "enabled: yes            # no size",
        )
        .replace("social.uu.nl", "social uu");
    std::fs::write(dir.path().join("a.yaml"), &broken).unwrap();
    let line = broken.lines().position(|l| l.contains("enabled: yes")).unwrap() + 1;
    std::fs::write(dir.path().join("b.yaml"), "kind: [unclosed\n").unwrap();
    let out = fediversity(&["validate", dir.path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let expected = format!(
        "a.yaml:{line}:16: document 1: spec.applications.pixelfed.enabled: expected a boolean, found the string \"yes\""
    );
    assert!(stdout.contains(&expected), "{stdout}");
    assert!(
        stdout.contains("b.yaml:2:1: document 1: invalid YAML"),
        "{stdout}"
    );
    assert!(stdout.contains("invalid: 2 problems"), "{stdout}");
}

#[test]
fn validate_of_a_missing_path_fails_without_a_panic() {
    let out = fediversity(&["validate", "/nonexistent/objects"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("error: cannot read /nonexistent/objects"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn schema_prints_a_strict_json_schema_per_kind() {
    for (kind, spec_field) in [
        ("deployment", "domain"),
        ("applications", "sizes"),
        ("RuntimeEnvironment", "proxmox"),
    ] {
        let out = fediversity(&["schema", kind]);
        assert_eq!(out.status.code(), Some(0));
        let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(schema["additionalProperties"], false, "{kind}");
        assert_eq!(
            schema["properties"]["apiVersion"]["enum"][0],
            "fediversity.eu/v1alpha1"
        );
        let spec_ref = schema["properties"]["spec"]["$ref"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned();
        let spec = &schema["$defs"][&spec_ref];
        assert_eq!(spec["additionalProperties"], false, "{kind}");
        assert!(spec["properties"][spec_field].is_object(), "{kind}: {spec}");
    }
}

#[test]
fn schema_of_an_unknown_kind_is_a_usage_error() {
    let out = fediversity(&["schema", "pod"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown kind `pod`"));
}
