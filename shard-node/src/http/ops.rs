//! `POST /v1/ops`: several row requests in one exchange (format in [`crate::ops`]).
//!
//! Every operation is answered as if it had come alone, and all of them at once. Reads of a row
//! run together on one reader connection, in one trip to a blocking thread, each as its own
//! statement; everything else is served by the row router, the same handlers that serve it
//! alone. The writes reach the writer as one job, so they share one group commit (unless they
//! overfill a group). The cluster secret is checked once, on the exchange.

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::http::{Request, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;
use tower::ServiceExt;

use crate::error::{FENCED_HEADER, NodeError};
use crate::ops::{
    OP_PATH_PREFIX, OPS_CONTENT_TYPE, Op, OpMethod, OpReply, decode_ops, encode_replies,
};
use crate::rows;
use crate::state::NodeState;

pub(super) async fn run(
    state: NodeState,
    router: Router,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, NodeError> {
    let body = body.map_err(NodeError::InvalidBody)?;
    let ops = decode_ops(body).map_err(NodeError::InvalidRequest)?;
    state.count_op_set(ops.len());
    let mut replies: Vec<Option<OpReply>> = vec![None; ops.len()];
    let mut reads = Vec::new();
    let mut others = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        if op.method == OpMethod::Get
            && let Some((table, key)) = row_path(&op.path)
        {
            match super::row_key(&state, &table, &key) {
                Ok(read) => reads.push((i, read)),
                Err(e) => replies[i] = Some(reply_of(e.into_response()).await),
            }
            continue;
        }
        others.push((i, op));
    }
    let read_all = async {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        state
            .read(move |_, conn| {
                Ok(reads
                    .into_iter()
                    .map(|(i, (table, key))| (i, rows::get(conn, &table, &key)))
                    .collect::<Vec<_>>())
            })
            .await
    };
    let routed = state.writes_together(futures::future::join_all(others.into_iter().map(
        |(i, op)| {
            let router = router.clone();
            async move { (i, routed(router, op).await) }
        },
    )));
    let (read, routed) = tokio::join!(read_all, routed);
    for (i, reply) in routed {
        replies[i] = Some(reply);
    }
    match read {
        Ok(read) => {
            for (i, row) in read {
                let response = match row {
                    Ok(row) => Json(row).into_response(),
                    Err(e) => e.into_response(),
                };
                replies[i] = Some(reply_of(response).await);
            }
        }
        // No reader: every read fails alike.
        Err(e) => {
            let failed = reply_of(e.into_response()).await;
            for reply in replies.iter_mut().filter(|r| r.is_none()) {
                *reply = Some(failed.clone());
            }
        }
    }
    let replies: Vec<OpReply> = replies
        .into_iter()
        .map(|r| r.expect("every operation was answered"))
        .collect();
    Ok((
        [(header::CONTENT_TYPE, OPS_CONTENT_TYPE)],
        encode_replies(&replies),
    )
        .into_response())
}

/// The table and key of `/v1/tables/{table}/rows/{key}`, percent-decoded as the router does;
/// `None` for any other shape (the router then answers it).
fn row_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix(OP_PATH_PREFIX)?;
    let (table, key) = rest.split_once("/rows/")?;
    if table.is_empty() || key.is_empty() || table.contains('/') || key.contains('/') {
        return None;
    }
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    Some((decode(table)?, decode(key)?))
}

/// Serves one operation through the row router, as if it had come alone.
async fn routed(router: Router, op: Op) -> OpReply {
    let mut request = Request::builder()
        .method(op.method.as_http())
        .uri(op.path.as_str());
    if op.method == OpMethod::Put {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let response = match request.body(Body::from(op.body)) {
        Ok(request) => match router.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        Err(e) => NodeError::InvalidRequest(format!("invalid operation path: {e}")).into_response(),
    };
    reply_of(response).await
}

async fn reply_of(response: Response) -> OpReply {
    let status = response.status().as_u16();
    let fenced = response.headers().contains_key(FENCED_HEADER);
    match axum::body::to_bytes(response.into_body(), usize::MAX).await {
        Ok(body) => OpReply {
            status,
            fenced,
            body,
        },
        Err(e) => OpReply {
            status: 500,
            fenced: false,
            body: Bytes::from(
                serde_json::json!({ "error": format!("reading the answer: {e}") }).to_string(),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::row_path;
    use crate::http::tests::{TestNode, send};
    use crate::ops::{OpMethod, OpReply, decode_replies, encode_ops};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    /// Sends one `POST /v1/ops` with `auth` as the bearer; the status and the raw body.
    async fn post_ops(
        node: &TestNode,
        body: axum::body::Bytes,
        auth: Option<&str>,
    ) -> (StatusCode, axum::body::Bytes) {
        let mut request = Request::post("/v1/ops");
        if let Some(token) = auth {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = crate::http::router(node.state.clone())
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    async fn ops(node: &TestNode, list: &[(OpMethod, &str, &str)]) -> Vec<OpReply> {
        let body = encode_ops(list.iter().map(|(m, p, b)| (*m, *p, b.as_bytes())));
        let (status, body) = post_ops(node, body, None).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        decode_replies(body).unwrap()
    }

    fn json_of(reply: &OpReply) -> Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[tokio::test]
    async fn each_operation_is_answered_as_if_it_came_alone() {
        let node = TestNode::new().await;
        let twin = TestNode::new().await;
        for n in [&node, &twin] {
            for (id, name) in [("u0", "Al"), ("u1", "Ann")] {
                let (status, body) = n
                    .call(
                        "PUT",
                        &format!("/v1/tables/users/rows/{id}"),
                        Some(json!({"name": name})),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
            }
        }
        let list = [
            (OpMethod::Get, "/v1/tables/users/rows/u1", ""),
            (OpMethod::Get, "/v1/tables/users/rows/nobody", ""),
            (OpMethod::Get, "/v1/tables/nosuch/rows/1", ""),
            (
                OpMethod::Put,
                "/v1/tables/users/rows/u2",
                r#"{"name":"Bo"}"#,
            ),
            (
                OpMethod::Put,
                "/v1/tables/users/rows/u3",
                r#"{"colour":"red"}"#,
            ),
            (OpMethod::Put, "/v1/tables/users/rows/u4", "{not json"),
            (OpMethod::Delete, "/v1/tables/users/rows/u0", ""),
            (OpMethod::Get, "/v1/tables/counters/rows/007", ""),
            (OpMethod::Get, "/v1/tables/users/rows/a/b", ""),
        ];
        let replies = ops(&node, &list).await;
        assert_eq!(replies.len(), list.len());
        // The same operations one by one on a node in the same state. (Those of a set run at
        // once, so the list touches no row twice.)
        for ((method, path, body), reply) in list.iter().zip(&replies) {
            let body = (*method == OpMethod::Put).then(|| body.to_string());
            let (status, _, alone) =
                send(twin.state.clone(), method.as_http().as_str(), path, body).await;
            assert_eq!(reply.status, status.as_u16(), "{method:?} {path}");
            assert!(!reply.fenced);
            assert_eq!(json_of(reply), alone, "{method:?} {path}");
        }
        assert_eq!(json_of(&replies[0])["name"], "Ann");
        assert_eq!(replies[1].status, 404);
        assert_eq!(replies[3].status, 200);
        assert_eq!(replies[4].status, 400);
        assert_eq!(replies[5].status, 400);
        // The failed PUTs changed nothing; the good ones committed.
        assert_eq!(
            node.query("SELECT id FROM users ORDER BY id").await,
            vec![json!(["u1"]), json!(["u2"])]
        );
        let (_, stats) = node.call("GET", "/v1/stats", None).await;
        assert_eq!(
            (stats["op_sets"].as_u64(), stats["ops"].as_u64()),
            (Some(1), Some(9))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writes_of_a_set_share_one_commit() {
        let node = TestNode::new().await;
        let (_, before) = node.call("GET", "/v1/stats", None).await;
        // A full set (256 = MAX_OPS, one group's worth): queued one by one, the writer would
        // wake on the first few and commit them before the rest were in.
        let paths: Vec<String> = (0..crate::ops::MAX_OPS)
            .map(|i| format!("/v1/tables/counters/rows/{i}"))
            .collect();
        let list: Vec<(OpMethod, &str, &str)> = paths
            .iter()
            .map(|p| (OpMethod::Put, p.as_str(), r#"{"n": 1}"#))
            .collect();
        let replies = ops(&node, &list).await;
        assert!(replies.iter().all(|r| r.status == 200));
        let (_, after) = node.call("GET", "/v1/stats", None).await;
        let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        assert_eq!(
            (delta("writes"), delta("commits")),
            (crate::ops::MAX_OPS as u64, 1)
        );
    }

    #[tokio::test]
    async fn a_fenced_write_is_flagged_in_its_own_answer_only() {
        let node = TestNode::new().await;
        let (status, body) = node
            .call(
                "PUT",
                "/v1/transfer/fences",
                Some(json!({"job": "j1", "ranges": [[0, u32::MAX]]})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let replies = ops(
            &node,
            &[
                (
                    OpMethod::Put,
                    "/v1/tables/users/rows/u1",
                    r#"{"name":"Ann"}"#,
                ),
                (OpMethod::Get, "/v1/tables/users/rows/u1", ""),
            ],
        )
        .await;
        assert_eq!((replies[0].status, replies[0].fenced), (409, true));
        assert_eq!(json_of(&replies[0])["fenced"], true);
        assert_eq!((replies[1].status, replies[1].fenced), (404, false));
        assert_eq!(node.user_count().await, 0);
    }

    #[tokio::test]
    async fn a_bad_set_is_refused_whole_and_changes_nothing() {
        let node = TestNode::new().await;
        let good = encode_ops(
            [(
                OpMethod::Put,
                "/v1/tables/users/rows/u1",
                &br#"{"name":"Ann"}"#[..],
            )]
            .into_iter(),
        );
        let truncated = good.slice(..good.len() - 1);
        let foreign = encode_ops([(OpMethod::Put, "/v1/sql", &b"{}"[..])].into_iter());
        for body in [truncated, foreign, axum::body::Bytes::from_static(b"{}")] {
            let (status, answer) = post_ops(&node, body, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            let answer: Value = serde_json::from_slice(&answer).unwrap();
            assert!(answer["error"].is_string(), "{answer}");
        }
        assert_eq!(node.user_count().await, 0);
        let (_, stats) = node.call("GET", "/v1/stats", None).await;
        assert_eq!(stats["op_sets"], 0);
    }

    #[tokio::test]
    async fn a_set_needs_the_cluster_secret() {
        let node = TestNode::empty(|c| c.cluster_secret = Some("s3cret".into()));
        let body = encode_ops([(OpMethod::Get, "/v1/tables/users/rows/u1", &b""[..])].into_iter());
        let (status, _) = post_ops(&node, body.clone(), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = post_ops(&node, body.clone(), Some("wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, answer) = post_ops(&node, body, Some("s3cret")).await;
        assert_eq!(status, StatusCode::OK);
        // In: the set was read and its one operation answered (no such table yet).
        assert_eq!(decode_replies(answer).unwrap()[0].status, 404);
    }

    #[test]
    fn row_paths_decode_like_the_router_and_others_are_left_to_it() {
        assert_eq!(
            row_path("/v1/tables/users/rows/a%2Fb%20c"),
            Some(("users".into(), "a/b c".into()))
        );
        assert_eq!(
            row_path("/v1/tables/t%C3%A9/rows/42"),
            Some(("té".into(), "42".into()))
        );
        for other in [
            "/v1/tables/users/rows/",
            "/v1/tables//rows/1",
            "/v1/tables/users/rows/1/x",
            "/v1/tables/users/keys/1",
            "/v1/tables/users/rows/%FF",
            "/v1/sql",
        ] {
            assert_eq!(row_path(other), None, "{other}");
        }
    }
}
