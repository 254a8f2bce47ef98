//! Accepting gRPC connections without letting them take what the queue needs.
//!
//! - **A limit below the descriptor budget.** At most `max_connections` connections are open at
//!   once (plus a few reserved for loopback, so an operator on the conversion host can still run
//!   `hyperctl` during a flood from the network); one more is accepted and closed at once. The
//!   agent raises its soft descriptor limit to the hard one at start-up and lowers
//!   `max_connections` if the budget cannot hold it next to the descriptors the queue and the
//!   conversions need ([`budget`]).
//! - **A handshake deadline.** A new connection must send its first [`HANDSHAKE_BYTES`] bytes (a
//!   TLS ClientHello, or the HTTP/2 preface and settings) within `handshake_timeout`.
//! - **An idle deadline.** After that, a connection that sends nothing for `idle_timeout` is closed.
//!   Live clients are never idle that long: the agent pings every connection every 20 s and HTTP/2
//!   clients answer every ping.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a connection must send within the handshake deadline.
pub const HANDSHAKE_BYTES: usize = 64;
/// Connection slots kept for loopback clients beyond `max_connections`.
pub const LOOPBACK_RESERVE: usize = 16;
/// Descriptors kept for the agent's own work: the queue, the output, logs, listeners, and per
/// running job its disks, pipes and children.
pub const BASE_RESERVE: u64 = 128;
pub const PER_JOB_RESERVE: u64 = 64;

/// How connections are limited.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Counters for `GetStatus` and the log.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub open: AtomicUsize,
    pub refused: AtomicU64,
    pub timed_out: AtomicU64,
    pub max: AtomicUsize,
}

/// Whether a peer address is this host (IPv4-mapped IPv6 addresses included: a dual-stack `[::]`
/// listener sees 127.0.0.1 as `::ffff:127.0.0.1`).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Raise the soft descriptor limit to the hard one, and return how many connections fit beside
/// the agent's own needs (`max_concurrent` jobs): `wanted` or fewer (with a warning).
pub fn budget(wanted: usize, max_concurrent: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (lim.current, lim.maximum)
        && cur < max
    {
        lim.current = Some(max);
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::debug!("cannot raise the descriptor limit: {e}");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let reserve = BASE_RESERVE + PER_JOB_RESERVE * max_concurrent as u64 + LOOPBACK_RESERVE as u64;
    let fits = usize::try_from(soft.saturating_sub(reserve)).unwrap_or(usize::MAX).max(1);
    if wanted > fits {
        tracing::warn!(
            max_connections = wanted,
            descriptor_limit = soft,
            "max_connections does not fit the descriptor limit beside the queue's needs; accepting at most {fits} connections (raise LimitNOFILE)"
        );
        fits
    } else {
        wanted
    }
}

/// Accept connections from `listener` within `limits`, forever (until the receiver is dropped).
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    stats: Arc<ConnStats>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(16);
    let general = Arc::new(Semaphore::new(limits.max_connections));
    let local = Arc::new(Semaphore::new(LOOPBACK_RESERVE));
    stats.max.store(limits.max_connections, Ordering::Relaxed);
    tokio::spawn(async move {
        let mut last_warning: Option<Instant> = None;
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE/ENFILE and friends: the connection stays in the backlog; try
                        // again shortly rather than spin.
                        tracing::debug!("accepting a gRPC connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let permit = if is_loopback(peer.ip()) {
                local.clone().try_acquire_owned().or_else(|_| general.clone().try_acquire_owned())
            } else {
                general.clone().try_acquire_owned()
            };
            let Ok(permit) = permit else {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(
                        %peer,
                        open = stats.open.load(Ordering::Relaxed),
                        refused = stats.refused.load(Ordering::Relaxed),
                        "too many gRPC connections (max_connections = {}): closing new ones",
                        limits.max_connections
                    );
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Conn::new(stream, peer, permit, limits, stats.clone());
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One accepted connection: its slot, and its deadlines.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    info: TcpConnectInfo,
    _permit: OwnedSemaphorePermit,
    deadline: Pin<Box<Sleep>>,
    handshake_left: usize,
    idle: Duration,
    stats: Arc<ConnStats>,
}

impl Conn {
    fn new(
        io: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        limits: Limits,
        stats: Arc<ConnStats>,
    ) -> Conn {
        stats.open.fetch_add(1, Ordering::Relaxed);
        let info = TcpConnectInfo { local_addr: io.local_addr().ok(), remote_addr: Some(peer) };
        Conn {
            io,
            info,
            _permit: permit,
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            handshake_left: HANDSHAKE_BYTES,
            idle: limits.idle_timeout,
            stats,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    self.handshake_left = self.handshake_left.saturating_sub(n);
                    if self.handshake_left == 0 {
                        let next = Instant::now() + self.idle;
                        self.deadline.as_mut().reset(next);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    let what = if self.handshake_left > 0 { "handshake" } else { "idle" };
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("gRPC connection from {:?} closed: {what} timeout", self.info.remote_addr),
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_loopback_is_loopback() {
        assert!(is_loopback("127.0.0.1".parse().expect("ip")));
        assert!(is_loopback("::1".parse().expect("ip")));
        assert!(is_loopback("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().expect("ip")));
        assert!(!is_loopback("10.0.0.1".parse().expect("ip")));
    }

    #[tokio::test]
    async fn idle_and_excess_connections_are_closed() {
        use tokio::io::AsyncReadExt;
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            max_connections: 1,
            handshake_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
        };
        let stats = Arc::new(ConnStats::default());
        let mut conns = incoming(listener, limits, stats.clone());
        // Loopback gets the reserve first, then the general slot: LOOPBACK_RESERVE + 1 fit.
        let mut clients = Vec::new();
        for _ in 0..LOOPBACK_RESERVE + 3 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut accepted = Vec::new();
        for _ in 0..LOOPBACK_RESERVE + 1 {
            accepted.push(conns.next().await.expect("conn").expect("ok"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(stats.open.load(Ordering::Relaxed), LOOPBACK_RESERVE + 1);
        assert_eq!(stats.refused.load(Ordering::Relaxed), 2, "the two beyond the limit were closed");
        // A connection that never sends a byte fails its handshake deadline.
        let mut c = accepted.pop().expect("one");
        let mut buf = [0u8; 8];
        let e = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("not hung")
            .expect_err("timeout");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(c);
        drop(accepted);
        assert_eq!(stats.open.load(Ordering::Relaxed), 0);
    }
}
