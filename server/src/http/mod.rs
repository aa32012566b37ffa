//! HTTPS listeners: a TLS accept loop in front of axum routers.
//!
//! Each accepted connection takes a permit from its listener's semaphore, so the number of
//! connections (idle watchers included) is capped; above the cap new connections are closed at
//! once. The enrollment listener, which needs no certificate, has its own small cap and a short
//! idle timeout, so anonymous clients cannot starve the agents' watches. The TLS handshake has a
//! timeout, so a silent client cannot hold a permit.
//! The verified client identity is attached to every request of the connection.

pub mod auth;
pub mod error;
pub mod routes;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use keyward_common::ids::TrustDomain;
use keyward_common::tls::peer_identity;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::Layer as _;

use self::auth::{Peer, PeerCert};
use crate::metrics::Metrics;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection whose handshake failed is drained before it is closed.
const LINGER: Duration = Duration::from_secs(1);
/// How long shutdown waits for open connections to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What a listener needs besides its socket.
#[derive(Clone)]
pub struct ListenerContext {
    /// TLS configuration of this listener.
    pub acceptor: TlsAcceptor,
    /// Routes of this listener.
    pub router: Router,
    /// The fleet's trust domain, to read identities.
    pub domain: TrustDomain,
    /// Connection permits of this listener.
    pub permits: Arc<Semaphore>,
    /// How long an idle keep-alive connection may take to send its next request headers.
    pub header_read_timeout: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Closes a connection whose handshake failed without resetting it.
///
/// With TLS 1.3 the client finishes its side of the handshake and sends its request before the
/// server has checked its certificate. Closing the socket with that request unread makes the
/// kernel reset the connection, and the client may then see the reset instead of the alert that
/// says why (for an evicted node, `certificate_revoked`). So: send FIN after the alert, read and
/// discard what the client sends for a short while, then close.
async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

/// Serves `listener` until `shutdown` turns true, then lets open connections finish for a grace
/// period. Requests in flight (including watches, which the hub answers at shutdown) complete;
/// connections still open after the grace period are dropped.
pub async fn serve(
    listener: TcpListener,
    ctx: ListenerContext,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (tcp, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = ctx.permits.clone().try_acquire_owned() else {
            Metrics::inc(&ctx.metrics.connections_refused);
            tracing::debug!(%addr, "connection refused: at the connection cap");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // The permit is held for the connection's life.
            let _permit = permit;
            let accept = ctx.acceptor.accept(tcp).into_fallible();
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(tls)) => tls,
                Ok(Err((e, tcp))) => {
                    Metrics::inc(&ctx.metrics.handshake_failures);
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    linger(tcp).await;
                    return;
                }
                Err(_) => {
                    Metrics::inc(&ctx.metrics.handshake_failures);
                    tracing::debug!(%addr, "TLS handshake timed out");
                    return;
                }
            };
            let identity =
                peer_identity(tls.get_ref().1.peer_certificates(), &ctx.domain).map(|result| {
                    let der = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .cloned();
                    Arc::new(match (result, der) {
                        (Ok((identity, facts)), Some(der)) => Ok(PeerCert {
                            identity,
                            facts,
                            der,
                        }),
                        (Err(e), _) => Err(e.to_string()),
                        (Ok(_), None) => Err("no certificate".to_string()),
                    })
                });
            let peer = Peer { addr, identity };
            ctx.metrics.connections.fetch_add(1, Ordering::Relaxed);
            let service = TowerToHyperService::new(Extension(peer).layer(ctx.router));
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(ctx.header_read_timeout)
                .keep_alive(true);
            let connection = http.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
            ctx.metrics.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; dropping them");
    }
}
