//! Containers for secret bytes: zeroized when dropped, never shown by `Debug`.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// Secret bytes (a private key, a file to inject, a join token).
///
/// The buffer is overwritten with zeros when the value is dropped. `Debug` prints `...`, so a
/// secret that ends up in a log line or an error by mistake shows nothing. Copies made with
/// [`SecretBytes::expose`] and then cloned by the caller are the caller's to protect.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes`; they are zeroized when this value is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret bytes. Keep the borrow short and do not log it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Lets the bytes be handed to an owner-based buffer (`bytes::Bytes::from_owner`), so they are
/// zeroized when the last reference is dropped instead of being copied into a plain buffer.
impl AsRef<[u8]> for SecretBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl From<String> for SecretBytes {
    fn from(text: String) -> Self {
        Self::new(text.into_bytes())
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes(...)")
    }
}

impl Zeroize for SecretBytes {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

/// A secret that is text (a join token, an OpenSSH private key).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Takes ownership of `text`; it is zeroized when this value is dropped.
    pub fn new(text: String) -> Self {
        Self(Zeroizing::new(text))
    }

    /// The secret text. Keep the borrow short and do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(...)")
    }
}

impl serde::Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let bytes = SecretBytes::from(b"hunter2-canary".to_vec());
        let text = SecretString::from("hunter2-canary".to_string());
        assert_eq!(format!("{bytes:?}"), "SecretBytes(...)");
        assert_eq!(format!("{text:?}"), "SecretString(...)");
        assert_eq!(
            format!("{:#?}", Some(&text)),
            "Some(\n    SecretString(...),\n)"
        );
    }

    #[test]
    fn zeroize_clears_the_buffer() {
        let mut bytes = SecretBytes::from(vec![7u8; 16]);
        bytes.zeroize();
        assert!(bytes.expose().iter().all(|b| *b == 0) || bytes.is_empty());
    }
}
