//! Simulated agents for the load benchmarks: many enrolled nodes, each with its own certificate
//! and its own mTLS connection, long-polling the server; and a bare TLS long-poll server as the
//! baseline those connections are compared against.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use keyward_common::client::ApiClient;
use keyward_common::tls::{ClientAuth, DenyList, client_config, server_config};
use keyward_server::datadir::DataDir;
use rustls_pki_types::pem::PemObject as _;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::node::FakeNode;

/// Enrolls `count` nodes named `{prefix}-{i}`, `concurrency` at a time.
pub async fn enroll_many(
    op: &ApiClient,
    api_url: &str,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> Vec<Arc<FakeNode>> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (op, url, permits) = (op.clone(), api_url.to_string(), permits.clone());
        let name = format!("{prefix}-{i}");
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            Arc::new(FakeNode::enroll(&op, &url, &name).await)
        }));
    }
    let mut nodes = Vec::with_capacity(count);
    for task in tasks {
        nodes.push(task.await.expect("enrollment task"));
    }
    nodes
}

/// A client for `node` pointed at another URL with the same certificate (for the baseline).
pub fn client_to(node: &FakeNode, url: &str) -> ApiClient {
    let cert =
        rustls_pki_types::CertificateDer::from_pem_slice(node.cert_pem.as_bytes()).expect("cert");
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_slice(node.key_pem.as_bytes()).expect("key");
    let config = client_config(
        &node.ca,
        Some(keyward_common::tls::CertifiedKey {
            chain: vec![cert],
            key,
        }),
    )
    .expect("config");
    ApiClient::new(url, config, Duration::from_secs(120)).expect("client")
}

/// A bare HTTPS server with keyward's TLS configuration (same certificate, client certificates
/// required) that parks every request until released, then answers a fixed body. It does no
/// keyward work: it is what the network and TLS alone cost.
pub struct BareServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    release: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl BareServer {
    /// Starts on a free port with the TLS identity of the server in `data`.
    pub async fn start(data: &std::path::Path) -> Self {
        let dir = DataDir::new(data);
        let domain = keyward_common::ids::TrustDomain::new("fleet.test").expect("domain");
        let ca = dir.ca(&domain).expect("ca");
        let tls = server_config(
            ca.cert_der(),
            dir.server_identity().expect("identity"),
            ClientAuth::Required,
            Arc::new(DenyList::new()),
        )
        .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("address"));
        let (release, released) = watch::channel(0u64);
        let body = Bytes::from(vec![b'x'; 1024]);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, released, body) = (acceptor.clone(), released.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (mut released, body) = (released.clone(), body.clone());
                        async move {
                            let park = req.uri().path() == "/park";
                            let _ = req.into_body().collect().await;
                            if park {
                                // Wait for the next release, not one that happened before.
                                released.borrow_and_update();
                                let _ = released.changed().await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { url, release, task }
    }

    /// Answers every parked request now.
    pub fn release_all(&self) {
        self.release.send_modify(|n| *n += 1);
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Parks one request per client on the bare server, releases them all, and returns each
/// client's latency from release to answer, in milliseconds.
pub async fn bare_fanout(server: &BareServer, clients: &[ApiClient]) -> Vec<f64> {
    // Open the connections first, as keyward's watchers are connected before a change.
    for client in clients {
        client
            .send(hyper::Method::GET, "/ping", None)
            .await
            .expect("bare server answers");
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for client in clients {
        let (client, done) = (client.clone(), done_tx.clone());
        tokio::spawn(async move {
            let answered = client
                .send(hyper::Method::GET, "/park", None)
                .await
                .map(|_| Instant::now());
            let _ = done.send(answered);
        });
    }
    // Let every request park.
    tokio::time::sleep(Duration::from_millis(500 + clients.len() as u64 / 2)).await;
    let released = Instant::now();
    server.release_all();
    let mut latencies = Vec::with_capacity(clients.len());
    for _ in clients {
        let at = done_rx
            .recv()
            .await
            .expect("answer")
            .expect("parked request answered");
        latencies.push(super::ms(at.saturating_duration_since(released)));
    }
    latencies
}
