//! Waking long-polling watchers when their node's manifests change.
//!
//! Each node has a `tokio::sync::watch` channel carrying the last revision that touched it.
//! A watch request subscribes before it reads the store, so a change committed between its read
//! and its wait still wakes it. Changes are announced after commit, locally by the writer and,
//! with PostgreSQL, by the `NOTIFY` listener for changes made by other replicas.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

/// Per-node wake-up channels plus a shutdown signal.
#[derive(Debug)]
pub struct WatchHub {
    nodes: Mutex<HashMap<String, watch::Sender<u64>>>,
    shutdown: watch::Sender<bool>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self {
            nodes: Mutex::new(HashMap::new()),
            shutdown: watch::Sender::new(false),
        }
    }
}

impl WatchHub {
    /// A hub with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_nodes<T>(&self, f: impl FnOnce(&mut HashMap<String, watch::Sender<u64>>) -> T) -> T {
        // The map stays consistent even if a holder panicked: every operation is one insert or
        // lookup.
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut nodes)
    }

    /// Subscribes to changes of `node`.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        self.with_nodes(|nodes| {
            nodes
                .entry(node.to_string())
                .or_insert_with(|| watch::Sender::new(0))
                .subscribe()
        })
    }

    /// Wakes the watchers of `nodes`.
    pub fn notify<S: AsRef<str>>(&self, nodes: &[S], revision: u64) {
        self.with_nodes(|map| {
            for node in nodes {
                if let Some(sender) = map.get(node.as_ref()) {
                    sender.send_if_modified(|current| {
                        let newer = revision > *current;
                        if newer {
                            *current = revision;
                        }
                        newer
                    });
                }
            }
        });
    }

    /// Wakes every watcher (after a lost `NOTIFY` connection, when anything may have changed).
    pub fn notify_all(&self, revision: u64) {
        self.with_nodes(|map| {
            for sender in map.values() {
                sender.send_modify(|current| *current = (*current).max(revision));
            }
            // Drop channels nobody listens to, so the map does not grow with departed nodes.
            map.retain(|_, sender| sender.receiver_count() > 0);
        });
    }

    /// A receiver that turns `true` when the server shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Tells every watcher to answer now: the server is shutting down.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    /// Number of nodes with a channel.
    pub fn channels(&self) -> usize {
        self.with_nodes(|map| map.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_change_wakes_only_the_watchers_of_that_node() {
        let hub = WatchHub::new();
        let mut a = hub.subscribe("a");
        let mut b = hub.subscribe("b");
        hub.notify(&["a"], 5);
        tokio::time::timeout(Duration::from_millis(100), a.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*a.borrow(), 5);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b.changed())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn an_older_revision_does_not_wake_anyone() {
        let hub = WatchHub::new();
        let mut a = hub.subscribe("a");
        hub.notify(&["a"], 5);
        a.changed().await.unwrap();
        hub.notify(&["a"], 4);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), a.changed())
                .await
                .is_err()
        );
    }
}
