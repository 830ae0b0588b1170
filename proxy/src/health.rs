//! Node health: a background check marks a node down after consecutive failed `GET /healthz`
//! calls and up again at its first answer. Requests for a down node's keys are answered 503 with
//! `Retry-After` at once, without waiting for a connect timeout; the other nodes keep serving.
//!
//! Health never changes ownership (twemproxy's auto-eject sent a dead server's keys elsewhere and
//! left two copies when it came back): a down owner means 503 for its keys, nothing more.

use crate::server::ProxyState;
use arc_swap::ArcSwap;
use http::Method;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// How often, and how strictly, nodes are checked.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Time between two checks of every node.
    pub interval: Duration,
    /// A check that takes longer fails.
    pub timeout: Duration,
    /// Consecutive failed checks before a node counts as down.
    pub failures: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_millis(500),
            // Generous: a node that is merely busy must not be declared down. A dead one
            // refuses connections, which fails requests at once anyway.
            timeout: Duration::from_secs(2),
            failures: 3,
        }
    }
}

/// Which nodes are down now. Read on every request: one atomic load, no lock.
#[derive(Default)]
pub struct Health {
    down: ArcSwap<HashSet<String>>,
}

impl Health {
    pub fn is_down(&self, node: &str) -> bool {
        let down = self.down.load();
        !down.is_empty() && down.contains(node)
    }

    pub fn down(&self) -> Arc<HashSet<String>> {
        self.down.load_full()
    }

    fn set(&self, down: HashSet<String>) {
        if *self.down.load_full() != down {
            self.down.store(Arc::new(down));
        }
    }
}

/// Checks every node of the current topology each interval until the proxy state is dropped.
pub fn spawn_checker(state: &ProxyState) -> tokio::task::JoinHandle<()> {
    let weak = state.downgrade();
    let config = state.config().health.clone();
    tokio::spawn(async move {
        let mut failures: HashMap<String, u32> = HashMap::new();
        loop {
            tokio::time::sleep(config.interval).await;
            let Some(state) = ProxyState::upgrade(&weak) else {
                return;
            };
            let topology = state.cluster().topology();
            let checks = topology.nodes.iter().map(|node| {
                let state = &state;
                async move {
                    let ok = state
                        .upstream()
                        .call_with_timeout(
                            &node.id,
                            Method::GET,
                            &node.url,
                            "/healthz",
                            None,
                            config.timeout,
                        )
                        .await
                        .is_ok_and(|reply| reply.status.is_success());
                    (node.id.clone(), ok)
                }
            });
            let results = futures::future::join_all(checks).await;
            failures.retain(|id, _| topology.node(id).is_some());
            let mut down = HashSet::new();
            for (id, ok) in results {
                let count = failures.entry(id.clone()).or_default();
                if ok {
                    if *count >= config.failures {
                        tracing::info!(node = %id, "node is back");
                    }
                    *count = 0;
                } else {
                    *count += 1;
                    if *count == config.failures {
                        tracing::warn!(node = %id, "node is down: its keys get 503 until it answers");
                    }
                    if *count >= config.failures {
                        down.insert(id);
                    }
                }
            }
            state.health().set(down);
        }
    })
}
