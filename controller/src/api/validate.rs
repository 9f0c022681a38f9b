//! Checks of single values (names, domains, paths, endpoints) and the collector of the problems they find.

use crate::yaml::FieldPath;

/// Problems found in one object, each with the path of the offending field.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(Vec<(FieldPath, String)>);

impl Problems {
    /// Records a problem at `path`.
    pub fn push(&mut self, path: &FieldPath, message: impl Into<String>) {
        self.0.push((path.clone(), message.into()));
    }

    /// Records the problem `check` returns, if any.
    pub fn check(&mut self, path: &FieldPath, check: Result<(), String>) {
        if let Err(message) = check {
            self.push(path, message);
        }
    }

    /// Whether no problem was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems in the order found.
    pub fn into_vec(self) -> Vec<(FieldPath, String)> {
        self.0
    }
}

/// Something that can check itself beyond what its types already guarantee.
pub trait Validate {
    /// Records every problem of `self`, found at `path`, in `problems`.
    fn validate(&self, path: &FieldPath, problems: &mut Problems);
}

/// Longest DNS-1123 label (RFC 1123 §2.1).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest domain name in its text form (RFC 1035 §2.3.4, less the trailing dot).
pub const MAX_DOMAIN_LEN: usize = 253;

fn label_problem(label: &str) -> Option<&'static str> {
    if label.is_empty() {
        Some("is empty")
    } else if label.len() > MAX_LABEL_LEN {
        Some("is longer than 63 characters")
    } else if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("may only contain lowercase letters, digits and '-'")
    } else if label.starts_with('-') || label.ends_with('-') {
        Some("must start and end with a letter or digit")
    } else {
        None
    }
}

/// A DNS-1123 label, as Kubernetes requires of object names: `uni-utrecht`, `mastodon`.
pub fn dns_label(value: &str) -> Result<(), String> {
    match label_problem(value) {
        None => Ok(()),
        Some(why) => Err(format!(
            "`{value}` is not a valid name: it {why} (use 1 to 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit, e.g. `uni-utrecht`)"
        )),
    }
}

/// A fully qualified domain name such as `social.uu.nl`.
pub fn domain(value: &str) -> Result<(), String> {
    let bad = |why: String| {
        Err(format!(
            "`{value}` is not a valid domain name: {why} (e.g. `social.example.org`)"
        ))
    };
    if value.len() > MAX_DOMAIN_LEN {
        return bad(format!("it is longer than {MAX_DOMAIN_LEN} characters"));
    }
    if value.ends_with('.') {
        return bad("drop the trailing dot".into());
    }
    let labels: Vec<&str> = value.split('.').collect();
    if labels.len() < 2 {
        return bad("it needs at least two labels separated by dots".into());
    }
    for label in &labels {
        if let Some(why) = label_problem(label) {
            return bad(format!("its label `{label}` {why}"));
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad("its last label is all digits, which makes it look like an IP address".into());
    }
    Ok(())
}

/// An e-mail address `local@domain`, checked loosely on the local part and strictly on the domain.
pub fn email(value: &str) -> Result<(), String> {
    let Some((local, host)) = value.rsplit_once('@') else {
        return Err(format!("`{value}` is not an e-mail address: it has no `@`"));
    };
    if local.is_empty() || local.len() > 64 || local.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{value}` is not an e-mail address: the part before `@` is not valid"
        ));
    }
    domain(&host.to_ascii_lowercase()).map_err(|e| format!("`{value}` is not an e-mail address: {e}"))
}

/// An absolute path to a file holding a secret. The value itself is never echoed: it may be the secret.
pub fn secret_file(value: &str) -> Result<(), String> {
    if !value.starts_with('/') {
        return Err(
            "must be an absolute path to a file holding the secret (if the secret itself was \
                    pasted here, remove it from the file and rotate it: secrets are never written inline)"
                .into(),
        );
    }
    absolute_path(value)
}

/// An absolute path without `..` components or control characters.
pub fn absolute_path(value: &str) -> Result<(), String> {
    if !value.starts_with('/') {
        return Err(format!("`{value}` must be an absolute path (starting with `/`)"));
    }
    if value.split('/').any(|c| c == "..") {
        return Err(format!("`{value}` must not contain `..`"));
    }
    if value.chars().any(char::is_control) {
        return Err("path contains control characters".into());
    }
    Ok(())
}

/// A path relative to the catalog root, without `..`, such as `nix/applications/mastodon.nix`.
pub fn relative_nix_path(value: &str) -> Result<(), String> {
    if value.starts_with('/') || value.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(format!(
            "`{value}` must be a relative path inside the catalog without `..` (e.g. `nix/applications/mastodon.nix`)"
        ));
    }
    if !value.ends_with(".nix") {
        return Err(format!("`{value}` must name a Nix file ending in `.nix`"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b))
    {
        return Err(format!("`{value}` may only contain letters, digits and `/._-+`"));
    }
    Ok(())
}

/// An `https://host[:port]` (or explicitly insecure `http://`) API endpoint without a path.
pub fn endpoint(value: &str) -> Result<(), String> {
    let bad = |why: &str| {
        // The endpoint may carry a password (`https://root:PASSWORD@host`): it is never echoed.
        Err(format!(
            "`{}` is not a valid endpoint: {why} (e.g. `https://pve1.example.net:8006`)",
            crate::text::redact(value)
        ))
    };
    let Some((scheme, rest)) = value.split_once("://") else {
        return bad("it has no `https://`");
    };
    if scheme != "https" && scheme != "http" {
        return bad("the scheme must be `https` (or `http` for a test cluster)");
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        return bad("credentials do not belong in the URL: give them under `credentials`, from files");
    }
    if authority.contains(['/', '?', '#']) {
        return bad("give only the scheme, host and port: the controller adds `/api2/json` itself");
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, Some(p)),
        _ => (authority, None),
    };
    if host.is_empty() {
        return bad("the host is missing");
    }
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return bad("the port must be a number from 1 to 65535");
    }
    Ok(())
}

/// A SHA-256 certificate fingerprint as Proxmox shows it: 32 hex bytes separated by colons.
pub fn fingerprint(value: &str) -> Result<(), String> {
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() == 32
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a SHA-256 fingerprint: expected 32 hex bytes separated by colons \
             (as shown by `pvenode cert info`)"
        ))
    }
}

/// A Kubernetes label or annotation key: an optional DNS prefix and `/`, then a name of up to 63 characters.
pub fn metadata_key(value: &str) -> Result<(), String> {
    let name = match value.split_once('/') {
        Some((prefix, name)) => {
            domain(prefix).map_err(|e| format!("key prefix: {e}"))?;
            name
        }
        None => value,
    };
    let ok = !name.is_empty()
        && name.len() <= MAX_LABEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a valid key: use up to 63 letters, digits, '-', '_' and '.', optionally after a `domain/` prefix"
        ))
    }
}

/// A Kubernetes label value: up to 63 letters, digits, `-`, `_`, `.`.
pub fn label_value(value: &str) -> Result<(), String> {
    let ok = value.is_empty()
        || (value.len() <= MAX_LABEL_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a valid label value: use up to 63 letters, digits, '-', '_' and '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_follow_rfc_1123() {
        for good in ["a", "uni-utrecht", "m4st0d0n", &"a".repeat(63)] {
            assert_eq!(dns_label(good), Ok(()), "{good}");
        }
        for bad in ["", "Uni", "uni_utrecht", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad}");
        }
        assert!(dns_label("Uni").unwrap_err().contains("lowercase"));
    }

    #[test]
    fn domains_need_two_valid_labels_and_no_numeric_tld() {
        for good in ["social.uu.nl", "a.example", "xn--bcher-kva.example"] {
            assert_eq!(domain(good), Ok(()), "{good}");
        }
        for bad in [
            "localhost",
            "social.uu.nl.",
            "so cial.nl",
            "a..b",
            "10.0.0.1",
            "-a.nl",
            "UPPER.nl",
        ] {
            assert!(domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_file_errors_never_echo_the_value() {
        let err = secret_file("s3cr3t-token-value").unwrap_err();
        assert!(!err.contains("s3cr3t"), "{err}");
        assert_eq!(secret_file("/run/secrets/pve-token"), Ok(()));
    }

    #[test]
    fn endpoints_are_scheme_host_and_port_only() {
        for good in [
            "https://pve1.ams.example.net:8006",
            "http://127.0.0.1:8006/",
            "https://[::1]:8006",
        ] {
            assert_eq!(endpoint(good), Ok(()), "{good}");
        }
        for bad in [
            "pve1:8006",
            "ftp://x",
            "https://x:99999",
            "https://x:8006/api2/json",
            "https://",
        ] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprints_are_32_colon_separated_hex_bytes() {
        let good = vec!["AB"; 32].join(":");
        assert_eq!(fingerprint(&good), Ok(()));
        assert!(fingerprint("AB:CD").is_err());
    }

    #[test]
    fn nix_module_paths_stay_inside_the_catalog() {
        assert_eq!(relative_nix_path("nix/applications/mastodon.nix"), Ok(()));
        for bad in [
            "/etc/x.nix",
            "../x.nix",
            "nix/app.txt",
            "nix/a b.nix",
            "nix//a.nix",
        ] {
            assert!(relative_nix_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_keys_and_values_follow_kubernetes_rules() {
        assert_eq!(metadata_key("app.kubernetes.io/name"), Ok(()));
        assert_eq!(metadata_key("tier"), Ok(()));
        assert!(metadata_key("bad key").is_err());
        assert_eq!(label_value("v1.2_x"), Ok(()));
        assert!(label_value("-x").is_err());
    }

    #[test]
    fn emails_check_the_domain() {
        assert_eq!(email("social@uu.nl"), Ok(()));
        assert!(email("social.uu.nl").is_err());
        assert!(email("a b@uu.nl").is_err());
        assert!(email("a@localhost").is_err());
    }
}
