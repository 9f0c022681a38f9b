//! The pure DNS planner: what a host's name should hold, and the guarded RFC 2136 change that gets it there.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addresses one name should point at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    /// A records.
    pub v4: BTreeSet<Ipv4Addr>,
    /// AAAA records.
    pub v6: BTreeSet<Ipv6Addr>,
}

impl Addresses {
    /// The addresses in `ips`, split by family.
    pub fn of(ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut out = Self::default();
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => {
                    out.v4.insert(v4);
                }
                IpAddr::V6(v6) => {
                    out.v6.insert(v6);
                }
            }
        }
        out
    }

    /// Whether there is no address at all.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Every address, IPv4 first.
    pub fn all(&self) -> Vec<IpAddr> {
        self.v4
            .iter()
            .copied()
            .map(IpAddr::V4)
            .chain(self.v6.iter().copied().map(IpAddr::V6))
            .collect()
    }
}

impl fmt::Display for Addresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.all().iter().map(ToString::to_string).collect();
        if all.is_empty() {
            f.write_str("no address")
        } else {
            f.write_str(&all.join(", "))
        }
    }
}

/// What the authoritative server holds at one name (the types the controller manages).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The A and AAAA records.
    pub addresses: Addresses,
    /// The TXT records, each as its strings joined.
    pub txt: BTreeSet<String>,
}

impl Observed {
    /// Whether the name holds none of the managed types.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.txt.is_empty()
    }
}

/// Record data the controller writes or compares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rdata {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// One TXT string.
    Txt(String),
}

/// The record types the controller manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecordType {
    /// IPv4 address.
    A,
    /// IPv6 address.
    Aaaa,
    /// Text (the ownership mark).
    Txt,
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::A => "A",
            Self::Aaaa => "AAAA",
            Self::Txt => "TXT",
        })
    }
}

/// An RFC 2136 prerequisite (§2.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prerequisite {
    /// §2.4.5: no record of any type exists at the name.
    NameNotInUse,
    /// §2.4.4: some record exists at the name (the zone's apex always has its SOA).
    NameInUse,
    /// §2.4.2: the RRset of this type holds exactly these values.
    RrsetEquals(RecordType, Vec<Rdata>),
    /// §2.4.3: no record of this type exists at the name.
    RrsetAbsent(RecordType),
}

/// An RFC 2136 update operation (§2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// §2.5.1: add a record.
    Add(Rdata),
    /// §2.5.2: delete the whole RRset of a type.
    DeleteRrset(RecordType),
    /// §2.5.4: delete one record.
    DeleteRecord(Rdata),
}

/// One atomic, guarded update of one name: applied in full only if every prerequisite holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The fully qualified name, with its trailing dot.
    pub name: String,
    /// What must hold on the server.
    pub prerequisites: Vec<Prerequisite>,
    /// What is changed.
    pub operations: Vec<Operation>,
    /// The TTL of added records.
    pub ttl: u32,
}

/// What a change does, for events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The name is claimed and its records created.
    Create,
    /// Our records get new addresses.
    Update,
    /// Our records are removed.
    Delete,
}

impl ChangeKind {
    /// The metric label of a successful change: `created`, `updated` or `deleted`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Create => "created",
            Self::Update => "updated",
            Self::Delete => "deleted",
        }
    }
}

/// What the planner decided for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The server already holds what is desired (or nothing, and nothing is desired).
    InSync,
    /// Send this change.
    Apply(ChangeKind, Change),
    /// The name holds records without our ownership mark: never touched, reported.
    Foreign(String),
}

/// Decides what to do with `name`, given what should be there (`None`: the host is gone) and what the
/// server holds. A name is ours only if it carries exactly our ownership TXT `owner`; every change is
/// guarded by prerequisites on what was observed, so a concurrent change makes the server refuse it.
pub fn decide(
    name: &str,
    desired: Option<&Addresses>,
    observed: &Observed,
    owner: &str,
    ttl: u32,
) -> Decision {
    let ours = observed.txt.contains(owner);
    let change = |prerequisites, operations| Change {
        name: name.to_owned(),
        prerequisites,
        operations,
        ttl,
    };
    match desired {
        Some(want) if want.is_empty() => Decision::InSync,
        Some(want) if observed.is_empty() => {
            let mut ops: Vec<Operation> = rdata(want).into_iter().map(Operation::Add).collect();
            ops.push(Operation::Add(Rdata::Txt(owner.to_owned())));
            Decision::Apply(ChangeKind::Create, change(vec![Prerequisite::NameNotInUse], ops))
        }
        Some(_) | None if !ours && !observed.is_empty() => Decision::Foreign(foreign_message(observed)),
        None if !ours => Decision::InSync,
        Some(want) if observed.addresses == *want => Decision::InSync,
        Some(want) => {
            let mut ops = Vec::new();
            let have = &observed.addresses;
            if have.v4 != want.v4 {
                ops.push(Operation::DeleteRrset(RecordType::A));
                ops.extend(want.v4.iter().map(|a| Operation::Add(Rdata::A(*a))));
            }
            if have.v6 != want.v6 {
                ops.push(Operation::DeleteRrset(RecordType::Aaaa));
                ops.extend(want.v6.iter().map(|a| Operation::Add(Rdata::Aaaa(*a))));
            }
            Decision::Apply(ChangeKind::Update, change(guards(observed), ops))
        }
        None => Decision::Apply(
            ChangeKind::Delete,
            change(
                guards(observed),
                vec![
                    Operation::DeleteRrset(RecordType::A),
                    Operation::DeleteRrset(RecordType::Aaaa),
                    Operation::DeleteRecord(Rdata::Txt(owner.to_owned())),
                ],
            ),
        ),
    }
}

/// A signed update that changes nothing: it only asks the server whether the zone's apex exists. The
/// server checks the signature and that it serves the zone, so this tells a wrong key or zone before any
/// host needs a name.
pub fn probe(zone: &str) -> Change {
    Change {
        name: format!("{}.", zone.trim_end_matches('.')),
        prerequisites: vec![Prerequisite::NameInUse],
        operations: Vec::new(),
        ttl: 0,
    }
}

fn rdata(addresses: &Addresses) -> Vec<Rdata> {
    addresses
        .v4
        .iter()
        .map(|a| Rdata::A(*a))
        .chain(addresses.v6.iter().map(|a| Rdata::Aaaa(*a)))
        .collect()
}

/// Prerequisites that hold only while the name is exactly as observed: our TXT set and both address sets.
fn guards(observed: &Observed) -> Vec<Prerequisite> {
    let txt = observed.txt.iter().cloned().map(Rdata::Txt).collect();
    let mut out = vec![Prerequisite::RrsetEquals(RecordType::Txt, txt)];
    let a: Vec<Rdata> = observed.addresses.v4.iter().map(|a| Rdata::A(*a)).collect();
    let aaaa: Vec<Rdata> = observed.addresses.v6.iter().map(|a| Rdata::Aaaa(*a)).collect();
    for (kind, set) in [(RecordType::A, a), (RecordType::Aaaa, aaaa)] {
        out.push(if set.is_empty() {
            Prerequisite::RrsetAbsent(kind)
        } else {
            Prerequisite::RrsetEquals(kind, set)
        });
    }
    out
}

fn foreign_message(observed: &Observed) -> String {
    let marked = observed.txt.iter().find(|t| t.starts_with(OWNER_PREFIX));
    match marked {
        Some(other) => format!(
            "the name is managed by another Deployment or controller installation ({other}); it is left untouched"
        ),
        None => format!(
            "the name already holds records not created by this controller ({}); they are left untouched: remove them, or rename the Deployment",
            observed.addresses
        ),
    }
}

/// How every ownership TXT of this controller begins.
pub const OWNER_PREFIX: &str = "heritage=fediversity,";

/// The ownership TXT of one Deployment's names: names the controller installation (a hash of its id,
/// as in VM owner tags) and the Deployment.
pub fn owner_txt(installation: &str, deployment: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(installation.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{OWNER_PREFIX}owner={hash},deployment={deployment}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "heritage=fediversity,owner=ab,deployment=uni";
    const NAME: &str = "uni-mastodon.hosting.test.";

    fn addrs(list: &[&str]) -> Addresses {
        Addresses::of(list.iter().map(|a| a.parse().unwrap()))
    }

    fn observed(list: &[&str], txt: &[&str]) -> Observed {
        Observed {
            addresses: addrs(list),
            txt: txt.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    #[test]
    fn a_free_name_is_claimed_only_while_it_stays_free() {
        let d = decide(
            NAME,
            Some(&addrs(&["192.0.2.10"])),
            &Observed::default(),
            OWNER,
            60,
        );
        let Decision::Apply(ChangeKind::Create, change) = d else {
            panic!("{d:?}")
        };
        assert_eq!(change.prerequisites, vec![Prerequisite::NameNotInUse]);
        assert_eq!(
            change.operations,
            vec![
                Operation::Add(Rdata::A("192.0.2.10".parse().unwrap())),
                Operation::Add(Rdata::Txt(OWNER.into())),
            ]
        );
    }

    #[test]
    fn a_name_without_our_mark_is_never_changed_or_deleted() {
        for txt in [
            &[][..],
            &["v=spf1 -all"],
            &["heritage=fediversity,owner=cd,deployment=uni"],
        ] {
            let foreign = observed(&["198.51.100.7"], txt);
            for desired in [Some(addrs(&["192.0.2.10"])), None] {
                let d = decide(NAME, desired.as_ref(), &foreign, OWNER, 60);
                assert!(matches!(d, Decision::Foreign(_)), "{txt:?} {desired:?}: {d:?}");
            }
        }
        let only_txt = observed(&[], &["something else"]);
        assert!(matches!(
            decide(NAME, Some(&addrs(&["192.0.2.10"])), &only_txt, OWNER, 60),
            Decision::Foreign(_)
        ));
    }

    #[test]
    fn an_address_change_replaces_only_the_changed_family_guarded_by_what_was_seen() {
        let seen = observed(&["192.0.2.10", "2001:db8::1"], &[OWNER]);
        let d = decide(
            NAME,
            Some(&addrs(&["192.0.2.11", "2001:db8::1"])),
            &seen,
            OWNER,
            60,
        );
        let Decision::Apply(ChangeKind::Update, change) = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            change.prerequisites,
            vec![
                Prerequisite::RrsetEquals(RecordType::Txt, vec![Rdata::Txt(OWNER.into())]),
                Prerequisite::RrsetEquals(RecordType::A, vec![Rdata::A("192.0.2.10".parse().unwrap())]),
                Prerequisite::RrsetEquals(
                    RecordType::Aaaa,
                    vec![Rdata::Aaaa("2001:db8::1".parse().unwrap())]
                ),
            ]
        );
        assert_eq!(
            change.operations,
            vec![
                Operation::DeleteRrset(RecordType::A),
                Operation::Add(Rdata::A("192.0.2.11".parse().unwrap())),
            ]
        );
    }

    #[test]
    fn a_gone_host_loses_only_our_records_and_only_if_unchanged() {
        let seen = observed(&["192.0.2.10"], &[OWNER]);
        let Decision::Apply(ChangeKind::Delete, change) = decide(NAME, None, &seen, OWNER, 60) else {
            panic!()
        };
        assert!(
            change
                .prerequisites
                .contains(&Prerequisite::RrsetAbsent(RecordType::Aaaa))
        );
        assert!(
            change
                .operations
                .contains(&Operation::DeleteRecord(Rdata::Txt(OWNER.into())))
        );
        assert_eq!(
            decide(NAME, None, &Observed::default(), OWNER, 60),
            Decision::InSync
        );
    }

    #[test]
    fn matching_records_need_no_update() {
        let seen = observed(&["192.0.2.10"], &[OWNER]);
        assert_eq!(
            decide(NAME, Some(&addrs(&["192.0.2.10"])), &seen, OWNER, 60),
            Decision::InSync
        );
    }

    #[test]
    fn the_ownership_mark_names_the_installation_and_deployment_not_the_raw_id() {
        let txt = owner_txt("secret-looking-installation-id", "uni");
        assert!(
            txt.starts_with(OWNER_PREFIX) && txt.ends_with(",deployment=uni"),
            "{txt}"
        );
        assert!(!txt.contains("secret-looking"));
        assert_ne!(txt, owner_txt("another", "uni"));
    }
}
