//! Admission: whether a signed `Join` lets a node into the run. Pure checks,
//! so they are tested without a network: the signature, that the signer is
//! the peer on the connection (a join cannot be replayed from elsewhere), the
//! protocol version and run (an empty run id joins the hosted run), a
//! timestamp near our clock (an old join cannot be replayed later), sane
//! sizes, that the operator has not revoked the node, and its certificate.
//!
//! A certificate, when a join carries one, must be valid in every run, open
//! or not: signed by the org it names, naming this node, issued (not in the
//! future beyond the clock skew we allow), unexpired, and not revoked. An open
//! run could drop a bad certificate and admit the node without an org, but
//! then an org's credit would vanish without anyone being told, and a forged
//! certificate would cost its sender nothing; refusing says why at once, and
//! the node's operator can renew the certificate or start without one. A run
//! limited to listed orgs also refuses a join without a certificate, or with
//! one from an org not on the list.

use barnraise_protocol::certificate::{
    CertificateError, certificate_id, format_utc, verify_certificate,
};
use barnraise_protocol::limits::{MAX_TEXT_BYTES, MAX_WORKERS_PER_NODE, PROTOCOL_VERSION};
use barnraise_protocol::messages::{Join, NodeCertificate};
use barnraise_protocol::{Hash, NodeId, OrgId, Signed};
use std::collections::BTreeSet;

/// How far a join's timestamp may be from the coordinator's clock, and how far
/// in the future a certificate may say it was issued.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Listen addresses a node may declare.
pub const MAX_LISTEN_ADDRS: usize = 16;

/// Who the run lets in, from the config's `[admission]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `None`: open to any node; otherwise only nodes certified by these orgs.
    pub orgs: Option<Vec<OrgId>>,
    /// Certificates the run no longer accepts, by [`certificate_id`].
    pub revoked_certificates: BTreeSet<Hash>,
    /// Nodes the run no longer admits, whatever certificate they show.
    pub revoked_nodes: BTreeSet<NodeId>,
    /// Workers a node without a certificate may declare
    /// (None: [`DEFAULT_MAX_UNCERTIFIED_WORKERS`]).
    pub max_uncertified_workers: Option<u32>,
}

/// Workers an uncertified node may declare unless the run says otherwise.
pub const DEFAULT_MAX_UNCERTIFIED_WORKERS: u32 = 4;

impl Policy {
    /// Open to any node, nothing revoked.
    pub fn open() -> Policy {
        Policy::default()
    }

    /// Whether a node the ledger already knows — admitted under an earlier
    /// config, before a restart — may keep its membership under this one:
    /// `None` if so, else the reason. A revoked node, a revoked certificate
    /// (the ledger keeps the id of the one the node joined with) and an org
    /// no longer listed all take effect at once.
    pub fn refuses_known(
        &self,
        node: &NodeId,
        org: Option<&OrgId>,
        certificate: Option<&Hash>,
    ) -> Option<String> {
        if self.revoked_nodes.contains(node) {
            return Some(format!("the node {node} was revoked by the run"));
        }
        if let Some(id) = certificate.filter(|id| self.revoked_certificates.contains(*id)) {
            return Some(format!("the certificate {id} was revoked by the run"));
        }
        match (&self.orgs, org) {
            (None, _) => None,
            (Some(orgs), Some(org)) if orgs.contains(org) => None,
            (Some(_), Some(org)) => Some(format!("its org {org} is no longer admitted")),
            (Some(_), None) => Some("the run now admits only listed orgs".into()),
        }
    }

    /// Limited to nodes certified by `orgs`.
    pub fn orgs(orgs: Vec<OrgId>) -> Policy {
        Policy {
            orgs: Some(orgs),
            ..Policy::default()
        }
    }
}

/// Why a join was refused, in words for the node's operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinRefusal {
    #[error("the join is not validly signed")]
    BadSignature,
    #[error(
        "the join is signed by a key other than the connecting peer's; every node joins for itself"
    )]
    NotTheSender,
    #[error(
        "protocol version {found} is not supported (this coordinator speaks {supported}); upgrade barnraise"
    )]
    Version { found: u32, supported: u32 },
    #[error("this coordinator runs `{expected}`, not `{found}`")]
    WrongRun { expected: String, found: String },
    #[error(
        "the join's timestamp is {skew_s} s from the coordinator's clock (at most 300 s allowed); check the node's clock"
    )]
    Clock { skew_s: u64 },
    #[error("the join is malformed: {0}")]
    Malformed(String),
    #[error("the node {0} was revoked by the run; its operator no longer admits it")]
    NodeRevoked(NodeId),
    #[error("{0}")]
    Certificate(CertificateRefusal),
    #[error(
        "this run admits only nodes certified by its listed orgs, and the join carries no certificate; ask your org for one (`barnraise org enroll`) and start the node with `--certificate FILE`"
    )]
    NoCertificate,
    #[error(
        "this run admits only nodes certified by its listed orgs, and org {org_name} ({org}) is not one of them; its org id must be on the run's `admission.orgs` list"
    )]
    OrgNotListed { org: OrgId, org_name: String },
}

/// Why the certificate a join carries is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateRefusal {
    /// Tampered, forged (signed by a key other than the org it names) or malformed.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the certificate names node {named}, not this node; the org must enroll this node's own id"
    )]
    OtherNode { named: NodeId },
    #[error("the certificate expired at {at}; ask the org for a new one")]
    Expired { at: String },
    #[error(
        "the certificate says it was issued at {at}, in the future; check the org's and this node's clocks"
    )]
    NotYetIssued { at: String },
    #[error("the certificate {0} was revoked by the run")]
    Revoked(Hash),
}

impl From<CertificateError> for CertificateRefusal {
    fn from(e: CertificateError) -> Self {
        CertificateRefusal::Invalid(e.to_string())
    }
}

/// An admitted node.
#[derive(Clone, Debug, PartialEq)]
pub struct Admitted {
    pub node: NodeId,
    pub join: Join,
    pub certificate: Option<NodeCertificate>,
}

/// Checks a join from `peer_key` (the key behind the connecting peer id, if
/// it has one) at `now_ms` against the run's `policy`.
pub fn admit(
    signed: &Signed<Join>,
    peer_key: Option<&barnraise_protocol::PublicKey>,
    run_id: &str,
    policy: &Policy,
    now_ms: u64,
) -> Result<Admitted, JoinRefusal> {
    let join = signed.verify(None).map_err(|_| JoinRefusal::BadSignature)?;
    if peer_key != Some(&signed.signer) {
        return Err(JoinRefusal::NotTheSender);
    }
    if join.protocol_version != PROTOCOL_VERSION {
        return Err(JoinRefusal::Version {
            found: join.protocol_version,
            supported: PROTOCOL_VERSION,
        });
    }
    // An empty run id means "whatever run you host": a coordinator hosts one run.
    if !join.run_id.is_empty() && join.run_id != run_id {
        return Err(JoinRefusal::WrongRun {
            expected: run_id.into(),
            found: join.run_id.chars().take(64).collect(),
        });
    }
    let skew = now_ms.abs_diff(join.timestamp_ms);
    if skew > MAX_CLOCK_SKEW_MS {
        return Err(JoinRefusal::Clock {
            skew_s: skew / 1000,
        });
    }
    if join.workers.is_empty() || join.workers.len() > MAX_WORKERS_PER_NODE {
        return Err(JoinRefusal::Malformed(format!(
            "declare 1 to {MAX_WORKERS_PER_NODE} workers"
        )));
    }
    if join.listen_addrs.len() > MAX_LISTEN_ADDRS || join.agent.len() > MAX_TEXT_BYTES {
        return Err(JoinRefusal::Malformed(format!(
            "at most {MAX_LISTEN_ADDRS} listen addresses and a {MAX_TEXT_BYTES}-byte agent string"
        )));
    }
    let node = NodeId(signed.signer);
    if policy.revoked_nodes.contains(&node) {
        return Err(JoinRefusal::NodeRevoked(node));
    }
    let certificate = match &join.certificate {
        Some(cert) => {
            Some(check_certificate(cert, &node, policy, now_ms).map_err(JoinRefusal::Certificate)?)
        }
        None => None,
    };
    let uncertified_cap = policy
        .max_uncertified_workers
        .unwrap_or(DEFAULT_MAX_UNCERTIFIED_WORKERS)
        .max(1);
    if let Some(cert) = &certificate
        && join.workers.len() > cert.max_workers as usize
    {
        return Err(JoinRefusal::Malformed(format!(
            "this node's certificate from {} allows at most {} workers (this join declares {}); \
             run fewer, or ask the org for a certificate with a larger --max-workers",
            cert.org_name
                .chars()
                .filter(|c| !c.is_control())
                .collect::<String>(),
            cert.max_workers,
            join.workers.len()
        )));
    }
    if certificate.is_none() && join.workers.len() > uncertified_cap as usize {
        return Err(JoinRefusal::Malformed(format!(
            "a node without an org certificate may declare at most {uncertified_cap} workers \
             (this join declares {}); run fewer, or ask an org to certify the node",
            join.workers.len()
        )));
    }
    if let Some(orgs) = &policy.orgs {
        match &certificate {
            Some(c) if orgs.contains(&c.org) => {}
            Some(c) => {
                return Err(JoinRefusal::OrgNotListed {
                    org: c.org,
                    org_name: c.org_name.chars().filter(|c| !c.is_control()).collect(),
                });
            }
            None => return Err(JoinRefusal::NoCertificate),
        }
    }
    Ok(Admitted {
        node,
        join,
        certificate,
    })
}

/// A certificate is valid when its org signed it, the run has not revoked
/// it, it names this node, and `now_ms` lies between its issue (give or take
/// the clock skew) and its expiry.
fn check_certificate(
    cert: &Signed<NodeCertificate>,
    node: &NodeId,
    policy: &Policy,
    now_ms: u64,
) -> Result<NodeCertificate, CertificateRefusal> {
    let body = verify_certificate(cert)?;
    let id = certificate_id(cert);
    if policy.revoked_certificates.contains(&id) {
        return Err(CertificateRefusal::Revoked(id));
    }
    if &body.node != node {
        return Err(CertificateRefusal::OtherNode { named: body.node });
    }
    if body.issued_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(CertificateRefusal::NotYetIssued {
            at: format_utc(body.issued_ms),
        });
    }
    if body.expires_ms <= now_ms {
        return Err(CertificateRefusal::Expired {
            at: format_utc(body.expires_ms),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::SigningKey;
    use barnraise_protocol::messages::WorkerInfo;

    const NOW: u64 = 1_800_000_000_000;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed([n; 32]).unwrap()
    }

    fn join(cert: Option<Signed<NodeCertificate>>) -> Join {
        Join {
            protocol_version: PROTOCOL_VERSION,
            agent: "barnraise/test".into(),
            run_id: "run".into(),
            workers: vec![WorkerInfo {
                device: "cpu".into(),
                name: "cpu".into(),
                memory_bytes: 1,
            }],
            listen_addrs: vec![],
            certificate: cert,
            timestamp_ms: NOW,
        }
    }

    fn cert(org: &SigningKey, node: &SigningKey, expires_ms: u64) -> Signed<NodeCertificate> {
        cert_for_workers(org, node, expires_ms, 8)
    }

    fn cert_for_workers(
        org: &SigningKey,
        node: &SigningKey,
        expires_ms: u64,
        max_workers: u32,
    ) -> Signed<NodeCertificate> {
        let body = NodeCertificate {
            org: org.org_id(),
            org_name: "Org".into(),
            node: node.node_id(),
            issued_ms: 0,
            expires_ms,
            max_workers,
        };
        Signed::sign(org, &body).unwrap()
    }

    #[test]
    fn open_run_admits_a_well_formed_join() {
        let node = key(1);
        let signed = Signed::sign(&node, &join(None)).unwrap();
        let admitted = admit(
            &signed,
            Some(&node.public()),
            "run",
            &Policy::open(),
            NOW + 1000,
        )
        .unwrap();
        assert_eq!(admitted.node, node.node_id());
        assert_eq!(admitted.certificate, None);
    }

    #[test]
    fn joins_are_refused_with_reasons() {
        let node = key(1);
        let sign = |j: &Join| Signed::sign(&node, j).unwrap();
        let me = Some(node.public());
        let open = Policy::open();
        let check = |s: &Signed<Join>, now| admit(s, me.as_ref(), "run", &open, now);

        let mut tampered = sign(&join(None));
        tampered.body[0] ^= 1;
        assert_eq!(check(&tampered, NOW), Err(JoinRefusal::BadSignature));
        assert_eq!(
            admit(
                &sign(&join(None)),
                Some(&key(2).public()),
                "run",
                &open,
                NOW
            ),
            Err(JoinRefusal::NotTheSender)
        );
        let mut old = join(None);
        old.protocol_version = 0;
        assert!(matches!(
            check(&sign(&old), NOW),
            Err(JoinRefusal::Version { .. })
        ));
        // A join replayed ten minutes later.
        assert!(matches!(
            check(&sign(&join(None)), NOW + 10 * 60 * 1000),
            Err(JoinRefusal::Clock { skew_s: 600 })
        ));
        let mut other = join(None);
        other.run_id = "other".into();
        assert!(matches!(
            check(&sign(&other), NOW),
            Err(JoinRefusal::WrongRun { .. })
        ));
        let mut no_workers = join(None);
        no_workers.workers.clear();
        assert!(matches!(
            check(&sign(&no_workers), NOW),
            Err(JoinRefusal::Malformed(_))
        ));
    }

    /// The join of node `key(1)` carrying `cert`, checked under `policy`.
    fn join_with(
        cert: Option<Signed<NodeCertificate>>,
        policy: &Policy,
    ) -> Result<Admitted, JoinRefusal> {
        let node = key(1);
        let signed = Signed::sign(&node, &join(cert)).unwrap();
        admit(&signed, Some(&node.public()), "run", policy, NOW)
    }

    /// The refusal's text, or a panic naming what was admitted.
    fn refusal(result: Result<Admitted, JoinRefusal>) -> String {
        match result {
            Ok(a) => panic!("admitted {:?} with {:?}", a.node, a.certificate),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn uncertified_nodes_declare_few_workers_and_certified_ones_more() {
        let (node, org) = (key(1), key(7));
        let with_workers = |n: usize, cert: Option<Signed<NodeCertificate>>| {
            let mut j = join(cert);
            j.workers = vec![j.workers[0].clone(); n];
            Signed::sign(&node, &j).unwrap()
        };
        let admit_with = |signed: &Signed<Join>, policy: &Policy| {
            admit(signed, Some(&node.public()), "run", policy, NOW)
        };
        let open = Policy::open();
        assert!(admit_with(&with_workers(4, None), &open).is_ok());
        match admit_with(&with_workers(64, None), &open) {
            Err(JoinRefusal::Malformed(why)) => {
                assert!(
                    why.contains("at most 4 workers") && why.contains("declares 64"),
                    "{why}"
                )
            }
            other => panic!("64 uncertified workers admitted: {other:?}"),
        }
        let cluster = || Some(cert_for_workers(&org, &node, NOW + 1, 64));
        assert!(
            admit_with(&with_workers(64, cluster()), &open).is_ok(),
            "an org vouches for a cluster"
        );
        // The certificate's signed max_workers bounds what the node declares.
        let eight = || Some(cert_for_workers(&org, &node, NOW + 1, 8));
        assert!(admit_with(&with_workers(8, eight()), &open).is_ok());
        match admit_with(&with_workers(9, eight()), &open) {
            Err(JoinRefusal::Malformed(why)) => assert!(
                why.contains("allows at most 8 workers") && why.contains("declares 9"),
                "{why}"
            ),
            other => panic!("9 workers admitted under an 8-worker certificate: {other:?}"),
        }
        // A certificate that allows no workers, or more than any node may
        // declare, is refused as a certificate.
        for bad in [0, 65] {
            match admit_with(
                &with_workers(1, Some(cert_for_workers(&org, &node, NOW + 1, bad))),
                &open,
            ) {
                Err(JoinRefusal::Certificate(_)) => {}
                other => panic!("a certificate for {bad} workers: {other:?}"),
            }
        }
        let strict = Policy {
            max_uncertified_workers: Some(1),
            ..Policy::open()
        };
        assert!(admit_with(&with_workers(2, None), &strict).is_err());
        assert!(admit_with(&with_workers(1, None), &strict).is_ok());
    }

    #[test]
    fn org_limited_run_admits_a_valid_certificate_from_a_listed_org() {
        let (node, org) = (key(1), key(7));
        let admitted = join_with(
            Some(cert(&org, &node, NOW + 1)),
            &Policy::orgs(vec![org.org_id()]),
        )
        .unwrap();
        let certificate = admitted.certificate.unwrap();
        assert_eq!(certificate.org, org.org_id());
        assert_eq!(certificate.org_name, "Org");
    }

    #[test]
    fn bad_certificates_are_refused_with_reasons_in_every_run() {
        let (node, org, stranger) = (key(1), key(7), key(8));
        let valid = cert(&org, &node, NOW + 1);
        let mut tampered = valid.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        // Key 8 signs a certificate that claims to come from org 7.
        let forged = {
            let body = valid.verify(None).unwrap();
            Signed::sign(&stranger, &body).unwrap()
        };
        let future = {
            let mut body = valid.verify(None).unwrap();
            body.issued_ms = NOW + MAX_CLOCK_SKEW_MS + 1;
            body.expires_ms = NOW + 10 * MAX_CLOCK_SKEW_MS;
            Signed::sign(&org, &body).unwrap()
        };
        let cases = [
            (cert(&org, &key(3), NOW + 1), "names node"),
            (cert(&org, &node, NOW), "expired at"),
            (tampered, "does not verify"),
            (forged, "forged"),
            (future, "in the future"),
        ];
        for policy in [Policy::open(), Policy::orgs(vec![org.org_id()])] {
            for (cert, needle) in &cases {
                let reason = refusal(join_with(Some(cert.clone()), &policy));
                assert!(reason.contains(needle), "{needle}: {reason}");
            }
        }
        // Issued a little ahead of our clock (within the skew) is fine.
        let mut body = valid.verify(None).unwrap();
        body.issued_ms = NOW + MAX_CLOCK_SKEW_MS;
        body.expires_ms = NOW + 10 * MAX_CLOCK_SKEW_MS;
        let ahead = Signed::sign(&org, &body).unwrap();
        assert!(join_with(Some(ahead), &Policy::open()).is_ok());
    }

    #[test]
    fn org_limited_run_refuses_strangers_and_the_uncertified() {
        let (node, org, stranger) = (key(1), key(7), key(8));
        let policy = Policy::orgs(vec![org.org_id()]);
        let reason = refusal(join_with(None, &policy));
        assert!(reason.contains("carries no certificate"), "{reason}");
        let reason = refusal(join_with(Some(cert(&stranger, &node, NOW + 1)), &policy));
        assert!(
            reason.contains(&stranger.org_id().to_string()) && reason.contains("not one of them"),
            "{reason}"
        );
        // An open run admits both, the stranger's node under its org.
        assert!(join_with(None, &Policy::open()).is_ok());
        let admitted = join_with(Some(cert(&stranger, &node, NOW + 1)), &Policy::open()).unwrap();
        assert_eq!(admitted.certificate.map(|c| c.org), Some(stranger.org_id()));
    }

    #[test]
    fn revoked_certificates_and_nodes_are_refused() {
        let (node, org) = (key(1), key(7));
        let revoked = cert(&org, &node, NOW + 1);
        let renewed = cert(&org, &node, NOW + 2);
        let mut policy = Policy::orgs(vec![org.org_id()]);
        policy
            .revoked_certificates
            .insert(barnraise_protocol::certificate::certificate_id(&revoked));
        let reason = refusal(join_with(Some(revoked.clone()), &policy));
        let id = barnraise_protocol::certificate::certificate_id(&revoked);
        assert_eq!(
            reason,
            format!("the certificate {id} was revoked by the run")
        );
        // A new certificate for the same node is another certificate.
        assert!(join_with(Some(renewed.clone()), &policy).is_ok());
        // Revoked in an open run too.
        let mut open = Policy::open();
        open.revoked_certificates = policy.revoked_certificates.clone();
        assert!(refusal(join_with(Some(revoked), &open)).contains("revoked"));
        // A revoked node is refused whatever it shows.
        policy.revoked_nodes.insert(node.node_id());
        let reason = refusal(join_with(Some(renewed), &policy));
        assert!(
            reason.contains(&node.node_id().to_string()) && reason.contains("revoked"),
            "{reason}"
        );
        open.revoked_nodes.insert(node.node_id());
        assert!(refusal(join_with(None, &open)).contains("revoked"));
    }

    #[test]
    fn known_nodes_are_rechecked_against_a_new_policy() {
        let node = key(1).node_id();
        let org = key(7).org_id();
        let other = key(8).org_id();
        assert_eq!(Policy::open().refuses_known(&node, None, None), None);
        assert_eq!(Policy::open().refuses_known(&node, Some(&org), None), None);
        let limited = Policy::orgs(vec![org]);
        assert_eq!(limited.refuses_known(&node, Some(&org), None), None);
        assert!(limited.refuses_known(&node, Some(&other), None).is_some());
        assert!(limited.refuses_known(&node, None, None).is_some());
        let mut revoked = Policy::open();
        revoked.revoked_nodes.insert(node);
        assert!(
            revoked
                .refuses_known(&node, Some(&org), None)
                .is_some_and(|r| r.contains("revoked"))
        );
        assert_eq!(revoked.refuses_known(&key(2).node_id(), None, None), None);
        let cert = Hash::of(b"certificate");
        revoked.revoked_certificates.insert(cert);
        assert!(
            revoked
                .refuses_known(&key(2).node_id(), Some(&org), Some(&cert))
                .is_some_and(|r| r.contains("certificate"))
        );
        assert_eq!(
            revoked.refuses_known(&key(2).node_id(), Some(&org), Some(&Hash::of(b"renewed"))),
            None,
            "a renewed certificate is not the revoked one"
        );
    }
}
