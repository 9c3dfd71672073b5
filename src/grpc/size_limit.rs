//! The status of a message over `max_message_bytes`: `RESOURCE_EXHAUSTED`, as the gRPC status
//! codes specify ("sent or received message larger than configured limit") and gRPC clients
//! expect. tonic answers `OUT_OF_RANGE` instead, both for a request it will not decode and for an
//! answer it will not send, and it has no setting for it, so the guard rewrites that status on
//! the way out.
//!
//! Where the status travels: a request refused by its length prefix gets a trailers-only response
//! (`grpc-status` in the response headers); an answer that turns out too large to encode ends its
//! body with trailers holding the status. Both are rewritten. Only tonic's own size refusal
//! (`OUT_OF_RANGE` whose message says "message length too large") is touched: the services never
//! answer `OUT_OF_RANGE` themselves, and any other status passes unchanged.

use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::{Code, Status};

/// tonic's messages: "Error, decoded (encoded) message length too large: found … bytes, …".
const TOO_LARGE: &str = "message length too large";

/// Turns tonic's `OUT_OF_RANGE` for an over-size message into `RESOURCE_EXHAUSTED`, in the
/// headers or the trailers of `resp`.
pub fn resource_exhausted_when_too_large(resp: http::Response<Body>) -> http::Response<Body> {
    let (mut parts, body) = resp.into_parts();
    rewrite(&mut parts.headers);
    let body = body.map_frame(|mut frame| {
        if let Some(trailers) = frame.trailers_mut() {
            rewrite(trailers);
        }
        frame
    });
    http::Response::from_parts(parts, Body::new(body))
}

fn rewrite(headers: &mut HeaderMap) {
    // The code first: it is one header compare on every answer; the message (percent-encoded)
    // is decoded only for an OUT_OF_RANGE.
    let out_of_range = headers
        .get(Status::GRPC_STATUS)
        .is_some_and(|v| v.as_bytes() == b"11");
    let too_large = out_of_range
        && Status::from_header_map(headers).is_some_and(|s| s.message().contains(TOO_LARGE));
    if too_large {
        let code = Code::ResourceExhausted as i32;
        headers.insert(Status::GRPC_STATUS, HeaderValue::from(code));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(h: &HeaderMap) -> Code {
        Status::from_header_map(h).expect("a status").code()
    }

    #[test]
    fn only_the_size_refusal_becomes_resource_exhausted() {
        let headers = |s: Status| {
            let mut h = HeaderMap::new();
            s.add_header(&mut h).unwrap();
            h
        };
        let mut h = headers(Status::out_of_range(
            "Error, decoded message length too large: found 2007 bytes, the limit is: 1024 bytes",
        ));
        rewrite(&mut h);
        assert_eq!(status_of(&h), Code::ResourceExhausted);
        assert!(
            Status::from_header_map(&h)
                .unwrap()
                .message()
                .contains("too large")
        );
        for other in [
            Status::out_of_range("something else"),
            Status::invalid_argument("message length too large"),
            Status::ok(""),
        ] {
            let code = other.code();
            let mut h = headers(other);
            rewrite(&mut h);
            assert_eq!(status_of(&h), code);
        }
        let mut none = HeaderMap::new();
        rewrite(&mut none);
        assert!(none.is_empty());
    }
}
