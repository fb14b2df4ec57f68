//! Receipts: the signed manifests that name this node, kept in
//! `<data_dir>/receipts/`, read back as the node's own account of what it
//! contributed. A volunteer checks the coordinator's numbers against these
//! without trusting its dashboard: every figure here comes from a manifest
//! the coordinator signed.
//!
//! Credit is FLOP-normalized like the coordinator's ledger: accepted tokens ×
//! training FLOPs per token of the run's model at its sequence length. The
//! node records that factor in `receipts/run.json` when it joins a run.

use barnraise_protocol::messages::Manifest;
use barnraise_protocol::{Hash, NodeId, PublicKey, Signed};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest receipt file read: a signed manifest at its protocol limit,
/// with room for the envelope.
const MAX_RECEIPT_BYTES: u64 = barnraise_protocol::limits::MAX_MANIFEST_BYTES as u64 + 4096;
/// The largest `run.json` read; it holds three short fields.
const MAX_RUN_FACTS_BYTES: u64 = 64 * 1024;

/// Reads a file of at most `cap` bytes, reading no further than that.
fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(cap + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {cap} bytes"),
        ));
    }
    Ok(bytes)
}
/// Name of the run facts file beside the receipts.
pub const RUN_FILE: &str = "run.json";

/// What the node's receipts need to know about the run to compute credit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunFacts {
    pub run_id: String,
    /// The coordinator's key (hex) that signs the run's manifests.
    pub coordinator: String,
    /// Training FLOPs per token of the run's model at its sequence length.
    pub flops_per_token: f64,
}

/// What one manifest says about this node.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    Accepted {
        tokens: u64,
        weight: f32,
        update_bytes: u64,
        compute_ms: u64,
    },
    Rejected {
        reason: String,
    },
    /// Assigned work, no commit by the deadline.
    Missing,
    /// The manifest does not name this node (kept by mistake, or another node's).
    NotNamed,
}

/// One verified receipt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Receipt {
    pub round: u64,
    /// Hash of the manifest's signed body: the link in the run's chain.
    pub manifest: String,
    /// The key that signed it (hex).
    pub signer: String,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Credit this manifest takes back from the node: its accepted tokens
    /// since its last verified round, after a failed spot check
    /// (docs/security.md, "Clawback").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voided: Option<barnraise_protocol::messages::VoidedCredit>,
}

/// A receipt file that did not verify, and why; it counts for nothing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BadReceipt {
    pub path: PathBuf,
    pub error: String,
}

/// The node's totals over its receipts, in the ledger's terms.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    pub rounds: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub missing: u64,
    /// Tokens of accepted updates, less those voided.
    pub tokens: u64,
    /// Tokens of accepted updates that a failed spot check voided.
    pub voided_tokens: u64,
    /// Compute time of accepted updates.
    pub compute_ms: u64,
    /// Bytes of accepted updates.
    pub accepted_bytes: u64,
    /// `tokens × flops_per_token`, when the run's facts are known.
    pub credit: Option<f64>,
    /// Rejections by reason code.
    pub rejections: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipts in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run facts {path}: {reason}")]
    RunFacts { path: PathBuf, reason: String },
}

/// Reads every `*.manifest` file in `dir`, verifying each signature (against
/// `pinned` when given) and what it says about `me`, in round order. A
/// missing directory is no receipts yet.
pub fn read_receipts(
    dir: &Path,
    me: &NodeId,
    pinned: Option<&PublicKey>,
) -> Result<(Vec<Receipt>, Vec<BadReceipt>), ReceiptError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(source) => {
            return Err(ReceiptError::Io {
                path: dir.into(),
                source,
            });
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "manifest"))
        .collect();
    paths.sort();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for path in paths {
        match read_one(&path, me, pinned) {
            Ok(receipt) => good.push(receipt),
            Err(error) => bad.push(BadReceipt { path, error }),
        }
    }
    good.sort_by_key(|r| r.round);
    // Two files for one round cannot both be right: the first (by file
    // name) counts and the other is reported, not silently dropped.
    let mut seen = std::collections::HashSet::new();
    let mut unique = Vec::with_capacity(good.len());
    for receipt in good {
        if seen.insert(receipt.round) {
            unique.push(receipt);
        } else {
            bad.push(BadReceipt {
                path: dir.join(format!("round {}", receipt.round)),
                error: "a second receipt for this round; only the first counts".into(),
            });
        }
    }
    Ok((unique, bad))
}

fn read_one(path: &Path, me: &NodeId, pinned: Option<&PublicKey>) -> Result<Receipt, String> {
    let bytes = read_capped(path, MAX_RECEIPT_BYTES).map_err(|e| e.to_string())?;
    parse_receipt(&bytes, me, pinned)
}

/// Checks one receipt file's bytes (a signed manifest, verified against
/// `pinned` when given) and reads what it says about `me`.
pub fn parse_receipt(
    bytes: &[u8],
    me: &NodeId,
    pinned: Option<&PublicKey>,
) -> Result<Receipt, String> {
    let signed = Signed::<Manifest>::from_bytes(bytes).map_err(|e| e.to_string())?;
    let manifest = signed.verify(pinned).map_err(|e| e.to_string())?;
    let verdict = if let Some(a) = manifest.accepted.iter().find(|a| a.node == *me) {
        Verdict::Accepted {
            tokens: a.tokens,
            weight: a.weight,
            update_bytes: a.update_bytes,
            compute_ms: a.compute_ms,
        }
    } else if let Some(r) = manifest.rejected.iter().find(|r| r.node == *me) {
        Verdict::Rejected {
            reason: r.reason.code().to_string(),
        }
    } else if manifest.missing.contains(me) {
        Verdict::Missing
    } else {
        Verdict::NotNamed
    };
    Ok(Receipt {
        round: manifest.round,
        manifest: Hash::of(&signed.body).to_hex(),
        signer: signed.signer.to_hex(),
        verdict,
        voided: manifest.voided.iter().find(|v| v.node == *me).cloned(),
    })
}

/// Adds the receipts up.
pub fn totals(receipts: &[Receipt], facts: Option<&RunFacts>) -> Totals {
    let mut t = Totals::default();
    for receipt in receipts {
        match &receipt.verdict {
            Verdict::Accepted {
                tokens,
                update_bytes,
                compute_ms,
                ..
            } => {
                t.accepted += 1;
                t.tokens += tokens;
                t.accepted_bytes += update_bytes;
                t.compute_ms += compute_ms;
            }
            Verdict::Rejected { reason } => {
                t.rejected += 1;
                *t.rejections.entry(reason.clone()).or_default() += 1;
            }
            Verdict::Missing => t.missing += 1,
            Verdict::NotNamed => continue,
        }
        if let Some(v) = &receipt.voided {
            t.voided_tokens += v.tokens;
        }
        t.rounds += 1;
    }
    // A void takes back tokens of earlier receipts; a node that kept only
    // some of its receipts cannot go below zero.
    t.tokens = t.tokens.saturating_sub(t.voided_tokens);
    t.credit = facts.map(|f| t.tokens as f64 * f.flops_per_token);
    t
}

/// Reads `receipts/run.json`; `None` when the node never wrote one.
pub fn read_run_facts(dir: &Path) -> Result<Option<RunFacts>, ReceiptError> {
    let path = dir.join(RUN_FILE);
    let text = match read_capped(&path, MAX_RUN_FACTS_BYTES) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ReceiptError::Io { path, source }),
    };
    parse_run_facts(&text)
        .map(Some)
        .map_err(|reason| ReceiptError::RunFacts { path, reason })
}

/// Parses the bytes of `receipts/run.json`.
pub fn parse_run_facts(bytes: &[u8]) -> Result<RunFacts, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Writes `receipts/run.json` atomically.
pub fn write_run_facts(dir: &Path, facts: &RunFacts) -> Result<(), ReceiptError> {
    let path = dir.join(RUN_FILE);
    let json = serde_json::to_vec_pretty(facts).map_err(|e| ReceiptError::RunFacts {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    crate::state::write_atomic(&path, &json).map_err(|e| ReceiptError::RunFacts {
        path,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::SigningKey;
    use barnraise_protocol::messages::{AcceptedUpdate, RejectReason, RejectedUpdate};

    fn manifest(round: u64, me: NodeId, verdict: &str) -> Manifest {
        let mut m = Manifest {
            run_id: "run".into(),
            round,
            previous_manifest: Hash::of(b"prev"),
            base_params_hash: Hash::of(b"base"),
            accepted: vec![],
            rejected: vec![],
            missing: vec![],
            verified: vec![],
            voided: vec![],
            aggregation: "mean".into(),
            next_params_hash: Hash::of(b"next"),
            closed_at_ms: 1,
        };
        match verdict {
            "accepted" => m.accepted.push(AcceptedUpdate {
                node: me,
                update_hash: Hash::of(b"u"),
                update_bytes: 100,
                tokens: 1000,
                weight: 0.5,
                compute_ms: 7,
            }),
            "rejected" => m.rejected.push(RejectedUpdate {
                node: me,
                update_hash: None,
                reason: RejectReason::SignFlipped,
            }),
            "voiding" => {
                m.rejected.push(RejectedUpdate {
                    node: me,
                    update_hash: None,
                    reason: RejectReason::SpotCheck { worker: 0 },
                });
                m.voided.push(barnraise_protocol::messages::VoidedCredit {
                    node: me,
                    from_round: round - 1,
                    tokens: 1000,
                });
            }
            "missing" => m.missing.push(me),
            _ => {}
        }
        m
    }

    #[test]
    fn totals_from_verified_receipts_only() {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = SigningKey::from_seed([9; 32]).unwrap();
        let me = SigningKey::from_seed([1; 32]).unwrap().node_id();
        for (round, verdict) in [
            (0, "accepted"),
            (1, "rejected"),
            (2, "accepted"),
            (3, "missing"),
            (4, "none"),
            (5, "accepted"),
            (6, "voiding"),
        ] {
            let signed = Signed::sign(&coordinator, &manifest(round, me, verdict)).unwrap();
            std::fs::write(
                dir.path().join(format!("round-{round:06}.manifest")),
                signed.to_bytes().unwrap(),
            )
            .unwrap();
        }
        // A tampered receipt and a forged one count for nothing.
        let mut tampered = Signed::sign(&coordinator, &manifest(7, me, "accepted"))
            .unwrap()
            .to_bytes()
            .unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        std::fs::write(dir.path().join("round-000007.manifest"), tampered).unwrap();
        let forger = SigningKey::from_seed([8; 32]).unwrap();
        let forged = Signed::sign(&forger, &manifest(8, me, "accepted")).unwrap();
        std::fs::write(
            dir.path().join("round-000008.manifest"),
            forged.to_bytes().unwrap(),
        )
        .unwrap();

        let pinned = coordinator.public();
        let (receipts, bad) = read_receipts(dir.path(), &me, Some(&pinned)).unwrap();
        assert_eq!(receipts.len(), 7);
        assert_eq!(bad.len(), 2, "{bad:?}");
        let facts = RunFacts {
            run_id: "run".into(),
            coordinator: pinned.to_hex(),
            flops_per_token: 6.0,
        };
        let t = totals(&receipts, Some(&facts));
        // Round 6's failed check voided round 5's 1000 tokens.
        assert_eq!((t.rounds, t.accepted, t.rejected, t.missing), (6, 3, 2, 1));
        assert_eq!((t.tokens, t.voided_tokens), (2000, 1000));
        assert_eq!((t.compute_ms, t.accepted_bytes), (21, 300));
        assert_eq!(t.credit, Some(12000.0));
        assert_eq!(t.rejections.get("sign-flipped"), Some(&1));

        write_run_facts(dir.path(), &facts).unwrap();
        assert_eq!(read_run_facts(dir.path()).unwrap(), Some(facts));
        std::fs::write(dir.path().join(RUN_FILE), b"{not json").unwrap();
        assert!(read_run_facts(dir.path()).is_err());
        // Oversized files are refused without being read whole.
        let big = std::fs::File::create(dir.path().join(RUN_FILE)).unwrap();
        big.set_len(1 << 30).unwrap();
        assert!(read_run_facts(dir.path()).is_err());
        let huge_receipt = dir.path().join("round-000009.manifest");
        std::fs::File::create(&huge_receipt)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let (_, bad) = read_receipts(dir.path(), &me, Some(&pinned)).unwrap();
        assert!(
            bad.iter()
                .any(|b| b.path == huge_receipt && b.error.contains("larger than")),
            "{bad:?}"
        );
        let nowhere = dir.path().join("nowhere");
        assert_eq!(read_receipts(&nowhere, &me, None).unwrap().0, vec![]);
    }
}
