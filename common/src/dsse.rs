//! DSSE (Dead Simple Signing Envelope) v1: encoding, signing with ed25519, and verification
//! under a trust root.
//!
//! The signature covers the pre-authentication encoding (PAE) of the payload type and the
//! payload bytes exactly as they travel, so a verifier never re-serializes the payload before
//! checking it. Signatures are checked with ed25519 *strict* verification, which refuses weak
//! (small-order) keys and non-canonical signatures, so a valid signature cannot be turned into a
//! second valid signature over the same message.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::Sha256Digest;
use crate::limits::Limits;

/// `payloadType` of a signed manifest.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.keyward.manifest+json; version=1";
/// `payloadType` of a signed node snapshot.
pub const SNAPSHOT_PAYLOAD_TYPE: &str = "application/vnd.keyward.snapshot+json; version=1";

/// Why an envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The encoded envelope is larger than the configured limit.
    #[error("envelope is {len} bytes, over the limit of {max}")]
    TooLarge {
        /// Size of the refused envelope.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The envelope is not the expected JSON object (syntax, unknown or duplicate field).
    #[error("envelope is not valid DSSE JSON: {0}")]
    Json(String),
    /// A base64 field does not decode as standard, padded base64.
    #[error("envelope field {field} is not valid base64")]
    Base64 {
        /// `payload` or `sig`.
        field: &'static str,
    },
    /// There are no signatures, or more than the limit.
    #[error("envelope has {count} signatures; between 1 and {max} are accepted")]
    SignatureCount {
        /// Number of signatures in the envelope.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Why no signature of an envelope was accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// None of the signatures names a key id in the trust root.
    #[error("no signature is from a key in the trust root (key ids: {0})")]
    UnknownKey(String),
    /// A signature names a trusted key but does not verify under it.
    #[error("signature by key {0} does not verify")]
    Invalid(String),
}

/// Why a signing or trust-root key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key material has the wrong length or encoding.
    #[error("key is malformed: {0}")]
    Malformed(&'static str),
    /// The public key is a weak (small-order) ed25519 point.
    #[error("public key is weak (small order) and cannot be trusted")]
    Weak,
    /// The key id written next to a public key is not the one computed from it.
    #[error("key id {stated} does not match the key, whose id is {actual}")]
    KeyIdMismatch {
        /// The id the trust root file states.
        stated: String,
        /// The id computed from the key.
        actual: String,
    },
}

/// The DSSE pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// The id of a manifest signing key: hex of the first 8 bytes of SHA-256 of the raw public key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Computes the id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256Digest::of(key.as_bytes());
        Self(hex::encode(&digest.as_bytes()[..8]))
    }

    /// The id as 16 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeSignature {
    /// The key id the signer claims; it only selects the key to try.
    pub keyid: String,
    /// The raw signature bytes.
    pub sig: Vec<u8>,
}

/// A decoded DSSE envelope. Nothing in it is trusted until [`TrustRoot::verify`] says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The declared type of the payload.
    pub payload_type: String,
    /// The payload bytes exactly as received.
    pub payload: Vec<u8>,
    /// The signatures over `pae(payload_type, payload)`.
    pub signatures: Vec<EnvelopeSignature>,
}

/// The JSON shape of an envelope on the wire.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope {
    payload: String,
    #[serde(rename = "payloadType")]
    payload_type: String,
    signatures: Vec<WireSignature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSignature {
    keyid: String,
    sig: String,
}

impl Envelope {
    /// Decodes the JSON form, enforcing the size limit before any parsing.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, EnvelopeError> {
        if bytes.len() > limits.max_envelope_bytes {
            return Err(EnvelopeError::TooLarge {
                len: bytes.len(),
                max: limits.max_envelope_bytes,
            });
        }
        let wire: WireEnvelope =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        if wire.signatures.is_empty() || wire.signatures.len() > limits.max_signatures {
            return Err(EnvelopeError::SignatureCount {
                count: wire.signatures.len(),
                max: limits.max_signatures,
            });
        }
        let payload = STANDARD
            .decode(wire.payload.as_bytes())
            .map_err(|_| EnvelopeError::Base64 { field: "payload" })?;
        let signatures = wire
            .signatures
            .into_iter()
            .map(|s| {
                let sig = STANDARD
                    .decode(s.sig.as_bytes())
                    .map_err(|_| EnvelopeError::Base64 { field: "sig" })?;
                Ok(EnvelopeSignature {
                    keyid: s.keyid,
                    sig,
                })
            })
            .collect::<Result<Vec<_>, EnvelopeError>>()?;
        Ok(Self {
            payload_type: wire.payload_type,
            payload,
            signatures,
        })
    }

    /// Encodes the envelope as compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        let wire = WireEnvelope {
            payload: STANDARD.encode(&self.payload),
            payload_type: self.payload_type.clone(),
            signatures: self
                .signatures
                .iter()
                .map(|s| WireSignature {
                    keyid: s.keyid.clone(),
                    sig: STANDARD.encode(&s.sig),
                })
                .collect(),
        };
        // Serializing a struct of strings into a Vec cannot fail.
        serde_json::to_vec(&wire).expect("envelope serializes")
    }

    /// Signs `payload` with every key in `keys` (several during a signing-key rotation).
    pub fn sign(payload_type: &str, payload: Vec<u8>, keys: &[&ManifestSigningKey]) -> Self {
        let message = pae(payload_type, &payload);
        let signatures = keys
            .iter()
            .map(|key| EnvelopeSignature {
                keyid: key.key_id().0.clone(),
                sig: key.key.sign(&message).to_bytes().to_vec(),
            })
            .collect();
        Self {
            payload_type: payload_type.to_owned(),
            payload,
            signatures,
        }
    }
}

/// The ed25519 key that signs manifests and snapshots. It is never a TLS key.
///
/// The secret half is zeroized when this value is dropped; `Debug` shows only the key id.
pub struct ManifestSigningKey {
    key: SigningKey,
    id: KeyId,
}

impl ManifestSigningKey {
    /// Generates a new key from the operating system's random source.
    pub fn generate() -> Self {
        Self::from_signing_key(SigningKey::generate(&mut rand_core::OsRng))
    }

    /// Makes the key from its 32-byte seed.
    pub fn from_seed(seed: &[u8]) -> Result<Self, KeyError> {
        let seed: &[u8; 32] = seed
            .try_into()
            .map_err(|_| KeyError::Malformed("seed is not 32 bytes"))?;
        Ok(Self::from_signing_key(SigningKey::from_bytes(seed)))
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let id = KeyId::of(&key.verifying_key());
        Self { key, id }
    }

    /// The 32-byte seed, for storing the key. Zeroized when dropped.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The key id of the public half.
    pub fn key_id(&self) -> &KeyId {
        &self.id
    }

    /// Signs a payload into a one-signature envelope.
    pub fn sign_envelope(&self, payload_type: &str, payload: Vec<u8>) -> Envelope {
        Envelope::sign(payload_type, payload, &[self])
    }
}

impl fmt::Debug for ManifestSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ManifestSigningKey({}, ...)", self.id)
    }
}

/// The set of manifest signing keys an agent accepts.
///
/// Holding more than one key lets the server rotate its signing key with an overlap: agents
/// trust old and new until every agent has the new one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrustRoot {
    keys: Vec<(KeyId, VerifyingKey)>,
}

/// The JSON file form of a trust root.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTrustRoot {
    keys: Vec<WireTrustedKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTrustedKey {
    keyid: String,
    /// Standard base64 of the 32-byte public key.
    public: String,
}

impl TrustRoot {
    /// A trust root holding `keys`. Weak keys are refused.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Result<Self, KeyError> {
        let mut root = Self::default();
        for key in keys {
            root.add(key)?;
        }
        Ok(root)
    }

    /// Adds a key unless it is already present. Weak keys are refused.
    pub fn add(&mut self, key: VerifyingKey) -> Result<(), KeyError> {
        if key.is_weak() {
            return Err(KeyError::Weak);
        }
        let id = KeyId::of(&key);
        if !self.keys.iter().any(|(known, _)| *known == id) {
            self.keys.push((id, key));
        }
        Ok(())
    }

    /// The ids of the trusted keys.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.iter().map(|(id, _)| id)
    }

    /// Parses the JSON file form: `{"keys":[{"keyid":"…","public":"<base64>"}]}`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, KeyError> {
        let wire: WireTrustRoot = serde_json::from_slice(bytes)
            .map_err(|_| KeyError::Malformed("trust root is not valid JSON"))?;
        let mut root = Self::default();
        for entry in wire.keys {
            let raw = STANDARD
                .decode(entry.public.as_bytes())
                .map_err(|_| KeyError::Malformed("public key is not base64"))?;
            let raw: [u8; 32] = raw
                .try_into()
                .map_err(|_| KeyError::Malformed("public key is not 32 bytes"))?;
            let key = VerifyingKey::from_bytes(&raw)
                .map_err(|_| KeyError::Malformed("public key is not a curve point"))?;
            let actual = KeyId::of(&key);
            if actual.as_str() != entry.keyid {
                return Err(KeyError::KeyIdMismatch {
                    stated: entry.keyid,
                    actual: actual.0,
                });
            }
            root.add(key)?;
        }
        Ok(root)
    }

    /// The JSON file form.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = WireTrustRoot {
            keys: self
                .keys
                .iter()
                .map(|(id, key)| WireTrustedKey {
                    keyid: id.0.clone(),
                    public: STANDARD.encode(key.as_bytes()),
                })
                .collect(),
        };
        // A struct of strings always serializes.
        serde_json::to_vec_pretty(&wire).expect("trust root serializes")
    }

    /// Verifies that at least one signature of `envelope` is valid under a trusted key.
    ///
    /// The key id only picks which key to try; a signature naming a trusted key that does not
    /// verify is an error even if another signature would, because a correct signer never
    /// produces one.
    pub fn verify(&self, envelope: &Envelope) -> Result<KeyId, SignatureError> {
        let message = pae(&envelope.payload_type, &envelope.payload);
        let mut accepted = None;
        for signature in &envelope.signatures {
            let Some((id, key)) = self.keys.iter().find(|(id, _)| id.0 == signature.keyid) else {
                continue;
            };
            let Ok(sig) = ed25519_dalek::Signature::from_slice(&signature.sig) else {
                return Err(SignatureError::Invalid(id.0.clone()));
            };
            if key.verify_strict(&message, &sig).is_err() {
                return Err(SignatureError::Invalid(id.0.clone()));
            }
            accepted.get_or_insert_with(|| id.clone());
        }
        accepted.ok_or_else(|| {
            let ids: Vec<String> = envelope
                .signatures
                .iter()
                .map(|s| s.keyid.chars().take(32).collect())
                .collect();
            SignatureError::UnknownKey(ids.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_specification_example() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn pae_of_empty_inputs_keeps_the_separators() {
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn envelope_round_trips_and_verifies() {
        let key = ManifestSigningKey::generate();
        let root = TrustRoot::new([key.verifying_key()]).unwrap();
        let envelope = key.sign_envelope("t", b"{\"a\":1}".to_vec());
        let decoded = Envelope::decode(&envelope.encode(), &Limits::default()).unwrap();
        assert_eq!(decoded, envelope);
        assert_eq!(root.verify(&decoded).unwrap(), *key.key_id());
    }

    #[test]
    fn key_id_is_the_first_eight_bytes_of_the_public_key_hash() {
        let key = ManifestSigningKey::from_seed(&[1u8; 32]).unwrap();
        let digest = Sha256Digest::of(key.verifying_key().as_bytes());
        assert_eq!(key.key_id().as_str(), hex::encode(&digest.as_bytes()[..8]));
        assert_eq!(key.key_id().as_str().len(), 16);
    }

    #[test]
    fn trust_root_file_round_trips_and_checks_key_ids() {
        let key = ManifestSigningKey::generate();
        let root = TrustRoot::new([key.verifying_key()]).unwrap();
        assert_eq!(TrustRoot::from_json(&root.to_json()).unwrap(), root);

        let other = ManifestSigningKey::generate();
        let forged = String::from_utf8(root.to_json())
            .unwrap()
            .replace(key.key_id().as_str(), other.key_id().as_str());
        assert_eq!(
            TrustRoot::from_json(forged.as_bytes()),
            Err(KeyError::KeyIdMismatch {
                stated: other.key_id().to_string(),
                actual: key.key_id().to_string()
            })
        );
    }

    #[test]
    fn trust_root_refuses_weak_keys() {
        // The identity point (all zeros but the sign convention) has small order.
        let mut raw = [0u8; 32];
        raw[0] = 1;
        let weak = VerifyingKey::from_bytes(&raw).unwrap();
        assert_eq!(TrustRoot::new([weak]), Err(KeyError::Weak));
    }

    #[test]
    fn debug_of_the_signing_key_shows_only_its_id() {
        let key = ManifestSigningKey::from_seed(&[9u8; 32]).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, format!("ManifestSigningKey({}, ...)", key.key_id()));
    }
}
