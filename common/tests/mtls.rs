//! mTLS over loopback with real rustls and certificates from the project's own CA.

use std::sync::Arc;
use std::time::Duration;

use keyward_certs::{FleetCa, IssuedKey, Validity};
use keyward_common::identity::Identity;
use keyward_common::ids::{NodeId, Sha256Digest, TrustDomain};
use keyward_common::tls::{
    CertifiedKey, ClientAuth, DenyList, client_config, peer_identity, pinned_ca_client_config,
    server_config,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn domain() -> TrustDomain {
    TrustDomain::new("fleet.test").unwrap()
}

fn day() -> Validity {
    Validity::for_duration(Duration::from_secs(86_400))
}

fn certified(ca: &FleetCa, issued: &IssuedKey) -> CertifiedKey {
    CertifiedKey {
        chain: vec![issued.cert.der.clone(), ca.cert_der().clone()],
        key: PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
    }
}

fn node(id: &str) -> Identity {
    Identity::Node(NodeId::new(id).unwrap())
}

/// Serves one connection: on success, answers with the peer's identity.
async fn serve_once(
    config: rustls::ServerConfig,
) -> (u16, tokio::task::JoinHandle<Result<String, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let who = match peer_identity(tls.get_ref().1.peer_certificates(), &domain()) {
            Some(Ok((id, _))) => id.to_string(),
            Some(Err(e)) => return Err(e.to_string()),
            None => "anonymous".to_string(),
        };
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(who.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(who)
    });
    (port, task)
}

/// Connects, sends a ping and returns what the server answered. With TLS 1.3 a refused client
/// certificate only shows on the first read, so the exchange is needed to see refusals.
async fn exchange(port: u16, config: rustls::ClientConfig) -> Result<String, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(out)
}

struct Fleet {
    ca: FleetCa,
    server: IssuedKey,
    deny: Arc<DenyList>,
}

fn fleet() -> Fleet {
    let ca = FleetCa::create(domain(), day()).unwrap();
    let server = ca
        .issue_server(&["localhost".into(), "127.0.0.1".into()], day())
        .unwrap();
    Fleet {
        ca,
        server,
        deny: Arc::new(DenyList::new()),
    }
}

impl Fleet {
    fn server_config(&self, auth: ClientAuth) -> rustls::ServerConfig {
        server_config(
            self.ca.cert_der(),
            certified(&self.ca, &self.server),
            auth,
            self.deny.clone(),
        )
        .unwrap()
    }

    fn client(&self, identity: Option<&IssuedKey>) -> rustls::ClientConfig {
        client_config(self.ca.cert_der(), identity.map(|i| certified(&self.ca, i))).unwrap()
    }
}

#[tokio::test]
async fn a_node_certificate_is_accepted_and_its_identity_extracted() {
    let f = fleet();
    let n1 = f.ca.issue_identity(&node("n1"), day()).unwrap();
    let (port, server) = serve_once(f.server_config(ClientAuth::Required)).await;
    assert_eq!(
        exchange(port, f.client(Some(&n1))).await.unwrap(),
        "node/n1"
    );
    assert_eq!(server.await.unwrap().unwrap(), "node/n1");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let f = fleet();
    let other = FleetCa::create(domain(), day()).unwrap();
    let stranger = other.issue_identity(&node("n1"), day()).unwrap();
    let (port, server) = serve_once(f.server_config(ClientAuth::Required)).await;
    let client = client_config(f.ca.cert_der(), Some(certified(&other, &stranger))).unwrap();
    assert!(exchange(port, client).await.is_err());
    let err = server.await.unwrap().unwrap_err();
    // The other CA has the same name, so the chain is built and its signature fails.
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let f = fleet();
    let past = Validity {
        not_before: time::OffsetDateTime::now_utc() - time::Duration::days(2),
        not_after: time::OffsetDateTime::now_utc() - time::Duration::days(1),
    };
    let expired = f.ca.issue_identity(&node("n1"), past).unwrap();
    let (port, server) = serve_once(f.server_config(ClientAuth::Required)).await;
    assert!(exchange(port, f.client(Some(&expired))).await.is_err());
    let err = server.await.unwrap().unwrap_err();
    assert!(err.contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn no_client_certificate_is_refused_on_the_mtls_listener() {
    let f = fleet();
    let (port, server) = serve_once(f.server_config(ClientAuth::Required)).await;
    assert!(exchange(port, f.client(None)).await.is_err());
    let err = server.await.unwrap().unwrap_err();
    assert!(
        err.contains("NoCertificatesPresented") || err.contains("certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn no_client_certificate_is_accepted_on_the_enrollment_listener() {
    let f = fleet();
    let (port, server) = serve_once(f.server_config(ClientAuth::Optional)).await;
    assert_eq!(exchange(port, f.client(None)).await.unwrap(), "anonymous");
    assert_eq!(server.await.unwrap().unwrap(), "anonymous");
}

#[tokio::test]
async fn the_enrollment_listener_still_refuses_a_foreign_certificate() {
    let f = fleet();
    let other = FleetCa::create(domain(), day()).unwrap();
    let stranger = other.issue_identity(&node("n1"), day()).unwrap();
    let (port, server) = serve_once(f.server_config(ClientAuth::Optional)).await;
    let client = client_config(f.ca.cert_der(), Some(certified(&other, &stranger))).unwrap();
    assert!(exchange(port, client).await.is_err());
    assert!(server.await.unwrap().is_err());
}

#[tokio::test]
async fn a_denied_serial_is_refused() {
    let f = fleet();
    let n1 = f.ca.issue_identity(&node("n1"), day()).unwrap();
    f.deny.extend([n1.cert.serial.clone()]);
    let (port, server) = serve_once(f.server_config(ClientAuth::Required)).await;
    assert!(exchange(port, f.client(Some(&n1))).await.is_err());
    let err = server.await.unwrap().unwrap_err();
    assert!(err.contains("Revoked"), "{err}");
}

#[tokio::test]
async fn a_client_trusting_only_the_fleet_ca_refuses_another_server() {
    let f = fleet();
    let other = fleet();
    let (port, _server) = serve_once(other.server_config(ClientAuth::Optional)).await;
    let err = exchange(port, f.client(None)).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn enrollment_pins_the_ca_by_fingerprint() {
    let f = fleet();
    let (port, _server) = serve_once(f.server_config(ClientAuth::Optional)).await;
    let pinned = pinned_ca_client_config(f.ca.fingerprint()).unwrap();
    assert_eq!(exchange(port, pinned).await.unwrap(), "anonymous");

    let (port, _server) = serve_once(f.server_config(ClientAuth::Optional)).await;
    let wrong = pinned_ca_client_config(Sha256Digest::of(b"another CA")).unwrap();
    let err = exchange(port, wrong).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
        "{err}"
    );
}

#[test]
fn ca_certificate_pem_round_trips() {
    let f = fleet();
    let der = CertificateDer::from_pem_slice(f.ca.cert_pem().as_bytes()).unwrap();
    assert_eq!(&der, f.ca.cert_der());
}
