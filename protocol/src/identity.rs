//! Identities: one Ed25519 key per node (and per org), used for everything —
//! signing protocol messages, naming the node in the ledger, and as its libp2p
//! identity on the mesh — so a node is the same party everywhere.
//!
//! Key files hold the 32-byte Ed25519 seed as hex behind a versioned first
//! line. They are created with mode 0600 and refused if others can read them.

use crate::hash::{from_hex_into, to_hex};
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

const KEY_FILE_HEADER: &str = "barnraise-ed25519-seed-v1";

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

/// A node's identity: its public key. Printed as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub PublicKey);

/// An org's identity: the public key that signs its node certificates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OrgId(pub PublicKey);

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

/// What went wrong with a key, a key file or a signature.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key file {path} does not exist; create one with `barnraise id new`")]
    Missing { path: PathBuf },
    #[error("key file {path} could not be read: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} could not be written: {source}")]
    Unwritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} already exists; refusing to overwrite an identity")]
    Exists { path: PathBuf },
    #[error("key file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("could not generate a key: the system random source failed")]
    Random,
    #[error("invalid key material: {0}")]
    InvalidKey(String),
    #[error("signature does not verify")]
    BadSignature,
}

impl PublicKey {
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Verifies `signature` over `message` with this key.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), IdentityError> {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(message, &signature.0)
            .map_err(|_| IdentityError::BadSignature)
    }

    /// The libp2p peer id of this key, so mesh connections can be matched to
    /// protocol identities.
    pub fn to_peer_id(&self) -> Result<libp2p_identity::PeerId, IdentityError> {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .map_err(|e| IdentityError::InvalidKey(e.to_string()))?;
        Ok(libp2p_identity::PublicKey::from(key).to_peer_id())
    }

    /// Recovers the Ed25519 key behind a libp2p peer id (ed25519 peer ids
    /// embed the key itself).
    pub fn from_peer_id(peer: &libp2p_identity::PeerId) -> Result<PublicKey, IdentityError> {
        let multihash = peer.as_ref();
        if multihash.code() != 0 {
            return Err(IdentityError::InvalidKey(
                "peer id does not embed its key".into(),
            ));
        }
        let key = libp2p_identity::PublicKey::try_decode_protobuf(multihash.digest())
            .map_err(|e| IdentityError::InvalidKey(e.to_string()))?;
        let ed = key
            .try_into_ed25519()
            .map_err(|_| IdentityError::InvalidKey("peer id is not an Ed25519 key".into()))?;
        Ok(PublicKey(ed.to_bytes()))
    }
}

macro_rules! hex_display {
    ($ty:ty, $name:literal, $get:expr) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&to_hex(&$get(self)))
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let hex = to_hex(&$get(self));
                write!(f, "{}({})", $name, &hex[..12])
            }
        }
        impl FromStr for $ty {
            type Err = crate::hash::HexError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                from_hex_into(s.trim(), &mut out)?;
                Ok(<$ty>::from_bytes(out))
            }
        }
    };
}

impl PublicKey {
    fn from_bytes(b: [u8; 32]) -> Self {
        PublicKey(b)
    }
}
impl NodeId {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        NodeId(PublicKey(b))
    }
    /// The first 12 hex characters, for logs and tables.
    pub fn short(&self) -> String {
        to_hex(&self.0.0[..6])
    }
}
impl OrgId {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        OrgId(PublicKey(b))
    }
}

hex_display!(PublicKey, "PublicKey", |k: &PublicKey| k.0);
hex_display!(NodeId, "NodeId", |k: &NodeId| k.0.0);
hex_display!(OrgId, "OrgId", |k: &OrgId| k.0.0);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", to_hex(&self.0[..6]))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let bytes: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(bytes))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Signature, A::Error> {
                let mut out = [0u8; 64];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(65, &self));
                }
                Ok(Signature(out))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// A secret Ed25519 key: a node's or an org's.
pub struct SigningKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({:?})", self.public())
    }
}

impl Clone for SigningKey {
    fn clone(&self) -> Self {
        // The seed was accepted once, so it is accepted again.
        match SigningKey::from_seed(self.seed) {
            Ok(key) => key,
            Err(_) => unreachable_seed(),
        }
    }
}

#[cold]
fn unreachable_seed() -> SigningKey {
    // ring accepts every 32-byte Ed25519 seed; this path cannot be reached.
    std::process::abort()
}

impl SigningKey {
    /// A fresh key from the system's random source.
    pub fn generate() -> Result<SigningKey, IdentityError> {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| IdentityError::Random)?;
        SigningKey::from_seed(seed)
    }

    /// A key from a 32-byte seed. Tests and `barnraise up` use fixed seeds
    /// so runs are reproducible.
    pub fn from_seed(seed: [u8; 32]) -> Result<SigningKey, IdentityError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|e| IdentityError::InvalidKey(e.to_string()))?;
        Ok(SigningKey { seed, pair })
    }

    pub fn public(&self) -> PublicKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(out)
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.public())
    }

    pub fn org_id(&self) -> OrgId {
        OrgId(self.public())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        Signature(out)
    }

    /// The same key as a libp2p identity, so the node has one identity on
    /// the mesh and in the ledger.
    pub fn to_libp2p(&self) -> Result<libp2p_identity::Keypair, IdentityError> {
        libp2p_identity::Keypair::ed25519_from_bytes(self.seed)
            .map_err(|e| IdentityError::InvalidKey(e.to_string()))
    }

    /// Writes a new key file with mode 0600. Never overwrites an existing one.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| IdentityError::Unwritable {
                path: path.into(),
                source,
            })?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => IdentityError::Exists { path: path.into() },
                _ => IdentityError::Unwritable {
                    path: path.into(),
                    source,
                },
            })?;
        let text = format!("{KEY_FILE_HEADER}\n{}\n", to_hex(&self.seed));
        file.write_all(text.as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(|source| IdentityError::Unwritable {
                path: path.into(),
                source,
            })
    }

    /// Reads a key file, refusing one that is missing, readable by others, or malformed.
    pub fn load(path: &Path) -> Result<SigningKey, IdentityError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => IdentityError::Missing { path: path.into() },
            _ => IdentityError::Unreadable {
                path: path.into(),
                source,
            },
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.into(),
                mode,
            });
        }
        if meta.len() > 4096 {
            return Err(IdentityError::Malformed {
                path: path.into(),
                reason: format!("{} bytes is far larger than a key file", meta.len()),
            });
        }
        let text = fs::read_to_string(path).map_err(|source| IdentityError::Unreadable {
            path: path.into(),
            source,
        })?;
        let malformed = |reason: &str| IdentityError::Malformed {
            path: path.into(),
            reason: reason.to_string(),
        };
        let mut lines = text.lines();
        match lines.next() {
            None => return Err(malformed("the file is empty")),
            Some(first) if first.trim() != KEY_FILE_HEADER => {
                return Err(malformed(&format!(
                    "first line must be `{KEY_FILE_HEADER}`"
                )));
            }
            Some(_) => {}
        }
        let hex = lines
            .next()
            .ok_or_else(|| malformed("the seed line is missing"))?;
        let mut seed = [0u8; 32];
        from_hex_into(hex.trim(), &mut seed).map_err(|e| malformed(&format!("seed: {e}")))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(malformed("unexpected lines after the seed"));
        }
        SigningKey::from_seed(seed)
    }

    /// Loads the key at `path`, or creates one there if none exists yet.
    pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), IdentityError> {
        match SigningKey::load(path) {
            Ok(key) => Ok((key, false)),
            Err(IdentityError::Missing { .. }) => {
                let key = SigningKey::generate()?;
                key.save_new(path)?;
                Ok((key, true))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed([n; 32]).unwrap_or_else(|_| unreachable_seed())
    }

    #[test]
    fn sign_and_verify() {
        let k = key(1);
        let sig = k.sign(b"hello");
        assert!(k.public().verify(b"hello", &sig).is_ok());
        assert!(k.public().verify(b"hellp", &sig).is_err());
        assert!(key(2).public().verify(b"hello", &sig).is_err());
    }

    #[test]
    fn libp2p_identity_is_the_same_key() {
        let k = key(7);
        let peer = k.to_libp2p().map(|kp| kp.public().to_peer_id());
        let peer = match peer {
            Ok(p) => p,
            Err(e) => panic!("libp2p key: {e}"),
        };
        assert_eq!(k.public().to_peer_id().ok(), Some(peer));
        assert_eq!(PublicKey::from_peer_id(&peer).ok(), Some(k.public()));
    }

    #[test]
    fn key_file_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("sub/node.key");
        let k = key(3);
        assert!(k.save_new(&path).is_ok());
        let mode = fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .ok();
        assert_eq!(mode, Some(0o600));
        let loaded = SigningKey::load(&path).map(|k| k.public()).ok();
        assert_eq!(loaded, Some(k.public()));
        assert!(matches!(
            k.save_new(&path),
            Err(IdentityError::Exists { .. })
        ));
    }

    #[test]
    fn bad_key_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("node.key");
        let err = SigningKey::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("does not exist") && err.contains("node.key"),
            "{err}"
        );

        let write = |text: &str, mode: u32| {
            fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        let cases: &[(&str, u32, &str)] = &[
            ("", 0o600, "empty"),
            ("not a key\n", 0o600, "first line"),
            (
                &format!("{KEY_FILE_HEADER}\n"),
                0o600,
                "seed line is missing",
            ),
            (&format!("{KEY_FILE_HEADER}\nzz\n"), 0o600, "seed"),
            (
                &format!("{KEY_FILE_HEADER}\n{}\nextra\n", "ab".repeat(32)),
                0o600,
                "unexpected",
            ),
            (
                &format!("{KEY_FILE_HEADER}\n{}\n", "ab".repeat(32)),
                0o644,
                "chmod 600",
            ),
        ];
        for (text, mode, needle) in cases {
            write(text, *mode);
            let err = SigningKey::load(&path)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains(needle) && err.contains("node.key"),
                "{needle}: {err}"
            );
        }
        write(&format!("{KEY_FILE_HEADER}\n{}\n", "ab".repeat(32)), 0o600);
        assert!(SigningKey::load(&path).is_ok());
    }

    #[test]
    fn ids_print_and_parse() {
        let id = key(9).node_id();
        assert_eq!(id.to_string().parse::<NodeId>().ok(), Some(id));
        assert_eq!(id.to_string().len(), 64);
    }
}
