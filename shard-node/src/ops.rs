//! Several single-row requests in one HTTP exchange: the wire format of `POST /v1/ops`.
//!
//! Under load the proxy holds many row requests for the same node at once. Sending each as its
//! own HTTP exchange costs both sides a parse, a write and a wake-up per row, and on a small
//! machine those, not SQLite, are most of the work. So the proxy sends what has queued up for a
//! node while its earlier exchanges were in flight as one `POST /v1/ops`; the node runs every
//! operation through the very handler that serves it alone (same checks, fences, group commit)
//! and answers each one's status, fence flag and body, in order. Operations in one exchange are
//! independent: each succeeds or fails on its own, as if it had been sent alone, at the same
//! moment as the others.
//!
//! The format is length-prefixed binary so that bodies (JSON rows, JSON answers) pass through
//! unescaped. All integers are big-endian.
//!
//! ```text
//! request: count:u32, then per operation: method:u8 (0 GET, 1 PUT, 2 DELETE),
//!          path_len:u16, path (UTF-8, e.g. /v1/tables/users/rows/42), body_len:u32, body
//! answer:  count:u32, then per operation: status:u16, flags:u8 (bit 0: fenced),
//!          body_len:u32, body
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The endpoint that takes a set of operations.
pub const OPS_PATH: &str = "/v1/ops";
/// The content type of both directions.
pub const OPS_CONTENT_TYPE: &str = "application/x-shardlite-ops";
/// The most operations one exchange may carry.
pub const MAX_OPS: usize = 256;
/// Row operations only: the paths an operation may name start with this.
pub const OP_PATH_PREFIX: &str = "/v1/tables/";

const FLAG_FENCED: u8 = 1;

/// The HTTP method of an operation: the row endpoint's three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpMethod {
    Get,
    Put,
    Delete,
}

impl OpMethod {
    fn code(self) -> u8 {
        match self {
            OpMethod::Get => 0,
            OpMethod::Put => 1,
            OpMethod::Delete => 2,
        }
    }

    fn from_code(code: u8) -> Option<OpMethod> {
        match code {
            0 => Some(OpMethod::Get),
            1 => Some(OpMethod::Put),
            2 => Some(OpMethod::Delete),
            _ => None,
        }
    }

    pub fn as_http(self) -> axum::http::Method {
        match self {
            OpMethod::Get => axum::http::Method::GET,
            OpMethod::Put => axum::http::Method::PUT,
            OpMethod::Delete => axum::http::Method::DELETE,
        }
    }

    pub fn from_http(method: &axum::http::Method) -> Option<OpMethod> {
        match *method {
            axum::http::Method::GET => Some(OpMethod::Get),
            axum::http::Method::PUT => Some(OpMethod::Put),
            axum::http::Method::DELETE => Some(OpMethod::Delete),
            _ => None,
        }
    }
}

/// One operation of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub method: OpMethod,
    pub path: String,
    pub body: Bytes,
}

/// One operation's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpReply {
    pub status: u16,
    pub fenced: bool,
    pub body: Bytes,
}

/// Encodes operations given as (method, path, body).
pub fn encode_ops<'a>(ops: impl ExactSizeIterator<Item = (OpMethod, &'a str, &'a [u8])>) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32(ops.len() as u32);
    for (method, path, body) in ops {
        out.put_u8(method.code());
        out.put_u16(path.len() as u16);
        out.put_slice(path.as_bytes());
        out.put_u32(body.len() as u32);
        out.put_slice(body);
    }
    out.freeze()
}

/// Reads a request. The error says what is wrong, for a 400.
pub fn decode_ops(mut buf: Bytes) -> Result<Vec<Op>, String> {
    let count = take_u32(&mut buf, "the operation count")? as usize;
    if count > MAX_OPS {
        return Err(format!(
            "{count} operations in one request; the most is {MAX_OPS}"
        ));
    }
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let code = take_u8(&mut buf, "a method")?;
        let method =
            OpMethod::from_code(code).ok_or_else(|| format!("operation {i}: method {code}"))?;
        let path_len = take_u16(&mut buf, "a path length")? as usize;
        let path = take(&mut buf, path_len, "a path")?;
        let path = String::from_utf8(path.to_vec())
            .map_err(|_| format!("operation {i}: the path is not UTF-8"))?;
        if !path.starts_with(OP_PATH_PREFIX) {
            return Err(format!(
                "operation {i}: only row paths ({OP_PATH_PREFIX}...) may be sent in a set"
            ));
        }
        let body_len = take_u32(&mut buf, "a body length")? as usize;
        let body = take(&mut buf, body_len, "a body")?;
        ops.push(Op { method, path, body });
    }
    if buf.has_remaining() {
        return Err(format!(
            "{} bytes after the last operation",
            buf.remaining()
        ));
    }
    Ok(ops)
}

/// Encodes the answers, in the order of the operations.
pub fn encode_replies(replies: &[OpReply]) -> Bytes {
    let size: usize = replies.iter().map(|r| 7 + r.body.len()).sum();
    let mut out = BytesMut::with_capacity(4 + size);
    out.put_u32(replies.len() as u32);
    for reply in replies {
        out.put_u16(reply.status);
        out.put_u8(if reply.fenced { FLAG_FENCED } else { 0 });
        out.put_u32(reply.body.len() as u32);
        out.put_slice(&reply.body);
    }
    out.freeze()
}

/// Reads the answers; bodies share `buf`'s memory.
pub fn decode_replies(mut buf: Bytes) -> Result<Vec<OpReply>, String> {
    let count = take_u32(&mut buf, "the answer count")? as usize;
    if count > MAX_OPS {
        return Err(format!("{count} answers; the most is {MAX_OPS}"));
    }
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        let status = take_u16(&mut buf, "a status")?;
        let flags = take_u8(&mut buf, "flags")?;
        let len = take_u32(&mut buf, "a body length")? as usize;
        let body = take(&mut buf, len, "a body")?;
        replies.push(OpReply {
            status,
            fenced: flags & FLAG_FENCED != 0,
            body,
        });
    }
    if buf.has_remaining() {
        return Err(format!("{} bytes after the last answer", buf.remaining()));
    }
    Ok(replies)
}

fn take(buf: &mut Bytes, len: usize, what: &str) -> Result<Bytes, String> {
    if buf.remaining() < len {
        return Err(format!(
            "the body ends inside {what} ({len} bytes wanted, {} left)",
            buf.remaining()
        ));
    }
    Ok(buf.split_to(len))
}

fn take_u8(buf: &mut Bytes, what: &str) -> Result<u8, String> {
    Ok(take(buf, 1, what)?.get_u8())
}

fn take_u16(buf: &mut Bytes, what: &str) -> Result<u16, String> {
    Ok(take(buf, 2, what)?.get_u16())
}

fn take_u32(buf: &mut Bytes, what: &str) -> Result<u32, String> {
    Ok(take(buf, 4, what)?.get_u32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_survive_a_round_trip() {
        let ops = [
            (OpMethod::Get, "/v1/tables/users/rows/1", &b""[..]),
            (
                OpMethod::Put,
                "/v1/tables/users/rows/2",
                &b"{\"name\":\"\\u00e9\"}"[..],
            ),
            (OpMethod::Delete, "/v1/tables/users/rows/a%2Fb", &b""[..]),
        ];
        let decoded = decode_ops(encode_ops(ops.iter().copied())).unwrap();
        let expected: Vec<Op> = ops
            .iter()
            .map(|(method, path, body)| Op {
                method: *method,
                path: (*path).to_owned(),
                body: Bytes::copy_from_slice(body),
            })
            .collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn answers_survive_a_round_trip() {
        let replies = vec![
            OpReply {
                status: 200,
                fenced: false,
                body: Bytes::from_static(b"{\"row\":{}}"),
            },
            OpReply {
                status: 409,
                fenced: true,
                body: Bytes::new(),
            },
        ];
        assert_eq!(decode_replies(encode_replies(&replies)).unwrap(), replies);
    }

    #[test]
    fn truncated_unknown_or_foreign_input_is_refused() {
        let one = encode_ops([(OpMethod::Put, "/v1/tables/t/rows/1", &b"{}"[..])].into_iter());
        for cut in 0..one.len() {
            assert!(decode_ops(one.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut extra = BytesMut::from(&one[..]);
        extra.put_u8(0);
        assert!(
            decode_ops(extra.freeze())
                .unwrap_err()
                .contains("after the last")
        );
        let mut bad_method = BytesMut::from(&one[..]);
        bad_method[4] = 9;
        assert!(decode_ops(bad_method.freeze()).is_err());
        let foreign = encode_ops([(OpMethod::Get, "/v1/ops", &b""[..])].into_iter());
        assert!(decode_ops(foreign).unwrap_err().contains("row paths"));
        let mut many = BytesMut::new();
        many.put_u32(MAX_OPS as u32 + 1);
        assert!(
            decode_ops(many.freeze())
                .unwrap_err()
                .contains("the most is")
        );
    }
}
