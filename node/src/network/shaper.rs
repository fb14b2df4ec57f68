//! A userspace link shaper: `barnraise up --link-mbps N --link-latency-ms L`
//! gives every in-process node the link of a volunteer on a slow line, on
//! one machine and without netem (which this project's machines lack).
//!
//! Each node has one [`Link`], shared by all its TCP connections (the
//! transport wraps every connection's byte stream in a [`Shaped`] one):
//!
//! - **rate**: a token bucket per direction caps what the node sends and
//!   what it receives at N Mbit/s each, over all its connections together;
//! - **latency**: what the node receives is held L ms after it comes off the
//!   wire before the connection sees it. With every node shaped, a message
//!   between two nodes is delayed L ms one way (2L a round trip), and one
//!   between a node and the (unshaped) coordinator L ms a round trip.
//!
//! Everything is driven by the connection's own polls and tokio timers: no
//! task per connection, and nothing is dropped; a stream that has its
//! receive buffer full (rate × latency plus a chunk) stops reading from the
//! socket, so TCP's flow control holds the sender back as a real link
//! would. What went through is counted in [`LinkCounters`], which is what
//! the tests check (on tokio's paused clock, never the wall clock).

use futures::io::{AsyncRead, AsyncWrite};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The most one read or write moves at once: a burst above the rate is at
/// most this, as a real link sends a packet at line speed.
const CHUNK: usize = 16 * 1024;

/// The most a connection holds back for the latency, whatever the shape.
const MAX_RECEIVE_WINDOW: usize = 4 << 20;

/// The longest latency a shape takes (a sanity bound for the CLI).
pub const MAX_LATENCY_MS: u64 = 10_000;

/// A link's rate and latency, as the CLI gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkShape {
    /// Mbit/s each way (`None`: no rate cap).
    pub mbps: Option<f64>,
    /// Delay added to what the node receives, in milliseconds.
    pub latency_ms: u64,
}

impl LinkShape {
    /// Checks the values a user typed; `None` when the shape changes nothing.
    pub fn new(mbps: Option<f64>, latency_ms: Option<u64>) -> Result<Option<LinkShape>, String> {
        if let Some(rate) = mbps
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(format!("--link-mbps {rate} must be a positive number"));
        }
        let latency_ms = latency_ms.unwrap_or(0);
        if latency_ms > MAX_LATENCY_MS {
            return Err(format!(
                "--link-latency-ms {latency_ms} is more than {MAX_LATENCY_MS} ms"
            ));
        }
        if mbps.is_none() && latency_ms == 0 {
            return Ok(None);
        }
        Ok(Some(LinkShape { mbps, latency_ms }))
    }

    fn bytes_per_second(&self) -> Option<f64> {
        self.mbps.map(|m| m * 1e6 / 8.0)
    }

    fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }
}

impl std::fmt::Display for LinkShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mbps {
            Some(m) => write!(f, "{m} Mbit/s each way")?,
            None => f.write_str("no rate cap")?,
        }
        write!(f, ", {} ms latency", self.latency_ms)
    }
}

/// What went through a link (for `up --json` and the tests).
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Times a read or write waited for the rate's tokens.
    pub rate_waits: AtomicU64,
    /// Chunks held back for the latency.
    pub delayed_chunks: AtomicU64,
}

/// One node's link, shared by its connections.
#[derive(Clone, Debug)]
pub struct Link {
    shape: LinkShape,
    up: Option<Arc<Mutex<Pace>>>,
    down: Option<Arc<Mutex<Pace>>>,
    counters: Arc<LinkCounters>,
}

/// Two links are the same link when they share their counters.
impl PartialEq for Link {
    fn eq(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.counters, &other.counters)
    }
}

impl Link {
    pub fn new(shape: LinkShape) -> Link {
        let pace = || {
            shape
                .bytes_per_second()
                .map(|rate| Arc::new(Mutex::new(Pace::new(rate))))
        };
        Link {
            shape,
            up: pace(),
            down: pace(),
            counters: Arc::default(),
        }
    }

    pub fn shape(&self) -> LinkShape {
        self.shape
    }

    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }

    /// Bytes a connection may hold back for the latency before it stops
    /// reading from the socket: what the link carries in that time, plus two
    /// chunks, at most [`MAX_RECEIVE_WINDOW`].
    fn receive_window(&self) -> usize {
        match self.shape.bytes_per_second() {
            Some(rate) => ((rate * self.shape.latency().as_secs_f64()) as usize)
                .saturating_add(2 * CHUNK)
                .min(MAX_RECEIVE_WINDOW),
            None => MAX_RECEIVE_WINDOW,
        }
    }
}

/// `None` when `pace` (if any) lets bytes through now, else when it will.
fn ready_at(pace: &Option<Arc<Mutex<Pace>>>, now: Instant) -> Option<Instant> {
    let pace = pace.as_ref()?;
    let mut pace = pace.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    pace.ready_at(now)
}

fn spend(pace: &Option<Arc<Mutex<Pace>>>, bytes: usize) {
    if let Some(pace) = pace {
        let mut pace = pace.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pace.tokens -= bytes as f64;
    }
}

/// A token bucket that may go into debt by one chunk: bytes pass while it
/// holds tokens, and the debt is slept off at the rate, so over time the
/// bytes that pass are the rate times the time.
#[derive(Debug)]
struct Pace {
    bytes_per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl Pace {
    fn new(bytes_per_second: f64) -> Pace {
        Pace {
            bytes_per_second,
            tokens: 0.0,
            refilled: Instant::now(),
        }
    }

    /// `None` when bytes may pass now, else when they may.
    fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        // At most one chunk saved up: an idle link does not bank a burst.
        self.tokens = (self.tokens + elapsed * self.bytes_per_second).min(CHUNK as f64);
        self.refilled = now;
        if self.tokens > 0.0 {
            return None;
        }
        let wait = (1.0 - self.tokens) / self.bytes_per_second;
        Some(now + Duration::from_secs_f64(wait))
    }
}

/// A byte stream through a [`Link`] (without one, the stream itself).
pub struct Shaped<S> {
    inner: S,
    link: Option<Link>,
    /// Bytes off the wire, each chunk with when the node may see it.
    arrived: VecDeque<(Instant, Vec<u8>)>,
    /// How much of the front chunk was already read.
    front_read: usize,
    /// Where reads off the wire land before the bytes read are queued.
    scratch: Vec<u8>,
    held: usize,
    eof: bool,
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Shaped<S> {
    pub fn new(inner: S, link: Option<Link>) -> Shaped<S> {
        Shaped {
            inner,
            link,
            arrived: VecDeque::new(),
            front_read: 0,
            scratch: Vec::new(),
            held: 0,
            eof: false,
            read_timer: None,
            write_timer: None,
        }
    }
}

/// Arms `timer` for `at`; true when it has already fired.
fn fired(timer: &mut Option<Pin<Box<Sleep>>>, at: Instant, cx: &mut Context<'_>) -> bool {
    match timer {
        Some(sleep) => sleep.as_mut().reset(at),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    match timer {
        Some(sleep) => sleep.as_mut().poll(cx).is_ready(),
        None => false,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Shaped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(link) = this.link.clone() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let now = Instant::now();
            // What has waited out the latency goes to the reader.
            if let Some((due, chunk)) = this.arrived.front()
                && *due <= now
            {
                let n = buf.len().min(chunk.len() - this.front_read);
                buf[..n].copy_from_slice(&chunk[this.front_read..this.front_read + n]);
                this.front_read += n;
                this.held -= n;
                if this.front_read == chunk.len() {
                    this.arrived.pop_front();
                    this.front_read = 0;
                }
                return Poll::Ready(Ok(n));
            }
            // More off the wire, as fast as the link's downstream allows.
            let mut wake = this.arrived.front().map(|(due, _)| *due);
            if !this.eof && this.held < link.receive_window() {
                match ready_at(&link.down, now) {
                    Some(at) => {
                        link.counters.rate_waits.fetch_add(1, Ordering::Relaxed);
                        wake = Some(wake.map_or(at, |w| w.min(at)));
                    }
                    None => {
                        this.scratch.resize(CHUNK, 0);
                        match Pin::new(&mut this.inner).poll_read(cx, &mut this.scratch) {
                            Poll::Ready(Ok(0)) => {
                                this.eof = true;
                                continue;
                            }
                            Poll::Ready(Ok(n)) => {
                                spend(&link.down, n);
                                // Exactly the bytes read: the queue's memory
                                // is what `held` counts.
                                let chunk = this.scratch[..n].to_vec();
                                let counters = &link.counters;
                                counters
                                    .bytes_received
                                    .fetch_add(n as u64, Ordering::Relaxed);
                                if link.shape.latency_ms > 0 {
                                    counters.delayed_chunks.fetch_add(1, Ordering::Relaxed);
                                }
                                this.arrived.push_back((now + link.shape.latency(), chunk));
                                this.held += n;
                                continue;
                            }
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => {}
                        }
                    }
                }
            }
            if this.eof && this.arrived.is_empty() {
                return Poll::Ready(Ok(0));
            }
            match wake {
                Some(at) if fired(&mut this.read_timer, at, cx) => continue,
                _ => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Shaped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(link) = this.link.clone() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        loop {
            if let Some(at) = ready_at(&link.up, Instant::now()) {
                link.counters.rate_waits.fetch_add(1, Ordering::Relaxed);
                if fired(&mut this.write_timer, at, cx) {
                    continue;
                }
                return Poll::Pending;
            }
            let n = buf.len().min(CHUNK);
            return match Pin::new(&mut this.inner).poll_write(cx, &buf[..n]) {
                Poll::Ready(Ok(n)) => {
                    spend(&link.up, n);
                    link.counters
                        .bytes_sent
                        .fetch_add(n as u64, Ordering::Relaxed);
                    Poll::Ready(Ok(n))
                }
                other => other,
            };
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::{AsyncReadExt, AsyncWriteExt, Cursor};

    fn link(mbps: Option<f64>, latency_ms: u64) -> Link {
        Link::new(LinkShape { mbps, latency_ms })
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// 1 MB received at 8 Mbit/s with 50 ms latency: every byte arrives, in
    /// order; the first one 50 ms after the start on tokio's paused clock,
    /// the last one the link's 1 s later; the counters say the same.
    #[tokio::test(start_paused = true)]
    async fn receiving_takes_the_rate_and_the_latency() {
        let sent = bytes(1_000_000);
        let link = link(Some(8.0), 50);
        let mut stream = Shaped::new(Cursor::new(sent.clone()), Some(link.clone()));
        let start = Instant::now();
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.unwrap();
        let first_at = start.elapsed();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        let all = start.elapsed();
        assert_eq!(first[0], sent[0]);
        assert_eq!(&rest[..], &sent[1..]);
        assert!(
            first_at >= Duration::from_millis(50) && first_at < Duration::from_millis(60),
            "{first_at:?}"
        );
        // 1 MB at 1 MB/s, plus the latency, give or take a chunk (16 ms).
        assert!(
            all >= Duration::from_millis(1_030) && all <= Duration::from_millis(1_080),
            "{all:?}"
        );
        let counters = link.counters();
        assert_eq!(counters.bytes_received.load(Ordering::Relaxed), 1_000_000);
        assert_eq!(counters.bytes_sent.load(Ordering::Relaxed), 0);
        assert!(counters.delayed_chunks.load(Ordering::Relaxed) >= 1_000_000 / CHUNK as u64);
        assert!(counters.rate_waits.load(Ordering::Relaxed) > 0);
    }

    /// Sending is capped at the rate, and two connections of one node share
    /// the link: 2 × 250 kB at 4 Mbit/s (500 kB/s) take a second together.
    #[tokio::test(start_paused = true)]
    async fn sending_shares_one_rate_across_connections() {
        let link = link(Some(4.0), 0);
        let payload = bytes(250_000);
        let start = Instant::now();
        let send = |link: Link| {
            let payload = payload.clone();
            async move {
                let mut stream = Shaped::new(Cursor::new(Vec::new()), Some(link));
                stream.write_all(&payload).await.unwrap();
                stream.flush().await.unwrap();
                stream.inner.into_inner()
            }
        };
        let (a, b) = futures::join!(send(link.clone()), send(link.clone()));
        let took = start.elapsed();
        assert_eq!(a, payload);
        assert_eq!(b, payload);
        assert!(
            took >= Duration::from_millis(960) && took <= Duration::from_millis(1_040),
            "{took:?}"
        );
        assert_eq!(link.counters().bytes_sent.load(Ordering::Relaxed), 500_000);
    }

    /// Without a link the stream is the inner one: no timers, no counters.
    #[tokio::test(start_paused = true)]
    async fn no_link_passes_bytes_through_at_once() {
        let sent = bytes(100_000);
        let mut stream = Shaped::new(Cursor::new(sent.clone()), None);
        let start = Instant::now();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// Latency alone delays without capping: 2 MB arrive 200 ms late and
    /// all at once after that.
    #[tokio::test(start_paused = true)]
    async fn latency_alone_does_not_cap_the_rate() {
        let sent = bytes(2_000_000);
        let link = link(None, 200);
        let mut stream = Shaped::new(Cursor::new(sent.clone()), Some(link.clone()));
        let start = Instant::now();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        assert_eq!(link.counters().rate_waits.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(LinkShape::new(None, None), Ok(None));
        assert_eq!(LinkShape::new(None, Some(0)), Ok(None));
        assert_eq!(
            LinkShape::new(Some(20.0), Some(100)),
            Ok(Some(LinkShape {
                mbps: Some(20.0),
                latency_ms: 100
            }))
        );
        for (mbps, latency, expect) in [
            (Some(0.0), None, "positive"),
            (Some(-3.0), None, "positive"),
            (Some(f64::NAN), None, "positive"),
            (None, Some(60_000), "more than"),
        ] {
            let error = LinkShape::new(mbps, latency).expect_err(expect);
            assert!(error.contains(expect), "{error}");
        }
        assert_eq!(
            LinkShape::new(Some(20.0), Some(100))
                .unwrap()
                .unwrap()
                .to_string(),
            "20 Mbit/s each way, 100 ms latency"
        );
    }
}
