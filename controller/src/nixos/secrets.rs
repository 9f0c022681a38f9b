//! Secrets a host needs from its environment, delivered as files over SSH stdin (never the Nix store),
//! and the controller's SSH public key that root's configuration declares.

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use super::generate::{HostEnvironment, OBJECT_STORAGE_CREDENTIALS, SMTP_PASSWORD};
use super::host::{HostError, SshHost};
use crate::api::{RuntimeEnvironmentSpec, SshSpec};

/// The manifest in a system toplevel: the secret files the system reads, with owner and mode.
pub const SECRETS_MANIFEST: &str = "etc/fediversity/secrets.json";

/// Why secrets could not be delivered. The messages name files and fields, never contents.
#[derive(Debug, Error)]
pub enum SecretError {
    /// A file on the controller's machine could not be read.
    #[error("failed to read {field} `{path}`: {reason}")]
    Read {
        /// The RuntimeEnvironment field naming the file.
        field: &'static str,
        /// The file.
        path: String,
        /// Why (the I/O error's kind, not its content).
        reason: String,
    },
    /// The public key file holds no SSH public key.
    #[error("`{0}` holds no SSH public key (expected `ssh-ed25519 AAAA…`)")]
    NotAPublicKey(String),
    /// The system asks for a secret the environment does not give.
    #[error("the system needs the secret `{0}`, which the RuntimeEnvironment does not provide")]
    Unknown(String),
    /// The system's manifest is not what the catalog writes.
    #[error("the system's secrets manifest is not valid: {0}")]
    Manifest(String),
    /// The upload failed.
    #[error("failed to deliver the secret `{name}`: {source}")]
    Upload {
        /// The secret's name.
        name: String,
        /// What went wrong on the way.
        #[source]
        source: HostError,
    },
}

/// One secret file a system reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SecretFile {
    /// Its name under the secrets folder.
    pub name: String,
    /// Its owner.
    pub owner: String,
    /// Its group.
    pub group: String,
    /// Its mode, e.g. `0400`.
    pub mode: String,
    /// Its path on the host.
    pub path: String,
}

impl SecretFile {
    fn check(&self) -> Result<(), SecretError> {
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        };
        let mode_ok = self.mode.len() == 4
            && self.mode.starts_with('0')
            && self.mode.bytes().all(|b| (b'0'..=b'7').contains(&b));
        if word(&self.name) && word(&self.owner) && word(&self.group) && mode_ok {
            Ok(())
        } else {
            Err(SecretError::Manifest(format!(
                "entry `{}` has an invalid name, owner, group or mode",
                self.name
            )))
        }
    }
}

/// The secret files the system at `toplevel` reads (none when it has no manifest).
pub fn manifest(toplevel: &Path) -> Result<Vec<SecretFile>, SecretError> {
    match std::fs::read(toplevel.join(SECRETS_MANIFEST)) {
        Ok(bytes) => {
            let files: Vec<SecretFile> =
                serde_json::from_slice(&bytes).map_err(|e| SecretError::Manifest(e.to_string()))?;
            for f in &files {
                f.check()?;
            }
            Ok(files)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(SecretError::Manifest(e.kind().to_string())),
    }
}

/// Where the environment keeps the secret `name` on the controller's machine, and the field saying so.
fn source(env: &RuntimeEnvironmentSpec, name: &str) -> Option<(&'static str, String)> {
    match name {
        SMTP_PASSWORD => env
            .smtp
            .as_ref()
            .and_then(|s| s.password_file.clone())
            .map(|p| ("spec.smtp.passwordFile", p)),
        OBJECT_STORAGE_CREDENTIALS => env
            .object_storage
            .as_ref()
            .map(|o| ("spec.objectStorage.credentialsFile", o.credentials_file.clone())),
        _ => None,
    }
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, SecretError> {
    std::fs::read(path).map_err(|e| SecretError::Read {
        field,
        path: path.to_owned(),
        reason: e.kind().to_string(),
    })
}

/// Delivers every secret the system at `toplevel` reads to `host`, each with the owner and mode the
/// system asks for. Returns how many were delivered.
pub async fn deliver(
    host: &SshHost,
    toplevel: &Path,
    env: &RuntimeEnvironmentSpec,
    environment: &HostEnvironment,
) -> Result<usize, SecretError> {
    let files = manifest(toplevel)?;
    for file in &files {
        let (field, path) = source(env, &file.name).ok_or_else(|| SecretError::Unknown(file.name.clone()))?;
        let content = read(field, &path)?;
        let target = environment.secret_path(&file.name);
        if target != file.path {
            return Err(SecretError::Manifest(format!(
                "the system reads `{}` at {}, the controller writes it at {target}",
                file.name, file.path
            )));
        }
        host.put_secret(&environment.secrets_dir, file, content)
            .await
            .map_err(|source| SecretError::Upload {
                name: file.name.clone(),
                source,
            })?;
    }
    Ok(files.len())
}

/// The controller's SSH public key (`TYPE BASE64`), from `publicKeyFile` or the private key's `.pub`.
pub fn public_key(ssh: &SshSpec) -> Result<String, SecretError> {
    let (field, path) = match &ssh.public_key_file {
        Some(p) => ("spec.ssh.publicKeyFile", p.clone()),
        None => (
            "spec.ssh.privateKeyFile (+ .pub)",
            format!("{}.pub", ssh.private_key_file),
        ),
    };
    let text = read(field, &path)?;
    let text = String::from_utf8_lossy(&text);
    let words: Vec<&str> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .take(2)
        .collect();
    let valid = words.len() == 2
        && (words[0].starts_with("ssh-") || words[0].starts_with("ecdsa-"))
        && words[1]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if !valid {
        return Err(SecretError::NotAPublicKey(path));
    }
    Ok(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_entry_that_could_inject_a_shell_word_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/fediversity")).unwrap();
        std::fs::write(
            dir.path().join(SECRETS_MANIFEST),
            r#"[{"name":"smtp-password","owner":"x;rm -rf /","group":"root","mode":"0400","path":"/s/smtp-password"}]"#,
        )
        .unwrap();
        assert!(matches!(manifest(dir.path()), Err(SecretError::Manifest(_))));
    }

    #[test]
    fn a_system_without_a_manifest_needs_no_secrets() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(manifest(dir.path()).unwrap(), Vec::new());
    }

    #[test]
    fn the_public_key_drops_its_comment_and_a_private_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        std::fs::write(dir.path().join("id.pub"), "ssh-ed25519 AAAAC3Nz+/= me@laptop\n").unwrap();
        let ssh = |public: Option<String>| SshSpec {
            user: "root".into(),
            private_key_file: key.to_string_lossy().into_owned(),
            public_key_file: public,
            port: 22,
        };
        assert_eq!(public_key(&ssh(None)).unwrap(), "ssh-ed25519 AAAAC3Nz+/=");
        let private = dir.path().join("private");
        std::fs::write(&private, "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n").unwrap();
        let err = public_key(&ssh(Some(private.to_string_lossy().into_owned()))).unwrap_err();
        assert!(!err.to_string().contains("secret\n"), "{err}");
        assert!(matches!(err, SecretError::NotAPublicKey(_)));
    }
}
