//! The client side of the 2024-11-05 HTTP+SSE transport, for upstreams
//! configured with `transport = "sse"`: a `GET` of the upstream's URL opens
//! an event stream whose first `endpoint` event names the URL to `POST`
//! messages to; the upstream's own messages arrive as `message` events.
//!
//! rmcp 3.9 has no such client (it dropped the transport), so this is an
//! rmcp [`Transport`] of our own over the gateway's shared reqwest client and
//! the protocol crate's SSE parser. One task reads the stream into a bounded
//! queue (a slow gateway slows the upstream's stream, not memory); when the
//! stream ends the queue closes, rmcp sees the connection as closed and the
//! gateway's reconnect loop takes over. Each outgoing message is one `POST`
//! (at most [`MAX_POSTS`] at a time), which must be answered with a 2xx.
//!
//! What the upstream sends is untrusted, and so is its URL (tenants add
//! upstreams): an event larger than
//! [`MAX_EVENT_BYTES`](meshgate_protocol::sse::MAX_EVENT_BYTES) closes the
//! connection, redirects are reported rather than followed (they would carry
//! the configured headers elsewhere), and the bodies of refusals go to the
//! gateway's log only, never into the error a tenant reads as the upstream's
//! status (else the gateway would read internal URLs for them).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshgate_protocol::sse::SseParser;
use reqwest::Url;
use reqwest::header::{
    ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION,
};
use rmcp::RoleClient;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

/// Messages read from the stream and not yet taken by rmcp.
const QUEUE: usize = 256;

/// `POST`s of one connection in flight at once; more wait for a slot.
pub const MAX_POSTS: usize = 64;

/// How much of an error answer's body goes into the log, and of an
/// upstream-sent string (an endpoint, a redirect target) into an error.
const EXCERPT: usize = 200;

/// Why an HTTP+SSE upstream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// The configured URL does not parse.
    #[error("the sse upstream url `{url}` is not a valid URL: {reason}")]
    BadUrl {
        /// The configured URL.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// A configured header cannot be sent.
    #[error("header `{0}` is not a valid HTTP header; fix the upstream's `headers`")]
    BadHeader(String),
    /// The `GET` of the event stream failed before an answer.
    #[error(
        "GET {url} failed: {reason}; check that the upstream is running and `url` is its event stream"
    )]
    Get {
        /// The stream's URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The `GET` was answered with something other than an event stream.
    /// The answer's body is logged, not quoted: tenants read this error.
    #[error(
        "GET {url} answered {status} ({content_type}); an sse upstream's url must be its 2024-11-05 event stream (for a Streamable HTTP server use transport = \"streamable_http\"; the answer's body is in the gateway's log)"
    )]
    NotAStream {
        /// The stream's URL.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The answer's content type.
        content_type: String,
    },
    /// A request was answered with a redirect, which meshgate does not
    /// follow: it would carry the configured headers to another server.
    #[error(
        "{method} {url} answered {status}: the upstream answered a redirect to {location}; meshgate does not follow redirects (they would carry the upstream's headers along), so configure that URL directly"
    )]
    Redirect {
        /// `GET` or `POST`.
        method: &'static str,
        /// The requested URL.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// Where it pointed (resolved against `url`), or why that is unknown.
        location: String,
    },
    /// No `endpoint` event within the connect timeout.
    #[error(
        "the event stream at {url} sent no `endpoint` event within {waited:?} (connect_timeout_secs); is it a 2024-11-05 HTTP+SSE server?"
    )]
    NoEndpoint {
        /// The stream's URL.
        url: String,
        /// How long was waited.
        waited: Duration,
    },
    /// The stream ended before its `endpoint` event.
    #[error("the event stream at {url} ended before its `endpoint` event: {reason}")]
    EndedEarly {
        /// The stream's URL.
        url: String,
        /// Why it ended.
        reason: String,
    },
    /// The `endpoint` event named a URL that cannot be used.
    #[error("the event stream at {url} named the message endpoint `{endpoint}`, which {reason}")]
    BadEndpoint {
        /// The stream's URL.
        url: String,
        /// The event's data.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A message could not be encoded.
    #[error("cannot encode a message for the upstream: {0}")]
    Encode(#[from] serde_json::Error),
    /// A `POST` failed before an answer.
    #[error("POST {endpoint} failed: {reason}")]
    Post {
        /// The message endpoint.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// A `POST` was answered with a status other than 2xx. The answer's
    /// body is logged, not quoted: tenants read this error.
    #[error(
        "POST {endpoint} answered {status}; the upstream refused the message (its answer is in the gateway's log; an expired session is re-opened when its event stream ends)"
    )]
    PostStatus {
        /// The message endpoint.
        endpoint: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
}

/// An open HTTP+SSE connection, as an rmcp client transport.
pub struct SseTransport {
    inbound: mpsc::Receiver<ServerJsonRpcMessage>,
    poster: Arc<Poster>,
    /// The task reading the stream; aborted when the transport goes.
    reader: AbortOnDrop,
}

/// What every `POST` of one connection needs.
struct Poster {
    /// The upstream's name, for the log.
    upstream: String,
    client: reqwest::Client,
    endpoint: Url,
    headers: HeaderMap,
    timeout: Duration,
    slots: Semaphore,
}

impl SseTransport {
    /// Opens the event stream of upstream `upstream` (its name, for the
    /// log) at `url` with `headers` (sent on the `GET` and every `POST`) and
    /// waits until `deadline` for its `endpoint` event. Each `POST` may take
    /// up to `post_timeout`. `client` must not follow redirects.
    pub async fn connect(
        upstream: &str,
        client: reqwest::Client,
        url: &str,
        headers: &BTreeMap<String, String>,
        deadline: Instant,
        post_timeout: Duration,
    ) -> Result<SseTransport, SseError> {
        let started = Instant::now();
        let stream_url = Url::parse(url).map_err(|e| SseError::BadUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        let headers = header_map(headers)?;
        let open = async {
            let response = client
                .get(stream_url.clone())
                .headers(headers.clone())
                .header(ACCEPT, "text/event-stream")
                .header(CACHE_CONTROL, "no-cache")
                .send()
                .await
                .map_err(|e| SseError::Get {
                    url: url.to_owned(),
                    reason: error_chain(&e),
                })?;
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no content type")
                .to_owned();
            let status = response.status();
            if status.is_redirection() {
                return Err(redirect("GET", &stream_url, &response));
            }
            if !status.is_success() || !content_type.starts_with("text/event-stream") {
                // Awaited before the macro: its arguments must not be held
                // across an await (they are not `Send`).
                let body = excerpt(response).await;
                tracing::warn!(
                    upstream,
                    url,
                    %status,
                    content_type,
                    body,
                    "an sse upstream's url is not an event stream"
                );
                return Err(SseError::NotAStream {
                    url: url.to_owned(),
                    status,
                    content_type,
                });
            }
            let (endpoint_tx, endpoint_rx) = oneshot::channel();
            let (inbound_tx, inbound) = mpsc::channel(QUEUE);
            let reader = tokio::spawn(read_stream(
                response,
                upstream.to_owned(),
                url.to_owned(),
                endpoint_tx,
                inbound_tx,
            ));
            Ok((reader, endpoint_rx, inbound))
        };
        let timed_out = || SseError::NoEndpoint {
            url: url.to_owned(),
            waited: started.elapsed(),
        };
        let (reader, endpoint_rx, inbound) = tokio::time::timeout_at(deadline, open)
            .await
            .map_err(|_| timed_out())??;
        // Aborts the reader on every early return below.
        let reader = AbortOnDrop(reader);
        let endpoint = match tokio::time::timeout_at(deadline, endpoint_rx).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(_)) => {
                return Err(SseError::EndedEarly {
                    url: url.to_owned(),
                    reason: "the stream closed".into(),
                });
            }
            Ok(Ok(Err(reason))) => {
                return Err(SseError::EndedEarly {
                    url: url.to_owned(),
                    reason,
                });
            }
            Ok(Ok(Ok(data))) => data,
        };
        let endpoint = resolve_endpoint(&stream_url, &endpoint)?;
        tracing::debug!(stream = %stream_url, %endpoint, "HTTP+SSE upstream connected");
        Ok(SseTransport {
            inbound,
            poster: Arc::new(Poster {
                upstream: upstream.to_owned(),
                client,
                endpoint,
                headers,
                timeout: post_timeout,
                slots: Semaphore::new(MAX_POSTS),
            }),
            reader,
        })
    }
}

impl Transport<RoleClient> for SseTransport {
    type Error = SseError;

    fn send(
        &mut self,
        item: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<(), SseError>> + Send + 'static {
        let poster = self.poster.clone();
        async move { poster.post(&item).await }
    }

    fn receive(&mut self) -> impl Future<Output = Option<ServerJsonRpcMessage>> + Send {
        self.inbound.recv()
    }

    async fn close(&mut self) -> Result<(), SseError> {
        self.reader.0.abort();
        self.inbound.close();
        Ok(())
    }
}

impl Poster {
    async fn post(&self, message: &ClientJsonRpcMessage) -> Result<(), SseError> {
        let body = serde_json::to_vec(message)?;
        let endpoint = || self.endpoint.to_string();
        // The semaphore is never closed, so acquiring fails only if it were.
        let _slot = self.slots.acquire().await.map_err(|_| SseError::Post {
            endpoint: endpoint(),
            reason: "the connection is closing".into(),
        })?;
        let response = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| SseError::Post {
                endpoint: endpoint(),
                reason: if e.is_timeout() {
                    format!("no answer within {:?} (timeout_secs)", self.timeout)
                } else {
                    error_chain(&e)
                },
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if status.is_redirection() {
            return Err(redirect("POST", &self.endpoint, &response));
        }
        let body = excerpt(response).await;
        tracing::warn!(
            upstream = %self.upstream,
            endpoint = %self.endpoint,
            %status,
            body,
            "an sse upstream refused a message"
        );
        Err(SseError::PostStatus {
            endpoint: endpoint(),
            status,
        })
    }
}

/// The error for a redirect answer to `method` of `url`, naming where it
/// pointed.
fn redirect(method: &'static str, url: &Url, response: &reqwest::Response) -> SseError {
    let location = match response.headers().get(LOCATION) {
        None => "nowhere (it has no Location header)".to_owned(),
        Some(value) => {
            let raw = String::from_utf8_lossy(value.as_bytes());
            match url.join(raw.trim()) {
                Ok(target) => cut(target.as_str()),
                Err(_) => format!("`{}` (not a valid URL)", cut(&raw)),
            }
        }
    };
    SseError::Redirect {
        method,
        url: url.to_string(),
        status: response.status(),
        location,
    }
}

/// Reads the event stream: the first `endpoint` event goes to `endpoint`,
/// `message` events (also those without an event type, whose type is
/// `message`) into `inbound`. Returning drops `inbound`, which rmcp takes as
/// the connection closing.
async fn read_stream(
    response: reqwest::Response,
    upstream: String,
    url: String,
    endpoint: oneshot::Sender<Result<String, String>>,
    inbound: mpsc::Sender<ServerJsonRpcMessage>,
) {
    let mut endpoint = Some(endpoint);
    let mut parser = SseParser::new();
    let mut body = response.bytes_stream();
    let why = loop {
        let chunk = match body.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => break format!("reading it failed: {}", error_chain(&e)),
            None => break "the upstream closed it".to_owned(),
        };
        let events = match parser.push(&chunk) {
            Ok(events) => events,
            Err(too_large) => {
                let why = format!(
                    "the upstream sent {too_large}; meshgate closed the connection (events are limited to {}: an upstream whose messages are larger cannot be used)",
                    too_large.limit_text()
                );
                tracing::warn!(upstream = %upstream, stream = %url, "{why}");
                break why;
            }
        };
        for event in events {
            match event.event.as_deref() {
                Some("endpoint") => match endpoint.take() {
                    Some(tx) => {
                        let _ = tx.send(Ok(event.data));
                    }
                    None => tracing::debug!(stream = %url, "ignoring a second `endpoint` event"),
                },
                None | Some("message") => match serde_json::from_str(&event.data) {
                    Ok(message) => {
                        if inbound.send(message).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(
                        stream = %url,
                        error = %e,
                        data = %event.data.chars().take(EXCERPT).collect::<String>(),
                        "skipping a `message` event that is not a JSON-RPC message"
                    ),
                },
                Some(other) => {
                    tracing::debug!(stream = %url, event = other, "ignoring an unknown event type")
                }
            }
        }
    };
    if let Some(tx) = endpoint {
        let _ = tx.send(Err(why));
    } else {
        tracing::info!(upstream = %upstream, stream = %url, reason = %why, "HTTP+SSE upstream stream ended; the connection is closed");
    }
}

/// Resolves the `endpoint` event's data against the stream's URL: relative
/// or absolute, but on the stream's own origin (scheme, host and port), so
/// an upstream cannot send the configured headers (often credentials) to
/// another server.
pub fn resolve_endpoint(stream: &Url, data: &str) -> Result<Url, SseError> {
    let bad = |reason: String| SseError::BadEndpoint {
        url: stream.to_string(),
        endpoint: cut(data),
        reason,
    };
    let raw = data.trim();
    if raw.is_empty() {
        return Err(bad("is empty".into()));
    }
    let endpoint = stream
        .join(raw)
        .map_err(|e| bad(format!("is not a valid URL: {e}")))?;
    if endpoint.origin() != stream.origin() {
        return Err(bad(format!(
            "is on another origin ({}); meshgate posts only to the event stream's own scheme, host and port",
            endpoint.origin().ascii_serialization()
        )));
    }
    Ok(endpoint)
}

/// The configured headers as a `HeaderMap`.
fn header_map(headers: &BTreeMap<String, String>) -> Result<HeaderMap, SseError> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        match (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            (Ok(k), Ok(v)) => {
                map.insert(k, v);
            }
            _ => return Err(SseError::BadHeader(k.clone())),
        }
    }
    Ok(map)
}

/// The start of an answer's body, for error messages; reads at most a few
/// KiB of it, however long it is.
async fn excerpt(response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    let mut body = response.bytes_stream();
    while bytes.len() < 4 * EXCERPT {
        match body.next().await {
            Some(Ok(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    cut(text)
}

/// At most [`EXCERPT`] characters of `text`, marked when cut.
fn cut(text: &str) -> String {
    let mut cut: String = text.chars().take(EXCERPT).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

/// An error with its sources (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn stream() -> Url {
        Url::parse("http://127.0.0.1:3001/sse?x=1").expect("a valid URL")
    }

    #[test]
    fn a_relative_endpoint_resolves_against_the_stream_url() {
        let e = resolve_endpoint(&stream(), "/message?sessionId=abc").expect("same origin");
        assert_eq!(e.as_str(), "http://127.0.0.1:3001/message?sessionId=abc");
        let e = resolve_endpoint(&stream(), "messages?sessionId=abc\n").expect("same origin");
        assert_eq!(e.as_str(), "http://127.0.0.1:3001/messages?sessionId=abc");
        let nested = Url::parse("http://h:1/api/mcp/sse").expect("a valid URL");
        let e = resolve_endpoint(&nested, "messages?s=1").expect("same origin");
        assert_eq!(e.as_str(), "http://h:1/api/mcp/messages?s=1");
    }

    #[test]
    fn an_absolute_endpoint_on_the_same_origin_is_taken() {
        let e =
            resolve_endpoint(&stream(), "http://127.0.0.1:3001/m/post?s=9").expect("same origin");
        assert_eq!(e.as_str(), "http://127.0.0.1:3001/m/post?s=9");
    }

    #[test]
    fn an_endpoint_on_another_origin_is_refused_with_the_reason() {
        for other in [
            "http://evil.example:3001/message",
            "https://127.0.0.1:3001/message",
            "http://127.0.0.1:3002/message",
            "//127.0.0.2:3001/message",
        ] {
            let err = resolve_endpoint(&stream(), other)
                .expect_err("another origin")
                .to_string();
            assert!(
                err.contains("another origin") && err.contains(other),
                "{err}"
            );
        }
        let err = resolve_endpoint(&stream(), "  ")
            .expect_err("empty")
            .to_string();
        assert!(err.contains("is empty"), "{err}");
    }

    /// A one-shot HTTP server on loopback that answers the first request
    /// with `head` and then `body`, and keeps the connection open.
    async fn serve_once(head: &str, body: impl Into<Vec<u8>>) -> String {
        let (head, body) = (head.to_owned(), body.into());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        format!("http://{addr}/sse")
    }

    /// The gateway's own client for `url` (it follows no redirects).
    fn gateway_client(url: &str) -> reqwest::Client {
        crate::gateway::HttpClients::default()
            .for_url(url)
            .expect("the upstream client builds")
    }

    /// A stream head and `prefix`, then a line that never ends, just over
    /// the 16 MiB limit.
    fn endless_line_after(prefix: &str) -> Vec<u8> {
        let mut body = prefix.as_bytes().to_vec();
        body.extend_from_slice(b"data: ");
        body.resize(
            body.len() + meshgate_protocol::sse::MAX_EVENT_BYTES + 64,
            b'x',
        );
        body
    }

    const STREAM_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";

    #[tokio::test]
    async fn an_event_over_16_mib_before_the_endpoint_fails_the_connection_naming_the_limit() {
        let url = serve_once(STREAM_HEAD, endless_line_after(": hello\n\n")).await;
        let err = SseTransport::connect(
            "up",
            gateway_client(&url),
            &url,
            &BTreeMap::new(),
            Instant::now() + Duration::from_secs(20),
            Duration::from_secs(1),
        )
        .await
        .err()
        .expect("too large")
        .to_string();
        assert!(
            err.contains("the upstream sent an SSE event larger than 16 MiB")
                && err.contains("closed the connection"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_event_over_16_mib_after_the_endpoint_closes_the_transport() {
        let url = serve_once(
            STREAM_HEAD,
            endless_line_after("event: endpoint\ndata: /message\n\n"),
        )
        .await;
        let mut transport = SseTransport::connect(
            "up",
            gateway_client(&url),
            &url,
            &BTreeMap::new(),
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(1),
        )
        .await
        .expect("connects");
        let after = tokio::time::timeout(Duration::from_secs(20), transport.receive())
            .await
            .expect("the oversized event ends the stream, the server does not");
        assert!(after.is_none(), "an oversized event closes the transport");
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_and_names_its_target() {
        // The target records whether anything reached it (with the secret).
        let target = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let target_url = format!("http://{}/elsewhere", target.local_addr().expect("address"));
        let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = reached.clone();
        tokio::spawn(async move {
            if target.accept().await.is_ok() {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let head = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target_url}\r\ncontent-length: 0\r\n\r\n"
        );
        let url = serve_once(&head, "").await;
        let headers = BTreeMap::from([("x-api-key".to_owned(), "s3cret".to_owned())]);
        let err = SseTransport::connect(
            "up",
            gateway_client(&url),
            &url,
            &headers,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(1),
        )
        .await
        .err()
        .expect("a redirect")
        .to_string();
        assert!(
            err.contains("307")
                && err.contains(&format!("redirect to {target_url}"))
                && err.contains("configure that URL directly"),
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !reached.load(std::sync::atomic::Ordering::SeqCst),
            "the redirect was followed"
        );
    }

    #[tokio::test]
    async fn a_relative_redirect_is_named_as_an_absolute_url() {
        let url = serve_once(
            "HTTP/1.1 302 Found\r\nlocation: /v2/sse\r\ncontent-length: 0\r\n\r\n",
            "",
        )
        .await;
        let err = SseTransport::connect(
            "up",
            gateway_client(&url),
            &url,
            &BTreeMap::new(),
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(1),
        )
        .await
        .err()
        .expect("a redirect")
        .to_string();
        let expected = url.replace("/sse", "/v2/sse");
        assert!(err.contains(&format!("redirect to {expected};")), "{err}");
    }

    #[tokio::test]
    async fn a_stream_without_an_endpoint_event_fails_by_name_at_the_deadline() {
        let url = serve_once(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
            ": only a comment\n\n",
        )
        .await;
        let deadline = Instant::now() + Duration::from_millis(300);
        let err = SseTransport::connect(
            "up",
            reqwest::Client::new(),
            &url,
            &BTreeMap::new(),
            deadline,
            Duration::from_secs(1),
        )
        .await
        .err()
        .expect("no endpoint event")
        .to_string();
        assert!(
            err.contains("no `endpoint` event") && err.contains(&url),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_url_that_is_not_an_event_stream_is_named_with_status_but_its_body_is_not_quoted() {
        let url = serve_once(
            "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\n",
            "no such!!",
        )
        .await;
        let err = SseTransport::connect(
            "up",
            reqwest::Client::new(),
            &url,
            &BTreeMap::new(),
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(1),
        )
        .await
        .err()
        .expect("not a stream")
        .to_string();
        assert!(
            err.contains("404") && err.contains("text/plain") && err.contains("streamable_http"),
            "{err}"
        );
        assert!(
            !err.contains("no such!!"),
            "the body (of an internal URL, perhaps) must not reach tenants: {err}"
        );
    }

    /// An HTTP+SSE server whose stream announces `endpoint`, sends one
    /// `message` event, and ends when `end` fires; its message endpoint
    /// answers 400 with a body naming the session. Both refuse requests
    /// without the header `x-team: blue`.
    async fn legacy_server(endpoint: &'static str) -> (String, oneshot::Sender<()>) {
        use axum::response::IntoResponse;
        use axum::response::sse::{Event, Sse};
        let (end_tx, end_rx) = oneshot::channel::<()>();
        let end = Arc::new(std::sync::Mutex::new(Some(end_rx)));
        let app = axum::Router::new()
            .route(
                "/sse",
                axum::routing::get(move |headers: axum::http::HeaderMap| {
                    let end = end.lock().ok().and_then(|mut e| e.take());
                    async move {
                        if headers.get("x-team").is_none_or(|v| v != "blue") {
                            return (axum::http::StatusCode::UNAUTHORIZED, "no x-team")
                                .into_response();
                        }
                        let first = futures::stream::iter([
                            Event::default().event("endpoint").data(endpoint),
                            Event::default().event("message").data(
                                r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#,
                            ),
                        ]);
                        let rest = futures::stream::once(async move {
                            if let Some(end) = end {
                                let _ = end.await;
                            }
                        })
                        .filter_map(|()| async { None::<Event> });
                        Sse::new(first.chain(rest).map(Ok::<_, std::convert::Infallible>))
                            .into_response()
                    }
                }),
            )
            .route(
                "/message",
                axum::routing::post(|headers: axum::http::HeaderMap| async move {
                    if headers.get("x-team").is_none_or(|v| v != "blue") {
                        return (axum::http::StatusCode::UNAUTHORIZED, "no x-team");
                    }
                    (axum::http::StatusCode::BAD_REQUEST, "session abc is gone")
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}/sse"), end_tx)
    }

    #[tokio::test]
    async fn messages_arrive_refused_posts_are_named_and_a_closed_stream_ends_the_transport() {
        let (url, end) = legacy_server("/message?sessionId=abc").await;
        let headers = BTreeMap::from([("x-team".to_owned(), "blue".to_owned())]);
        let mut transport = SseTransport::connect(
            "up",
            reqwest::Client::new(),
            &url,
            &headers,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .await
        .expect("connects");
        let first = tokio::time::timeout(Duration::from_secs(5), transport.receive())
            .await
            .expect("a message in time")
            .expect("the stream is open");
        let first = serde_json::to_value(&first).expect("serializes");
        assert_eq!(first["method"], "notifications/tools/list_changed");

        let ping: ClientJsonRpcMessage = serde_json::from_value(serde_json::json!(
            {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        ))
        .expect("a ping request");
        let err = transport
            .send(ping)
            .await
            .expect_err("the endpoint answers 400")
            .to_string();
        assert!(
            err.contains("400") && err.contains("/message?sessionId=abc"),
            "{err}"
        );
        assert!(!err.contains("session abc is gone"), "body quoted: {err}");

        let _ = end.send(());
        let after = tokio::time::timeout(Duration::from_secs(5), transport.receive())
            .await
            .expect("the end is seen in time");
        assert!(after.is_none(), "a closed stream closes the transport");
    }

    #[tokio::test]
    async fn a_cross_origin_endpoint_event_fails_the_connection() {
        let (url, _end) = legacy_server("http://127.0.0.9:1/message").await;
        let headers = BTreeMap::from([("x-team".to_owned(), "blue".to_owned())]);
        let err = SseTransport::connect(
            "up",
            reqwest::Client::new(),
            &url,
            &headers,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(1),
        )
        .await
        .err()
        .expect("another origin")
        .to_string();
        assert!(err.contains("another origin"), "{err}");
    }
}
