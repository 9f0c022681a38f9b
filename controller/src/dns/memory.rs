//! An in-memory zone with RFC 2136 semantics, for the demo: the same guarded changes, applied in process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::plan::{Addresses, Change, Observed, Operation, Prerequisite, Rdata, RecordType};
use super::{Applied, DnsError, ZoneClient};
use crate::runtime::BoxFuture;

/// One zone's records, by name, kept in memory. Prerequisites and updates behave as on a primary server.
pub struct MemoryZone {
    zone: String,
    names: Mutex<BTreeMap<String, BTreeSet<Rdata>>>,
}

fn kind(data: &Rdata) -> RecordType {
    match data {
        Rdata::A(_) => RecordType::A,
        Rdata::Aaaa(_) => RecordType::Aaaa,
        Rdata::Txt(_) => RecordType::Txt,
    }
}

impl MemoryZone {
    /// An empty zone `zone` (e.g. `hosting.example`).
    pub fn new(zone: &str) -> Self {
        Self {
            zone: format!("{}.", zone.trim_end_matches('.')),
            names: Mutex::new(BTreeMap::new()),
        }
    }

    /// Every record, as `name TYPE value` lines in name order.
    pub fn records(&self) -> Vec<String> {
        let names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names
            .iter()
            .flat_map(|(name, set)| {
                set.iter().map(move |d| match d {
                    Rdata::A(a) => format!("{name} A {a}"),
                    Rdata::Aaaa(a) => format!("{name} AAAA {a}"),
                    Rdata::Txt(t) => format!("{name} TXT \"{t}\""),
                })
            })
            .collect()
    }

    fn observe_now(&self, name: &str) -> Observed {
        let names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let set = names.get(name).cloned().unwrap_or_default();
        let mut out = Observed {
            addresses: Addresses::default(),
            txt: BTreeSet::new(),
        };
        for data in set {
            match data {
                Rdata::A(a) => {
                    out.addresses.v4.insert(a);
                }
                Rdata::Aaaa(a) => {
                    out.addresses.v6.insert(a);
                }
                Rdata::Txt(t) => {
                    out.txt.insert(t);
                }
            }
        }
        out
    }

    fn apply_now(&self, change: &Change) -> Result<Applied, DnsError> {
        let in_zone = change.name == self.zone || change.name.ends_with(&format!(".{}", self.zone));
        if !in_zone {
            return Err(DnsError::ZoneNotServed {
                server: "in-memory".into(),
                zone: self.zone.trim_end_matches('.').to_owned(),
                why: "NOTZONE".into(),
            });
        }
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = names.get(&change.name).cloned().unwrap_or_default();
        let of = |t: RecordType| -> BTreeSet<&Rdata> { current.iter().filter(|d| kind(d) == t).collect() };
        for prerequisite in &change.prerequisites {
            let failed = match prerequisite {
                Prerequisite::NameNotInUse => (!current.is_empty()).then_some("YXDOMAIN"),
                // The apex always holds its SOA, which this zone does not model.
                Prerequisite::NameInUse if change.name == self.zone => None,
                Prerequisite::NameInUse => current.is_empty().then_some("NXDOMAIN"),
                Prerequisite::RrsetAbsent(t) => (!of(*t).is_empty()).then_some("YXRRSET"),
                Prerequisite::RrsetEquals(t, values) => {
                    (of(*t) != values.iter().collect::<BTreeSet<_>>()).then_some("NXRRSET")
                }
            };
            if let Some(code) = failed {
                return Ok(Applied::PrerequisiteFailed(code.into()));
            }
        }
        let set = names.entry(change.name.clone()).or_default();
        for operation in &change.operations {
            match operation {
                Operation::Add(data) => {
                    set.insert(data.clone());
                }
                Operation::DeleteRrset(t) => set.retain(|d| kind(d) != *t),
                Operation::DeleteRecord(data) => {
                    set.remove(data);
                }
            }
        }
        if set.is_empty() {
            names.remove(&change.name);
        }
        Ok(Applied::Done)
    }
}

impl ZoneClient for MemoryZone {
    fn observe(&self, name: &str) -> BoxFuture<Result<Observed, DnsError>> {
        let observed = self.observe_now(name);
        Box::pin(async move { Ok(observed) })
    }

    fn apply(&self, change: &Change) -> BoxFuture<Result<Applied, DnsError>> {
        let result = self.apply_now(change);
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::plan::{Decision, decide};

    #[tokio::test]
    async fn the_memory_zone_refuses_what_a_primary_server_refuses() {
        let zone = MemoryZone::new("hosting.example");
        let name = "uni-mastodon.hosting.example.";
        let want = Addresses::of(["192.0.2.1".parse().unwrap()]);
        let Decision::Apply(_, claim) = decide(
            name,
            Some(&want),
            &Observed::default(),
            "heritage=fediversity,x",
            60,
        ) else {
            panic!()
        };
        assert_eq!(zone.apply(&claim).await.unwrap(), Applied::Done);
        assert_eq!(
            zone.apply(&claim).await.unwrap(),
            Applied::PrerequisiteFailed("YXDOMAIN".into()),
            "a second claim finds the name in use"
        );
        assert_eq!(
            zone.records(),
            vec![
                format!("{name} A 192.0.2.1"),
                format!("{name} TXT \"heritage=fediversity,x\"")
            ]
        );
        let elsewhere = Change {
            name: "a.other.example.".into(),
            ..claim
        };
        assert!(matches!(
            zone.apply(&elsewhere).await,
            Err(DnsError::ZoneNotServed { .. })
        ));
    }
}
