//! A small HTTPS client for the keyward API: HTTP/1.1 over rustls, with keep-alive connection
//! reuse, a deadline on every request and a cap on response size.
//!
//! It is deliberately minimal (one server, JSON in and out) so that agents, the CLI and the load
//! generator share one well-understood code path, and so that a refused client certificate can be
//! told apart from other failures: the server's `certificate_revoked` alert becomes
//! [`ClientError::CertificateRevoked`].

use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::api::ErrorBody;

/// Largest response body accepted.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 4;
/// Time allowed to open a TCP connection and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server URL is not `https://host:port`.
    #[error("server URL {0:?} is invalid: expected https://HOST:PORT")]
    BadUrl(String),
    /// The TCP connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server refused this client's certificate as revoked (evicted node, revoked operator).
    #[error("the server refused this certificate as revoked")]
    CertificateRevoked,
    /// TLS failed (untrusted server, refused client certificate, protocol error).
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        /// `host:port`.
        addr: String,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with {addr} failed: {message}")]
    Http {
        /// `host:port`.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The request did not complete in time.
    #[error("request to {0} timed out")]
    Timeout(String),
    /// The response body is larger than [`MAX_RESPONSE_BYTES`].
    #[error("response is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    /// The server answered with an error status.
    #[error("server answered {status} ({code}): {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The error code from the body (`unknown` if the body had none).
        code: String,
        /// The message from the body.
        message: String,
    },
    /// A successful answer's body is not the expected JSON.
    #[error("server answer is not the expected JSON: {0}")]
    Decode(String),
}

impl ClientError {
    /// The HTTP status of an error answer, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API error code of an error answer, if this is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Bytes,
}

impl ApiResponse {
    /// Turns a non-2xx answer into [`ClientError::Status`].
    pub fn error_for_status(self) -> Result<Self, ClientError> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(body) => (body.code, body.message),
            Err(_) => (
                "unknown".to_string(),
                String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(300)
                    .collect(),
            ),
        };
        Err(ClientError::Status {
            status: self.status,
            code,
            message,
        })
    }

    /// Decodes a 2xx JSON answer.
    pub fn json<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        let ok = self.error_for_status()?;
        serde_json::from_slice(&ok.body).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

/// A client for one keyward server.
#[derive(Clone)]
pub struct ApiClient {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    timeout: Duration,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("host", &self.inner.host)
            .field("port", &self.inner.port)
            .finish()
    }
}

/// Splits `https://host:port` (an optional trailing `/` allowed) into host and port.
pub fn parse_https_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::BadUrl(url.to_string());
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, port) = v6.split_once("]:").ok_or_else(bad)?;
        (host.to_string(), port)
    } else {
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        (host.to_string(), port)
    };
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

impl ApiClient {
    /// A client for the server at `url` (`https://host:port`) using `config`. `timeout` is the
    /// default deadline of each request.
    pub fn new(url: &str, config: ClientConfig, timeout: Duration) -> Result<Self, ClientError> {
        let (host, port) = parse_https_url(url)?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| ClientError::BadUrl(url.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                host,
                port,
                server_name,
                connector: TlsConnector::from(Arc::new(config)),
                idle: Mutex::new(Vec::new()),
                timeout,
            }),
        })
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.inner.host, self.inner.port)
    }

    /// Drops idle connections, so the next request makes a new TLS handshake.
    pub fn reset(&self) {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let addr = self.addr();
        let tcp = TcpStream::connect((self.inner.host.as_str(), self.inner.port))
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .inner
            .connector
            .connect(self.inner.server_name.clone(), tcp)
            .await
            .map_err(|e| classify(&addr, &e))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| classify(&addr, &e))?;
        // The connection future drives the socket; it ends when the sender is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        loop {
            let idle = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop();
            match idle {
                Some(mut sender) => {
                    if sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
                None => return self.connect().await,
            }
        }
    }

    /// Sends a request with the default deadline.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<ApiResponse, ClientError> {
        self.send_with_timeout(method, path, body, self.inner.timeout)
            .await
    }

    /// Sends a request; `path` includes the query string.
    pub async fn send_with_timeout(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<ApiResponse, ClientError> {
        let addr = self.addr();
        let exchange = async {
            let mut sender = tokio::time::timeout(CONNECT_TIMEOUT, self.sender())
                .await
                .map_err(|_| ClientError::Timeout(addr.clone()))??;
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, addr.as_str())
                .header(header::ACCEPT, "application/json");
            if body.is_some() {
                request = request.header(header::CONTENT_TYPE, "application/json");
            }
            let request = request
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::Http {
                    addr: addr.clone(),
                    message: e.to_string(),
                })?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| classify(&addr, &e))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        ClientError::TooLarge
                    } else {
                        ClientError::Http {
                            addr: addr.clone(),
                            message: e.to_string(),
                        }
                    }
                })?
                .to_bytes();
            let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(sender);
            }
            Ok(ApiResponse { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.addr()))?
    }

    /// `GET path`, decoding a JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(Method::GET, path, None).await?.json()
    }

    /// `POST path` with a JSON body, decoding a JSON answer.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.send(Method::POST, path, Some(body)).await?.json()
    }

    /// `DELETE path`, decoding a JSON answer.
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(Method::DELETE, path, None).await?.json()
    }
}

/// Turns a connection error into the most telling [`ClientError`]: a revoked certificate, another
/// TLS failure, or a plain HTTP/IO failure.
fn classify(addr: &str, err: &(dyn StdError + 'static)) -> ClientError {
    match find_rustls_error(err) {
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)) => {
            ClientError::CertificateRevoked
        }
        Some(tls) => ClientError::Tls {
            addr: addr.to_string(),
            source: tls.clone(),
        },
        None => ClientError::Http {
            addr: addr.to_string(),
            message: chain_message(err),
        },
    }
}

/// Finds a rustls error anywhere in `err`'s chain, including inside `std::io::Error` wrappers.
fn find_rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = find_rustls_error(inner)
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

fn chain_message(err: &(dyn StdError + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_host_and_port() {
        assert_eq!(
            parse_https_url("https://127.0.0.1:7443").unwrap(),
            ("127.0.0.1".into(), 7443)
        );
        assert_eq!(
            parse_https_url("https://keys.example:443/").unwrap(),
            ("keys.example".into(), 443)
        );
        assert_eq!(
            parse_https_url("https://[::1]:7443").unwrap(),
            ("::1".into(), 7443)
        );
        for bad in [
            "http://a:1",
            "https://a",
            "https://a:x",
            "https://:1",
            "https://a:1/v1",
        ] {
            assert!(
                matches!(parse_https_url(bad), Err(ClientError::BadUrl(_))),
                "{bad}"
            );
        }
    }
}
