//! Downstream listeners: accept (under a connection cap), TLS handshake (under a timeout),
//! then HTTP with Weir's limits, an idle timeout, and graceful drain: HTTP/1.1 by Weir's own
//! server ([`crate::h1::server`]), HTTP/2 by hyper's.
//!
//! Plain listeners detect HTTP/2 by its prior-knowledge preface (h2c); TLS listeners follow
//! ALPN. An HTTP/1.1 request that leaves HTTP (an upgrade, CONNECT) is handed with its
//! connection to hyper's HTTP/1 server, which tunnels it. hyper's HTTP/1 header-read timeout
//! only works with a timer, so every builder gets one.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::{ListenerConfig, ListenerLimits};
use crate::h1::server::{self, RequestBody, Rewind, ServerConn};
use crate::iowatch::{IoWatch, Watched};
use crate::proxy::{handle, ClientBody, ConnInfo, CurrentGateway, Shared};
use crate::tls::TlsInfo;

/// A bound listener, ready to serve.
pub struct BoundListener {
    /// Its name.
    pub name: Arc<str>,
    /// The socket. Only the accept loop holds it, so closing it refuses new connections at
    /// once even while connections are still draining.
    pub tcp: TcpListener,
    /// What new connections use; a reload stores a new one (limits, certificates).
    pub rt: Arc<ArcSwap<ListenerRt>>,
}

/// What connection tasks of a listener share.
pub struct ListenerRt {
    name: Arc<str>,
    tls: Option<TlsAcceptor>,
    limits: ListenerLimits,
    /// hyper's connection builders: HTTP/1.1 (upgrades, CONNECT) and HTTP/2.
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
}

impl BoundListener {
    /// Binds a listener's socket and prepares its TLS and HTTP settings.
    pub async fn bind(
        cfg: &ListenerConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<BoundListener> {
        let tcp = bind_socket(cfg.address)?;
        Ok(BoundListener {
            name: cfg.name.as_str().into(),
            tcp,
            rt: Arc::new(ArcSwap::from_pointee(ListenerRt::new(cfg, tls))),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.tcp.local_addr().expect("bound socket has an address")
    }
}

/// A listening socket at `address`.
pub fn bind_socket(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Rebinding right after a restart must not fail on TIME_WAIT sockets.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

impl ListenerRt {
    /// The TLS and HTTP settings of a listener's config.
    pub fn new(cfg: &ListenerConfig, tls: Option<Arc<rustls::ServerConfig>>) -> ListenerRt {
        let builder = |limits: &ListenerLimits| {
            let mut b = auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_header_bytes)
                .max_headers(limits.max_headers)
                .keep_alive(true);
            b.http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_concurrent_streams)
                .max_header_list_size(limits.h2_max_header_list_size)
                .max_pending_accept_reset_streams(20)
                .max_local_error_reset_streams(200)
                .initial_stream_window_size(64 * 1024)
                .initial_connection_window_size(1024 * 1024);
            // Not `enable_connect_protocol`: WebSocket over HTTP/2 (RFC 8441's extended
            // CONNECT) needs translating to an HTTP/1.1 Upgrade for the upstream, which Weir
            // does not do; without the setting, browsers open WebSockets over HTTP/1.1.
            b
        };
        ListenerRt {
            name: cfg.name.as_str().into(),
            tls: tls.map(TlsAcceptor::from),
            h1: builder(&cfg.limits).http1_only(),
            h2: builder(&cfg.limits).http2_only(),
            limits: cfg.limits.clone(),
        }
    }
}

/// Accepts and serves connections until `drain` turns true; then stops accepting (new
/// connections are refused) and asks every open connection to finish gracefully. Each
/// connection task holds a clone of `done`, so the caller knows when all have ended.
/// `stop` (a reload removed, renamed or moved the listener) does the same, except that a
/// listener taking over the address gets the socket through `handoff`.
pub async fn serve(
    listener: BoundListener,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    handoff: Handoff,
    done: mpsc::Sender<()>,
) {
    let BoundListener { name, tcp, rt } = listener;
    let mut cap = rt.load().limits.max_connections;
    let slots = Arc::new(Semaphore::new(cap));
    // Places to take out of the cap as connections close, after a reload lowered it.
    let mut owed = 0usize;
    let (gauge, accepted) = shared.metrics.listener(&name);
    // The drain of this listener's connections: at shutdown, and also when a reload stops
    // the listener (removed, renamed, moved), as Envoy drains a removed listener's
    // connections: requests in flight finish, then each connection closes (HTTP/1.1 after
    // its response, HTTP/2 by GOAWAY). Its requests would find no listener config any more.
    let (conn_drain_tx, conn_drain) = watch::channel(*drain.borrow());
    loop {
        // A reload may have changed the cap: places are added at once, or taken out as
        // they come free.
        let want = rt.load().limits.max_connections;
        if want > cap {
            let more = want - cap;
            let repaid = more.min(owed);
            owed -= repaid;
            slots.add_permits(more - repaid);
        } else if want < cap {
            owed += cap - want;
        }
        cap = want;
        if owed > 0 {
            owed -= slots.forget_permits(owed);
        }
        let permit = tokio::select! {
            biased;
            _ = drain.changed() => break,
            _ = stop.changed() => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            // At the cap, look again now and then: a reload may have raised it.
            _ = tokio::time::sleep(CAP_RECHECK) => continue,
        };
        if owed > 0 {
            // A place that came free under a lowered cap: taken out, not used.
            permit.forget();
            owed -= 1;
            continue;
        }
        let (tcp, peer) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.changed() => break,
            _ = stop.changed() => break,
        };
        accepted.inc();
        let (l, s, d, done, gauge) = (
            rt.load_full(),
            shared.clone(),
            conn_drain.clone(),
            done.clone(),
            gauge.clone(),
        );
        tokio::spawn(async move {
            gauge.inc();
            let slot: Arc<dyn std::any::Any + Send + Sync> = Arc::new(Slot {
                _permit: permit,
                gauge,
                _done: done,
            });
            connection(&l, tcp, peer, s, d, slot).await;
        });
    }
    let _ = conn_drain_tx.send(true);
    if *stop.borrow() && !*drain.borrow() {
        if let Some(to) = handoff.lock().expect("handoff lock").take() {
            tracing::info!(listener = %name, "stopped accepting: socket handed over");
            let _ = to.send(tcp);
            return;
        }
    }
    drop(tcp);
    tracing::info!(listener = %name, "stopped accepting");
}

/// Where a listener stopped by a reload gives its socket to the listener that takes its
/// address over (a rename, two listeners trading addresses): the socket never closes, so no
/// connection is refused in between, and binding the address again, which the kernel refuses
/// while the old socket listens, is not needed.
pub type Handoff = Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<TcpListener>>>>;

/// How often a listener at its connection cap looks whether a reload raised it.
const CAP_RECHECK: Duration = Duration::from_millis(500);

/// What an accepted connection holds while it is open: its place under the connection cap,
/// its count on the open-connections gauge, and the server's wait at drain. A tunnel made
/// from the connection (WebSocket, CONNECT) holds it too: the tunnel is that connection.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
    _done: mpsc::Sender<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn connection(
    l: &ListenerRt,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    drain: watch::Receiver<bool>,
    slot: Arc<dyn std::any::Any + Send + Sync>,
) {
    let _ = tcp.set_nodelay(true);
    match &l.tls {
        None => {
            let conn = Arc::new(ConnInfo::new(l.name.clone(), peer, None, slot));
            let io_watch = IoWatch::new(conn.opened);
            let io = Watched::new(tcp, io_watch.clone());
            serve_http(
                io,
                l,
                Start::H1 { detect_h2: true },
                conn,
                shared,
                drain,
                io_watch,
            )
            .await;
        }
        Some(acceptor) => {
            let stream = match tokio::time::timeout(l.limits.tls_handshake_timeout, acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(listener = %l.name, client.addr = %peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = %l.name, client.addr = %peer, "tls handshake timed out");
                    return;
                }
            };
            let info = TlsInfo::from_connection(stream.get_ref().1);
            let h2 = info.alpn.as_deref() == Some(b"h2");
            let conn = Arc::new(ConnInfo::new(l.name.clone(), peer, Some(Arc::new(info)), slot));
            let io_watch = IoWatch::new(conn.opened);
            let io = Watched::new(stream, io_watch.clone());
            let start = if h2 {
                Start::H2
            } else {
                Start::H1 { detect_h2: false }
            };
            serve_http(io, l, start, conn, shared, drain, io_watch).await;
        }
    }
}

/// How a connection starts: Weir's HTTP/1.1 server (a plain listener's may find the HTTP/2
/// preface instead), or hyper's HTTP/2 (ALPN chose it).
#[derive(Clone, Copy)]
enum Start {
    H1 { detect_h2: bool },
    H2,
}

/// A connection served by hyper: the connection future, and how to ask it to shut down.
type HyperServing<'a> = (Pin<Box<dyn Future<Output = ()> + Send + 'a>>, Arc<Notify>);

/// What serves a connection now. Weir's HTTP/1.1 server hands the connection to hyper's
/// server for HTTP/2 and for requests that leave HTTP/1.1 (upgrades, CONNECT).
// Made once per connection and never moved: boxing the larger variant would only cost.
#[allow(clippy::large_enum_variant)]
enum Serving<'a, I, S, F> {
    Own(ServerConn<I, S, F>),
    Hyper(HyperServing<'a>),
}

/// Serves `io` with hyper's server (HTTP/2, or HTTP/1.1 for an upgrade or CONNECT).
fn hyper_serving<'a, I>(
    builder: &'a auto::Builder<TokioExecutor>,
    io: I,
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
) -> HyperServing<'a>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stop = Arc::new(Notify::new());
    let asked = stop.clone();
    let fut = async move {
        let info = conn.clone();
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            // Hyper's server writes the response's own head: no `RawHead` on this path.
            handle(req.map(ClientBody::Hyper), info.clone(), shared.gateway())
                .map(|reply| Ok::<_, std::convert::Infallible>(reply.response))
        });
        let c = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(c);
        let mut shutting = false;
        loop {
            tokio::select! {
                r = c.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(listener = %conn.listener, client.addr = %conn.client, error = %e, "connection ended with error");
                    }
                    return;
                }
                // A permit stored before the first poll counts too.
                _ = asked.notified(), if !shutting => {
                    shutting = true;
                    c.as_mut().graceful_shutdown();
                }
            }
        }
    };
    (Box::pin(fut), stop)
}

async fn serve_http<'a, I>(
    io: I,
    l: &'a ListenerRt,
    start: Start,
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
    io_watch: Arc<IoWatch>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &l.limits;
    let (idle_timeout, stream_idle, head_timeout) = (
        limits.idle_timeout,
        limits.stream_idle_timeout,
        limits.header_read_timeout,
    );
    let (info, mut gateway) = (conn.clone(), CurrentGateway::new(shared.clone()));
    let svc =
        move |req: http::Request<RequestBody>| handle(req.map(ClientBody::H1), info.clone(), gateway.get());
    let mut c = match start {
        Start::H1 { detect_h2 } => {
            let h1_limits = server::Limits {
                max_head: limits.max_header_bytes,
                max_headers: limits.max_headers,
                head_timeout,
            };
            Serving::Own(ServerConn::new(io, conn.clone(), svc, h1_limits, detect_h2))
        }
        Start::H2 => Serving::Hyper(hyper_serving(
            &l.h2,
            Rewind::new(io, bytes::Bytes::new()),
            conn.clone(),
            shared.clone(),
        )),
    };
    let poll_conn = |c: &mut Serving<'a, I, _, _>, cx: &mut Context<'_>| -> Poll<()> {
        loop {
            match c {
                Serving::Own(own) => match ready!(own.poll(cx)) {
                    server::Ended::Closed => return Poll::Ready(()),
                    server::Ended::Handoff { io, h2 } => {
                        let builder = if h2 { &l.h2 } else { &l.h1 };
                        *c = Serving::Hyper(hyper_serving(builder, io, conn.clone(), shared.clone()));
                    }
                },
                Serving::Hyper((fut, _)) => return fut.as_mut().poll(cx),
            }
        }
    };
    let graceful_shutdown = |c: &mut Serving<'a, I, _, _>| match c {
        Serving::Own(own) => own.graceful_shutdown(),
        Serving::Hyper((_, stop)) => stop.notify_one(),
    };
    let mut closing = *drain.borrow();
    // A drain that came before the client's first byte waits for it: a plain listener's
    // HTTP/1-or-2 detection, asked to shut down before it read anything, closes with no
    // answer, though the request may already be on its way. (A client silent for the header
    // read timeout is dropped anyway.)
    let mut drain_unheard = closing;
    // When a client that has sent nothing, not even the HTTP/2 preface, is dropped: the
    // header read timeout after it connected, as one that sends its head slowly (before a
    // plain listener's HTTP/1-or-2 detection, and before an HTTP/2 connection's preface, no
    // timer of hyper's runs: only the idle timeout, six times longer by default, held such a
    // connection), or a short grace once a drain began.
    let silent = tokio::time::sleep_until(tokio::time::Instant::from_std(conn.opened) + head_timeout);
    tokio::pin!(silent);
    let mut heard = false;
    let period = (idle_timeout.min(stream_idle) / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    // Ticks in a stream idle timeout, plus the one under way.
    let stall_ticks = u64::try_from(stream_idle.as_millis() / period.as_millis()).unwrap_or(u64::MAX) + 1;
    // Armed when an idle connection is asked to close; drain has its own global deadline.
    let force_close = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(force_close);
    let mut idle_closing = false;
    let mut drained = std::pin::pin!(drain.changed());
    // The drain signal, the idle tick and the forced close are polled with their own waker and
    // only when it fired: the connection is woken a few times per request, and polling all
    // three every time (as a `select!` does) cost more than a thousand instructions a request.
    let side = Arc::new(SideWake::default());
    let side_waker = Waker::from(side.clone());
    // The task's waker as last registered with `side`, while it is there: a side event takes
    // it (and marks itself due, which is seen below before the task waits again). Registering
    // on every poll cost two atomic read-modify-writes (~20 cycles each) a poll.
    let mut registered: Option<Waker> = None;
    std::future::poll_fn(|cx| loop {
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            side.task.register(cx.waker());
            registered = Some(cx.waker().clone());
        }
        if poll_conn(&mut c, cx).is_ready() {
            return Poll::Ready(());
        }
        if drain_unheard && io_watch.heard() {
            // The first bytes are in: shut down after what they asked for.
            drain_unheard = false;
            graceful_shutdown(&mut c);
            continue;
        }
        // A plain load first: the swap is a locked instruction, and nothing is due on most polls.
        if !side.due.load(Ordering::Acquire) || !side.due.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        // The event that was due took the registered waker.
        registered = None;
        let mut scx = Context::from_waker(&side_waker);
        if !closing && drained.as_mut().poll(&mut scx).is_ready() {
            closing = true;
            if io_watch.heard() {
                graceful_shutdown(&mut c);
            } else {
                drain_unheard = true;
                let grace = tokio::time::Instant::now() + DRAIN_UNHEARD_GRACE;
                if grace < silent.deadline() {
                    silent.as_mut().reset(grace);
                }
            }
        }
        if !heard {
            heard = io_watch.heard();
            if !heard && silent.as_mut().poll(&mut scx).is_ready() {
                tracing::debug!(listener = %conn.listener, client.addr = %conn.client, "client sent nothing; dropping the connection");
                return Poll::Ready(());
            }
        }
        while tick.poll_tick(&mut scx).is_ready() {
            // A peer that stopped reading: nothing it is sent can leave, so no graceful close
            // can finish either; the connection (and its upstream exchange) is dropped.
            if io_watch.stalled_for(std::time::Instant::now()).is_some_and(|d| d >= stream_idle) {
                tracing::debug!(listener = %conn.listener, client.addr = %conn.client, "client stopped reading; dropping the connection");
                return Poll::Ready(());
            }
            // The same over HTTP/2, where the socket does not block: a client that grants a
            // stream no flow-control window leaves its response body unpolled.
            if conn.tick_and_find_stalled_handover(stall_ticks) {
                tracing::debug!(listener = %conn.listener, client.addr = %conn.client, "client granted a stream no window for the stream idle timeout; dropping the connection");
                return Poll::Ready(());
            }
            if !closing && conn.idle_for().is_some_and(|d| d >= idle_timeout) {
                tracing::debug!(listener = %conn.listener, client.addr = %conn.client, "closing idle connection");
                closing = true;
                idle_closing = true;
                force_close.as_mut().reset(tokio::time::Instant::now() + crate::limits::IDLE_CLOSE_GRACE);
                graceful_shutdown(&mut c);
            }
        }
        if idle_closing && force_close.as_mut().poll(&mut scx).is_ready() {
            tracing::debug!(listener = %conn.listener, client.addr = %conn.client, "idle connection did not close in time; dropping it");
            return Poll::Ready(());
        }
        // Round again: a shutdown just asked for needs the connection polled.
    })
    .await
}

/// How long a connection that has sent nothing yet may still do so once a drain began (its
/// request may be on its way; a connection opened for later, a browser's preconnect, should
/// not hold up a shutdown for the whole header read timeout).
const DRAIN_UNHEARD_GRACE: Duration = Duration::from_secs(1);

/// The waker of a connection's side events: notes that one is due and wakes the task.
struct SideWake {
    due: AtomicBool,
    task: AtomicWaker,
}

impl Default for SideWake {
    fn default() -> SideWake {
        // Due at first, so every side future is polled once and registers.
        SideWake {
            due: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }
    }
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        self.task.wake();
    }
}
