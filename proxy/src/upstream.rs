//! The HTTP client from the proxy to its nodes (and from the CLI to the proxy).
//!
//! One pooled keep-alive hyper client for all nodes: hyper-util's client measured 10–13% faster
//! than reqwest on this path. Every call has a connect timeout and a whole-request timeout, so a
//! dead node costs a bounded time (503 or 504), never a hang, and other nodes are not held up.

use crate::error::{ProxyError, ProxyResult};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

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
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            bearer: None,
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
    client: Client<HttpConnector, Full<Bytes>>,
    config: UpstreamConfig,
    /// `Bearer <token>`, built once.
    authorization: Option<http::HeaderValue>,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        let authorization = config
            .bearer
            .as_ref()
            .and_then(|token| http::HeaderValue::from_str(&format!("Bearer {token}")).ok());
        Upstream {
            client,
            config,
            authorization,
        }
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Sends one request to `base_url` + `path` and reads the whole answer. `who` names the
    /// node in errors. A refused or timed-out connect is `ShardUnavailable`; no complete answer
    /// within the request timeout is `ShardTimeout`.
    pub async fn call(
        &self,
        who: &str,
        method: Method,
        base_url: &str,
        path: &str,
        body: Option<Bytes>,
    ) -> ProxyResult<Reply> {
        self.call_with_timeout(
            who,
            method,
            base_url,
            path,
            body,
            self.config.request_timeout,
        )
        .await
    }

    pub async fn call_with_timeout(
        &self,
        who: &str,
        method: Method,
        base_url: &str,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> ProxyResult<Reply> {
        let uri = format!("{base_url}{path}");
        let mut builder = Request::builder().method(method).uri(&uri);
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(authorization) = &self.authorization {
            builder = builder.header(header::AUTHORIZATION, authorization);
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ProxyError::BadRequest(format!("cannot build a request to {uri}: {e}")))?;
        let call = async {
            let response = self.client.request(request).await.map_err(|e| {
                let reason = if e.is_connect() {
                    format!("cannot connect to {base_url}: {}", source_chain(&e))
                } else {
                    format!("request to {base_url} failed: {}", source_chain(&e))
                };
                ProxyError::ShardUnavailable {
                    node: who.to_owned(),
                    reason,
                }
            })?;
            let status = response.status();
            let fenced = response.headers().contains_key(FENCED_HEADER);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ProxyError::ShardUnavailable {
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
