//! `keyward-server serve`: loads the data directory, opens the store, binds both listeners and
//! runs until SIGTERM or SIGINT.
//!
//! Shutdown order: stop accepting, answer every waiting watch at once, let requests in flight
//! finish (bounded), stop the rollout driver after its current step, close the store. Nothing
//! is lost: every change was committed before it was acknowledged.

use std::sync::Arc;
use std::time::Duration;

use keyward_common::ids::TrustDomain;
use keyward_common::tls::{ClientAuth, DenyList, server_config};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Settings;
use crate::datadir::{DataDir, DataDirError};
use crate::http::{self, ListenerContext};
use crate::metrics::Metrics;
use crate::service::{Service, rollouts};
use crate::store::{Backend, NOTIFY_CHANNEL, Store, StoreError};
use crate::watch::WatchHub;

/// Idle keep-alive time on the API listener (agents reuse their connection between watches).
const API_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Connection cap of the enrollment listener, which accepts clients without certificates.
const ENROLL_CONNECTIONS: usize = 256;
/// Idle time allowed on the enrollment listener.
const ENROLL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The data directory could not be loaded.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The trust domain in the settings is invalid.
    #[error("trust domain: {0}")]
    Domain(String),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] keyward_common::tls::TlsError),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading the deny list failed.
    #[error("loading the deny list: {0}")]
    DenyList(String),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// Builds the service from settings: keys from the data directory, store from the URL.
pub async fn build_service(settings: Settings) -> Result<Arc<Service>, DaemonError> {
    let data = DataDir::new(settings.data_dir.clone());
    let domain = TrustDomain::new(settings.trust_domain.clone())
        .map_err(|e| DaemonError::Domain(e.to_string()))?;
    let store = Store::open(&settings.database_url).await?;
    let service = Arc::new(Service {
        store,
        ca: data.ca(&domain)?,
        signing: data.signing_key()?,
        trust_root: data.trust_root()?,
        kek: data.kek()?,
        deny: Arc::new(DenyList::new()),
        hub: WatchHub::new(),
        rollout_wake: Notify::new(),
        settings,
        metrics: Arc::new(Metrics::default()),
    });
    service
        .refresh_deny_list()
        .await
        .map_err(|e| DaemonError::DenyList(e.to_string()))?;
    Ok(service)
}

/// Runs the server until a termination signal.
pub async fn run(mut settings: Settings) -> Result<(), DaemonError> {
    // Bind first: with port 0 the default URLs printed for agents must carry the real ports.
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Bind { addr, source })
    };
    let api_listener = bind(settings.listen).await?;
    let enroll_listener = bind(settings.enroll_listen).await?;
    let local = |listener: &TcpListener, addr| {
        listener
            .local_addr()
            .map_err(|source| DaemonError::Bind { addr, source })
    };
    let api_addr = local(&api_listener, settings.listen)?;
    let enroll_addr = local(&enroll_listener, settings.enroll_listen)?;
    if settings.server_url == format!("https://{}", settings.listen) {
        settings.server_url = format!("https://{api_addr}");
    }
    if settings.enroll_url == format!("https://{}", settings.enroll_listen) {
        settings.enroll_url = format!("https://{enroll_addr}");
    }

    let data = DataDir::new(settings.data_dir.clone());
    let service = build_service(settings).await?;
    let settings = &service.settings;
    let domain = service.ca.domain().clone();

    let identity = || data.server_identity();
    let api_tls = server_config(
        service.ca.cert_der(),
        identity()?,
        ClientAuth::Required,
        service.deny.clone(),
    )?;
    let enroll_tls = server_config(
        service.ca.cert_der(),
        identity()?,
        ClientAuth::Optional,
        service.deny.clone(),
    )?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let context = |acceptor, router, permits, header_read_timeout| ListenerContext {
        acceptor,
        router,
        domain: domain.clone(),
        permits: Arc::new(Semaphore::new(permits)),
        header_read_timeout,
        metrics: service.metrics.clone(),
    };
    let api = tokio::spawn(http::serve(
        api_listener,
        context(
            TlsAcceptor::from(Arc::new(api_tls)),
            http::routes::api_router(service.clone()),
            settings.max_connections,
            API_IDLE_TIMEOUT,
        ),
        stop_rx.clone(),
    ));
    let enroll = tokio::spawn(http::serve(
        enroll_listener,
        context(
            TlsAcceptor::from(Arc::new(enroll_tls)),
            http::routes::enroll_router(service.clone()),
            ENROLL_CONNECTIONS,
            ENROLL_IDLE_TIMEOUT,
        ),
        stop_rx.clone(),
    ));
    let driver = tokio::spawn(rollouts::run_driver(service.clone(), stop_rx.clone()));
    if service.store.backend() == Backend::Postgres {
        tokio::spawn(listen_for_replicas(service.clone(), stop_rx.clone()));
        tokio::spawn(refresh_deny_list(service.clone(), stop_rx.clone()));
    }

    // Printed on stdout as well as logged, so scripts starting the server can read the ports.
    println!("keyward-server listening api={api_addr} enroll={enroll_addr}");
    tracing::info!(
        api = %api_addr,
        enroll = %enroll_addr,
        database = ?service.store.backend(),
        signing_key = %service.signing.key_id(),
        "keyward-server started"
    );

    wait_for_signal().await?;
    tracing::info!("shutting down: answering watchers, finishing requests in flight");
    service.hub.shut_down();
    let _ = stop_tx.send(true);
    let _ = tokio::join!(api, enroll, driver);
    service.store.close().await;
    tracing::info!("keyward-server stopped");
    Ok(())
}

async fn wait_for_signal() -> Result<(), DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// With PostgreSQL, reloads the deny list every few seconds so evictions made through another
/// replica reach this one's TLS listeners. (Node requests also check the node's state in the
/// store on every request, so an evicted node is refused at once either way.)
async fn refresh_deny_list(service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = service.refresh_deny_list().await {
            tracing::warn!(error = %e, "reloading the deny list failed");
        }
    }
}

/// With PostgreSQL, wakes local watchers for changes other replicas committed. Reconnects with
/// backoff; after a lost connection every watcher is woken, since notifications may have been
/// missed.
async fn listen_for_replicas(service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let listener = async {
            let mut listener =
                sqlx::postgres::PgListener::connect(&service.settings.database_url).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        backoff = Duration::from_millis(200);
        loop {
            let received = tokio::select! {
                r = listener.try_recv() => r,
                _ = stop.changed() => return,
            };
            match received {
                Ok(Some(notification)) => {
                    let (revision, nodes) =
                        notification.payload().split_once(':').unwrap_or(("0", "*"));
                    let revision = revision.parse().unwrap_or(u64::MAX);
                    if nodes == "*" {
                        service.hub.notify_all(revision);
                    } else {
                        let nodes: Vec<&str> = nodes.split(',').collect();
                        service.hub.notify(&nodes, revision);
                    }
                }
                Ok(None) => {
                    let revision = service.store.revision().await.unwrap_or(u64::MAX);
                    service.hub.notify_all(revision);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                    break;
                }
            }
        }
    }
}
