//! Generators of realistic object files, for tests and benchmarks at scale.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The text of a valid RuntimeEnvironment named `name`.
pub fn environment_yaml(name: &str) -> String {
    format!(
        "apiVersion: fediversity.eu/v1alpha1
kind: RuntimeEnvironment
metadata:
  name: {name}
spec:
  proxmox:
    endpoint: https://{name}.example.net:8006
    credentials: {{ tokenId: \"fediversity@pve!controller\", secretFile: /run/secrets/{name}-token }}
    nodes: [pve1, pve2]
    template: {{ vmid: 9000 }}
    storage: local-zfs
    bridge: vmbr0
    vmidRange: {{ start: 20000, end: 29999 }}
  ssh: {{ privateKeyFile: /run/secrets/deploy-key }}
"
    )
}

/// The text of a valid Application named `name`.
pub fn application_yaml(name: &str) -> String {
    format!(
        "apiVersion: fediversity.eu/v1alpha1
kind: Application
metadata:
  name: {name}
spec:
  displayName: App {name}
  nixosModule: nix/applications/{name}.nix
  sizes:
    small: {{ cores: 2, memoryMiB: 4096, diskGiB: 40 }}
    medium: {{ cores: 4, memoryMiB: 8192, diskGiB: 100 }}
  settings: {{ type: object, properties: {{ singleUserMode: {{ type: boolean }} }} }}
  requires: [postgresql, redis]
  healthCheck: {{ path: /health }}
"
    )
}

/// The text of a valid Deployment named `name`; `revision` goes into a setting so specs can be varied.
pub fn deployment_yaml(name: &str, environment: &str, revision: u32) -> String {
    format!(
        "apiVersion: fediversity.eu/v1alpha1
kind: Deployment
metadata:
  name: {name}
  labels: {{ fediversity.eu/operator: {name} }}
spec:
  domain: {name}.example.org
  runtimeEnvironment: {environment}
  applications:
    mastodon: {{ enabled: true, size: small, settings: {{ maxTootChars: {revision} }} }}
    pixelfed: {{ enabled: true }}
  initialUser: {{ displayName: Admin of {name}, email: admin@{name}.example.org }}
"
    )
}

/// Writes `count` objects under `root`: half as one file per object in `single/`, half as files of
/// `per_file` documents in `multi/`. About 1% are RuntimeEnvironments, 4% Applications (among them
/// `mastodon` and `pixelfed`), the rest Deployments. Returns the files written.
pub fn write_tree(root: &Path, count: usize, per_file: usize) -> std::io::Result<Vec<PathBuf>> {
    let single = root.join("single");
    let multi = root.join("multi");
    std::fs::create_dir_all(&single)?;
    std::fs::create_dir_all(&multi)?;
    // Deployments use env-0, mastodon and pixelfed, which all exist, so every object can become Ready.
    let text = |i: usize| match (i, i % 100) {
        (1, _) => application_yaml("mastodon"),
        (2, _) => application_yaml("pixelfed"),
        (_, 0) => environment_yaml(&format!("env-{i}")),
        (_, 1..=4) => application_yaml(&format!("app-{i}")),
        _ => deployment_yaml(&format!("deploy-{i}"), "env-0", 500),
    };
    let mut files = Vec::new();
    let half = count / 2;
    for i in 0..half {
        let path = single.join(format!("object-{i:05}.yaml"));
        std::fs::write(&path, text(i))?;
        files.push(path);
    }
    let per_file = per_file.max(1);
    let mut i = half;
    while i < count {
        let path = multi.join(format!("batch-{i:05}.yaml"));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for j in i..(i + per_file).min(count) {
            writeln!(file, "---")?;
            file.write_all(text(j).as_bytes())?;
        }
        file.flush()?;
        files.push(path);
        i += per_file;
    }
    Ok(files)
}

/// Writes `count` objects the way a provider's repository holds them: one RuntimeEnvironment (`env-0`), the
/// four catalog Applications, and `count - 5` Deployments that use them, half as one file each in
/// `single/`, half as files of `per_file` documents in `multi/`. Returns the files written.
pub fn write_catalog_tree(root: &Path, count: usize, per_file: usize) -> std::io::Result<Vec<PathBuf>> {
    let single = root.join("single");
    let multi = root.join("multi");
    std::fs::create_dir_all(&single)?;
    std::fs::create_dir_all(&multi)?;
    let mut files = Vec::new();
    let mut write = |path: PathBuf, text: String| -> std::io::Result<()> {
        std::fs::write(&path, text)?;
        files.push(path);
        Ok(())
    };
    write(root.join("environment.yaml"), environment_yaml("env-0"))?;
    for app in ["mastodon", "pixelfed", "peertube", "matrix"] {
        write(root.join(format!("{app}.yaml")), application_yaml(app))?;
    }
    let deployments = count.saturating_sub(5);
    let half = deployments / 2;
    for i in 0..half {
        let name = format!("deploy-{i:05}");
        write(
            single.join(format!("{name}.yaml")),
            deployment_yaml(&name, "env-0", 500),
        )?;
    }
    let per_file = per_file.max(1);
    let mut i = half;
    while i < deployments {
        let mut text = String::new();
        for j in i..(i + per_file).min(deployments) {
            text.push_str("---\n");
            text.push_str(&deployment_yaml(&format!("deploy-{j:05}"), "env-0", 500));
        }
        write(multi.join(format!("batch-{i:05}.yaml")), text)?;
        i += per_file;
    }
    Ok(files)
}

/// A figure from `/proc/self/status` in KiB (`VmHWM:` is the peak resident set, `VmRSS:` the current
/// one), for benchmarks; 0 where the file does not exist.
pub fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
