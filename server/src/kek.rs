//! The key-encryption key: how host keys and secret files are stored at rest.
//!
//! XChaCha20-Poly1305 with a random 192-bit nonce per value and the value's place in the store
//! (for example `host-key:<container>`) as associated data, so a ciphertext copied into another
//! row does not decrypt. Stored form: nonce (24 bytes) followed by ciphertext and tag.

use std::fmt;
use std::path::Path;

use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use keyward_certs::files;
use keyward_common::secret::SecretBytes;
use rand_core::{OsRng, RngCore as _};
use zeroize::Zeroizing;

const NONCE_LEN: usize = 24;

/// Why a value could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KekError {
    /// The key file is missing, unreadable or too open.
    #[error("key-encryption key: {0}")]
    File(#[from] files::FileError),
    /// The key file does not hold 32 bytes.
    #[error("key-encryption key file is not 32 bytes")]
    BadKey,
    /// A stored value does not decrypt: wrong key, moved or edited ciphertext.
    #[error("stored secret for {0} does not decrypt (wrong key-encryption key or tampered row)")]
    Open(String),
}

/// The key-encryption key. Zeroized on drop; `Debug` shows nothing.
pub struct Kek {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(...)")
    }
}

impl Kek {
    /// Generates a new key and writes it to `path` (mode 0600).
    pub fn create(path: &Path) -> Result<Self, KekError> {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(key.as_mut());
        files::write_secret(path, key.as_ref())?;
        Self::from_bytes(key.as_ref())
    }

    /// Loads the key from `path`, refusing a file readable by others.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let bytes = files::read_secret(path)?;
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, KekError> {
        let cipher = XChaCha20Poly1305::new_from_slice(bytes).map_err(|_| KekError::BadKey)?;
        Ok(Self { cipher })
    }

    /// Encrypts `plaintext`, bound to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            // Encryption only fails for inputs longer than the cipher's 256 GiB limit.
            .expect("plaintext within XChaCha20-Poly1305 limits");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a value sealed with the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<SecretBytes, KekError> {
        if sealed.len() < NONCE_LEN {
            return Err(KekError::Open(context.to_string()));
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map(SecretBytes::new)
            .map_err(|_| KekError::Open(context.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_context_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek.key")).unwrap();
        let sealed = kek.seal("host-key:c1", b"private");
        assert_eq!(
            kek.open("host-key:c1", &sealed).unwrap().expose(),
            b"private"
        );
        assert!(
            matches!(kek.open("host-key:c2", &sealed), Err(KekError::Open(c)) if c == "host-key:c2")
        );

        let other = Kek::create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("host-key:c1", &sealed).is_err());

        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(kek.open("host-key:c1", &flipped).is_err());
        assert!(!sealed.windows(7).any(|w| w == b"private"));
    }

    #[test]
    fn the_key_file_is_private_and_reloads() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.key");
        let kek = Kek::create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = kek.seal("x", b"y");
        assert_eq!(
            Kek::load(&path)
                .unwrap()
                .open("x", &sealed)
                .unwrap()
                .expose(),
            b"y"
        );
    }
}
