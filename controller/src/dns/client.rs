//! The RFC 2136 client over hickory-dns: TSIG-signed reads and guarded updates over UDP, and resolver queries.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hickory_client::client::{Client, ClientHandle};
use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm as HickoryAlgorithm;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::{A, AAAA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType as HickoryType};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::udp::UdpClientStream;
use hickory_proto::xfer::{DnsHandle, FirstAnswer};
use hickory_proto::{ProtoError, ProtoErrorKind};

use super::plan::{Addresses, Change, Observed, Operation, Prerequisite, Rdata, RecordType};
use super::{Applied, DnsError, Resolver, ZoneClient};
use crate::api::{DnsServer, DnsSpec, TsigAlgorithm};
use crate::runtime::BoxFuture;

/// How long one request waits for an answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// TSIG's allowed clock difference, in seconds (RFC 8945 recommends 300).
const FUDGE: u16 = 300;

/// Reads a TSIG secret: the base64 secret alone, or the `key` clause `tsig-keygen` writes.
pub fn read_secret(path: &str) -> Result<Vec<u8>, DnsError> {
    let bad = |why: &str| DnsError::Secret {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e.kind().to_string()))?;
    let secret = match text.find("secret") {
        Some(i) => text[i..]
            .split('"')
            .nth(1)
            .ok_or_else(|| bad("its `secret` clause has no quoted value"))?,
        None => text.trim(),
    };
    if secret.is_empty() {
        return Err(bad("it is empty"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(secret.trim())
        .map_err(|_| bad("it does not hold a base64 secret (as `tsig-keygen` writes)"))
}

fn algorithm(algorithm: TsigAlgorithm) -> HickoryAlgorithm {
    match algorithm {
        TsigAlgorithm::HmacSha256 => HickoryAlgorithm::HmacSha256,
        TsigAlgorithm::HmacSha384 => HickoryAlgorithm::HmacSha384,
        TsigAlgorithm::HmacSha512 => HickoryAlgorithm::HmacSha512,
    }
}

fn label(server: &DnsServer) -> String {
    format!("{}:{}", server.host, server.port)
}

async fn socket_address(server: &DnsServer) -> Result<SocketAddr, DnsError> {
    if let Ok(ip) = server.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, server.port));
    }
    tokio::net::lookup_host((server.host.as_str(), server.port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| DnsError::Unreachable {
            server: label(server),
            why: "the host name does not resolve".into(),
        })
}

fn name(text: &str, server: &str) -> Result<Name, DnsError> {
    Name::from_str(text).map_err(|e| DnsError::Server {
        server: server.to_owned(),
        why: format!("`{text}` is not a valid name: {e}"),
    })
}

/// Maps a transport or protocol error: no answer is `Unreachable`; anything else on a signed exchange
/// means the server did not accept (or sign) it, which is what a wrong key or secret gives.
fn proto_error(server: &str, e: &ProtoError, signed: bool) -> DnsError {
    match e.kind() {
        ProtoErrorKind::Timeout
        | ProtoErrorKind::Io(_)
        | ProtoErrorKind::NoConnections
        | ProtoErrorKind::Busy => DnsError::Unreachable {
            server: server.to_owned(),
            why: if matches!(e.kind(), ProtoErrorKind::Timeout) {
                format!("no answer within {}s", TIMEOUT.as_secs())
            } else {
                e.to_string()
            },
        },
        _ if signed => DnsError::Rejected {
            server: server.to_owned(),
            why: "the answer was not signed with our key".into(),
        },
        _ => DnsError::Server {
            server: server.to_owned(),
            why: e.to_string(),
        },
    }
}

fn client_error(server: &str, e: &hickory_client::ClientError, signed: bool) -> DnsError {
    use hickory_client::ClientErrorKind;
    match e.kind() {
        ClientErrorKind::Proto(p) => proto_error(server, p, signed),
        ClientErrorKind::Io(io) => DnsError::Unreachable {
            server: server.to_owned(),
            why: io.to_string(),
        },
        ClientErrorKind::Timeout => DnsError::Unreachable {
            server: server.to_owned(),
            why: format!("no answer within {}s", TIMEOUT.as_secs()),
        },
        _ if signed => DnsError::Rejected {
            server: server.to_owned(),
            why: "the answer was not signed with our key".into(),
        },
        _ => DnsError::Server {
            server: server.to_owned(),
            why: e.to_string(),
        },
    }
}

async fn connect(addr: SocketAddr, signer: Option<TSigner>, server: &str) -> Result<Client, DnsError> {
    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::default())
        .with_timeout(Some(TIMEOUT))
        .with_signer(signer.map(|s| Arc::new(s) as Arc<_>))
        .build();
    let (client, background) = Client::connect(stream)
        .await
        .map_err(|e| proto_error(server, &e, false))?;
    tokio::spawn(background);
    Ok(client)
}

/// One zone on its primary server, with the TSIG key that signs every request.
pub struct HickoryZone {
    server: DnsServer,
    zone: String,
    signer: TSigner,
}

impl HickoryZone {
    /// A client for `spec`'s zone; reads the secret file now.
    pub fn new(spec: &DnsSpec) -> Result<Self, DnsError> {
        let secret = read_secret(&spec.tsig.secret_file)?;
        let server = label(&spec.server);
        let key_name = name(&spec.tsig.key_name, &server)?;
        let signer = TSigner::new(secret, algorithm(spec.tsig.algorithm), key_name, FUDGE).map_err(|e| {
            DnsError::Secret {
                path: spec.tsig.secret_file.clone(),
                why: format!("the key cannot sign: {e}"),
            }
        })?;
        Ok(Self {
            server: spec.server.clone(),
            zone: format!("{}.", spec.zone.trim_end_matches('.')),
            signer,
        })
    }

    async fn client(&self) -> Result<Client, DnsError> {
        let addr = socket_address(&self.server).await?;
        connect(addr, Some(self.signer.clone()), &label(&self.server)).await
    }

    fn zone_error(&self, code: ResponseCode) -> DnsError {
        DnsError::ZoneNotServed {
            server: label(&self.server),
            zone: self.zone.trim_end_matches('.').to_owned(),
            why: mnemonic(code),
        }
    }

    async fn observe_name(&self, text: String) -> Result<Observed, DnsError> {
        let server = label(&self.server);
        let owner = name(&text, &server)?;
        let mut client = self.client().await?;
        let mut observed = Observed::default();
        for kind in [HickoryType::A, HickoryType::AAAA, HickoryType::TXT] {
            let response = client
                .query(owner.clone(), DNSClass::IN, kind)
                .await
                .map_err(|e| client_error(&server, &e, false))?;
            match response.response_code() {
                ResponseCode::NoError | ResponseCode::NXDomain if response.authoritative() => {}
                ResponseCode::NoError
                | ResponseCode::NXDomain
                | ResponseCode::Refused
                | ResponseCode::NotAuth => {
                    return Err(self.zone_error(response.response_code()));
                }
                code => {
                    return Err(DnsError::Server {
                        server,
                        why: mnemonic(code),
                    });
                }
            }
            for record in response.answers().iter().filter(|r| *r.name() == owner) {
                match record.data() {
                    RData::A(a) => {
                        observed.addresses.v4.insert(a.0);
                    }
                    RData::AAAA(a) => {
                        observed.addresses.v6.insert(a.0);
                    }
                    RData::TXT(txt) => {
                        observed.txt.insert(txt_text(txt));
                    }
                    _ => {}
                }
            }
        }
        Ok(observed)
    }

    async fn apply_change(&self, change: Change) -> Result<Applied, DnsError> {
        let server = label(&self.server);
        let owner = name(&change.name, &server)?;
        let zone = name(&self.zone, &server)?;
        let message = update_message(&zone, &owner, &change);
        let client = self.client().await?;
        let response = client
            .send(message)
            .first_answer()
            .await
            .map_err(|e| proto_error(&server, &e, true))?;
        match response.response_code() {
            ResponseCode::NoError => Ok(Applied::Done),
            code @ (ResponseCode::YXDomain
            | ResponseCode::YXRRSet
            | ResponseCode::NXRRSet
            | ResponseCode::NXDomain) => Ok(Applied::PrerequisiteFailed(mnemonic(code))),
            // A bad signature never gets here: its unsigned answer fails the exchange itself.
            code @ (ResponseCode::NotZone | ResponseCode::NotAuth) => Err(self.zone_error(code)),
            code @ ResponseCode::Refused => Err(DnsError::Rejected {
                server,
                why: mnemonic(code),
            }),
            code => Err(DnsError::Server {
                server,
                why: mnemonic(code),
            }),
        }
    }
}

/// A response code as `nsupdate` prints it: `NXRRSET`, `REFUSED`, `NOTAUTH`.
fn mnemonic(code: ResponseCode) -> String {
    format!("{code:?}").to_uppercase()
}

fn txt_text(txt: &TXT) -> String {
    txt.txt_data()
        .iter()
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

fn record_type(kind: RecordType) -> HickoryType {
    match kind {
        RecordType::A => HickoryType::A,
        RecordType::Aaaa => HickoryType::AAAA,
        RecordType::Txt => HickoryType::TXT,
    }
}

fn record(owner: &Name, ttl: u32, data: &Rdata, class: DNSClass) -> Record {
    let rdata = match data {
        Rdata::A(a) => RData::A(A(*a)),
        Rdata::Aaaa(a) => RData::AAAA(AAAA(*a)),
        Rdata::Txt(t) => RData::TXT(TXT::new(vec![t.clone()])),
    };
    let mut record = Record::from_rdata(owner.clone(), ttl, rdata);
    record.set_dns_class(class);
    record
}

fn empty(owner: &Name, kind: HickoryType, class: DNSClass) -> Record {
    let mut record = Record::update0(owner.clone(), 0, kind);
    record.set_dns_class(class);
    record
}

/// The RFC 2136 message of `change` (§2.4 prerequisites, §2.5 updates).
pub fn update_message(zone: &Name, owner: &Name, change: &Change) -> Message {
    let mut query = Query::new();
    query
        .set_name(zone.clone())
        .set_query_class(DNSClass::IN)
        .set_query_type(HickoryType::SOA);
    let mut message = Message::new();
    message
        .set_id(fastrand::u16(..))
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Update)
        .set_recursion_desired(false);
    message.add_zone(query);
    for prerequisite in &change.prerequisites {
        match prerequisite {
            Prerequisite::NameNotInUse => {
                message.add_pre_requisite(empty(owner, HickoryType::ANY, DNSClass::NONE));
            }
            Prerequisite::NameInUse => {
                message.add_pre_requisite(empty(owner, HickoryType::ANY, DNSClass::ANY));
            }
            Prerequisite::RrsetAbsent(kind) => {
                message.add_pre_requisite(empty(owner, record_type(*kind), DNSClass::NONE));
            }
            Prerequisite::RrsetEquals(kind, values) if values.is_empty() => {
                message.add_pre_requisite(empty(owner, record_type(*kind), DNSClass::NONE));
            }
            Prerequisite::RrsetEquals(_, values) => {
                for value in values {
                    message.add_pre_requisite(record(owner, 0, value, DNSClass::IN));
                }
            }
        }
    }
    for operation in &change.operations {
        match operation {
            Operation::Add(value) => message.add_update(record(owner, change.ttl, value, DNSClass::IN)),
            Operation::DeleteRrset(kind) => {
                message.add_update(empty(owner, record_type(*kind), DNSClass::ANY));
            }
            Operation::DeleteRecord(value) => message.add_update(record(owner, 0, value, DNSClass::NONE)),
        }
    }
    message
}

impl ZoneClient for HickoryZone {
    fn observe(&self, name: &str) -> BoxFuture<Result<Observed, DnsError>> {
        let this = self.handle();
        let name = name.to_owned();
        Box::pin(async move { this.observe_name(name).await })
    }

    fn apply(&self, change: &Change) -> BoxFuture<Result<Applied, DnsError>> {
        let this = self.handle();
        let change = change.clone();
        Box::pin(async move { this.apply_change(change).await })
    }
}

impl HickoryZone {
    fn handle(&self) -> Self {
        Self {
            server: self.server.clone(),
            zone: self.zone.clone(),
            signer: self.signer.clone(),
        }
    }
}

/// A recursive resolver asked over UDP, unsigned.
pub struct HickoryResolver {
    server: DnsServer,
}

impl HickoryResolver {
    /// A resolver at `server`.
    pub fn new(server: &DnsServer) -> Self {
        Self {
            server: server.clone(),
        }
    }

    async fn lookup(server: DnsServer, text: String) -> Result<Vec<IpAddr>, DnsError> {
        let label = label(&server);
        let addr = socket_address(&server).await?;
        let mut client = connect(addr, None, &label).await?;
        let mut current = name(&text, &label)?;
        // A recursive resolver answers with the whole CNAME chain; an authoritative server stops at
        // the edge of its zone. Follow the chain either way, a bounded number of steps.
        for _ in 0..MAX_CNAME_STEPS {
            let mut found = Vec::new();
            let mut next = None;
            for kind in [HickoryType::A, HickoryType::AAAA] {
                let response = client
                    .query(current.clone(), DNSClass::IN, kind)
                    .await
                    .map_err(|e| client_error(&label, &e, false))?;
                match response.response_code() {
                    ResponseCode::NoError | ResponseCode::NXDomain => {}
                    code => {
                        return Err(DnsError::Server {
                            server: label,
                            why: mnemonic(code),
                        });
                    }
                }
                for record in response.answers() {
                    match record.data() {
                        RData::A(a) => found.push(IpAddr::V4(a.0)),
                        RData::AAAA(a) => found.push(IpAddr::V6(a.0)),
                        RData::CNAME(target) => next = Some(target.0.clone()),
                        _ => {}
                    }
                }
            }
            match next {
                Some(target) if found.is_empty() => current = target,
                _ => return Ok(Addresses::of(found).all()),
            }
        }
        Ok(Vec::new())
    }
}

/// The longest CNAME chain followed when checking an operator's name.
const MAX_CNAME_STEPS: usize = 8;

impl Resolver for HickoryResolver {
    fn resolve(&self, name: &str) -> BoxFuture<Result<Vec<IpAddr>, DnsError>> {
        Box::pin(Self::lookup(self.server.clone(), name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_read_alone_or_from_a_tsig_keygen_clause_and_never_shown_when_bad() {
        let dir = tempfile::tempdir().unwrap();
        let alone = dir.path().join("alone");
        std::fs::write(&alone, "c2VjcmV0\n").unwrap();
        assert_eq!(read_secret(alone.to_str().unwrap()).unwrap(), b"secret");
        let clause = dir.path().join("clause");
        std::fs::write(
            &clause,
            "key \"k\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0\";\n};\n",
        )
        .unwrap();
        assert_eq!(read_secret(clause.to_str().unwrap()).unwrap(), b"secret");
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "not base64 at all!!").unwrap();
        let err = read_secret(bad.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("does not hold a base64 secret"), "{err}");
        assert!(!err.contains("not base64 at all"), "the content leaked: {err}");
        let missing = read_secret("/nonexistent/secret").unwrap_err().to_string();
        assert!(missing.contains("spec.dns.tsig.secretFile"), "{missing}");
    }

    #[test]
    fn a_claim_sends_the_name_not_in_use_prerequisite() {
        let zone = Name::from_str("hosting.test.").unwrap();
        let owner = Name::from_str("uni-mastodon.hosting.test.").unwrap();
        let change = Change {
            name: owner.to_string(),
            prerequisites: vec![Prerequisite::NameNotInUse],
            operations: vec![Operation::Add(Rdata::A("192.0.2.1".parse().unwrap()))],
            ttl: 60,
        };
        let message = update_message(&zone, &owner, &change);
        assert_eq!(message.op_code(), OpCode::Update);
        let pre = &message.prerequisites()[0];
        assert_eq!(pre.dns_class(), DNSClass::NONE);
        assert_eq!(pre.record_type(), HickoryType::ANY);
        assert_eq!(message.updates()[0].ttl(), 60);
    }
}
