//! OpenSSH key handling: generating per-container access and host keys, checking user keys.

use keyward_common::secret::SecretString;
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};

/// Why an SSH key was refused or could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshKeyError {
    /// The text is not an OpenSSH public key line.
    #[error("not an OpenSSH public key line (expected e.g. 'ssh-ed25519 AAAA... comment'): {0}")]
    Parse(String),
    /// The key's algorithm is not accepted.
    #[error(
        "key algorithm {0} is not accepted; use ssh-ed25519, ecdsa-sha2-nistp256/384/521 or rsa of \
         3072 bits or more"
    )]
    Algorithm(String),
    /// Key generation failed.
    #[error("key generation failed: {0}")]
    Generate(String),
}

/// A newly generated ed25519 key pair in OpenSSH formats.
pub struct GeneratedKey {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----` text, zeroized on drop.
    pub private_openssh: SecretString,
    /// `ssh-ed25519 AAAA... comment`.
    pub public_line: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("public_line", &self.public_line)
            .field("fingerprint", &self.fingerprint)
            .field("private_openssh", &"...")
            .finish()
    }
}

/// Generates an ed25519 key with `comment`.
pub fn generate(comment: &str) -> Result<GeneratedKey, SshKeyError> {
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
        .map_err(|e| SshKeyError::Generate(e.to_string()))?;
    key.set_comment(comment);
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| SshKeyError::Generate(e.to_string()))?;
    let public_line = key
        .public_key()
        .to_openssh()
        .map_err(|e| SshKeyError::Generate(e.to_string()))?;
    Ok(GeneratedKey {
        private_openssh: SecretString::new(private.as_str().to_owned()),
        public_line,
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    })
}

/// A user's public key, parsed and normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKey {
    /// The key as one OpenSSH line, comment kept.
    pub line: String,
    /// `SHA256:...`.
    pub fingerprint: String,
}

/// Parses and checks an OpenSSH public key line.
pub fn parse_public(line: &str) -> Result<UserKey, SshKeyError> {
    let trimmed = line.trim();
    if trimmed.contains('\n') || trimmed.contains('\r') {
        return Err(SshKeyError::Parse("more than one line".into()));
    }
    let key = PublicKey::from_openssh(trimmed).map_err(|e| SshKeyError::Parse(e.to_string()))?;
    let accepted = match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => true,
        Algorithm::Rsa { .. } => key.key_data().rsa().is_some_and(|rsa| {
            // Modulus length in bits, ignoring a leading zero byte of the mpint.
            let n = rsa.n.as_bytes();
            let n = n.strip_prefix(&[0]).unwrap_or(n);
            n.len() * 8 >= 3072
        }),
        _ => false,
    };
    if !accepted {
        return Err(SshKeyError::Algorithm(key.algorithm().to_string()));
    }
    let line = key
        .to_openssh()
        .map_err(|e| SshKeyError::Parse(e.to_string()))?;
    Ok(UserKey {
        line,
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_openssh_formats() {
        let key = generate("keyward:c1").unwrap();
        assert!(
            key.private_openssh
                .expose()
                .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
        );
        assert!(key.public_line.starts_with("ssh-ed25519 "));
        assert!(key.public_line.ends_with(" keyward:c1"));
        let parsed = parse_public(&key.public_line).unwrap();
        assert_eq!(parsed.fingerprint, key.fingerprint);
        let private = PrivateKey::from_openssh(key.private_openssh.expose()).unwrap();
        assert_eq!(private.public_key().to_openssh().unwrap(), key.public_line);
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn garbage_and_multi_line_input_is_refused() {
        assert!(matches!(
            parse_public("ssh-ed25519 not-base64"),
            Err(SshKeyError::Parse(_))
        ));
        let key = generate("a").unwrap();
        let two = format!("{}\n{}", key.public_line, key.public_line);
        assert!(matches!(parse_public(&two), Err(SshKeyError::Parse(_))));
    }
}
