//! Validated identifiers: node ids, container ids and names, operator and user names, trust
//! domains, image ids and SHA-256 digests.
//!
//! Each type can only be made by parsing, so code that holds a [`NodeId`] knows it matches the
//! grammar `[a-z0-9][a-z0-9.-]{0,62}` and can be put into a URI, a Docker label or a file name
//! without further escaping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The identifier does not match `[a-z0-9][a-z0-9.-]{0,62}`.
    #[error(
        "{kind} {value:?} is invalid: use 1 to 63 characters from a-z, 0-9, '.' and '-', starting \
         with a letter or digit"
    )]
    BadName {
        /// Which kind of identifier was expected.
        kind: &'static str,
        /// The refused value, cut to 80 characters.
        value: String,
    },
    /// The image id is not `sha256:` followed by 64 lower-case hex digits.
    #[error("image id {0:?} is invalid: expected sha256: followed by 64 lower-case hex digits")]
    BadImageId(String),
    /// The digest is not 64 lower-case hex digits.
    #[error("digest {0:?} is invalid: expected 64 lower-case hex digits")]
    BadDigest(String),
}

/// Checks the shared grammar of node ids, container ids and names, operator and user names.
fn check_name(kind: &'static str, value: &str) -> Result<(), IdError> {
    let bytes = value.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'.' || *b == b'-');
    if first_ok && rest_ok && bytes.len() <= 63 {
        Ok(())
    } else {
        Err(IdError::BadName {
            kind,
            value: value.chars().take(80).collect(),
        })
    }
}

/// Declares a string newtype whose only constructor checks [`check_name`].
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses and checks the identifier.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_name($kind, &value)?;
                Ok(Self(value))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// The id of a node (a Docker host running an agent), as in `spiffe://<domain>/node/<id>`.
    NodeId,
    "node id"
);
name_type!(
    /// The server-assigned id of a container, stable across its generations.
    ContainerId,
    "container id"
);
name_type!(
    /// The operator-chosen name of a container, unique on its node.
    ContainerName,
    "container name"
);
name_type!(
    /// The name of an operator, as in `spiffe://<domain>/operator/<name>`.
    OperatorName,
    "operator name"
);
name_type!(
    /// The name of a user whose SSH keys may be granted to containers.
    UserName,
    "user name"
);
name_type!(
    /// The name of a group of users.
    GroupName,
    "group name"
);

/// A trust domain: a DNS-like name such as `fleet.example`.
///
/// The grammar is that of a node id, but up to 253 characters, so any host name fits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses and checks a trust domain.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        let ok = !value.is_empty()
            && value.len() <= 253
            && value
                .split('.')
                .all(|label| check_name("trust domain", label).is_ok());
        if ok {
            Ok(Self(value))
        } else {
            Err(IdError::BadName {
                kind: "trust domain",
                value: value.chars().take(80).collect(),
            })
        }
    }

    /// The domain as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SHA-256 digest, shown and serialized as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 lower-case hex digits.
    pub fn parse_hex(value: &str) -> Result<Self, IdError> {
        let lower = value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let mut out = [0u8; 32];
        if value.len() != 64 || !lower || hex::decode_to_slice(value, &mut out).is_err() {
            return Err(IdError::BadDigest(value.chars().take(80).collect()));
        }
        Ok(Self(out))
    }

    /// The digest as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({})", self.to_hex())
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A Docker image id: `sha256:` and 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(String);

impl ImageId {
    /// Parses and checks an image id.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        match value.strip_prefix("sha256:") {
            Some(hex) if Sha256Digest::parse_hex(hex).is_ok() => Ok(Self(value)),
            _ => Err(IdError::BadImageId(value.chars().take(80).collect())),
        }
    }

    /// The id as a string slice, with its `sha256:` prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ImageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ImageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_documented_grammar_only() {
        for ok in ["a", "node-1", "0.db-2", &"a".repeat(63)] {
            assert!(NodeId::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "A",
            "a_b",
            "a/b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert_eq!(
                NodeId::new(bad),
                Err(IdError::BadName {
                    kind: "node id",
                    value: bad.chars().take(80).collect()
                }),
            );
        }
    }

    #[test]
    fn image_ids_need_the_sha256_prefix_and_lower_hex() {
        let hex = "ab".repeat(32);
        assert!(ImageId::new(format!("sha256:{hex}")).is_ok());
        assert!(ImageId::new(hex.clone()).is_err());
        assert!(ImageId::new(format!("sha256:{}", hex.to_uppercase())).is_err());
        assert!(ImageId::new(format!("sha256:{}", &hex[..62])).is_err());
    }

    #[test]
    fn trust_domains_are_dotted_names() {
        assert!(TrustDomain::new("fleet.example").is_ok());
        assert!(TrustDomain::new("fleet..example").is_err());
        assert!(TrustDomain::new("Fleet.example").is_err());
    }

    #[test]
    fn digests_round_trip_through_hex() {
        let d = Sha256Digest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Sha256Digest::parse_hex(&d.to_hex()), Ok(d));
        assert!(Sha256Digest::parse_hex(&d.to_hex().to_uppercase()).is_err());
    }
}
