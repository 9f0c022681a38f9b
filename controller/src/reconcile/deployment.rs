//! The Deployment reconciler's first step: resolve references, check choices, plan hosts.

use std::collections::BTreeMap;

use crate::api::{Application, Deployment, HostStatus, Kind, Name, Object, ObjectKey, reasons};
use crate::runtime::ReconcileError;
use crate::state::DesiredState;

/// How long a Deployment waits for a missing dependency before it looks again on its own (it is also
/// woken at once when the dependency appears).
pub const DEPENDENCY_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

pub use crate::provider::PlannedHost;

/// Plans the hosts of `deployment` given the Applications it names (pure: no I/O). A missing
/// Application is a wait; a choice the Application does not offer is a terminal error.
pub fn plan(
    deployment: &Deployment,
    applications: &BTreeMap<Name, Application>,
) -> Result<Vec<PlannedHost>, ReconcileError> {
    let mut hosts = Vec::new();
    let mut missing = Vec::new();
    let mut invalid = Vec::new();
    for (name, choice) in &deployment.spec.applications {
        if !choice.enabled {
            continue;
        }
        let Some(app) = applications.get(name) else {
            missing.push(name.to_string());
            continue;
        };
        let size_name = match choice.size.as_ref().or_else(|| app.spec.default_size_name()) {
            Some(size) => size.clone(),
            None => {
                invalid.push(format!("Application {name} offers no size"));
                continue;
            }
        };
        let Some(size) = app.spec.sizes.get(&size_name) else {
            let offered: Vec<&str> = app.spec.sizes.keys().map(Name::as_str).collect();
            invalid.push(format!(
                "spec.applications.{name}.size: `{size_name}` is not offered by Application {name} (offered: {})",
                offered.join(", ")
            ));
            continue;
        };
        for (setting, message) in super::settings::check(app.spec.settings.as_ref(), &choice.settings) {
            invalid.push(format!("spec.applications.{name}.settings.{setting}: {message}"));
        }
        hosts.push(PlannedHost {
            name: format!("{}-{name}", deployment.metadata.name),
            application: name.clone(),
            size_name,
            size: *size,
            fqdn: format!("{name}.{}", deployment.spec.domain),
        });
    }
    if !missing.is_empty() {
        return Err(ReconcileError::Waiting {
            reason: reasons::DEPENDENCY_NOT_READY,
            message: format!("waiting for Application {} to exist", missing.join(", ")),
            retry_after: DEPENDENCY_RETRY,
        });
    }
    if !invalid.is_empty() {
        return Err(ReconcileError::Terminal {
            reason: reasons::INVALID_SPEC,
            message: invalid.join("; "),
        });
    }
    for host in &hosts {
        if host.name.len() > crate::api::validate::MAX_LABEL_LEN {
            return Err(ReconcileError::Terminal {
                reason: reasons::INVALID_SPEC,
                message: format!(
                    "host name `{}` is longer than 63 characters; shorten the Deployment's name",
                    host.name
                ),
            });
        }
    }
    Ok(hosts)
}

/// Resolves what a Deployment refers to: its RuntimeEnvironment must exist and be Ready, and every
/// enabled Application must exist. Returns the Applications by name.
pub fn resolve(
    deployment: &Deployment,
    desired: &DesiredState,
    is_ready: impl Fn(&ObjectKey) -> bool,
) -> Result<BTreeMap<Name, Application>, ReconcileError> {
    let env_key = ObjectKey {
        kind: Kind::RuntimeEnvironment,
        name: deployment.spec.runtime_environment.clone(),
    };
    let waiting = |message: String| ReconcileError::Waiting {
        reason: reasons::DEPENDENCY_NOT_READY,
        message,
        retry_after: DEPENDENCY_RETRY,
    };
    if desired.get(&env_key).is_none() {
        return Err(waiting(format!(
            "waiting for RuntimeEnvironment {} to exist",
            env_key.name
        )));
    }
    if !is_ready(&env_key) {
        return Err(waiting(format!(
            "waiting for RuntimeEnvironment {} to become Ready",
            env_key.name
        )));
    }
    let mut applications = BTreeMap::new();
    for name in deployment.spec.applications.keys() {
        let key = ObjectKey {
            kind: Kind::Application,
            name: name.clone(),
        };
        if let Some(Object::Application(app)) = desired.get(&key).map(|d| d.object().clone()) {
            applications.insert(name.clone(), app);
        }
    }
    Ok(applications)
}

/// The status entries of planned hosts, keeping what is already known of each.
pub fn host_statuses(hosts: &[PlannedHost], previous: &[HostStatus]) -> Vec<HostStatus> {
    hosts
        .iter()
        .map(|host| {
            previous
                .iter()
                .find(|h| h.name == host.name)
                .cloned()
                .unwrap_or_else(|| HostStatus {
                    name: host.name.clone(),
                    phase: "Planned".into(),
                    ..HostStatus::default()
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str) -> Application {
        let text = crate::fixtures::application_yaml(name);
        let docs = crate::yaml::parse_documents(&text, &crate::yaml::Limits::default()).unwrap();
        match crate::api::parse_object(&docs[0].1).unwrap() {
            Object::Application(app) => app,
            _ => unreachable!("the fixture is an Application"),
        }
    }

    fn deployment(extra: &str) -> Deployment {
        let text = format!(
            "apiVersion: fediversity.eu/v1alpha1\nkind: Deployment\nmetadata: {{ name: uni }}\nspec:\n  domain: social.uu.nl\n  runtimeEnvironment: env\n  applications:\n{extra}"
        );
        let docs = crate::yaml::parse_documents(&text, &crate::yaml::Limits::default()).unwrap();
        match crate::api::parse_object(&docs[0].1).unwrap() {
            Object::Deployment(d) => d,
            _ => unreachable!("the text is a Deployment"),
        }
    }

    fn catalog(names: &[&str]) -> BTreeMap<Name, Application> {
        names.iter().map(|n| (Name::new(*n), app(n))).collect()
    }

    #[test]
    fn one_host_is_planned_per_enabled_application_with_its_size() {
        let d = deployment(
            "    mastodon: { size: medium }\n    pixelfed: {}\n    peertube: { enabled: false }\n",
        );
        let hosts = plan(&d, &catalog(&["mastodon", "pixelfed"])).unwrap();
        let summary: Vec<(String, String, u32, String)> = hosts
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    h.size_name.to_string(),
                    h.size.cores,
                    h.fqdn.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "uni-mastodon".into(),
                    "medium".into(),
                    4,
                    "mastodon.social.uu.nl".into()
                ),
                (
                    "uni-pixelfed".into(),
                    "medium".into(),
                    4,
                    "pixelfed.social.uu.nl".into()
                ),
            ]
        );
    }

    #[test]
    fn a_missing_application_is_a_wait_not_a_failure() {
        let err = plan(&deployment("    mastodon: {}\n"), &catalog(&[])).unwrap_err();
        assert!(
            matches!(&err, ReconcileError::Waiting { reason, .. } if *reason == reasons::DEPENDENCY_NOT_READY),
            "{err:?}"
        );
        assert!(err.to_string().contains("Application mastodon"));
    }

    #[test]
    fn a_size_the_application_does_not_offer_stalls_the_deployment() {
        let err = plan(
            &deployment("    mastodon: { size: huge }\n"),
            &catalog(&["mastodon"]),
        )
        .unwrap_err();
        assert!(matches!(err, ReconcileError::Terminal { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("`huge` is not offered by Application mastodon (offered: medium, small)"),
            "{err}"
        );
    }

    #[test]
    fn settings_outside_the_applications_schema_stall_the_deployment() {
        let err = plan(
            &deployment("    mastodon: { settings: { singleUserMode: 1 } }\n"),
            &catalog(&["mastodon"]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("settings.singleUserMode: expected boolean, found the number 1"),
            "{err}"
        );
    }

    #[test]
    fn known_host_facts_are_kept_when_planning_again() {
        let d = deployment("    mastodon: {}\n");
        let hosts = plan(&d, &catalog(&["mastodon"])).unwrap();
        let known = HostStatus {
            name: "uni-mastodon".into(),
            phase: "Ready".into(),
            vmid: Some(20001),
            ..HostStatus::default()
        };
        assert_eq!(host_statuses(&hosts, std::slice::from_ref(&known)), vec![known]);
    }
}
