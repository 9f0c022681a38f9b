//! What an environment provides to every deployment: the ACME account, an SMTP relay, object storage.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validate::{self, Problems};
use crate::yaml::FieldPath;

/// The ACME account certificates are requested with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AcmeSpec {
    /// The account's e-mail address (the CA writes about expiring certificates to it).
    pub email: String,
    /// The CA's directory URL, e.g. Let's Encrypt's staging one; the default CA when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// The SMTP relay applications send mail through (confirmations, password resets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SmtpSpec {
    /// The relay's host name.
    pub host: String,
    /// Its port: 587 (STARTTLS, the default) or 465 (TLS).
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// The login, when the relay wants one (then give `passwordFile` too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The file on the controller's machine holding the password; delivered to hosts as a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// The sender address, e.g. `notifications@example.net`.
    pub from: String,
}

fn default_smtp_port() -> u16 {
    587
}

/// S3-compatible object storage, for the applications that can keep media there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectStorageSpec {
    /// The S3 endpoint, `https://HOST[:PORT]`.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// The region (`us-east-1` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The file on the controller's machine with `AWS_ACCESS_KEY_ID=` and `AWS_SECRET_ACCESS_KEY=` lines.
    pub credentials_file: String,
}

/// Checks the environment's services; `path` is the spec's path.
pub fn validate(
    acme: Option<&AcmeSpec>,
    smtp: Option<&SmtpSpec>,
    object_storage: Option<&ObjectStorageSpec>,
    path: &FieldPath,
    problems: &mut Problems,
) {
    if let Some(acme) = acme {
        let at = path.key("acme");
        problems.check(&at.key("email"), validate::email(&acme.email));
        if let Some(server) = &acme.server
            && (!server.starts_with("https://") || server.contains(char::is_whitespace))
        {
            problems.push(
                &at.key("server"),
                format!(
                    "`{server}` is not an ACME directory URL: expected `https://…`, e.g. \
`https://acme-staging-v02.api.letsencrypt.org/directory`"
                ),
            );
        }
    }
    if let Some(smtp) = smtp {
        let at = path.key("smtp");
        if !plain_host(&smtp.host) {
            problems.push(
                &at.key("host"),
                format!("`{}` is not a host name (e.g. `smtp.example.net`)", smtp.host),
            );
        }
        if smtp.port == 0 {
            problems.push(&at.key("port"), "the port must be from 1 to 65535 (587 or 465)");
        }
        problems.check(&at.key("from"), validate::email(&smtp.from));
        match (&smtp.user, &smtp.password_file) {
            (Some(user), Some(file)) => {
                if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    problems.push(&at.key("user"), "the login must not be empty or contain spaces");
                }
                problems.check(&at.key("passwordFile"), validate::secret_file(file));
            }
            (None, None) => {}
            (Some(_), None) => problems.push(
                &at.key("passwordFile"),
                "give the file holding the password of `user`",
            ),
            (None, Some(_)) => problems.push(&at.key("user"), "give the login that goes with `passwordFile`"),
        }
    }
    if let Some(storage) = object_storage {
        let at = path.key("objectStorage");
        problems.check(&at.key("endpoint"), validate::endpoint(&storage.endpoint));
        let bucket_ok = (3..=63).contains(&storage.bucket.len())
            && storage
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !bucket_ok {
            problems.push(
                &at.key("bucket"),
                format!(
                    "`{}` is not an S3 bucket name: 3 to 63 lower-case letters, digits, `-` and `.`",
                    storage.bucket
                ),
            );
        }
        if let Some(region) = &storage.region
            && (region.is_empty() || !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            problems.push(
                &at.key("region"),
                format!("`{region}` is not a region name (e.g. `eu-west-1`)"),
            );
        }
        problems.check(
            &at.key("credentialsFile"),
            validate::secret_file(&storage.credentials_file),
        );
    }
}

/// A host name or address without spaces, scheme or path.
fn plain_host(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(
        acme: Option<AcmeSpec>,
        smtp: Option<SmtpSpec>,
        storage: Option<ObjectStorageSpec>,
    ) -> Vec<String> {
        let mut problems = Problems::default();
        validate(
            acme.as_ref(),
            smtp.as_ref(),
            storage.as_ref(),
            &FieldPath::root().key("spec"),
            &mut problems,
        );
        problems
            .into_vec()
            .into_iter()
            .map(|(p, m)| format!("{p}: {m}"))
            .collect()
    }

    fn smtp() -> SmtpSpec {
        SmtpSpec {
            host: "smtp.example.net".into(),
            port: 587,
            user: Some("mailer".into()),
            password_file: Some("/etc/fediversity/smtp-password".into()),
            from: "noreply@example.net".into(),
        }
    }

    #[test]
    fn well_formed_services_pass() {
        let acme = AcmeSpec {
            email: "hostmaster@example.net".into(),
            server: Some("https://acme-staging-v02.api.letsencrypt.org/directory".into()),
        };
        let storage = ObjectStorageSpec {
            endpoint: "https://s3.example.net".into(),
            bucket: "media-1".into(),
            region: None,
            credentials_file: "/etc/fediversity/s3.env".into(),
        };
        assert_eq!(
            problems_of(Some(acme), Some(smtp()), Some(storage)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn an_inline_smtp_password_is_refused_without_being_echoed() {
        let mut s = smtp();
        s.password_file = Some("hunter2-secret".into());
        let problems = problems_of(None, Some(s), None);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("spec.smtp.passwordFile: "),
            "{problems:?}"
        );
        assert!(!problems[0].contains("hunter2"), "{problems:?}");
    }

    #[test]
    fn a_login_without_a_password_file_names_the_missing_field() {
        let mut s = smtp();
        s.password_file = None;
        assert_eq!(
            problems_of(None, Some(s), None),
            vec!["spec.smtp.passwordFile: give the file holding the password of `user`".to_owned()]
        );
    }

    #[test]
    fn a_bad_acme_email_server_and_bucket_are_each_named() {
        let acme = AcmeSpec {
            email: "nobody".into(),
            server: Some("http://ca".into()),
        };
        let storage = ObjectStorageSpec {
            endpoint: "https://s3.example.net".into(),
            bucket: "Bad_Bucket".into(),
            region: None,
            credentials_file: "/x".into(),
        };
        let problems = problems_of(Some(acme), None, Some(storage));
        let fields: Vec<&str> = problems.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            ["spec.acme.email", "spec.acme.server", "spec.objectStorage.bucket"],
            "{problems:?}"
        );
    }
}
