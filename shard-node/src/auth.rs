//! Bearer tokens, as the node's cluster secret and the proxy's tokens check them.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

/// Whether `headers` carry `Authorization: Bearer <expected>`, compared in constant time. The
/// scheme's name is case-insensitive (RFC 7235, section 2.1), so `bearer` works too; the token
/// is not.
pub fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some((scheme, token)) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
    else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && bool::from(
            token
                .trim_start_matches(' ')
                .as_bytes()
                .ct_eq(expected.as_bytes()),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let mut headers = HeaderMap::new();
        assert!(!bearer_matches(&headers, "s3cret"));
        for right in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "Bearer  s3cret",
        ] {
            headers.insert(AUTHORIZATION, right.parse().unwrap());
            assert!(bearer_matches(&headers, "s3cret"), "{right}");
        }
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Bearer S3CRET",
            "Bearer",
            "Bearer ",
            "s3cret",
            "Basic s3cret",
            "Bearers3cret",
        ] {
            headers.insert(AUTHORIZATION, wrong.parse().unwrap());
            assert!(!bearer_matches(&headers, "s3cret"), "{wrong}");
        }
    }
}
