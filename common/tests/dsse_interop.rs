//! Interoperability with an independent ed25519/DSSE implementation (Python `cryptography`).
//! The fixture and the script that made it are in `tests/fixtures/`.

use keyward_common::dsse::{Envelope, MANIFEST_PAYLOAD_TYPE, ManifestSigningKey, TrustRoot, pae};
use keyward_common::ids::{NodeId, Sha256Digest};
use keyward_common::limits::Limits;
use keyward_common::manifest::{NodeSnapshot, SnapshotEntry};
use keyward_common::paths::PathRules;
use keyward_common::verify::Verifier;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    seed_hex: String,
    public_key_hex: String,
    keyid: String,
    pae_hex: String,
    signature_hex: String,
    envelope: String,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("fixtures/dsse_python.json")).unwrap()
}

#[test]
fn an_envelope_signed_by_python_verifies() {
    let f = fixture();
    let ours = ManifestSigningKey::from_seed(&hex::decode(&f.seed_hex).unwrap()).unwrap();
    assert_eq!(
        hex::encode(ours.verifying_key().as_bytes()),
        f.public_key_hex
    );
    assert_eq!(ours.key_id().as_str(), f.keyid);

    let root = TrustRoot::new([ours.verifying_key()]).unwrap();
    let envelope = Envelope::decode(f.envelope.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(root.verify(&envelope).unwrap().as_str(), f.keyid);
}

#[test]
fn the_pae_matches_python_byte_for_byte() {
    let f = fixture();
    let envelope = Envelope::decode(f.envelope.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(
        hex::encode(pae(&envelope.payload_type, &envelope.payload)),
        f.pae_hex
    );
}

#[test]
fn our_signature_over_the_same_payload_is_the_one_python_made_and_verified() {
    // ed25519 is deterministic: same seed and message give the same signature, so equality with
    // the signature Python produced (and verified) shows ours verifies under Python too.
    let f = fixture();
    let key = ManifestSigningKey::from_seed(&hex::decode(&f.seed_hex).unwrap()).unwrap();
    let theirs = Envelope::decode(f.envelope.as_bytes(), &Limits::default()).unwrap();
    let ours = key.sign_envelope(MANIFEST_PAYLOAD_TYPE, theirs.payload.clone());
    assert_eq!(hex::encode(&ours.signatures[0].sig), f.signature_hex);
    assert_eq!(ours.signatures, theirs.signatures);
}

#[test]
fn a_python_signed_manifest_with_foreign_key_order_passes_the_full_checks() {
    let f = fixture();
    let key = ManifestSigningKey::from_seed(&hex::decode(&f.seed_hex).unwrap()).unwrap();
    let node = NodeId::new("node-a").unwrap();
    let verifier = Verifier {
        trust_root: TrustRoot::new([key.verifying_key()]).unwrap(),
        node: node.clone(),
        limits: Limits::default(),
        path_rules: PathRules::default(),
        max_clock_skew: 30,
    };
    let envelope = Envelope::decode(f.envelope.as_bytes(), &Limits::default()).unwrap();
    let digest = Sha256Digest::of(&envelope.payload);
    let snapshot = NodeSnapshot {
        node,
        revision: 1,
        issued_at: 1_800_000_000,
        expires_at: 1_800_000_060,
        manifests: vec![SnapshotEntry {
            container_id: "c1".parse().unwrap(),
            generation: 1,
            digest,
        }],
    };
    let snap_env = key.sign_envelope(
        keyward_common::dsse::SNAPSHOT_PAYLOAD_TYPE,
        serde_json::to_vec(&snapshot).unwrap(),
    );
    let now = 1_800_000_010;
    let snap = verifier.snapshot(&snap_env.encode(), now, None).unwrap();
    let verified = verifier
        .manifest(f.envelope.as_bytes(), now, None, &snap)
        .unwrap();
    assert_eq!(verified.digest(), digest);
    assert_eq!(verified.manifest().generation, 1);
}
