//! Node certificates as files, and the checks every party applies to them.
//!
//! An org vouches for a node by signing a [`NodeCertificate`]; the node shows
//! it in its `Join`. On disk a certificate is a small text file an operator
//! can read and mail around:
//!
//! ```text
//! # barnraise node certificate: Example University vouches for a node.
//! # org:     Example University (3f2a…, 64 hex characters)
//! # node:    9c41…
//! # issued:  2025-03-01 12:00:00 UTC
//! # expires: 2026-03-01 12:00:00 UTC
//! # id:      5be0…  (the line a run operator lists to revoke it)
//! barnraise-node-certificate-v1
//! 0f3a…  (hex of the signed envelope's wire encoding, one line)
//! ```
//!
//! `#` lines and blank lines are for people and are ignored when loading:
//! everything that counts is read from the signed envelope, which must verify
//! and be signed by the org it names. Files are read through a size cap, and
//! written atomically without ever replacing an existing file.

use crate::hash::{Hash, from_hex_into, to_hex};
use crate::identity::OrgId;
use crate::limits::{
    ENVELOPE_OVERHEAD, MAX_CERTIFICATE_BYTES, MAX_TEXT_BYTES, MAX_WORKERS_PER_NODE,
};
use crate::messages::NodeCertificate;
use crate::signed::{Signed, SignedError};
use crate::wire::WireError;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The first line that is not a comment.
pub const CERTIFICATE_FILE_HEADER: &str = "barnraise-node-certificate-v1";
/// Largest certificate file read: the hex of the largest envelope plus
/// generous room for comments. Anything larger is not a certificate.
pub const MAX_CERTIFICATE_FILE_BYTES: u64 = 16 * 1024;

/// A certificate's id: the hash of its whole signed envelope (signer, kind,
/// body, signature), so two certificates for the same node — a renewal, say —
/// have different ids and can be revoked one at a time. It is what a run
/// operator lists to revoke one.
pub fn certificate_id(cert: &Signed<NodeCertificate>) -> Hash {
    // Hashed part by part rather than through the wire encoding so naming a
    // certificate cannot fail; only the body varies in length, so the parts
    // cannot be shifted into one another.
    let mut hasher = crate::hash::Hasher::new();
    hasher.update(&cert.signer.0);
    hasher.update(&(cert.kind as u16).to_le_bytes());
    hasher.update(&cert.body);
    hasher.update(&cert.signature.0);
    hasher.finish()
}

/// Why a signed certificate is not what it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate does not verify ({0}): it was altered after signing, or is corrupt")]
    DoesNotVerify(#[source] SignedError),
    #[error(
        "the certificate names org {org} but is signed by {signer}: it is forged, the org did not issue it"
    )]
    NotSignedByOrg { org: OrgId, signer: OrgId },
    #[error("the certificate's org name is longer than {MAX_TEXT_BYTES} bytes")]
    NameTooLong,
    #[error("the certificate expires before it was issued")]
    ExpiresBeforeIssued,
    #[error("the certificate allows {0} workers; a certificate allows 1 to {MAX_WORKERS_PER_NODE}")]
    WorkersOutOfRange(u32),
}

/// Checks that `cert` verifies and that its signer is the org it names, and
/// returns what it says. Whether it is in date, names the right node, or was
/// revoked is the caller's question: those depend on when and where it is used.
pub fn verify_certificate(
    cert: &Signed<NodeCertificate>,
) -> Result<NodeCertificate, CertificateError> {
    let body = cert.verify(None).map_err(CertificateError::DoesNotVerify)?;
    if body.org.0 != cert.signer {
        return Err(CertificateError::NotSignedByOrg {
            org: body.org,
            signer: OrgId(cert.signer),
        });
    }
    if body.org_name.len() > MAX_TEXT_BYTES {
        return Err(CertificateError::NameTooLong);
    }
    if body.expires_ms <= body.issued_ms {
        return Err(CertificateError::ExpiresBeforeIssued);
    }
    if body.max_workers == 0 || body.max_workers as usize > MAX_WORKERS_PER_NODE {
        return Err(CertificateError::WorkersOutOfRange(body.max_workers));
    }
    Ok(body)
}

/// What went wrong with a certificate file. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertificateFileError {
    #[error(
        "certificate file {path} does not exist; the node's org creates one with `barnraise org enroll --node <node id>`"
    )]
    Missing { path: PathBuf },
    #[error("certificate file {path} could not be read: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate file {path} could not be written: {source}")]
    Unwritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "certificate file {path} already exists; refusing to overwrite it (move it away or write elsewhere)"
    )]
    Exists { path: PathBuf },
    #[error(
        "certificate file {path} is larger than {limit} bytes, far larger than any certificate; is it the right file?"
    )]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("certificate file {path} is not a barnraise certificate: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("certificate file {path} is refused: {source}")]
    Invalid {
        path: PathBuf,
        source: CertificateError,
    },
    #[error("certificate for {path} could not be encoded: {source}")]
    Encode { path: PathBuf, source: WireError },
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`, so files
/// and command output show dates people can read without a date library.
pub fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01: count whole 400-year
/// eras (146 097 days each), then years within the era, with years taken to
/// start on 1 March so the leap day falls at the end.
fn civil_date(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// The text of a certificate file: comment lines that say what it is, then
/// the header and the signed envelope in hex. It must verify first.
pub fn render(cert: &Signed<NodeCertificate>, path: &Path) -> Result<String, CertificateFileError> {
    let body = verify_certificate(cert).map_err(|source| CertificateFileError::Invalid {
        path: path.into(),
        source,
    })?;
    let bytes = cert
        .to_bytes()
        .map_err(|source| CertificateFileError::Encode {
            path: path.into(),
            source,
        })?;
    // The name is the org's own text; keep it on its comment line.
    let name: String = body
        .org_name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Ok(format!(
        "# barnraise node certificate: {name} vouches for a node.\n\
         # org:     {name} ({org})\n\
         # node:    {node}\n\
         # issued:  {issued}\n\
         # expires: {expires}\n\
         # id:      {id}\n\
         # Give this file to the node (`barnraise node --certificate FILE`).\n\
         # Lines starting with # are ignored; the signed line below is what counts.\n\
         {CERTIFICATE_FILE_HEADER}\n\
         {hex}\n",
        org = body.org,
        node = body.node,
        issued = format_utc(body.issued_ms),
        expires = format_utc(body.expires_ms),
        id = certificate_id(cert),
        hex = to_hex(&bytes),
    ))
}

/// Writes `cert` to a new file at `path`. It must verify first (a file that
/// would not load is never written), an existing file is never replaced, and
/// a crash leaves either no file or the whole file.
pub fn save_certificate(
    path: &Path,
    cert: &Signed<NodeCertificate>,
) -> Result<(), CertificateFileError> {
    let text = render(cert, path)?;
    let unwritable = |source| CertificateFileError::Unwritable {
        path: path.into(),
        source,
    };
    if fs::symlink_metadata(path).is_ok() {
        return Err(CertificateFileError::Exists { path: path.into() });
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "certificate".into());
    let temp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        // A hard link publishes the finished file under its name and, unlike
        // a rename, fails instead of replacing a file that appeared meanwhile.
        fs::hard_link(&temp, path)
    })();
    let _ = fs::remove_file(&temp);
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(CertificateFileError::Exists { path: path.into() })
        }
        Err(e) => Err(unwritable(e)),
    }
}

/// Reads a certificate file and checks that it verifies and is signed by the
/// org it names. It does not check dates: an expired certificate still loads,
/// so it can be inspected.
pub fn load_certificate(path: &Path) -> Result<Signed<NodeCertificate>, CertificateFileError> {
    let file = fs::File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CertificateFileError::Missing { path: path.into() },
        _ => CertificateFileError::Unreadable {
            path: path.into(),
            source,
        },
    })?;
    let mut raw = Vec::new();
    file.take(MAX_CERTIFICATE_FILE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|source| CertificateFileError::Unreadable {
            path: path.into(),
            source,
        })?;
    parse_certificate(&raw, path)
}

/// Parses the bytes of a certificate file (what [`load_certificate`] read
/// from `path`, which only names the source in errors) and checks that it
/// verifies and is signed by the org it names.
pub fn parse_certificate(
    raw: &[u8],
    path: &Path,
) -> Result<Signed<NodeCertificate>, CertificateFileError> {
    if raw.len() as u64 > MAX_CERTIFICATE_FILE_BYTES {
        return Err(CertificateFileError::TooLarge {
            path: path.into(),
            limit: MAX_CERTIFICATE_FILE_BYTES,
        });
    }
    let malformed = |reason: String| CertificateFileError::Malformed {
        path: path.into(),
        reason,
    };
    let text = std::str::from_utf8(raw).map_err(|_| malformed("it is not text".into()))?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    match lines.next() {
        None => return Err(malformed("it is empty".into())),
        Some(CERTIFICATE_FILE_HEADER) => {}
        Some(_) => {
            return Err(malformed(format!(
                "the first line that is not a comment must be `{CERTIFICATE_FILE_HEADER}`"
            )));
        }
    }
    let hex = lines
        .next()
        .ok_or_else(|| malformed("the signed line after the header is missing".into()))?;
    if lines.next().is_some() {
        return Err(malformed(
            "there are lines after the signed line (only # comments may be added)".into(),
        ));
    }
    if hex.len() % 2 != 0 {
        return Err(malformed(
            "the signed line has an odd number of hex digits; it was cut short or edited".into(),
        ));
    }
    let limit = MAX_CERTIFICATE_BYTES + ENVELOPE_OVERHEAD;
    if hex.len() / 2 > limit {
        return Err(malformed(format!(
            "the signed line is longer than a certificate can be ({limit} bytes)"
        )));
    }
    let mut bytes = vec![0u8; hex.len() / 2];
    from_hex_into(hex, &mut bytes)
        .map_err(|e| malformed(format!("the signed line is not hex: {e}")))?;
    let cert = Signed::<NodeCertificate>::from_bytes(&bytes).map_err(|e| {
        malformed(format!(
            "the signed line does not decode; it was cut short or altered ({e})"
        ))
    })?;
    verify_certificate(&cert).map_err(|source| CertificateFileError::Invalid {
        path: path.into(),
        source,
    })?;
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SigningKey;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed([n; 32]).unwrap()
    }

    fn cert_signed_by(signer: &SigningKey, org: &SigningKey) -> Signed<NodeCertificate> {
        let body = NodeCertificate {
            org: org.org_id(),
            org_name: "Example University".into(),
            node: key(2).node_id(),
            issued_ms: 1_700_000_000_000,
            expires_ms: 1_800_000_000_000,
            max_workers: 8,
        };
        Signed::sign(signer, &body).unwrap()
    }

    fn cert() -> Signed<NodeCertificate> {
        cert_signed_by(&key(1), &key(1))
    }

    fn error_text(path: &Path) -> String {
        match load_certificate(path) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        }
    }

    /// The file's text with its signed line replaced by `f(line)`.
    fn rewrite_signed_line(text: &str, f: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        let mut after_header = false;
        for line in text.lines() {
            if after_header && !line.starts_with('#') {
                out.push_str(&f(line));
            } else {
                out.push_str(line);
            }
            out.push('\n');
            after_header |= line == CERTIFICATE_FILE_HEADER;
        }
        out
    }

    #[test]
    fn round_trip_and_readable_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.cert");
        let cert = cert();
        save_certificate(&path, &cert).unwrap();
        assert_eq!(load_certificate(&path).unwrap(), cert);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("Example University"), "{text}");
        assert!(text.contains(&key(2).node_id().to_string()), "{text}");
        assert!(text.contains("2023-11-14 22:13:20 UTC"), "{text}");
        assert!(text.contains(&certificate_id(&cert).to_hex()), "{text}");
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.cert");
        fs::write(&path, "precious").unwrap();
        let err = save_certificate(&path, &cert())
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("already exists") && e.contains("node.cert")),
            "{err:?}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn forged_certificates_are_neither_written_nor_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("forged.cert");
        // Key 3 signs a certificate claiming to be from org 1.
        let forged = cert_signed_by(&key(3), &key(1));
        let err = save_certificate(&path, &forged)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("forged")),
            "{err:?}"
        );
        assert!(!path.exists());
        // Written by hand, it is refused on loading.
        let good = dir.path().join("good.cert");
        save_certificate(&good, &cert()).unwrap();
        let hex = to_hex(&forged.to_bytes().unwrap());
        let text = rewrite_signed_line(&fs::read_to_string(&good).unwrap(), |_| hex.clone());
        fs::write(&path, text).unwrap();
        let err = error_text(&path);
        assert!(
            err.contains("forged") && err.contains("forged.cert"),
            "{err}"
        );
    }

    #[test]
    fn every_tampered_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.cert");
        let cert = cert();
        save_certificate(&path, &cert).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let bytes = cert.to_bytes().unwrap();
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            let hex = to_hex(&tampered);
            fs::write(&path, rewrite_signed_line(&text, |_| hex.clone())).unwrap();
            assert!(load_certificate(&path).is_err(), "byte {i} flipped loaded");
        }
        // A flip inside the signed body is reported as tampering.
        let at = bytes
            .windows(cert.body.len())
            .position(|w| w == cert.body.as_slice())
            .unwrap();
        let mut tampered = bytes.clone();
        tampered[at + cert.body.len() - 1] ^= 0x01;
        let hex = to_hex(&tampered);
        fs::write(&path, rewrite_signed_line(&text, |_| hex.clone())).unwrap();
        let err = error_text(&path);
        assert!(
            err.contains("does not verify") && err.contains("node.cert"),
            "{err}"
        );
    }

    #[test]
    fn broken_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.cert");
        save_certificate(&path, &cert()).unwrap();
        let good = fs::read_to_string(&path).unwrap();
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "empty"),
            ("# only a comment\n\n".into(), "empty"),
            (
                good.replace(CERTIFICATE_FILE_HEADER, "barnraise-ed25519-seed-v1"),
                "first line",
            ),
            (
                rewrite_signed_line(&good, |l| l.replace('a', "z")),
                "not hex",
            ),
            (
                rewrite_signed_line(&good, |l| l[..l.len() - 1].into()),
                "odd number",
            ),
            (
                rewrite_signed_line(&good, |l| l[..l.len() / 4 * 2].into()),
                "cut short",
            ),
            (
                rewrite_signed_line(&good, |l| l[..l.len() - 2].into()),
                "cut short",
            ),
            (
                good.lines()
                    .take_while(|l| l.starts_with('#'))
                    .chain([CERTIFICATE_FILE_HEADER])
                    .collect::<Vec<_>>()
                    .join("\n"),
                "missing",
            ),
            (format!("{good}extra\n"), "lines after"),
            (
                rewrite_signed_line(&good, |l| l.repeat(20)),
                "longer than a certificate",
            ),
        ];
        for (text, needle) in cases {
            fs::write(&path, &text).unwrap();
            let err = error_text(&path);
            assert!(
                err.contains(needle) && err.contains("node.cert"),
                "{needle}: {err}"
            );
        }
        fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        assert!(error_text(&path).contains("not text"));
        let missing = dir.path().join("absent.cert");
        let err = error_text(&missing);
        assert!(
            err.contains("does not exist") && err.contains("absent.cert"),
            "{err}"
        );
    }

    #[test]
    fn huge_files_are_read_only_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.cert");
        let file = fs::File::create(&path).unwrap();
        // A sparse 1 GiB file: reading it whole would take the memory.
        file.set_len(1 << 30).unwrap();
        let err = error_text(&path);
        assert!(
            err.contains("larger than") && err.contains("huge.cert"),
            "{err}"
        );
    }

    #[test]
    fn ids_differ_between_renewals() {
        let first = cert();
        let mut body = first.verify(None).unwrap();
        body.expires_ms += 1;
        let renewed = Signed::sign(&key(1), &body).unwrap();
        assert_ne!(certificate_id(&first), certificate_id(&renewed));
        assert_eq!(certificate_id(&first), certificate_id(&first.clone()));
    }

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
        assert_eq!(format_utc(4_107_542_400_000), "2100-03-01 00:00:00 UTC");
    }
}
