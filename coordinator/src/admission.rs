//! Admission: whether a signed `Join` lets a node into the run. Pure checks,
//! so they are tested without a network: the signature, that the signer is
//! the peer on the connection (a join cannot be replayed from elsewhere), the
//! protocol version and run (an empty run id joins the hosted run), a timestamp near our clock (an old join cannot
//! be replayed later), sane sizes, and — when the run is limited to listed
//! orgs — a valid, unexpired certificate from one of them naming this node.

use barnraise_protocol::limits::{MAX_TEXT_BYTES, MAX_WORKERS_PER_NODE, PROTOCOL_VERSION};
use barnraise_protocol::messages::{Join, NodeCertificate};
use barnraise_protocol::{NodeId, OrgId, Signed};

/// How far a join's timestamp may be from the coordinator's clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Listen addresses a node may declare.
pub const MAX_LISTEN_ADDRS: usize = 16;

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
    #[error("this run admits only nodes certified by its listed orgs; {0}")]
    NotAdmitted(String),
}

/// An admitted node.
#[derive(Clone, Debug, PartialEq)]
pub struct Admitted {
    pub node: NodeId,
    pub join: Join,
    pub certificate: Option<NodeCertificate>,
}

/// Checks a join from `peer_key` (the key behind the connecting peer id, if
/// it has one) at `now_ms`.
pub fn admit(
    signed: &Signed<Join>,
    peer_key: Option<&barnraise_protocol::PublicKey>,
    run_id: &str,
    admitted_orgs: Option<&[OrgId]>,
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
    let certificate = match &join.certificate {
        Some(cert) => match check_certificate(cert, &node, now_ms) {
            Ok(c) => Some(c),
            Err(reason) if admitted_orgs.is_some() => return Err(JoinRefusal::NotAdmitted(reason)),
            Err(_) => None,
        },
        None => None,
    };
    if let Some(orgs) = admitted_orgs {
        match &certificate {
            Some(c) if orgs.contains(&c.org) => {}
            Some(c) => {
                return Err(JoinRefusal::NotAdmitted(format!(
                    "org {} is not one of them",
                    c.org
                )));
            }
            None => {
                return Err(JoinRefusal::NotAdmitted(
                    "the join carries no certificate".into(),
                ));
            }
        }
    }
    Ok(Admitted {
        node,
        join,
        certificate,
    })
}

/// A certificate is valid when its org signed it, it names this node, and it
/// has not expired.
fn check_certificate(
    cert: &Signed<NodeCertificate>,
    node: &NodeId,
    now_ms: u64,
) -> Result<NodeCertificate, String> {
    let body = cert
        .verify(None)
        .map_err(|e| format!("the certificate does not verify: {e}"))?;
    if OrgId(cert.signer) != body.org {
        return Err("the certificate is not signed by the org it names".into());
    }
    if &body.node != node {
        return Err("the certificate names another node".into());
    }
    if body.expires_ms <= now_ms {
        return Err("the certificate has expired".into());
    }
    if body.org_name.len() > MAX_TEXT_BYTES {
        return Err("the certificate's org name is too long".into());
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
        let body = NodeCertificate {
            org: org.org_id(),
            org_name: "Org".into(),
            node: node.node_id(),
            issued_ms: 0,
            expires_ms,
        };
        Signed::sign(org, &body).unwrap()
    }

    #[test]
    fn open_run_admits_a_well_formed_join() {
        let node = key(1);
        let signed = Signed::sign(&node, &join(None)).unwrap();
        let admitted = admit(&signed, Some(&node.public()), "run", None, NOW + 1000).unwrap();
        assert_eq!(admitted.node, node.node_id());
    }

    #[test]
    fn joins_are_refused_with_reasons() {
        let node = key(1);
        let sign = |j: &Join| Signed::sign(&node, j).unwrap();
        let me = Some(node.public());
        let check = |s: &Signed<Join>, now| admit(s, me.as_ref(), "run", None, now);

        let mut tampered = sign(&join(None));
        tampered.body[0] ^= 1;
        assert_eq!(check(&tampered, NOW), Err(JoinRefusal::BadSignature));
        assert_eq!(
            admit(&sign(&join(None)), Some(&key(2).public()), "run", None, NOW),
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

    #[test]
    fn org_limited_run_needs_a_valid_certificate_from_a_listed_org() {
        let node = key(1);
        let org = key(7);
        let stranger_org = key(8);
        let orgs = [org.org_id()];
        let try_join = |cert| {
            let signed = Signed::sign(&node, &join(cert)).unwrap();
            admit(&signed, Some(&node.public()), "run", Some(&orgs), NOW)
        };
        assert!(try_join(Some(cert(&org, &node, NOW + 1))).is_ok());
        assert!(matches!(try_join(None), Err(JoinRefusal::NotAdmitted(_))));
        assert!(
            matches!(try_join(Some(cert(&org, &node, NOW - 1))), Err(JoinRefusal::NotAdmitted(m)) if m.contains("expired"))
        );
        assert!(matches!(
            try_join(Some(cert(&stranger_org, &node, NOW + 1))),
            Err(JoinRefusal::NotAdmitted(_))
        ));
        assert!(
            matches!(try_join(Some(cert(&org, &key(3), NOW + 1))), Err(JoinRefusal::NotAdmitted(m)) if m.contains("another node"))
        );
    }
}
