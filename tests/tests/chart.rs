//! The Helm chart, CRDs and alert rules pass the real tools: helm, kubernetes-validate and promtool.

use std::process::Command;

use fediversity_e2e::{repo_root, run, text, tool};

fn helm() -> std::path::PathBuf {
    tool("HELM", "helm")
}

fn render(extra: &[&str]) -> String {
    let chart = repo_root().join("charts/fediversity");
    let out = run(Command::new(helm())
        .args([
            "template",
            "rel",
            chart.to_str().unwrap(),
            "--kube-version",
            "1.33",
        ])
        .args(extra));
    assert!(out.status.success(), "helm template failed: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn kubernetes_validate(files: &[std::path::PathBuf]) {
    let out = run(Command::new(tool("KUBERNETES_VALIDATE", "kubernetes-validate"))
        .args(["--strict", "-k", "1.33.0"])
        .args(files));
    let report = text(&out);
    assert!(out.status.success(), "kubernetes-validate failed:\n{report}");
    assert!(!report.contains("failed"), "{report}");
}

#[test]
fn the_chart_passes_helm_lint_strict() {
    let out = run(Command::new(helm())
        .args(["lint", "--strict"])
        .arg(repo_root().join("charts/fediversity")));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 chart(s) failed"), "{}", text(&out));
}

#[test]
fn rendered_manifests_and_crds_pass_kubernetes_validate_strict() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = dir.path().join("defaults.yaml");
    std::fs::write(&defaults, render(&[])).unwrap();
    let everything = dir.path().join("everything.yaml");
    let all_options = [
        "--set",
        "proxmox.tokenSecret=placeholder",
        "--set",
        "proxmox.caCertificate=placeholder",
        "--set",
        "deployKeySecret=deploy-key",
        "--set",
        "gitSshSecret=git-ssh",
        "--set",
        "apiTokenSecret=api-token",
        "--set",
        "persistence.enabled=false",
        "--set",
        "serviceMonitor.enabled=false",
        "--set",
        "prometheusRule.enabled=false",
    ];
    std::fs::write(&everything, render(&all_options)).unwrap();
    let mut files = vec![defaults, everything];
    for entry in std::fs::read_dir(repo_root().join("crds")).unwrap() {
        files.push(entry.unwrap().path());
    }
    kubernetes_validate(&files);
}

#[test]
fn the_chart_runs_one_hardened_replica_with_its_state_on_a_kept_volume() {
    let manifests = render(&["--set", "apiTokenSecret=api-token"]);
    let docs: Vec<serde_json::Value> = manifests
        .split("\n---")
        .filter_map(|d| yaml_serde::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d.is_object())
        .collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let deployment = find("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--api-token-file=/run/secrets/fediversity/api/token"),
        "{args:?}"
    );
    assert!(args.iter().any(|a| a.starts_with("--source=git+")), "{args:?}");
    assert_eq!(
        find("PersistentVolumeClaim")["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    // The dashboard and the rules in the chart are the files shipped beside it.
    let dashboard = find("ConfigMap")["data"]["fediversity-controller.json"]
        .as_str()
        .unwrap()
        .to_owned();
    let shipped =
        std::fs::read_to_string(repo_root().join("charts/fediversity/files/dashboard.json")).unwrap();
    assert_eq!(dashboard.trim(), shipped.trim());
    let rules: serde_json::Value = yaml_serde::from_str(
        &std::fs::read_to_string(repo_root().join("charts/fediversity/files/alerts.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(find("PrometheusRule")["spec"], rules);
}

#[test]
fn with_an_etcd_endpoint_the_chart_runs_three_replicas_on_the_shared_store_without_a_volume() {
    let manifests = render(&[
        "--set",
        "etcd.endpoints=etcd://etcd-0:2379\\,etcd-1:2379\\,etcd-2:2379/fediversity",
        "--set",
        "etcd.existingSecret=etcd-client",
        "--set",
        "etcd.tls=true",
        "--set",
        "etcd.clientCertificate=true",
    ]);
    let docs: Vec<serde_json::Value> = manifests
        .split("\n---")
        .filter_map(|d| yaml_serde::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d.is_object())
        .collect();
    assert!(!docs.iter().any(|d| d["kind"] == "PersistentVolumeClaim"));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    for arg in [
        "--store=etcd://etcd-0:2379,etcd-1:2379,etcd-2:2379/fediversity",
        "--etcd-ca=/run/secrets/fediversity/etcd/ca.pem",
        "--etcd-cert=/run/secrets/fediversity/etcd/cert.pem",
        "--etcd-key=/run/secrets/fediversity/etcd/key.pem",
    ] {
        assert!(args.contains(&arg), "{arg} missing from {args:?}");
    }
    let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
    let etcd = volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "etcd")
        .unwrap();
    assert_eq!(etcd["secret"]["secretName"], "etcd-client");
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = tool("PROMTOOL", "promtool");
    let out = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo_root().join("charts/fediversity/files/alerts.yaml")));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo_root().join("tests/monitoring/alerts_test.yaml")));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

#[test]
fn the_chart_runs_the_image_that_scripts_build_image_sh_builds_as_its_user() {
    let manifests = render(&[]);
    let docs: Vec<serde_json::Value> = manifests
        .split("\n---")
        .filter_map(|d| yaml_serde::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d.is_object())
        .collect();
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // The chart's appVersion is the controller's version, the tag the build script gives the image.
    assert_eq!(
        container["image"],
        format!("fediversity-controller:{}", env!("CARGO_PKG_VERSION"))
    );
    let script = std::fs::read_to_string(repo_root().join("scripts/build-image.sh")).unwrap();
    let image_uid = script
        .lines()
        .find_map(|l| l.strip_prefix("uid="))
        .expect("scripts/build-image.sh sets uid=");
    assert_eq!(pod["securityContext"]["runAsUser"].to_string(), image_uid);
    assert_eq!(pod["securityContext"]["runAsGroup"].to_string(), image_uid);
    // Nix builds need a writable /nix although the root filesystem is read-only.
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains(&"/nix"), "{mounts:?}");
    assert!(mounts.contains(&"/var/lib/fediversity"), "{mounts:?}");
}
