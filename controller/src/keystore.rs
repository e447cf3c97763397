//! The root CA private keys at rest: sealed with AES-256-GCM under a key-encryption key (KEK).
//!
//! A copy of the data directory (a backup, a disk image, a stray `strings db`) must not hand out the mesh's
//! CA. The KEK comes from `QUICMESH_KEK` (base64 of 32 bytes) or from a file (`--kek-file`, default
//! `<data-dir>/kek`), which is generated owner-only on the first start of a new mesh. Each sealed key
//! is `v1:` + base64(nonce ‖ ciphertext ‖ tag), with the root's fingerprint as associated data, so a
//! sealed key copied onto another root record does not open. `ring` is the only crypto here (the
//! provider rustls already uses).

use std::path::{Path, PathBuf};

use base64::Engine;
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};

/// Environment variable holding the KEK (base64 of 32 bytes); wins over the file.
pub const KEK_ENV: &str = "QUICMESH_KEK";
/// Default KEK file name inside the data directory.
pub const KEK_FILE: &str = "kek";
const KEY_LEN: usize = 32;
const SEALED_PREFIX: &str = "v1:";

/// Why the KEK or a sealed key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The KEK file cannot be read or written.
    #[error("key-encryption key {path}: {problem}", path = path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// The KEK is not 32 bytes of base64.
    #[error("key-encryption key from {source_name}: {problem}")]
    Malformed {
        /// Env variable or file.
        source_name: String,
        /// What is wrong.
        problem: String,
    },
    /// A sealed key does not open with this KEK.
    #[error(
        "the private key of root {fingerprint} does not decrypt with the key-encryption key from {source_name}: it is not the key the store's roots were sealed with (every controller of a mesh needs the same one), or the record is damaged"
    )]
    Open {
        /// Root fingerprint.
        fingerprint: String,
        /// Where the KEK came from.
        source_name: String,
    },
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
}

/// The key-encryption key and where it came from (for messages).
pub struct Kek {
    key: LessSafeKey,
    source_name: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("source", &self.source_name)
            .finish_non_exhaustive()
    }
}

fn parse_key(text: &str, source_name: &str) -> Result<[u8; KEY_LEN], KeyStoreError> {
    let malformed = |problem: String| KeyStoreError::Malformed {
        source_name: source_name.to_owned(),
        problem,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| malformed(format!("not base64: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| malformed(format!("expected {KEY_LEN} bytes, got {}", b.len())))
}

impl Kek {
    /// A KEK from raw bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN], source_name: &str) -> Result<Self, KeyStoreError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| KeyStoreError::Random)?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            source_name: source_name.to_owned(),
        })
    }

    /// Loads the KEK: `env_value` if given, else `path`. A missing file is generated (owner-only) when
    /// `may_generate`, i.e. when nothing sealed under an earlier KEK exists yet.
    pub fn load(
        env_value: Option<&str>,
        path: &Path,
        may_generate: bool,
    ) -> Result<Self, KeyStoreError> {
        if let Some(v) = env_value {
            return Self::from_bytes(&parse_key(v, KEK_ENV)?, KEK_ENV);
        }
        let name = path.display().to_string();
        let file_err = |problem: String| KeyStoreError::File {
            path: path.to_owned(),
            problem,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_bytes(&parse_key(&text, &name)?, &name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_generate => {
                let mut key = [0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| KeyStoreError::Random)?;
                let text = base64::engine::general_purpose::STANDARD.encode(key) + "\n";
                write_private(path, text.as_bytes())
                    .map_err(|e| file_err(format!("cannot create: {e}")))?;
                tracing::info!(path = %name, "generated the key-encryption key of the root CA keys");
                Self::from_bytes(&key, &name)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(file_err(
                "missing, but the store holds root keys sealed with it: restore the file or set QUICMESH_KEK"
                    .into(),
            )),
            Err(e) => Err(file_err(format!("cannot read: {e}"))),
        }
    }

    /// Seals `plain` for the root `fingerprint`.
    pub fn seal(&self, fingerprint: &str, plain: &[u8]) -> Result<String, KeyStoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyStoreError::Random)?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(fingerprint.as_bytes()),
                &mut buf,
            )
            .map_err(|_| KeyStoreError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!(
            "{SEALED_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    /// Opens what [`Kek::seal`] made for `fingerprint`.
    pub fn open(&self, fingerprint: &str, sealed: &str) -> Result<Vec<u8>, KeyStoreError> {
        let err = || KeyStoreError::Open {
            fingerprint: fingerprint.to_owned(),
            source_name: self.source_name.clone(),
        };
        let b64 = sealed.strip_prefix(SEALED_PREFIX).ok_or_else(err)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| err())?;
        if raw.len() < NONCE_LEN {
            return Err(err());
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| err())?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(fingerprint.as_bytes()), &mut buf)
            .map_err(|_| err())?;
        Ok(plain.to_vec())
    }
}

/// Writes `bytes` to a new owner-only (0600) file, replacing nothing.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_refuses_the_wrong_key_or_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kek");
        let kek = Kek::load(None, &path, true).expect("generated");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let sealed = kek
            .seal("fp1", b"-----BEGIN PRIVATE KEY-----")
            .expect("seal");
        assert!(!sealed.contains("PRIVATE"));
        assert_eq!(
            kek.open("fp1", &sealed).expect("open"),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert!(matches!(
            kek.open("fp2", &sealed),
            Err(KeyStoreError::Open { .. })
        ));
        // The same file loads the same key; another key does not open it.
        let again = Kek::load(None, &path, false).expect("reload");
        assert!(again.open("fp1", &sealed).is_ok());
        let other = Kek::from_bytes(&[7u8; 32], "test").expect("other");
        let e = other.open("fp1", &sealed).expect_err("wrong kek");
        assert!(e.to_string().contains("does not decrypt"), "{e}");
        // Missing when something is sealed: an error, not a new key.
        let e = Kek::load(None, &dir.path().join("nope"), false).expect_err("missing");
        assert!(e.to_string().contains("QUICMESH_KEK"), "{e}");
        let e = Kek::load(Some("c2hvcnQ="), &path, true).expect_err("short env");
        assert!(e.to_string().contains("32 bytes"), "{e}");
    }
}
