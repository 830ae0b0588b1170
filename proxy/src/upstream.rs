//! The HTTP client from the proxy to its nodes (and from the CLI to the proxy).
//!
//! One pooled keep-alive hyper client for all nodes: hyper-util's client measured 10–13% faster
//! than reqwest on this path. Every call has a connect timeout and a whole-request timeout, so a
//! dead node costs a bounded time (503 or 504), never a hang, and other nodes are not held up.
//!
//! Single-row requests take [`Upstream::call_row`]: per node, those that wait while the node's
//! earlier exchanges are in flight leave together in one `POST /v1/ops`. Under load that cuts
//! the HTTP exchanges (each a parse, a write and a wake-up on both sides) by the batch size;
//! when requests come one at a time, each still goes alone, at once.

use crate::error::{ProxyError, ProxyResult};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shardlite_node::identity::NODE_HEADER;
use shardlite_node::ops::{
    MAX_OPS, OPS_CONTENT_TYPE, OPS_PATH, OpMethod, decode_replies, encode_ops,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// The content type of every body but a set of row operations.
const JSON: &str = "application/json";

/// The header a node sets on a write it refused because the key's range is moving.
pub const FENCED_HEADER: &str = "x-shardlite-fenced";

/// Timeouts for calls to nodes.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// How long a TCP connect may take before the node counts as down (503).
    pub connect_timeout: Duration,
    /// How long a whole call may take, body included, before it counts as timed out (504).
    pub request_timeout: Duration,
    /// Sent as `Authorization: Bearer ...` on every call: the cluster secret towards nodes, the
    /// admin token from the CLI towards the proxy.
    pub bearer: Option<String>,
    /// Names the node each call is meant for (`x-shardlite-node: <who>`), so a node at a
    /// wrong address refuses it (421, see `shardlite_node::identity`): on for the proxy's
    /// calls to its nodes, off for the CLI's calls to the proxy.
    pub name_nodes: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            bearer: None,
            name_nodes: true,
        }
    }
}

/// A node's answer: status and body, already read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    /// The node refused a write because the key's range is fenced for a move
    /// (`x-shardlite-fenced`): the caller re-routes and retries.
    pub fenced: bool,
}

impl Reply {
    /// The body as JSON if the status is a success; the node's error otherwise.
    pub fn json<T: serde::de::DeserializeOwned>(self, node: &str) -> ProxyResult<T> {
        let body = self.ok(node)?;
        serde_json::from_slice(&body).map_err(|e| ProxyError::BadNodeAnswer {
            node: node.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The body if the status is a success; the node's error (status and body passed on) otherwise.
    pub fn ok(self, node: &str) -> ProxyResult<Bytes> {
        if self.status.is_success() {
            Ok(self.body)
        } else {
            Err(ProxyError::Node {
                node: node.to_owned(),
                status: self.status,
                body: self.body,
            })
        }
    }
}

#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Client>,
    /// Row operations waiting for a node, per node URL.
    lanes: Arc<Mutex<HashMap<String, NodeLanes>>>,
}

/// The pooled client and what every call carries.
struct Client {
    client: LegacyClient<HttpConnector, Full<Bytes>>,
    config: UpstreamConfig,
    /// `Bearer <token>`, built once.
    authorization: Option<http::HeaderValue>,
}

/// Where a lane sends: the node's id (for errors) and URL, and whether it carries writes.
struct LaneKey {
    node: String,
    url: String,
    writes: bool,
}

/// A node's two lanes: reads, and writes.
struct NodeLanes {
    node: String,
    reads: mpsc::UnboundedSender<Pending>,
    writes: mpsc::UnboundedSender<Pending>,
}

impl NodeLanes {
    fn start(client: &Arc<Client>, node: &str, url: &str) -> NodeLanes {
        let start = |writes| {
            let (sender, receiver) = mpsc::unbounded_channel();
            let key = LaneKey {
                node: node.to_owned(),
                url: url.to_owned(),
                writes,
            };
            tokio::spawn(lane(client.clone(), key, receiver));
            sender
        };
        NodeLanes {
            node: node.to_owned(),
            reads: start(false),
            writes: start(true),
        }
    }
}

/// A row operation waiting for its lane, and where its answer goes.
struct Pending {
    method: OpMethod,
    path: String,
    body: Bytes,
    reply: oneshot::Sender<ProxyResult<Reply>>,
}

/// Exchanges in flight per node for reads, and for writes. Operations that arrive while all
/// are busy wait and leave together in the next one, so fewer exchanges make larger sets.
/// Measured with the bench (64 client connections over 3 nodes): 2 read exchanges cost the
/// proxy and nodes together 70 µs of CPU per GET against 82 with 4 and 100 with 8. Writes
/// share one writer thread per node whose group commit takes what is queued anyway: one
/// exchange at a time lets the next set gather while the node syncs. 2 were slower in an A/B
/// run alternating the two (old, new, old, new): 14.1k and 14.8k PUT/s against 19.5k and 16.3k
/// with 1, at about the same CPU. Measured again on 2026-11-29, when the machine was faster
/// and the bench left about 0.3 cores idle during the proxy's PUTs: 3 alternating pairs gave
/// 19.4k, 20.6k and 21.0k PUT/s with 2 against 26.4k, 26.2k and 22.0k with 1; with 2 the
/// nodes commit 6.7 writes at a time instead of 10.2.
const READ_EXCHANGES: usize = 2;
const WRITE_EXCHANGES: usize = 1;
/// The most bytes of operation bodies one exchange gathers (it always takes at least one).
const MAX_EXCHANGE_BYTES: usize = 1 << 20;

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = LegacyClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        let authorization = config
            .bearer
            .as_ref()
            .and_then(|token| http::HeaderValue::from_str(&format!("Bearer {token}")).ok());
        Upstream {
            inner: Arc::new(Client {
                client,
                config,
                authorization,
            }),
            lanes: Arc::default(),
        }
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.inner.config
    }

    /// Sends one request to `base_url` + `path` and reads the whole answer. `who` names the
    /// node in errors. A refused or timed-out connect is `ShardUnavailable`; a call that breaks
    /// off once connected is `ShardBrokeOff`; no complete answer within the request timeout is
    /// `ShardTimeout`.
    pub async fn call(
        &self,
        who: &str,
        method: Method,
        base_url: &str,
        path: &str,
        body: Option<Bytes>,
    ) -> ProxyResult<Reply> {
        let timeout = self.inner.config.request_timeout;
        self.call_with_timeout(who, method, base_url, path, body, timeout)
            .await
    }

    /// [`Upstream::call`] with a time limit of its own (health checks, migrations).
    pub async fn call_with_timeout(
        &self,
        who: &str,
        method: Method,
        base_url: &str,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> ProxyResult<Reply> {
        self.inner
            .call(
                who,
                method,
                base_url,
                path,
                body.map(|b| (b, JSON)),
                timeout,
            )
            .await
    }

    /// A single-row request (GET, PUT or DELETE on `/v1/tables/{table}/rows/{key}`), answered
    /// exactly as [`Upstream::call`] would, but sent together with the node's other row
    /// requests of the moment when several are waiting (see [`shardlite_node::ops`]). Alone
    /// it goes as a plain request, so a quiet cluster sees no difference.
    pub async fn call_row(
        &self,
        who: &str,
        method: OpMethod,
        base_url: &str,
        path: &str,
        body: Option<Bytes>,
    ) -> ProxyResult<Reply> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            method,
            path: path.to_owned(),
            body: body.unwrap_or_default(),
            reply,
        };
        let sent = {
            let mut lanes = self.lanes.lock().expect("the lane map is never poisoned");
            // A URL now served by another node id starts afresh (the old lanes finish what
            // they hold, then end).
            if lanes.get(base_url).is_none_or(|found| found.node != who) {
                let fresh = NodeLanes::start(&self.inner, who, base_url);
                lanes.insert(base_url.to_owned(), fresh);
            }
            let lanes = &lanes[base_url];
            if method == OpMethod::Get {
                lanes.reads.send(pending)
            } else {
                lanes.writes.send(pending)
            }
        };
        if sent.is_err() {
            return Err(ProxyError::ShardUnavailable {
                node: who.to_owned(),
                reason: "the proxy is shutting down".into(),
            });
        }
        // Waiting for a free exchange counts against the request's time too.
        let timeout = self.inner.config.request_timeout;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProxyError::ShardUnavailable {
                node: who.to_owned(),
                reason: "the request was dropped before it was sent".into(),
            }),
            Err(_) => Err(ProxyError::ShardTimeout {
                node: who.to_owned(),
                after: timeout,
            }),
        }
    }
}

/// Serves one lane: takes what is waiting whenever an exchange is free, and sends it.
async fn lane(client: Arc<Client>, key: LaneKey, mut waiting: mpsc::UnboundedReceiver<Pending>) {
    let exchanges = Arc::new(Semaphore::new(if key.writes {
        WRITE_EXCHANGES
    } else {
        READ_EXCHANGES
    }));
    let key = Arc::new(key);
    loop {
        let Ok(slot) = exchanges.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = waiting.recv().await else {
            return;
        };
        let mut bytes = first.body.len();
        let mut batch = vec![first];
        while batch.len() < MAX_OPS && bytes < MAX_EXCHANGE_BYTES {
            match waiting.try_recv() {
                Ok(next) => {
                    bytes += next.body.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // A caller that gave up (its client went away) is not sent.
        batch.retain(|pending| !pending.reply.is_closed());
        let client = client.clone();
        let key = key.clone();
        tokio::spawn(async move {
            exchange(&client, &key, batch).await;
            drop(slot);
        });
    }
}

/// Sends a batch as one plain request (one operation) or one `POST /v1/ops`, and answers each.
async fn exchange(client: &Client, key: &LaneKey, mut batch: Vec<Pending>) {
    let timeout = client.config.request_timeout;
    if batch.len() <= 1 {
        if let Some(one) = batch.pop() {
            alone(client, key, one).await;
        }
        return;
    }
    let body = encode_ops(
        batch
            .iter()
            .map(|p| (p.method, p.path.as_str(), p.body.as_ref())),
    );
    let answers = client
        .call(
            &key.node,
            Method::POST,
            &key.url,
            OPS_PATH,
            Some((body, OPS_CONTENT_TYPE)),
            timeout,
        )
        .await
        .and_then(|reply| reply.ok(&key.node))
        .and_then(|body| {
            let replies = decode_replies(body).map_err(|reason| ProxyError::BadNodeAnswer {
                node: key.node.clone(),
                reason,
            })?;
            if replies.len() != batch.len() {
                return Err(ProxyError::BadNodeAnswer {
                    node: key.node.clone(),
                    reason: format!("{} answers to {} operations", replies.len(), batch.len()),
                });
            }
            Ok(replies)
        });
    match answers {
        Ok(replies) => {
            for (pending, reply) in batch.into_iter().zip(replies) {
                let status =
                    StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let _ = pending.reply.send(Ok(Reply {
                    status,
                    body: reply.body,
                    fenced: reply.fenced,
                }));
            }
        }
        // A node from before `/v1/ops` (during a rolling upgrade): each goes alone.
        Err(ProxyError::Node { status, .. })
            if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED =>
        {
            futures::future::join_all(batch.into_iter().map(|one| alone(client, key, one))).await;
        }
        Err(error) => {
            for pending in batch {
                let _ = pending.reply.send(Err(error.for_each_caller()));
            }
        }
    }
}

/// Sends one operation as a plain request.
async fn alone(client: &Client, key: &LaneKey, one: Pending) {
    let body = (one.method == OpMethod::Put).then_some((one.body, JSON));
    let result = client
        .call(
            &key.node,
            one.method.as_http(),
            &key.url,
            &one.path,
            body,
            client.config.request_timeout,
        )
        .await;
    let _ = one.reply.send(result);
}

impl Client {
    async fn call(
        &self,
        who: &str,
        method: Method,
        base_url: &str,
        path: &str,
        body: Option<(Bytes, &'static str)>,
        timeout: Duration,
    ) -> ProxyResult<Reply> {
        let uri = format!("{base_url}{path}");
        let mut builder = Request::builder().method(method).uri(&uri);
        let body = match body {
            Some((body, content_type)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                body
            }
            None => Bytes::new(),
        };
        if let Some(authorization) = &self.authorization {
            builder = builder.header(header::AUTHORIZATION, authorization);
        }
        if self.config.name_nodes {
            builder = builder.header(NODE_HEADER, who);
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| ProxyError::BadRequest(format!("cannot build a request to {uri}: {e}")))?;
        let call = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    ProxyError::ShardUnavailable {
                        node: who.to_owned(),
                        reason: format!("cannot connect to {base_url}: {}", source_chain(&e)),
                    }
                } else {
                    // Connected: the request may have gone out and been applied.
                    ProxyError::ShardBrokeOff {
                        node: who.to_owned(),
                        reason: format!("request to {base_url} failed: {}", source_chain(&e)),
                    }
                }
            })?;
            let status = response.status();
            if status == StatusCode::MISDIRECTED_REQUEST && self.config.name_nodes {
                // Another node answers at this address: its keys are unavailable (nothing
                // was done there), never served by the wrong file.
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let said = crate::error::node_error_message(who, &body);
                return Err(ProxyError::ShardUnavailable {
                    node: who.to_owned(),
                    reason: format!("{base_url} refused the call: {said}"),
                });
            }
            let fenced = response.headers().contains_key(FENCED_HEADER);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ProxyError::ShardBrokeOff {
                    node: who.to_owned(),
                    reason: format!("answer from {base_url} broke off: {e}"),
                })?
                .to_bytes();
            Ok(Reply {
                status,
                body,
                fenced,
            })
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::ShardTimeout {
                node: who.to_owned(),
                after: timeout,
            }),
        }
    }
}

/// The error and its causes in one line: hyper's own message alone ("client error (Connect)")
/// does not say what happened.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
