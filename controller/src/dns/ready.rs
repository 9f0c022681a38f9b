//! What the operator must set at their own domain, and whether it leads to the hosts (`DNSReady`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::Resolver;
use crate::api::{ConditionStatus, DnsRecordStatus, OperatorRecord};
use crate::provider::PlannedHost;

/// The `DNSReady` condition: status, reason, message.
pub type ReadyCondition = (ConditionStatus, &'static str, String);

/// The records the operator must set, and whether they resolve to the hosts (`DNSReady`).
pub async fn operator_records(
    resolver: Option<&dyn Resolver>,
    planned: &[PlannedHost],
    entries: &BTreeMap<String, DnsRecordStatus>,
) -> (Vec<OperatorRecord>, ReadyCondition) {
    let mut records = Vec::new();
    let mut missing = Vec::new();
    let mut failures = Vec::new();
    let mut waiting = false;
    for host in planned {
        let Some(entry) = entries.get(&host.name) else {
            continue;
        };
        let name = format!("{}.", host.fqdn);
        let mut record = OperatorRecord {
            name: name.clone(),
            type_: "CNAME".into(),
            value: entry.name.clone(),
            at_apex: entry
                .addresses
                .iter()
                .map(|a| {
                    let kind = if a.contains(':') { "AAAA" } else { "A" };
                    format!("{kind} {a}")
                })
                .collect(),
            resolves: None,
        };
        if entry.state != "Published" {
            waiting = true;
        } else if let Some(resolver) = resolver {
            let want: Vec<IpAddr> = entry.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            match resolver.resolve(&name).await {
                Ok(found) => {
                    let ok = !want.is_empty() && want.iter().all(|a| found.contains(a));
                    record.resolves = Some(ok);
                    if !ok {
                        missing.push(format!("{name} CNAME {}", entry.name));
                    }
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        records.push(record);
    }
    let condition = if resolver.is_none() {
        (
            ConditionStatus::Unknown,
            "NotChecked",
            "spec.dns.resolver is not set: the operator's names are not checked".to_owned(),
        )
    } else if !failures.is_empty() {
        (
            ConditionStatus::Unknown,
            "ResolverFailed",
            format!("the resolver could not be asked: {}", failures.join("; ")),
        )
    } else if !missing.is_empty() {
        (
            ConditionStatus::False,
            "OperatorRecordsMissing",
            format!(
                "waiting for the operator's DNS: set {} at your domain (an A record with the host's address where a CNAME is impossible, at a zone apex)",
                missing.join(", ")
            ),
        )
    } else if waiting || records.is_empty() {
        (
            ConditionStatus::Unknown,
            "WaitingForNames",
            "the hosts' names are not all published yet".to_owned(),
        )
    } else {
        (
            ConditionStatus::True,
            "Resolving",
            format!("{} operator name(s) resolve to their hosts", records.len()),
        )
    };
    (records, condition)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Name, Size};
    use crate::dns::DnsError;
    use crate::runtime::BoxFuture;

    /// A resolver double: every name leads to the given addresses.
    struct Answers(Vec<IpAddr>);

    impl Resolver for Answers {
        fn resolve(&self, _name: &str) -> BoxFuture<Result<Vec<IpAddr>, DnsError>> {
            let found = self.0.clone();
            Box::pin(async move { Ok(found) })
        }
    }

    fn planned() -> Vec<PlannedHost> {
        vec![PlannedHost {
            name: "uni-mastodon".into(),
            application: Name::new("mastodon"),
            size_name: Name::new("small"),
            size: Size {
                cores: 2,
                memory_mib: 4096,
                disk_gib: 40,
            },
            fqdn: "mastodon.social.uu.nl".into(),
        }]
    }

    fn published() -> BTreeMap<String, DnsRecordStatus> {
        let entry = DnsRecordStatus {
            host: "uni-mastodon".into(),
            name: "uni-mastodon.hosting.example.".into(),
            addresses: vec!["203.0.113.5".into()],
            state: "Published".into(),
            message: None,
        };
        BTreeMap::from([("uni-mastodon".to_owned(), entry)])
    }

    #[tokio::test]
    async fn the_operator_is_told_the_cname_and_dns_ready_waits_until_it_leads_to_the_host() {
        let elsewhere = Answers(vec!["198.51.100.1".parse().unwrap()]);
        let (records, (status, reason, message)) =
            operator_records(Some(&elsewhere), &planned(), &published()).await;
        assert_eq!(records[0].name, "mastodon.social.uu.nl.");
        assert_eq!(records[0].value, "uni-mastodon.hosting.example.");
        assert_eq!(records[0].at_apex, vec!["A 203.0.113.5"]);
        assert_eq!(records[0].resolves, Some(false));
        assert_eq!(
            (status, reason),
            (ConditionStatus::False, "OperatorRecordsMissing")
        );
        assert!(
            message.contains("set mastodon.social.uu.nl. CNAME uni-mastodon.hosting.example. at your domain"),
            "{message}"
        );

        let ours = Answers(vec!["203.0.113.5".parse().unwrap()]);
        let (records, (status, ..)) = operator_records(Some(&ours), &planned(), &published()).await;
        assert_eq!(status, ConditionStatus::True);
        assert_eq!(records[0].resolves, Some(true));

        let (_, (status, reason, _)) = operator_records(None, &planned(), &published()).await;
        assert_eq!((status, reason), (ConditionStatus::Unknown, "NotChecked"));
    }
}
