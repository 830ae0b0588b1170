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

/// Parses a JSON body into `T`, with serde's message (line, column, what was expected).
pub fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ProxyError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ProxyError::BadRequest(format!("invalid JSON body: {e}")))
}

/// `head`, the JSON texts joined by commas, then `tail`: rows forwarded as the text they came
/// in, without a JSON tree built and serialized again.
pub fn splice<'a>(head: &str, items: impl IntoIterator<Item = &'a str>, tail: &str) -> Bytes {
    let mut body = head.to_owned();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str(tail);
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
        assert_eq!(&super::splice("[", [], "]")[..], b"[]");
    }
}
