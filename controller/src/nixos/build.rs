//! Builds a host's system toplevel with `nix build`, with the environment's nixpkgs, builders and caches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::command::{self, CommandError, CommandSpec};
use super::escape;
use super::host::{HostError, StorePath};

/// Why a system could not be built.
#[derive(Debug, Error)]
pub enum BuildError {
    /// `nix build` failed or timed out.
    #[error("failed to build the system of {host}: {source}")]
    Nix {
        /// The host.
        host: String,
        /// What nix said.
        #[source]
        source: CommandError,
    },
    /// A file of the build could not be written or read.
    #[error("failed to {what} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// `nix build --json` printed something else than one output path.
    #[error("unexpected output of nix build: {0}")]
    BadOutput(String),
    /// The built path is not a store path.
    #[error(transparent)]
    StorePath(#[from] HostError),
}

/// Where nixpkgs comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NixpkgsSource {
    /// A folder (a checkout or a stand-in with a `nixos` entry).
    Path(PathBuf),
    /// A flake reference such as `github:NixOS/nixpkgs/nixos-25.05`.
    Flake(String),
}

impl NixpkgsSource {
    /// An absolute path is a folder; anything else a flake reference.
    pub fn parse(s: &str) -> Self {
        if s.starts_with('/') {
            NixpkgsSource::Path(PathBuf::from(s))
        } else {
            NixpkgsSource::Flake(s.to_owned())
        }
    }
}

/// How systems are built in one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSettings {
    /// The nixpkgs to build with.
    pub nixpkgs: NixpkgsSource,
    /// Remote builders (`builders`), joined with `;`.
    pub builders: Vec<String>,
    /// Binary caches (`substituters`); empty keeps Nix's own setting.
    pub substituters: Vec<String>,
    /// How long one build may take.
    pub timeout: Duration,
    /// Extra Nix configuration for the build (`NIX_CONFIG`), e.g. `connect-timeout = 5`.
    pub nix_config: Option<String>,
}

/// The `nix build` of the toplevel of the configuration in `config_file`, linked at `out_link` (a
/// garbage-collector root, so the system survives until the next build replaces it).
pub fn build_command(
    config_file: &Path,
    out_link: &Path,
    settings: &BuildSettings,
) -> Result<CommandSpec, BuildError> {
    let config =
        escape::string(&config_file.to_string_lossy()).map_err(|e| BuildError::BadOutput(e.to_string()))?;
    let features = match settings.nixpkgs {
        NixpkgsSource::Path(_) => "nix-command",
        NixpkgsSource::Flake(_) => "nix-command flakes",
    };
    let mut args: Vec<String> = vec![
        "--extra-experimental-features".into(),
        features.into(),
        "build".into(),
        "--json".into(),
        "--out-link".into(),
        out_link.to_string_lossy().into_owned(),
    ];
    if !settings.substituters.is_empty() {
        args.extend([
            "--option".into(),
            "substituters".into(),
            settings.substituters.join(" "),
        ]);
    }
    if !settings.builders.is_empty() {
        args.extend(["--option".into(), "builders".into(), settings.builders.join("; ")]);
    }
    match &settings.nixpkgs {
        NixpkgsSource::Path(p) => args.extend([
            "--file".into(),
            p.join("nixos").to_string_lossy().into_owned(),
            "--arg".into(),
            "configuration".into(),
            config,
            "config.system.build.toplevel".into(),
        ]),
        NixpkgsSource::Flake(reference) => {
            let reference = escape::string(reference).map_err(|e| BuildError::BadOutput(e.to_string()))?;
            args.extend([
                "--impure".into(),
                "--expr".into(),
                format!(
                    "(import ((builtins.getFlake {reference}).outPath + \"/nixos\") {{ configuration = {config}; }}).config.system.build.toplevel"
                ),
            ]);
        }
    }
    let spec = CommandSpec::new("nix", args, settings.timeout);
    Ok(match &settings.nix_config {
        Some(config) => spec.env("NIX_CONFIG", config),
        None => spec,
    })
}

/// What a build produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    /// The system toplevel.
    pub path: StorePath,
    /// Whether `nix build` ran (false: the inputs were unchanged and the last result still exists).
    pub rebuilt: bool,
    /// Seconds spent.
    pub seconds: f64,
}

/// Builds systems, skipping `nix build` when nothing that goes into a host's system changed.
pub struct Builder {
    state_dir: PathBuf,
    catalog_root: PathBuf,
    last: Mutex<HashMap<String, (String, StorePath)>>,
}

impl Builder {
    /// A builder keeping host configurations and GC roots under `state_dir/hosts/`, and reading the
    /// catalog's Nix files under `catalog_root/nix/`.
    pub fn new(state_dir: &Path, catalog_root: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            catalog_root: catalog_root.to_owned(),
            last: Mutex::new(HashMap::new()),
        }
    }

    /// The folder of one host's files.
    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.state_dir.join("hosts").join(host)
    }

    /// Writes `host`'s configuration and builds it (or returns the last result when the text, the
    /// catalog's Nix files and the build settings are all unchanged).
    pub async fn build(
        &self,
        host: &str,
        nix_text: &str,
        settings: &BuildSettings,
    ) -> Result<Built, BuildError> {
        let started = Instant::now();
        let dir = self.host_dir(host);
        let key = self.inputs_key(nix_text, settings).await?;
        let cached = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .cloned();
        if let Some((last_key, path)) = cached
            && last_key == key
            && Path::new(path.as_str()).exists()
        {
            return Ok(Built {
                path,
                rebuilt: false,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        crate::provider::progress::report(format!("{host}: building its NixOS system"));
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| BuildError::Io { what, path, source }
        };
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io("create", &dir))?;
        let config = dir.join("configuration.nix");
        tokio::fs::write(&config, nix_text)
            .await
            .map_err(io("write", &config))?;
        let spec = build_command(&config, &dir.join("system"), settings)?;
        let out = command::run_ok(&spec).await.map_err(|source| BuildError::Nix {
            host: host.to_owned(),
            source,
        })?;
        let path = parse_build_json(&out.stdout)?;
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_owned(), (key, path.clone()));
        Ok(Built {
            path,
            rebuilt: true,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// SHA-256 over the configuration, the build settings and every file under the catalog's `nix/`.
    async fn inputs_key(&self, nix_text: &str, settings: &BuildSettings) -> Result<String, BuildError> {
        let mut hash = Sha256::new();
        hash.update(nix_text.as_bytes());
        hash.update(format!(
            "\0{:?}\0{:?}\0{:?}\0",
            settings.nixpkgs, settings.builders, settings.substituters
        ));
        let mut stack = vec![self.catalog_root.join("nix")];
        let mut files = Vec::new();
        while let Some(dir) = stack.pop() {
            let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
                continue;
            };
            while let Ok(Some(entry)) = entries.next_entry().await {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        files.sort();
        for file in files {
            let bytes = tokio::fs::read(&file).await.map_err(|source| BuildError::Io {
                what: "read",
                path: file.clone(),
                source,
            })?;
            hash.update(file.to_string_lossy().as_bytes());
            hash.update([0]);
            hash.update(&bytes);
        }
        Ok(format!("{:x}", hash.finalize()))
    }
}

/// The one output path of `nix build --json`.
pub fn parse_build_json(stdout: &str) -> Result<StorePath, BuildError> {
    let value: serde_json::Value =
        serde_json::from_str(stdout.trim()).map_err(|_| BuildError::BadOutput(command::tail(stdout)))?;
    let out = value
        .get(0)
        .and_then(|v| v.get("outputs"))
        .and_then(|o| o.get("out"))
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| BuildError::BadOutput(command::tail(stdout)))?;
    Ok(StorePath::new(out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(nixpkgs: &str) -> BuildSettings {
        BuildSettings {
            nixpkgs: NixpkgsSource::parse(nixpkgs),
            builders: vec!["ssh://builder x86_64-linux".into()],
            substituters: vec!["https://cache.nixos.org".into(), "https://cache.example".into()],
            timeout: Duration::from_secs(60),
            nix_config: None,
        }
    }

    #[test]
    fn a_nixpkgs_folder_is_built_with_file_and_arg() {
        let spec = build_command(
            Path::new("/state/hosts/h/configuration.nix"),
            Path::new("/state/hosts/h/system"),
            &settings("/srv/nixpkgs"),
        )
        .unwrap();
        assert_eq!(
            spec.to_string(),
            "nix --extra-experimental-features nix-command build --json --out-link /state/hosts/h/system \
--option substituters 'https://cache.nixos.org https://cache.example' --option builders 'ssh://builder x86_64-linux' \
--file /srv/nixpkgs/nixos --arg configuration '\"/state/hosts/h/configuration.nix\"' config.system.build.toplevel"
        );
    }

    #[test]
    fn a_flake_reference_is_built_with_get_flake() {
        let spec = build_command(
            Path::new("/state/hosts/h/configuration.nix"),
            Path::new("/state/hosts/h/system"),
            &BuildSettings {
                builders: vec![],
                substituters: vec![],
                ..settings("github:NixOS/nixpkgs/nixos-25.05")
            },
        )
        .unwrap();
        assert_eq!(
            spec.to_string(),
            "nix --extra-experimental-features 'nix-command flakes' build --json --out-link /state/hosts/h/system --impure --expr \
'(import ((builtins.getFlake \"github:NixOS/nixpkgs/nixos-25.05\").outPath + \"/nixos\") { configuration = \"/state/hosts/h/configuration.nix\"; }).config.system.build.toplevel'"
        );
    }

    #[test]
    fn the_output_path_is_read_from_the_json() {
        let out = r#"[{"drvPath":"/nix/store/x.drv","outputs":{"out":"/nix/store/abc-nixos-system-h"}}]"#;
        assert_eq!(
            parse_build_json(out).unwrap().as_str(),
            "/nix/store/abc-nixos-system-h"
        );
        assert!(parse_build_json("[]").is_err());
    }
}
