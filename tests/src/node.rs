//! A node client without Docker: enrolls through the API and speaks the node protocol. Used to
//! test the server alone and as the load generator's simulated agents.

use std::time::Duration;

use keyward_certs::generate_csr;
use keyward_common::api::{
    CertificateResponse, EnrollRequest, LocalImage, StatusReport, WatchResponse,
};
use keyward_common::client::{ApiClient, ClientError};
use keyward_common::ids::{ImageId, NodeId, Sha256Digest};
use keyward_common::secret::SecretString;
use keyward_common::tls::{CertifiedKey, client_config, pinned_ca_client_config};
use keyward_server::api::{CreateTokenRequest, TokenResponse};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// An enrolled node's client.
pub struct FakeNode {
    /// Node id.
    pub id: NodeId,
    /// Client presenting the node certificate.
    pub client: ApiClient,
    /// The certificate PEM.
    pub cert_pem: String,
    /// The key PEM.
    pub key_pem: String,
    /// The CA certificate.
    pub ca: CertificateDer<'static>,
    /// The trust root JSON received at enrollment.
    pub trust_root: String,
}

/// Creates a join token for `node` with the operator client.
pub async fn token(operator: &ApiClient, node: &str) -> TokenResponse {
    operator
        .post_json(
            "/v1/nodes/tokens",
            &CreateTokenRequest {
                node: node.into(),
                ttl_seconds: None,
            },
        )
        .await
        .expect("creating a join token")
}

/// Sends an enrollment request with `token` for `node`; returns the answer and the key PEM.
pub async fn enroll_raw(
    enroll_url: &str,
    ca_fingerprint: &str,
    node: &str,
    token: &str,
) -> Result<(CertificateResponse, String), ClientError> {
    let fingerprint = Sha256Digest::parse_hex(ca_fingerprint).expect("fingerprint");
    let config = pinned_ca_client_config(fingerprint).expect("client config");
    let client = ApiClient::new(enroll_url, config, Duration::from_secs(30))?;
    let csr = generate_csr(node).expect("csr");
    let request = EnrollRequest {
        token: SecretString::new(token.to_string()),
        node: NodeId::new(node).expect("node id"),
        csr_pem: csr.csr_pem.clone(),
    };
    let answer: CertificateResponse = client.post_json("/v1/enroll", &request).await?;
    Ok((answer, csr.key_pem.to_string()))
}

impl FakeNode {
    /// Enrolls `node` on the server behind `operator`.
    pub async fn enroll(operator: &ApiClient, api_url: &str, node: &str) -> Self {
        let token = token(operator, node).await;
        let (answer, key_pem) = enroll_raw(
            &token.enroll_url,
            &token.ca_fingerprint,
            node,
            token.token.expose(),
        )
        .await
        .expect("enrollment");
        Self::from_parts(
            api_url,
            node,
            &answer.certificate_pem,
            &key_pem,
            &answer.ca_pem,
            answer.trust_root.get(),
        )
    }

    /// A node client from certificate material.
    pub fn from_parts(
        api_url: &str,
        node: &str,
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
        trust_root: &str,
    ) -> Self {
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca");
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let config = client_config(
            &ca,
            Some(CertifiedKey {
                chain: vec![cert],
                key,
            }),
        )
        .expect("client config");
        Self {
            id: NodeId::new(node).expect("node id"),
            client: ApiClient::new(api_url, config, Duration::from_secs(60)).expect("client"),
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            ca,
            trust_root: trust_root.to_string(),
        }
    }

    /// Long-polls for changes after `since`, waiting up to `wait_secs`.
    pub async fn watch(&self, since: u64, wait_secs: u64) -> Result<WatchResponse, ClientError> {
        self.client
            .get_json(&format!("/v1/node/watch?since={since}&wait={wait_secs}"))
            .await
    }

    /// Reports an inventory holding one image with `tag`; returns the made-up image id.
    pub async fn report_image(&self, tag: &str) -> ImageId {
        let id = ImageId::new(format!(
            "sha256:{}",
            Sha256Digest::of(tag.as_bytes()).to_hex()
        ))
        .expect("image id");
        let report = StatusReport {
            containers: Vec::new(),
            inventory: Some(vec![LocalImage {
                id: id.clone(),
                tags: vec![tag.to_string()],
            }]),
        };
        self.report(&report).await.expect("reporting inventory");
        id
    }

    /// Sends a status report.
    pub async fn report(&self, report: &StatusReport) -> Result<(), ClientError> {
        let body = serde_json::to_vec(report).expect("report serializes");
        self.client
            .send(hyper::Method::POST, "/v1/node/status", Some(body))
            .await?
            .error_for_status()
            .map(|_| ())
    }
}
