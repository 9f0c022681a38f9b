//! Checks of the schema's named formats and property strings, with PVE::JSONSchema's messages.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{LazyLock, Mutex};

use regex::Regex;

use crate::schema::{ParamType, SubKeySpec};

/// Compiled regular expressions, by source text (schema patterns are few and fixed).
static REGEXES: LazyLock<Mutex<HashMap<String, Option<Regex>>>> = LazyLock::new(Default::default);

/// Whether the whole of `value` matches `pattern` (anchored, as Perl's `^(?:…)$`).
pub fn matches_whole(pattern: &str, value: &str) -> bool {
    let mut cache = REGEXES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let re = cache
        .entry(pattern.to_string())
        .or_insert_with(|| Regex::new(&format!("^(?:{pattern})$")).ok());
    re.as_ref().is_some_and(|re| re.is_match(value))
}

const NODE_RE: &str = r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?";
const DNS_RE: &str = r"([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?";
/// `PVE::JSONSchema`'s tag pattern (case-insensitive).
pub const TAG_RE: &str = r"(?i)[a-z0-9_][a-z0-9_\-+.]*";
const URLENCODED_RE: &str = r"[-%a-zA-Z0-9_.!~*'()]*";
const CONFIGID_RE: &str = r"(?i)[a-z][a-z0-9_]+";
const STORAGE_ID_RE: &str = r"(?i)[a-z][a-z0-9\-_.]*[a-z0-9]";
const POOL_RE: &str = r"[A-Za-z0-9_\-]+";
const MAC_RE: &str = r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}";

/// Checks `value` against the named `format`; the error is the text after `invalid format - `.
/// Formats the simulator does not model are accepted.
pub fn check_named(format: &str, value: &str) -> Result<(), String> {
    let ok = |b: bool, msg: String| if b { Ok(()) } else { Err(msg) };
    match format {
        "pve-vmid" => ok(
            value.parse::<u32>().is_ok(),
            "value does not look like a valid VM ID".into(),
        ),
        "pve-node" => ok(
            matches_whole(NODE_RE, value),
            "value does not look like a valid node name".into(),
        ),
        "dns-name" => ok(
            matches_whole(DNS_RE, value),
            "value does not look like a valid DNS name".into(),
        ),
        "pve-tag-list" => split_list(value).try_for_each(|t| {
            ok(
                matches_whole(TAG_RE, t),
                format!("invalid characters in tag '{t}'"),
            )
        }),
        "urlencoded" => ok(
            matches_whole(URLENCODED_RE, value),
            format!("invalid urlencoded string: {value}"),
        ),
        "pve-configid" => ok(
            matches_whole(CONFIGID_RE, value),
            format!("invalid configuration ID '{value}'"),
        ),
        "pve-configid-list" => split_list(value).try_for_each(|id| {
            ok(
                matches_whole(CONFIGID_RE, id),
                format!("invalid configuration ID '{id}'"),
            )
        }),
        "pve-storage-id" => ok(
            matches_whole(STORAGE_ID_RE, value),
            format!("storage ID '{value}' contains illegal characters"),
        ),
        "pve-poolid" => ok(
            matches_whole(POOL_RE, value),
            format!("pool name '{value}' contains illegal characters"),
        ),
        "pve-realm" => ok(
            matches_whole(r"[A-Za-z][A-Za-z0-9\.\-_]+", value),
            "invalid realm name".into(),
        ),
        "mac-addr" => {
            let unicast = u8::from_str_radix(value.get(..2).unwrap_or("01"), 16).is_ok_and(|b| b & 1 == 0);
            ok(
                matches_whole(MAC_RE, value) && unicast,
                "value does not look like a valid unicast MAC address".into(),
            )
        }
        "address-list" => split_list(value).try_for_each(|a| {
            ok(
                a.parse::<std::net::IpAddr>().is_ok(),
                format!("value '{a}' does not look like a valid IP address"),
            )
        }),
        "CIDR" => ok(
            parse_cidr(value).is_some(),
            "value does not look like a valid CIDR network".into(),
        ),
        "pve-qm-ipconfig" => check_ipconfig(value),
        _ => Ok(()),
    }
}

/// Splits a `;`/`,`/space separated list, dropping empty items.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split([';', ',', ' ', '\0']).filter(|s| !s.is_empty())
}

fn parse_cidr(value: &str) -> Option<(std::net::IpAddr, u8)> {
    let (ip, prefix) = value.split_once('/')?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

fn check_ipconfig(value: &str) -> Result<(), String> {
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let Some((key, v)) = part.split_once('=') else {
            return Err(format!("format error\n{part}: property is not defined in schema"));
        };
        let valid = match key {
            "ip" => v == "dhcp" || parse_cidr(v).is_some_and(|(ip, _)| ip.is_ipv4()),
            "ip6" => v == "dhcp" || v == "auto" || parse_cidr(v).is_some_and(|(ip, _)| ip.is_ipv6()),
            "gw" => v.parse::<Ipv4Addr>().is_ok(),
            "gw6" => v.parse::<Ipv6Addr>().is_ok(),
            _ => {
                return Err(format!(
                    "format error\n{key}: property is not defined in schema and the schema does not allow additional properties"
                ));
            }
        };
        if !valid {
            return Err(format!(
                "format error\n{key}: invalid format - value does not look like a valid address: {v}"
            ));
        }
    }
    Ok(())
}

/// Checks a boolean the way `PVE::JSONSchema` does, returning `1`/`0`.
pub fn parse_bool(value: &str) -> Option<&'static str> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Some("1"),
        "0" | "off" | "no" | "false" => Some("0"),
        _ => None,
    }
}

/// Checks a value against a type, bounds and enumeration, returning the normalised value.
pub fn check_typed(
    ty: ParamType,
    value: &str,
    minimum: Option<i64>,
    maximum: Option<i64>,
    enumeration: Option<&[String]>,
) -> Result<String, String> {
    let type_error = || format!("type check ('{}') failed - got '{value}'", ty.name());
    let normalised = match ty {
        ParamType::Boolean => parse_bool(value).ok_or_else(type_error)?.to_string(),
        ParamType::Integer | ParamType::Number => {
            let pattern = if ty == ParamType::Integer {
                r"-?\d+"
            } else {
                r"-?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?"
            };
            if !matches_whole(pattern, value) {
                return Err(type_error());
            }
            let n: f64 = value.parse().map_err(|_| type_error())?;
            if let Some(min) = minimum.filter(|m| n < *m as f64) {
                return Err(format!("value must have a minimum value of {min}"));
            }
            if let Some(max) = maximum.filter(|m| n > *m as f64) {
                return Err(format!("value must have a maximum value of {max}"));
            }
            value.to_string()
        }
        ParamType::String => value.to_string(),
    };
    if let Some(list) = enumeration.filter(|l| !l.iter().any(|e| e == value)) {
        return Err(format!(
            "value '{value}' does not have a value in the enumeration '{}'",
            list.join(", ")
        ));
    }
    Ok(normalised)
}

/// A parsed property string: canonical key → value.
pub type PropertyString = BTreeMap<String, String>;

/// Parses and checks a property string (`virtio=BC:24:11:00:00:01,bridge=vmbr0`) against its keys.
/// The error is the text after `invalid format - `.
pub fn parse_property_string(
    keys: &BTreeMap<String, SubKeySpec>,
    value: &str,
) -> Result<PropertyString, String> {
    let format_error = |key: &str, msg: &str| format!("format error\n{key}: {msg}");
    let mut out = PropertyString::new();
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let (key, v) = match part.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match keys.iter().find(|(_, s)| s.default_key) {
                Some((k, _)) => (k.clone(), part.to_string()),
                None => return Err(format_error(part, "property is not defined in schema")),
            },
        };
        let Some(spec) = keys.get(&key) else {
            return Err(format_error(
                &key,
                "property is not defined in schema and the schema does not allow additional properties",
            ));
        };
        let (key, v) = match (&spec.alias, &spec.key_alias) {
            (Some(alias), Some(key_alias)) => {
                insert_unique(&mut out, key_alias, key.clone())?;
                (alias.clone(), v)
            }
            (Some(alias), None) => (alias.clone(), v),
            _ => (key, v),
        };
        let spec = keys.get(&key).unwrap_or(spec);
        let v = match spec.ty {
            Some(ty) => check_typed(ty, &v, spec.minimum, spec.maximum, spec.enumeration.as_deref())
                .map_err(|e| format_error(&key, &e))?,
            None => v,
        };
        if let Some(format) = &spec.format {
            check_named(format, &v).map_err(|e| format_error(&key, &format!("invalid format - {e}")))?;
        }
        insert_unique(&mut out, &key, v)?;
    }
    if let Some((key, _)) = keys
        .iter()
        .find(|(k, s)| !s.optional && s.ty.is_some() && !out.contains_key(*k))
    {
        return Err(format_error(key, "property is missing and it is not optional"));
    }
    Ok(out)
}

fn insert_unique(out: &mut PropertyString, key: &str, value: String) -> Result<(), String> {
    if out.insert(key.to_string(), value).is_some() {
        return Err(format!(
            "format error\n{key}: duplicate key in comma-separated list property"
        ));
    }
    Ok(())
}

/// Normalises a tag list as `PVE::GuestHelpers::get_unique_tags` does: lower-cased, de-duplicated,
/// sorted, joined with `;`.
pub fn normalise_tags(value: &str) -> String {
    let mut tags: Vec<String> = split_list(value).map(str::to_lowercase).collect();
    tags.sort();
    tags.dedup();
    tags.join(";")
}

/// Percent-decodes a strictly encoded string (as Perl's `uri_unescape`).
pub fn uri_unescape(value: &str) -> String {
    percent_encoding::percent_decode_str(value)
        .decode_utf8_lossy()
        .into_owned()
}

/// Whether every non-empty, non-comment line is an OpenSSH public key (`[options] type base64 [comment]`).
pub fn valid_ssh_public_keys(keys: &str) -> bool {
    keys.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .all(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.windows(2).any(|w| {
                let known = ["ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-"]
                    .iter()
                    .any(|p| w[0].starts_with(p));
                known && w[1].len() >= 16 && matches_whole(r"[A-Za-z0-9+/]+={0,3}", w[1])
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_of_the_route_table_and_of_this_module_compiles() {
        let table = &crate::schema::ROUTE_TABLE;
        let patterns = table
            .routes
            .iter()
            .flat_map(|r| r.params.values())
            .filter_map(|p| p.pattern.as_deref());
        let own = [
            NODE_RE,
            DNS_RE,
            TAG_RE,
            URLENCODED_RE,
            CONFIGID_RE,
            STORAGE_ID_RE,
            POOL_RE,
            MAC_RE,
        ];
        for pattern in patterns.chain(own) {
            assert!(Regex::new(pattern).is_ok(), "{pattern}");
        }
    }

    #[test]
    fn mixed_case_tags_are_valid() {
        assert!(check_named("pve-tag-list", "Fediversity;owner-A").is_ok());
        assert!(check_named("pve-tag-list", "bad/tag").is_err());
    }

    #[test]
    fn tags_are_lowercased_deduplicated_and_sorted() {
        assert_eq!(
            normalise_tags("Web,fediversity;web owner-a"),
            "fediversity;owner-a;web"
        );
    }

    #[test]
    fn sshkeys_with_a_plus_for_space_are_not_urlencoded() {
        assert!(check_named("urlencoded", "ssh-ed25519%20AAAA").is_ok());
        assert!(check_named("urlencoded", "ssh-ed25519 AAAA").is_err());
    }

    #[test]
    fn booleans_accept_perl_spellings() {
        assert_eq!(parse_bool("On"), Some("1"));
        assert_eq!(parse_bool("false"), Some("0"));
        assert_eq!(parse_bool("maybe"), None);
    }

    #[test]
    fn integer_bounds_use_the_schema_messages() {
        let err = check_typed(ParamType::Integer, "99", Some(100), None, None).unwrap_err();
        assert_eq!(err, "value must have a minimum value of 100");
        let err = check_typed(ParamType::Integer, "abc", None, None, None).unwrap_err();
        assert_eq!(err, "type check ('integer') failed - got 'abc'");
    }

    #[test]
    fn ssh_keys_are_recognised_and_garbage_is_not() {
        assert!(valid_ssh_public_keys(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE0 user@host\n"
        ));
        assert!(!valid_ssh_public_keys("hello world"));
    }
}
