//! Writes the small NixOS configuration of one host: imports from the catalog, values from the Deployment.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use thiserror::Error;

use super::escape::{self, EscapeError};

/// Why a host's configuration could not be written.
#[derive(Debug, Error)]
pub enum GenerateError {
    /// A value from the Deployment or the catalog cannot be written as Nix.
    #[error("failed to write {field} as Nix: {source}")]
    Escape {
        /// The field, e.g. `settings.registrations`.
        field: String,
        /// What is wrong with it.
        #[source]
        source: EscapeError,
    },
    /// A catalog path is not absolute after joining it to the catalog root.
    #[error("the module path `{0}` is not absolute")]
    RelativeModule(String),
    /// Nobody gave the ACME account's e-mail address, which nixpkgs' ACME module requires.
    #[error(
        "no e-mail address for the ACME account: give the RuntimeEnvironment `spec.acme.email` \
(or the Deployment an `initialUser`)"
    )]
    NoAcmeEmail,
}

/// The folder on hosts the controller writes secret files into (root-owned, 0711).
pub const DEFAULT_SECRETS_DIR: &str = "/var/lib/fediversity-secrets";
/// The secret file of the SMTP relay's password, under the secrets folder.
pub const SMTP_PASSWORD: &str = "smtp-password";
/// The secret file of the object storage's credentials, under the secrets folder.
pub const OBJECT_STORAGE_CREDENTIALS: &str = "object-storage-credentials";

/// What the RuntimeEnvironment provides to a host, as the host sees it: secrets are paths on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEnvironment {
    /// Where the controller writes secret files on the host.
    pub secrets_dir: String,
    /// The ACME account's e-mail address.
    pub acme_email: Option<String>,
    /// The ACME directory URL, when not the default CA.
    pub acme_server: Option<String>,
    /// The SMTP relay.
    pub smtp: Option<crate::api::SmtpSpec>,
    /// Object storage.
    pub object_storage: Option<crate::api::ObjectStorageSpec>,
}

impl Default for HostEnvironment {
    fn default() -> Self {
        Self {
            secrets_dir: DEFAULT_SECRETS_DIR.into(),
            acme_email: None,
            acme_server: None,
            smtp: None,
            object_storage: None,
        }
    }
}

impl HostEnvironment {
    /// The host-side path of the secret file `name`.
    pub fn secret_path(&self, name: &str) -> String {
        format!("{}/{name}", self.secrets_dir.trim_end_matches('/'))
    }

    /// The `fediversity.environment` value: every secret replaced by its path on the host.
    fn to_value(&self, acme_email: &str) -> Value {
        let mut env = Map::new();
        env.insert("secretsDir".into(), Value::String(self.secrets_dir.clone()));
        let mut acme = Map::new();
        acme.insert("email".into(), Value::String(acme_email.to_owned()));
        if let Some(server) = &self.acme_server {
            acme.insert("server".into(), Value::String(server.clone()));
        }
        env.insert("acme".into(), Value::Object(acme));
        if let Some(smtp) = &self.smtp {
            let mut m = Map::new();
            m.insert("host".into(), Value::String(smtp.host.clone()));
            m.insert("port".into(), Value::from(smtp.port));
            if let Some(user) = &smtp.user {
                m.insert("user".into(), Value::String(user.clone()));
            }
            if smtp.password_file.is_some() {
                m.insert(
                    "passwordFile".into(),
                    Value::String(self.secret_path(SMTP_PASSWORD)),
                );
            }
            m.insert("from".into(), Value::String(smtp.from.clone()));
            env.insert("smtp".into(), Value::Object(m));
        }
        if let Some(storage) = &self.object_storage {
            let mut m = Map::new();
            m.insert("endpoint".into(), Value::String(storage.endpoint.clone()));
            m.insert("bucket".into(), Value::String(storage.bucket.clone()));
            if let Some(region) = &storage.region {
                m.insert("region".into(), Value::String(region.clone()));
            }
            m.insert(
                "credentialsFile".into(),
                Value::String(self.secret_path(OBJECT_STORAGE_CREDENTIALS)),
            );
            env.insert("objectStorage".into(), Value::Object(m));
        }
        Value::Object(env)
    }
}

/// Everything that decides one host's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct HostConfig {
    /// The host's name (`<deployment>-<application>`), a DNS label; its `networking.hostName`.
    pub host_name: String,
    /// The application it runs, e.g. `mastodon`: the option set `fediversity.<application>`.
    pub application: String,
    /// The public host name, `<application>.<domain>`.
    pub fqdn: String,
    /// The catalog's base module (SSH, Nix settings, firewall) as an absolute path.
    pub base_module: PathBuf,
    /// The ground of the machine (`nix/proxmox-guest.nix` for a VM cloned from the template); none
    /// for a static host, whose own configuration has it.
    pub platform_module: Option<PathBuf>,
    /// The Application's `nixosModule` as an absolute path.
    pub module: PathBuf,
    /// The e-mail address of the first account and of ACME registration.
    pub admin_email: Option<String>,
    /// The operator's settings, already checked against the Application's schema.
    pub settings: Map<String, Value>,
    /// What the environment provides (ACME, SMTP, object storage, the secrets folder).
    pub environment: HostEnvironment,
    /// The SSH public keys root accepts (the controller's), declared in the system.
    pub root_keys: Vec<String>,
    /// For a host that must start from a snapshot: the file whose existence says the restore is done.
    /// Until it exists, the application's units are held stopped (`fediversity.restoreHold`).
    pub restore_hold: Option<String>,
}

impl HostConfig {
    /// The configuration for `host` of an Application whose module is `nixos_module` (relative to
    /// `catalog_root`, as written in the Application).
    pub fn new(
        catalog_root: &Path,
        host_name: &str,
        application: &str,
        fqdn: &str,
        nixos_module: &str,
        admin_email: Option<&str>,
        settings: &Map<String, Value>,
    ) -> Self {
        Self {
            host_name: host_name.to_owned(),
            application: application.to_owned(),
            fqdn: fqdn.to_owned(),
            base_module: catalog_root.join("nix/base.nix"),
            platform_module: Some(catalog_root.join(PROXMOX_GUEST_MODULE)),
            module: catalog_root.join(nixos_module),
            admin_email: admin_email.map(str::to_owned),
            settings: settings.clone(),
            environment: HostEnvironment::default(),
            root_keys: Vec::new(),
            restore_hold: None,
        }
    }
}

/// The catalog's module for VMs cloned from the project's Proxmox template, relative to the catalog.
pub const PROXMOX_GUEST_MODULE: &str = "nix/proxmox-guest.nix";

fn esc(field: &str, s: &str) -> Result<String, GenerateError> {
    escape::string(s).map_err(|source| GenerateError::Escape {
        field: field.to_owned(),
        source,
    })
}

fn module_path(path: &Path) -> Result<String, GenerateError> {
    let text = path.to_string_lossy();
    if !path.is_absolute() {
        return Err(GenerateError::RelativeModule(text.into_owned()));
    }
    // A path literal cannot carry every character a folder name may hold; `/. + "..."` can.
    Ok(format!("(/. + {})", esc("module", &text)?))
}

/// The Nix text of one host's configuration: a NixOS module (an attribute set) that imports the
/// catalog's modules and sets the values from the Deployment. Pure; every string is escaped.
pub fn generate(host: &HostConfig) -> Result<String, GenerateError> {
    let mut out = String::new();
    out.push_str(&format!(
        "# Generated by the Fediversity controller for host {}, application {}.\n",
        sanitize_comment(&host.host_name),
        sanitize_comment(&host.application)
    ));
    out.push_str("# Do not edit: it is written again whenever the Deployment changes.\n");
    out.push_str("{\n  imports = [\n");
    out.push_str(&format!("    {}\n", module_path(&host.base_module)?));
    if let Some(platform) = &host.platform_module {
        out.push_str(&format!("    {}\n", module_path(platform)?));
    }
    out.push_str(&format!("    {}\n", module_path(&host.module)?));
    out.push_str("  ];\n\n");
    out.push_str(&format!(
        "  networking.hostName = {};\n\n",
        esc("host name", &host.host_name)?
    ));
    let acme_email = host
        .environment
        .acme_email
        .as_deref()
        .or(host.admin_email.as_deref())
        .ok_or(GenerateError::NoAcmeEmail)?;
    let mut environment = String::new();
    escape::write_value(&mut environment, &host.environment.to_value(acme_email), 1).map_err(|source| {
        GenerateError::Escape {
            field: "environment".into(),
            source,
        }
    })?;
    out.push_str(&format!("  fediversity.environment = {environment};\n\n"));
    let mut keys = String::new();
    let keys_value = Value::Array(host.root_keys.iter().cloned().map(Value::String).collect());
    escape::write_value(&mut keys, &keys_value, 1).map_err(|source| GenerateError::Escape {
        field: "ssh public key".into(),
        source,
    })?;
    out.push_str(&format!("  fediversity.rootAuthorizedKeys = {keys};\n\n"));
    if let Some(marker) = &host.restore_hold {
        out.push_str(
            "  # The host starts from a snapshot: its application stays stopped until the restore is done.\n",
        );
        out.push_str(&format!(
            "  fediversity.restoreHold = {{\n    enable = true;\n    marker = {};\n  }};\n\n",
            esc("restore marker", marker)?
        ));
    }
    let app = escape::attr_name(&host.application).map_err(|source| GenerateError::Escape {
        field: "application".into(),
        source,
    })?;
    out.push_str(&format!("  fediversity.{app} = {{\n"));
    out.push_str("    enable = true;\n");
    out.push_str(&format!("    domain = {};\n", esc("domain", &host.fqdn)?));
    if let Some(email) = &host.admin_email {
        out.push_str(&format!("    adminEmail = {};\n", esc("adminEmail", email)?));
    }
    let mut settings = String::new();
    escape::write_value(&mut settings, &Value::Object(host.settings.clone()), 2).map_err(|source| {
        GenerateError::Escape {
            field: "settings".into(),
            source,
        }
    })?;
    out.push_str(&format!("    settings = {settings};\n"));
    out.push_str("  };\n}\n");
    Ok(out)
}

/// Comments end at a newline: keep a name on its line whatever it holds.
fn sanitize_comment(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn host(settings: Value) -> HostConfig {
        HostConfig::new(
            Path::new("/catalog"),
            "uni-mastodon",
            "mastodon",
            "mastodon.social.uu.nl",
            "nix/applications/mastodon.nix",
            Some("social@uu.nl"),
            settings.as_object().unwrap(),
        )
    }

    #[test]
    fn a_host_imports_the_catalog_modules_and_sets_the_deployments_values() {
        let text = generate(&host(
            json!({"registrations": "approval", "singleUserMode": false}),
        ))
        .unwrap();
        assert!(
            text.contains("(/. + \"/catalog/nix/applications/mastodon.nix\")"),
            "{text}"
        );
        assert!(text.contains("networking.hostName = \"uni-mastodon\";"), "{text}");
        assert!(text.contains("      registrations = \"approval\";\n"), "{text}");
    }

    #[test]
    fn a_hostile_setting_cannot_interpolate() {
        let text = generate(&host(
            json!({"registrations": "\"; ${builtins.readFile \"/etc/passwd\"} \""}),
        ))
        .unwrap();
        assert!(
            text.contains(r#"registrations = "\"; \${builtins.readFile \"/etc/passwd\"} \"";"#),
            "{text}"
        );
    }

    #[test]
    fn a_host_that_starts_from_a_snapshot_holds_its_application_until_the_restore_marker_exists() {
        assert!(!generate(&host(json!({}))).unwrap().contains("restoreHold"));
        let mut h = host(json!({}));
        h.restore_hold = Some("/var/lib/fediversity-backup/restored".into());
        let text = generate(&h).unwrap();
        assert!(
            text.contains(
                "  fediversity.restoreHold = {\n    enable = true;\n    marker = \"/var/lib/fediversity-backup/restored\";\n  };\n"
            ),
            "{text}"
        );
        crate::nixos::check_syntax(&text).unwrap();
    }

    #[test]
    fn a_relative_module_path_is_refused() {
        let mut h = host(json!({}));
        h.module = PathBuf::from("nix/x.nix");
        assert!(matches!(generate(&h), Err(GenerateError::RelativeModule(_))));
    }

    #[test]
    fn a_nul_in_a_setting_names_the_field() {
        let err = generate(&host(json!({"registrations": "a\u{0}b"}))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to write settings as Nix: a string contains a NUL character, which Nix strings cannot hold"
        );
    }

    #[test]
    fn a_vm_imports_the_guest_module_and_a_static_host_does_not() {
        let vm = generate(&host(json!({}))).unwrap();
        assert!(vm.contains("(/. + \"/catalog/nix/proxmox-guest.nix\")"), "{vm}");
        let mut h = host(json!({}));
        h.platform_module = None;
        let static_host = generate(&h).unwrap();
        assert!(!static_host.contains("proxmox-guest"), "{static_host}");
    }

    #[test]
    fn the_acme_email_is_the_environments_else_the_first_accounts_else_an_error() {
        let mut h = host(json!({}));
        assert!(generate(&h).unwrap().contains("email = \"social@uu.nl\";"));
        h.environment.acme_email = Some("hostmaster@uu.nl".into());
        assert!(generate(&h).unwrap().contains("email = \"hostmaster@uu.nl\";"));
        h.environment.acme_email = None;
        h.admin_email = None;
        let err = generate(&h).unwrap_err();
        assert!(matches!(err, GenerateError::NoAcmeEmail));
        assert!(err.to_string().contains("spec.acme.email"), "{err}");
    }

    #[test]
    fn secrets_appear_as_host_paths_only() {
        let mut h = host(json!({}));
        h.environment.smtp = Some(crate::api::SmtpSpec {
            host: "smtp.uu.nl".into(),
            port: 587,
            user: Some("u".into()),
            password_file: Some("/controller/only/smtp".into()),
            from: "noreply@uu.nl".into(),
        });
        let text = generate(&h).unwrap();
        assert!(
            text.contains("passwordFile = \"/var/lib/fediversity-secrets/smtp-password\";"),
            "{text}"
        );
        assert!(!text.contains("/controller/only/smtp"), "{text}");
    }
}
