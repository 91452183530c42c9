//! A request id on every request: nginx's `X-Request-Id` when present, else one made here.
//! It is in the span of every log line of the request and in the response headers. The app
//! can be reached without nginx, so a client's id is kept only if it looks like one (short,
//! letters, digits, `-`, `_`, `.`): anything else is replaced, so it can never add fields to
//! a text log line or flood it.

use axum::http::{HeaderName, Request};
use std::sync::atomic::{AtomicU64, Ordering};
use tower_http::request_id::{MakeRequestId, RequestId};

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Makes ids unique per process: the pid and a counter.
#[derive(Clone, Default)]
pub struct Sequential;

static NEXT: AtomicU64 = AtomicU64::new(1);

impl MakeRequestId for Sequential {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let id = format!("{:x}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        id.parse().ok().map(RequestId::new)
    }
}

const MAX_LEN: usize = 64;

fn acceptable(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

/// Drops a client's id that does not look like one (`SetRequestIdLayer` then makes one).
pub async fn sanitize(mut request: Request<axum::body::Body>) -> Request<axum::body::Body> {
    let headers = request.headers_mut();
    let ids = headers.get_all(HEADER);
    if ids.iter().count() > 1 || ids.iter().any(|id| !acceptable(id.as_bytes())) {
        headers.remove(HEADER);
    }
    request
}

/// The span every log line of a request is in.
pub fn span<B>(request: &Request<B>) -> tracing::Span {
    let id = request
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path())
}

/// The id of the request, for handlers.
pub fn of(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(HEADER).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_plain_short_ids_are_kept() {
        assert!(super::acceptable(b"4f3c2a1b0e9d8c7b6a5f4e3d2c1b0a99"));
        for bad in [&b""[..], b"a b", b"x\" path=/admin", b"a=b", &[b'a'; 65]] {
            assert!(!super::acceptable(bad), "{bad:?}");
        }
    }
}
