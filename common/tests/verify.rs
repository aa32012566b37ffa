//! One test per refusal of the manifest and snapshot checks, plus the accepted path.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyward_common::dsse::{
    Envelope, EnvelopeError, MANIFEST_PAYLOAD_TYPE, ManifestSigningKey, SNAPSHOT_PAYLOAD_TYPE,
    SignatureError, TrustRoot,
};
use keyward_common::ids::{ContainerId, ContainerName, ImageId, NodeId, Sha256Digest};
use keyward_common::limits::Limits;
use keyward_common::manifest::{
    Action, BaseImage, FileEntry, Manifest, NodeSnapshot, RunSettings, SnapshotEntry,
};
use keyward_common::paths::{FileMode, PathError, PathRules, SafePath};
use keyward_common::secret::SecretBytes;
use keyward_common::verify::{VerifiedSnapshot, Verifier, VerifyError};

const NOW: u64 = 1_800_000_000;
const CONTENT: &[u8] = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGvq user@example\n";

struct Fixture {
    key: ManifestSigningKey,
    verifier: Verifier,
}

fn node() -> NodeId {
    NodeId::new("node-a").unwrap()
}

fn container() -> ContainerId {
    ContainerId::new("c1").unwrap()
}

fn fixture() -> Fixture {
    let key = ManifestSigningKey::from_seed(&[42u8; 32]).unwrap();
    let verifier = Verifier {
        trust_root: TrustRoot::new([key.verifying_key()]).unwrap(),
        node: node(),
        limits: Limits::default(),
        path_rules: PathRules::default(),
        max_clock_skew: 30,
    };
    Fixture { key, verifier }
}

fn manifest(generation: u64) -> Manifest {
    Manifest {
        container_id: container(),
        container_name: ContainerName::new("web").unwrap(),
        node: node(),
        generation,
        revision: 10,
        issued_at: NOW - 5,
        expires_at: NOW + 3600,
        action: Action::Run,
        image: BaseImage {
            reference: "keyward/sshd:latest".into(),
            id: ImageId::new(format!("sha256:{}", "ab".repeat(32))).unwrap(),
        },
        run: RunSettings::default(),
        files: vec![FileEntry {
            path: SafePath::parse("/root/.ssh/authorized_keys").unwrap(),
            mode: FileMode::OWNER_READ,
            uid: 0,
            gid: 0,
            size: CONTENT.len() as u64,
            sha256: Sha256Digest::of(CONTENT),
        }],
    }
}

fn sign_json(key: &ManifestSigningKey, payload_type: &str, payload: Vec<u8>) -> Vec<u8> {
    key.sign_envelope(payload_type, payload).encode()
}

fn sign_manifest(key: &ManifestSigningKey, m: &Manifest) -> (Vec<u8>, Sha256Digest) {
    let payload = serde_json::to_vec(m).unwrap();
    let digest = Sha256Digest::of(&payload);
    (sign_json(key, MANIFEST_PAYLOAD_TYPE, payload), digest)
}

fn snapshot_doc(entries: Vec<SnapshotEntry>) -> NodeSnapshot {
    NodeSnapshot {
        node: node(),
        revision: 10,
        issued_at: NOW - 1,
        expires_at: NOW + 60,
        manifests: entries,
    }
}

fn sign_snapshot(key: &ManifestSigningKey, s: &NodeSnapshot) -> Vec<u8> {
    sign_json(key, SNAPSHOT_PAYLOAD_TYPE, serde_json::to_vec(s).unwrap())
}

fn snapshot_listing(f: &Fixture, generation: u64, digest: Sha256Digest) -> VerifiedSnapshot {
    let doc = snapshot_doc(vec![SnapshotEntry {
        container_id: container(),
        generation,
        digest,
    }]);
    f.verifier
        .snapshot(&sign_snapshot(&f.key, &doc), NOW, None)
        .unwrap()
}

/// Signs `m`, makes a snapshot listing it, and verifies `m` with the given mark.
fn check(f: &Fixture, m: &Manifest, mark: Option<u64>) -> Result<Sha256Digest, VerifyError> {
    let (bytes, digest) = sign_manifest(&f.key, m);
    let snap = snapshot_listing(f, m.generation, digest);
    f.verifier
        .manifest(&bytes, NOW, mark, &snap)
        .map(|v| v.digest())
}

/// Re-encodes an envelope with its payload replaced (signatures kept).
fn with_payload(bytes: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    v["payload"] = STANDARD.encode(payload).into();
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn a_valid_manifest_is_accepted_and_its_files_checked() {
    let f = fixture();
    let m = manifest(3);
    let (bytes, digest) = sign_manifest(&f.key, &m);
    let snap = snapshot_listing(&f, 3, digest);
    let verified = f.verifier.manifest(&bytes, NOW, Some(2), &snap).unwrap();
    assert_eq!(verified.manifest(), &m);
    assert_eq!(verified.digest(), digest);
    assert_eq!(verified.envelope(), bytes.as_slice());

    let file = verified
        .verify_file(0, SecretBytes::from(CONTENT.to_vec()))
        .unwrap();
    assert_eq!(file.path().as_str(), "/root/.ssh/authorized_keys");
    assert_eq!(file.mode().bits(), 0o400);
    assert_eq!(
        verified
            .verify_file(0, SecretBytes::from(b"ssh-ed25519 other\n".to_vec()))
            .unwrap_err(),
        VerifyError::FileContentMismatch(SafePath::parse("/root/.ssh/authorized_keys").unwrap())
    );
}

#[test]
fn a_flipped_payload_byte_is_refused_by_the_signature_check() {
    let f = fixture();
    let (bytes, _) = sign_manifest(&f.key, &manifest(1));
    let env = Envelope::decode(&bytes, &Limits::default()).unwrap();
    let mut payload = env.payload.clone();
    let i = payload.iter().position(|b| *b == b'1').unwrap();
    payload[i] = b'2';
    let tampered = with_payload(&bytes, &payload);
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(&payload));
    assert_eq!(
        f.verifier
            .manifest(&tampered, NOW, None, &snap)
            .unwrap_err(),
        VerifyError::Signature(SignatureError::Invalid(f.key.key_id().to_string()))
    );
}

#[test]
fn a_flipped_signature_byte_is_refused() {
    let f = fixture();
    let m = manifest(1);
    let payload = serde_json::to_vec(&m).unwrap();
    let mut env = f.key.sign_envelope(MANIFEST_PAYLOAD_TYPE, payload.clone());
    env.signatures[0].sig[10] ^= 0x01;
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(&payload));
    let err = f
        .verifier
        .manifest(&env.encode(), NOW, None, &snap)
        .unwrap_err();
    assert_eq!(
        err,
        VerifyError::Signature(SignatureError::Invalid(f.key.key_id().to_string()))
    );
    assert_eq!(
        err.to_string(),
        format!(
            "check 2 (signature): signature by key {} does not verify",
            f.key.key_id()
        )
    );
}

#[test]
fn a_signature_by_an_unknown_key_is_refused() {
    let f = fixture();
    let stranger = ManifestSigningKey::from_seed(&[7u8; 32]).unwrap();
    let m = manifest(1);
    let (bytes, digest) = sign_manifest(&stranger, &m);
    let snap = snapshot_listing(&f, 1, digest);
    assert_eq!(
        f.verifier.manifest(&bytes, NOW, None, &snap).unwrap_err(),
        VerifyError::Signature(SignatureError::UnknownKey(stranger.key_id().to_string()))
    );
}

#[test]
fn a_signature_claiming_a_trusted_key_id_but_made_by_another_key_is_refused() {
    let f = fixture();
    let stranger = ManifestSigningKey::from_seed(&[7u8; 32]).unwrap();
    let m = manifest(1);
    let payload = serde_json::to_vec(&m).unwrap();
    let mut env = stranger.sign_envelope(MANIFEST_PAYLOAD_TYPE, payload.clone());
    env.signatures[0].keyid = f.key.key_id().to_string();
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(&payload));
    assert_eq!(
        f.verifier
            .manifest(&env.encode(), NOW, None, &snap)
            .unwrap_err(),
        VerifyError::Signature(SignatureError::Invalid(f.key.key_id().to_string()))
    );
}

#[test]
fn a_wrong_payload_type_is_refused() {
    let f = fixture();
    let m = manifest(1);
    let payload = serde_json::to_vec(&m).unwrap();
    let bytes = sign_json(&f.key, "application/json", payload.clone());
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(&payload));
    assert_eq!(
        f.verifier.manifest(&bytes, NOW, None, &snap).unwrap_err(),
        VerifyError::PayloadType {
            expected: MANIFEST_PAYLOAD_TYPE,
            found: "application/json".into()
        }
    );
    // A snapshot is not accepted as a manifest either.
    let as_snapshot = sign_json(&f.key, SNAPSHOT_PAYLOAD_TYPE, payload);
    assert!(matches!(
        f.verifier.manifest(&as_snapshot, NOW, None, &snap),
        Err(VerifyError::PayloadType { .. })
    ));
}

#[test]
fn a_manifest_for_another_node_is_refused() {
    let f = fixture();
    let mut m = manifest(1);
    m.node = NodeId::new("node-b").unwrap();
    assert_eq!(
        check(&f, &m, None).unwrap_err(),
        VerifyError::WrongNode {
            kind: "manifest",
            expected: node(),
            found: m.node.clone()
        }
    );
}

#[test]
fn a_generation_equal_to_the_mark_is_refused() {
    let f = fixture();
    assert_eq!(
        check(&f, &manifest(5), Some(5)).unwrap_err(),
        VerifyError::GenerationNotAbove {
            container: container(),
            generation: 5,
            mark: 5
        }
    );
}

#[test]
fn a_generation_below_the_mark_is_refused() {
    let f = fixture();
    let err = check(&f, &manifest(4), Some(5)).unwrap_err();
    assert_eq!(
        err,
        VerifyError::GenerationNotAbove {
            container: container(),
            generation: 4,
            mark: 5
        }
    );
    assert!(err.to_string().starts_with("check 4 (generation):"));
}

#[test]
fn an_expired_manifest_is_refused() {
    let f = fixture();
    let mut m = manifest(1);
    m.expires_at = NOW - 31;
    assert_eq!(
        check(&f, &m, None).unwrap_err(),
        VerifyError::Expired {
            expires_at: NOW - 31,
            now: NOW
        }
    );
}

#[test]
fn expiry_within_the_clock_skew_is_tolerated() {
    let f = fixture();
    let mut m = manifest(1);
    m.expires_at = NOW - 29;
    assert!(check(&f, &m, None).is_ok());
}

#[test]
fn a_manifest_issued_too_far_in_the_future_is_refused() {
    let f = fixture();
    let mut m = manifest(1);
    m.issued_at = NOW + 31;
    assert_eq!(
        check(&f, &m, None).unwrap_err(),
        VerifyError::IssuedInFuture {
            kind: "manifest",
            issued_at: NOW + 31,
            now: NOW
        }
    );
}

#[test]
fn a_manifest_missing_from_the_snapshot_is_refused() {
    let f = fixture();
    let (bytes, _) = sign_manifest(&f.key, &manifest(1));
    let doc = snapshot_doc(vec![]);
    let snap = f
        .verifier
        .snapshot(&sign_snapshot(&f.key, &doc), NOW, None)
        .unwrap();
    assert_eq!(
        f.verifier.manifest(&bytes, NOW, None, &snap).unwrap_err(),
        VerifyError::NotInSnapshot(container())
    );
}

#[test]
fn a_snapshot_listing_another_digest_is_refused() {
    let f = fixture();
    let (bytes, digest) = sign_manifest(&f.key, &manifest(1));
    let other = Sha256Digest::of(b"something else");
    let snap = snapshot_listing(&f, 1, other);
    assert_eq!(
        f.verifier.manifest(&bytes, NOW, None, &snap).unwrap_err(),
        VerifyError::SnapshotMismatch {
            container: container(),
            listed_generation: 1,
            listed_digest: other,
            generation: 1,
            digest,
        }
    );
}

#[test]
fn a_stale_snapshot_is_refused() {
    let f = fixture();
    let mut doc = snapshot_doc(vec![]);
    doc.expires_at = NOW - 31;
    assert_eq!(
        f.verifier
            .snapshot(&sign_snapshot(&f.key, &doc), NOW, None)
            .unwrap_err(),
        VerifyError::SnapshotStale {
            expires_at: NOW - 31,
            now: NOW
        }
    );
}

#[test]
fn a_snapshot_that_went_stale_since_it_was_verified_no_longer_admits_manifests() {
    let f = fixture();
    let (bytes, digest) = sign_manifest(&f.key, &manifest(1));
    let snap = snapshot_listing(&f, 1, digest);
    let later = NOW + 60 + 30;
    assert_eq!(
        f.verifier.manifest(&bytes, later, None, &snap).unwrap_err(),
        VerifyError::SnapshotStale {
            expires_at: NOW + 60,
            now: later
        }
    );
}

#[test]
fn a_snapshot_older_than_the_last_accepted_revision_is_refused() {
    let f = fixture();
    let doc = snapshot_doc(vec![]);
    assert_eq!(
        f.verifier
            .snapshot(&sign_snapshot(&f.key, &doc), NOW, Some(11))
            .unwrap_err(),
        VerifyError::SnapshotRolledBack {
            revision: 10,
            last: 11
        }
    );
    assert!(
        f.verifier
            .snapshot(&sign_snapshot(&f.key, &doc), NOW, Some(10))
            .is_ok()
    );
}

#[test]
fn a_snapshot_for_another_node_is_refused() {
    let f = fixture();
    let mut doc = snapshot_doc(vec![]);
    doc.node = NodeId::new("node-b").unwrap();
    assert_eq!(
        f.verifier
            .snapshot(&sign_snapshot(&f.key, &doc), NOW, None)
            .unwrap_err(),
        VerifyError::WrongNode {
            kind: "snapshot",
            expected: node(),
            found: doc.node.clone()
        }
    );
}

/// Builds a manifest whose single file path is `path`, bypassing `SafePath` by editing JSON.
fn manifest_with_raw_path(f: &Fixture, path: &str) -> Result<Sha256Digest, VerifyError> {
    let mut value = serde_json::to_value(manifest(1)).unwrap();
    value["files"][0]["path"] = path.into();
    let payload = serde_json::to_vec(&value).unwrap();
    let digest = Sha256Digest::of(&payload);
    let bytes = sign_json(&f.key, MANIFEST_PAYLOAD_TYPE, payload);
    let snap = snapshot_listing(f, 1, digest);
    f.verifier
        .manifest(&bytes, NOW, None, &snap)
        .map(|v| v.digest())
}

#[test]
fn traversal_and_malformed_paths_are_refused() {
    let f = fixture();
    let cases: [(&str, &str); 6] = [
        ("/root/../etc/shadow", "contains a '..' segment"),
        ("root/.ssh/authorized_keys", "is not absolute"),
        ("/root//.ssh/authorized_keys", "is not normalized"),
        ("/root/.ssh/..", "contains a '..' segment"),
        ("/root/.ssh/a\u{0}b", "contains a NUL or control character"),
        ("/root/.ssh/./x", "is not normalized"),
    ];
    for (path, reason) in cases {
        let err = manifest_with_raw_path(&f, path).unwrap_err();
        let VerifyError::Payload {
            kind: "manifest",
            reason: got,
        } = &err
        else {
            panic!("{path:?}: unexpected {err:?}");
        };
        assert!(got.contains(reason), "{path:?}: {got}");
    }
    let long = format!("/root/.ssh/{}", "a".repeat(300));
    let err = manifest_with_raw_path(&f, &long).unwrap_err();
    assert!(
        err.to_string().contains("more than the limit of 256"),
        "{err}"
    );
}

#[test]
fn paths_outside_the_allowed_prefixes_are_refused() {
    let f = fixture();
    let mut m = manifest(1);
    m.files[0].path = SafePath::parse("/etc/shadow").unwrap();
    let err = check(&f, &m, None).unwrap_err();
    assert!(
        matches!(err, VerifyError::Path(PathError::OutsidePrefixes { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("check 6 (files): path \"/etc/shadow\" is not under")
    );
}

#[test]
fn setuid_modes_are_refused() {
    let f = fixture();
    let mut value = serde_json::to_value(manifest(1)).unwrap();
    value["files"][0]["mode"] = 0o4755.into();
    let payload = serde_json::to_vec(&value).unwrap();
    let digest = Sha256Digest::of(&payload);
    let bytes = sign_json(&f.key, MANIFEST_PAYLOAD_TYPE, payload);
    let snap = snapshot_listing(&f, 1, digest);
    let err = f.verifier.manifest(&bytes, NOW, None, &snap).unwrap_err();
    assert!(
        err.to_string().contains("mode 0o4755 is not allowed"),
        "{err}"
    );
}

#[test]
fn too_many_and_too_large_files_are_refused() {
    let f = fixture();
    let mut m = manifest(1);
    m.files[0].size = Limits::default().max_file_bytes + 1;
    assert!(matches!(
        check(&f, &m, None),
        Err(VerifyError::FileTooLarge { .. })
    ));

    let mut m = manifest(1);
    m.files = (0..65)
        .map(|i| FileEntry {
            path: SafePath::parse(&format!("/etc/keyward/f{i}")).unwrap(),
            ..manifest(1).files[0].clone()
        })
        .collect();
    assert_eq!(
        check(&f, &m, None).unwrap_err(),
        VerifyError::TooManyFiles { count: 65, max: 64 }
    );

    let mut m = manifest(1);
    m.files.push(m.files[0].clone());
    assert_eq!(
        check(&f, &m, None).unwrap_err(),
        VerifyError::DuplicatePath(SafePath::parse("/root/.ssh/authorized_keys").unwrap())
    );
}

#[test]
fn an_oversize_envelope_is_refused_before_parsing() {
    let f = fixture();
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(b""));
    let huge = vec![b'{'; 1024 * 1024 + 1];
    assert_eq!(
        f.verifier.manifest(&huge, NOW, None, &snap).unwrap_err(),
        VerifyError::Envelope(EnvelopeError::TooLarge {
            len: 1024 * 1024 + 1,
            max: 1024 * 1024
        })
    );
}

#[test]
fn bad_base64_is_refused() {
    let f = fixture();
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(b""));
    let (bytes, _) = sign_manifest(&f.key, &manifest(1));
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["payload"] = "not*base64!".into();
    assert_eq!(
        f.verifier
            .manifest(&serde_json::to_vec(&v).unwrap(), NOW, None, &snap)
            .unwrap_err(),
        VerifyError::Envelope(EnvelopeError::Base64 { field: "payload" })
    );
    v["payload"] = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["payload"].clone();
    v["signatures"][0]["sig"] = "%%%".into();
    assert_eq!(
        f.verifier
            .manifest(&serde_json::to_vec(&v).unwrap(), NOW, None, &snap)
            .unwrap_err(),
        VerifyError::Envelope(EnvelopeError::Base64 { field: "sig" })
    );
}

#[test]
fn bad_json_is_refused() {
    let f = fixture();
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(b""));
    let err = f
        .verifier
        .manifest(b"{\"payload\": ", NOW, None, &snap)
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::Envelope(EnvelopeError::Json(_))),
        "{err:?}"
    );

    // A correctly signed payload that is not JSON.
    let bytes = sign_json(&f.key, MANIFEST_PAYLOAD_TYPE, b"not json".to_vec());
    let err = f.verifier.manifest(&bytes, NOW, None, &snap).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Payload {
                kind: "manifest",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn unknown_fields_are_refused_in_envelope_and_payload() {
    let f = fixture();
    let m = manifest(1);
    let (bytes, _) = sign_manifest(&f.key, &m);
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(b""));
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["extra"] = 1.into();
    let err = f
        .verifier
        .manifest(&serde_json::to_vec(&v).unwrap(), NOW, None, &snap)
        .unwrap_err();
    assert!(err.to_string().contains("unknown field `extra`"), "{err}");

    let mut value = serde_json::to_value(&m).unwrap();
    value["privileged"] = true.into();
    let payload = serde_json::to_vec(&value).unwrap();
    let bytes = sign_json(&f.key, MANIFEST_PAYLOAD_TYPE, payload);
    let err = f.verifier.manifest(&bytes, NOW, None, &snap).unwrap_err();
    assert!(
        err.to_string().contains("unknown field `privileged`"),
        "{err}"
    );
}

#[test]
fn duplicate_json_keys_are_refused() {
    let f = fixture();
    let snap = snapshot_listing(&f, 1, Sha256Digest::of(b""));
    let (bytes, _) = sign_manifest(&f.key, &manifest(1));
    let text = String::from_utf8(bytes).unwrap();
    let doubled = text.replacen("{\"payload\":", "{\"payloadType\":\"x\",\"payload\":", 1);
    let err = f
        .verifier
        .manifest(doubled.as_bytes(), NOW, None, &snap)
        .unwrap_err();
    assert!(
        err.to_string().contains("duplicate field `payloadType`"),
        "{err}"
    );

    let payload = serde_json::to_vec(&manifest(1)).unwrap();
    let text = String::from_utf8(payload).unwrap();
    let doubled = text.replacen(
        "{\"container_id\":",
        "{\"generation\":99,\"container_id\":",
        1,
    );
    let bytes = sign_json(&f.key, MANIFEST_PAYLOAD_TYPE, doubled.into_bytes());
    let err = f.verifier.manifest(&bytes, NOW, None, &snap).unwrap_err();
    assert!(
        err.to_string().contains("duplicate field `generation`"),
        "{err}"
    );
}

#[test]
fn an_accepted_manifest_reverifies_from_storage_only_with_its_recorded_digest() {
    let f = fixture();
    let mut m = manifest(1);
    m.expires_at = NOW - 1000;
    let (bytes, digest) = sign_manifest(&f.key, &m);
    assert_eq!(
        f.verifier
            .accepted_manifest(&bytes, digest)
            .unwrap()
            .digest(),
        digest
    );
    assert_eq!(
        f.verifier
            .accepted_manifest(&bytes, Sha256Digest::of(b"x"))
            .unwrap_err(),
        VerifyError::AcceptedDigestMismatch(container())
    );
}

mod mutations {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any change to any byte of a signed envelope makes verification fail, whichever
        /// check catches it: the encoding is canonical (compact JSON, padded base64 with no
        /// trailing bits), so no byte can change without changing what is signed.
        #[test]
        fn any_envelope_mutation_is_refused(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let f = fixture();
            let (bytes, digest) = sign_manifest(&f.key, &manifest(1));
            let snap = snapshot_listing(&f, 1, digest);
            let mut mutated = bytes.clone();
            let i = index.index(mutated.len());
            mutated[i] ^= flip;
            let result = f.verifier.manifest(&mutated, NOW, None, &snap);
            prop_assert!(result.is_err(), "mutation at byte {} was accepted", i);
        }
    }
}
