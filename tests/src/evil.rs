//! A hostile key server for refusal tests: it holds the real server's TLS identity and signing
//! key (as an attacker who stole them, or a man in the middle with a stolen certificate, would),
//! and answers watches with whatever the test scripts: tampered, replayed, misaddressed or
//! expired documents. It records the agent's status reports so tests can assert the refusals.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use keyward_common::api::StatusReport;
use keyward_common::dsse::{MANIFEST_PAYLOAD_TYPE, ManifestSigningKey, SNAPSHOT_PAYLOAD_TYPE};
use keyward_common::ids::{NodeId, Sha256Digest};
use keyward_common::manifest::{Manifest, NodeSnapshot, SnapshotEntry};
use keyward_common::tls::{ClientAuth, DenyList, server_config};
use keyward_server::datadir::DataDir;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// What the evil server answers and what it saw.
#[derive(Default)]
pub struct Script {
    /// Watch answers to give, in order; the last one is repeated once the queue is empty.
    pub watches: VecDeque<String>,
    last: Option<String>,
    /// File contents by (container, generation, index).
    pub files: HashMap<(String, u64, usize), Vec<u8>>,
    /// Status reports received.
    pub reports: Vec<StatusReport>,
}

/// A running evil server.
pub struct EvilServer {
    /// Shared script.
    pub script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
    /// The signing key stolen from the real server's data directory.
    pub signing: ManifestSigningKey,
}

impl EvilServer {
    /// Serves on 127.0.0.1:`port` with the TLS identity and signing key of the server whose data
    /// directory is `data`.
    pub async fn start(data: &std::path::Path, port: u16) -> Self {
        let dir = DataDir::new(data);
        let domain = keyward_common::ids::TrustDomain::new("fleet.test").unwrap();
        let ca = dir.ca(&domain).unwrap();
        let tls = server_config(
            ca.cert_der(),
            dir.server_identity().unwrap(),
            ClientAuth::Optional,
            Arc::new(DenyList::new()),
        )
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = bind_retrying(port).await;
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = script.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let script = shared.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(move |req| handle(req, script.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            script,
            task,
            signing: dir.signing_key().unwrap(),
        }
    }

    /// Queues a watch answer.
    pub fn push_watch(&self, answer: String) {
        self.script.lock().unwrap().watches.push_back(answer);
    }

    /// Makes a watch answer from a snapshot and manifest envelopes (raw JSON texts).
    pub fn watch_answer(revision: u64, snapshot: &str, manifests: &[String]) -> String {
        format!(
            "{{\"revision\":{revision},\"snapshot\":{snapshot},\"manifests\":[{}]}}",
            manifests.join(",")
        )
    }

    /// Signs a manifest; returns the envelope text and payload digest.
    pub fn sign_manifest(&self, manifest: &Manifest) -> (String, Sha256Digest) {
        let payload = serde_json::to_vec(manifest).unwrap();
        let digest = Sha256Digest::of(&payload);
        let envelope = self
            .signing
            .sign_envelope(MANIFEST_PAYLOAD_TYPE, payload)
            .encode();
        (String::from_utf8(envelope).unwrap(), digest)
    }

    /// Signs a snapshot for `node` listing `entries`, valid for `ttl` seconds from now (negative:
    /// already expired).
    pub fn sign_snapshot(
        &self,
        node: &NodeId,
        revision: u64,
        entries: Vec<SnapshotEntry>,
        ttl: i64,
    ) -> String {
        let now = keyward_common::time::now_unix() as i64;
        let snapshot = NodeSnapshot {
            node: node.clone(),
            revision,
            issued_at: (now - 1).max(0) as u64,
            expires_at: (now + ttl).max(0) as u64,
            manifests: entries,
        };
        let envelope = self
            .signing
            .sign_envelope(
                SNAPSHOT_PAYLOAD_TYPE,
                serde_json::to_vec(&snapshot).unwrap(),
            )
            .encode();
        String::from_utf8(envelope).unwrap()
    }

    /// Reports received so far.
    pub fn reports(&self) -> Vec<StatusReport> {
        self.script
            .lock()
            .unwrap()
            .reports
            .iter()
            .map(|r| serde_json::from_value(serde_json::to_value(r).unwrap()).unwrap())
            .collect()
    }
}

impl Drop for EvilServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bind_retrying(port: u16) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot bind 127.0.0.1:{port}");
}

async fn handle(
    req: Request<Incoming>,
    script: Arc<Mutex<Script>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = |status: u16, body: Vec<u8>| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap())
    };
    if path == "/v1/node/watch" {
        let answer = {
            let mut s = script.lock().unwrap();
            match s.watches.pop_front() {
                Some(a) => {
                    s.last = Some(a.clone());
                    Some(a)
                }
                None => s.last.clone(),
            }
        };
        // Pace repeated answers like a long-poll would.
        tokio::time::sleep(Duration::from_millis(300)).await;
        return match answer {
            Some(a) => reply(200, a.into_bytes()),
            None => reply(
                503,
                br#"{"code":"unavailable","message":"nothing scripted"}"#.to_vec(),
            ),
        };
    }
    if path == "/v1/node/status" {
        if let Ok(report) = serde_json::from_slice::<StatusReport>(&body) {
            script.lock().unwrap().reports.push(report);
        }
        return reply(204, Vec::new());
    }
    if let Some(rest) = path.strip_prefix("/v1/node/files/") {
        let parts: Vec<&str> = rest.split('/').collect();
        if let [container, generation, idx] = parts.as_slice() {
            let key = (
                container.to_string(),
                generation.parse().unwrap_or(0),
                idx.parse().unwrap_or(0),
            );
            if let Some(content) = script.lock().unwrap().files.get(&key) {
                return reply(200, content.clone());
            }
        }
        return reply(
            404,
            br#"{"code":"not_found","message":"no such file"}"#.to_vec(),
        );
    }
    reply(
        404,
        br#"{"code":"not_found","message":"no such endpoint"}"#.to_vec(),
    )
}
