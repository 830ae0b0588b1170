//! Request bodies: read with the configured size limit and parsed as JSON, so that every
//! failure (too large, not JSON, wrong shape) is a `{"error": ...}` answer, never axum's
//! plain-text rejection.

use crate::error::ProxyError;
use crate::server::ProxyState;
use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A JSON body of type `T`.
pub struct JsonBody<T>(pub T);

/// The raw bytes of a body, within the limit.
pub struct RawBody(pub Bytes);

impl FromRequest<ProxyState> for RawBody {
    type Rejection = ProxyError;

    async fn from_request(req: Request, state: &ProxyState) -> Result<Self, Self::Rejection> {
        let limit = state.config().max_body_bytes;
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(RawBody(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ProxyError::PayloadTooLarge { limit })
            }
            Err(rejection) => Err(ProxyError::BadRequest(format!(
                "cannot read the request body: {}",
                rejection.body_text()
            ))),
        }
    }
}

impl<T: DeserializeOwned> FromRequest<ProxyState> for JsonBody<T> {
    type Rejection = ProxyError;

    async fn from_request(req: Request, state: &ProxyState) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse(&bytes).map(JsonBody)
    }
}

/// The options an endpoint that needs no body may still carry in one: `None` for no body (empty,
/// or JSON `null`), else the body parsed as `T`. So a body is never ignored: one that is not a
/// `T` is a 400, not a request carried out without what it asked for.
pub fn options<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<Option<T>, ProxyError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    parse(bytes)
}

/// Parses a JSON body into `T`, with serde's message (line, column, what was expected).
pub fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ProxyError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ProxyError::BadRequest(format!("invalid JSON body: {e}")))
}

/// `head`, the JSON texts joined by commas, then `tail`: rows forwarded as the text they came
/// in, without a JSON tree built and serialized again.
pub fn splice<I: AsRef<[u8]>>(head: &str, items: impl IntoIterator<Item = I>, tail: &str) -> Bytes {
    let mut body = head.as_bytes().to_vec();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item.as_ref());
    }
    body.extend_from_slice(tail.as_bytes());
    Bytes::from(body)
}

#[cfg(test)]
mod tests {
    #[test]
    fn splice_joins_raw_texts_into_valid_json() {
        let rows = [r#"{"id":"a"}"#, r#"{"id":"b","v":[1,2]}"#];
        let body = super::splice(r#"{"rows":["#, rows, "]}");
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"rows": [{"id": "a"}, {"id": "b", "v": [1, 2]}]})
        );
        assert_eq!(&super::splice("[", [""; 0], "]")[..], b"[]");
    }

    #[test]
    fn options_are_absent_only_without_a_body() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Flags {
            dry_run: Option<bool>,
        }
        for none in ["", " \n", "null"] {
            assert_eq!(
                super::options::<Flags>(none.as_bytes()).unwrap(),
                None,
                "{none:?}"
            );
        }
        assert_eq!(
            super::options::<Flags>(b"{}").unwrap(),
            Some(Flags { dry_run: None })
        );
        assert_eq!(
            super::options::<Flags>(br#"{"dry_run": true}"#).unwrap(),
            Some(Flags {
                dry_run: Some(true)
            })
        );
        for bad in [
            r#"{"force": true}"#,
            r#"{"dry_run": "yes"}"#,
            "[]",
            "nonsense",
        ] {
            assert!(super::options::<Flags>(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
