//! Every default limit of Weir, in one place, each with the reason for its value.
//!
//! Operators override them in `weir.toml`; the config structs take their defaults from here.

use std::time::Duration;

/// Largest HTTP/1 request head (request line + headers) accepted before answering 431.
/// 64 KiB is the edge profile of nginx/Envoy: enough for big cookies and JWTs, small enough
/// that a slow client cannot pin much memory per connection.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;

/// Most header fields in one request before answering 431. 100 is Envoy's default.
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// Longest request target before answering 414. 16 KiB covers long query strings.
pub const DEFAULT_MAX_URI_BYTES: usize = 16 * 1024;

/// Largest request body forwarded; above it the answer is 413. 100 MiB: uploads pass, a
/// runaway client does not stream forever through a gateway.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 100 * 1024 * 1024;

/// Time a client has to send a complete request head (slowloris). Also bounds how long an
/// idle HTTP/1 keep-alive connection waits for its next request head, and how long a new
/// connection (HTTP/1 or HTTP/2) may send nothing at all.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request or response body that yields nothing for this long fails: the stream is reset
/// (the connection closed on HTTP/1.1) and its upstream connection dropped. Envoy's default
/// stream idle timeout; long-polling and streaming routes may need more.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A connection with no request in flight for this long is closed. 60 s is the edge profile;
/// a mesh sidecar may raise it to an hour.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// After an idle connection was asked to close (HTTP/2 GOAWAY), the time it gets to finish the
/// close handshake before the socket is dropped: a peer that never answers the GOAWAY's PING
/// must not keep the connection forever.
pub const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Time a client has to finish the TLS handshake; hyper does not bound it.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent HTTP/2 streams per downstream connection (the h2 edge profile).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;

/// Largest decoded HTTP/2 header list; HPACK bombs count against it.
pub const DEFAULT_H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// Open downstream connections per listener; above it Weir stops accepting until one closes.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Time to establish a TCP (and TLS) connection to an upstream endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Time from sending a request upstream to receiving its response head (Envoy's route
/// timeout default). Streaming bodies are not cut by it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// An idle pooled upstream connection is closed after this long: shorter than the usual
/// upstream keep-alive (nginx 75 s) so Weir closes first and never races a server-side close.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle HTTP/1 connections kept per upstream endpoint.
pub const DEFAULT_MAX_IDLE_PER_ENDPOINT: usize = 128;

/// How often DNS names of upstream endpoints are resolved again.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);

/// First ejection of an endpoint that failed to connect; doubles per consecutive failure.
pub const DEFAULT_EJECTION_BACKOFF: Duration = Duration::from_secs(1);

/// Longest ejection of an endpoint that keeps failing to connect.
pub const DEFAULT_EJECTION_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Time in-flight requests get to finish after SIGTERM/SIGINT before Weir exits.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Peak-EWMA: round-trip estimate assumed for an endpoint before it has answered (linkerd2's
/// default), so new endpoints are neither starved nor flooded.
pub const DEFAULT_EWMA_RTT: Duration = Duration::from_millis(30);

/// Peak-EWMA decay time constant: how fast a latency spike is forgotten (linkerd2's value).
pub const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(10);

/// Attempts to find an endpoint that accepts a connection, per request. Only connection
/// failures are retried here (the request was never sent); other retries are filter policy.
pub const CONNECT_ATTEMPTS: usize = 3;

/// How long a pooled HTTP/1.1 connection must have sat idle for a request on it to be sent
/// again, on a new connection, if the upstream closes it before any response (idempotent
/// requests without a body). Upstreams close idle keep-alive connections after seconds
/// (Node.js 5 s, gunicorn 2 s, nginx 75 s), so the race with their idle timeout is only met
/// on connections that rested; busier connections skip the copy of the request head a
/// resend needs (~1 400 instructions, 4 % of a proxied request). A close racing a request on
/// a busy connection (an upstream shutting down) gets 502, as with Envoy, for a resilience
/// filter's retry policy to retry.
pub const RESEND_AFTER_IDLE: Duration = Duration::from_millis(100);

/// The default admin address: loopback, Envoy's conventional port.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";

/// CPU time one filter phase call may use before it is cut off (epoch interruption). 20 ms
/// is far above a sane filter's microseconds and far below a client's patience.
pub const DEFAULT_FILTER_CPU_BUDGET: Duration = Duration::from_millis(20);

/// How often the epoch advances: the granularity of filter CPU deadlines. 1 ms keeps the
/// overshoot small at the cost of one cheap atomic increment per millisecond.
pub const FILTER_EPOCH_TICK: Duration = Duration::from_millis(1);

/// Linear memory one filter instance may grow to. 32 MiB: room for a JWKS cache, not for a
/// runaway allocation.
pub const DEFAULT_FILTER_MEMORY: u64 = 32 * 1024 * 1024;

/// Wasm stack per call; deep recursion traps instead of overflowing the host.
pub const DEFAULT_FILTER_STACK: usize = 512 * 1024;

/// Most live instances of one filter, i.e. how many requests it serves at once.
pub const DEFAULT_FILTER_MAX_INSTANCES: usize = 256;

/// Most header fields a filter may leave on a head (its edits, or a response it makes) and
/// most bytes their values may add up to: a filter cannot grow host memory without bound
/// through headers (the `http` crate also panics past 24 576 distinct names). Far above what
/// a client's head may bring (HTTP/2's 64 KiB header list holds ~2 000 tiny fields), so a
/// filter's edit never fails for the client's headers.
pub const MAX_FILTER_HEADERS: usize = 4096;
/// See [`MAX_FILTER_HEADERS`].
pub const MAX_FILTER_HEADER_BYTES: usize = 1024 * 1024;

/// Largest body of a response a filter makes itself.
pub const MAX_FILTER_RESPONSE_BODY: usize = 1024 * 1024;

/// Most bytes of a body the filter host gathers for a buffered body filter, and of a request
/// body it keeps for a retry (Envoy's default per-request buffer is also 1 MiB). Larger
/// buffered bodies are refused (413 for requests, 502 for responses); larger requests are
/// not retried.
pub const DEFAULT_FILTER_BODY_BUFFER: u64 = 1024 * 1024;

/// Most times one request is sent upstream because filters asked for a retry (the first
/// attempt included): a filter bug cannot loop a request forever.
pub const MAX_ATTEMPTS: u32 = 5;

/// Wasm instances the pooling allocator holds across every filter of the process: the sum of
/// the filters' live instances may not exceed it.
pub const FILTER_POOL_INSTANCES: u32 = 1000;

/// Largest linear memory a pooled Wasm instance slot holds (`filter_host.memory_limit` may not
/// exceed it).
pub const FILTER_POOL_MEMORY: u64 = 1024 * 1024 * 1024;

/// Quiet time after the last file change before a reload: an editor's save or a ConfigMap
/// update (several renames) becomes one reload.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(100);

/// How often a registry tag is checked for a new filter version (Istio's WasmPlugin checks on
/// each config push; a poll is the pull-only equivalent).
pub const DEFAULT_REGISTRY_POLL: Duration = Duration::from_secs(30);

/// Time one registry pull or check may take.
pub const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest filter artifact pulled from a registry.
pub const MAX_FILTER_ARTIFACT: usize = 64 * 1024 * 1024;

/// Longest back-off a filter may ask for before a retry.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Longest a filter may eject an upstream endpoint for (an outlier signal).
pub const MAX_FILTER_EJECTION: Duration = Duration::from_secs(600);
