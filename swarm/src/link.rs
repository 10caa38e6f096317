//! Emulated access links: a rate limiter (bandwidth) and a one-way delay on every byte a volunteer sends and receives,
//! in userspace, plus the byte meter that the per-sample traffic figures come from.
//!
//! Why userspace and not `tc netem`: netem needs root and a network namespace per volunteer (or one qdisc with a
//! filter per source address), which this machine's sandbox does not allow; a shaper in the volunteer's socket path
//! shapes exactly the same bytes. What it does not emulate: TCP's own reaction to a long, thin pipe (slow start,
//! loss), because the TCP connection underneath runs over loopback. A long-lived WebSocket is in steady state, so
//! the rate and the delay are what matter.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

/// One link's shape. `None` rates are unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Volunteer → coordinator, bytes per second.
    pub up: Option<f64>,
    /// Coordinator → volunteer, bytes per second.
    pub down: Option<f64>,
    /// Added to every byte in each direction.
    pub delay: Duration,
}

impl Link {
    /// Loopback as it is.
    pub const LAN: Link = Link {
        up: None,
        down: None,
        delay: Duration::ZERO,
    };

    /// A link with the rates in Mbit/s (10⁶ bits) and the one-way delay in milliseconds.
    pub fn mbit(up: f64, down: f64, delay_ms: u64) -> Self {
        Self {
            up: Some(up * 1e6 / 8.0),
            down: Some(down * 1e6 / 8.0),
            delay: Duration::from_millis(delay_ms),
        }
    }

    /// The named scenarios of issue 11.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "lan" => Some(Self::LAN),
            "home" => Some(Self::mbit(10.0, 50.0, 25)),
            "mobile" => Some(Self::mbit(2.0, 10.0, 60)),
            _ => None,
        }
    }

    pub fn is_shaped(&self) -> bool {
        self.up.is_some() || self.down.is_some() || !self.delay.is_zero()
    }
}

/// Bytes a volunteer wrote (up) and read (down), WebSocket framing and the HTTP upgrade included.
#[derive(Debug, Default)]
pub struct Meter {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

/// A stream that counts what passes through it into a [`Meter`]; the volunteer's WebSocket runs over one.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Arc<Meter>) -> Self {
        Self { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.meter.down.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.meter.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How much the volunteer end of a shaped link buffers before its writes wait: small, so that a slow uplink pushes
/// back on the WebSocket as a real socket buffer would.
const PIPE_BYTES: usize = 64 * 1024;

/// Puts `tcp` behind `link` and returns the volunteer's end: what is written to it reaches the coordinator at the
/// uplink rate, `delay` later; what the coordinator sends arrives at the downlink rate, `delay` later. The four pump
/// tasks end when either side closes.
pub fn shape(tcp: TcpStream, link: Link) -> DuplexStream {
    let (volunteer, inner) = tokio::io::duplex(PIPE_BYTES);
    let (from_coord, to_coord) = tcp.into_split();
    let (from_vol, to_vol) = tokio::io::split(inner);
    tokio::spawn(pump(from_vol, to_coord, link.up, link.delay));
    tokio::spawn(pump(from_coord, to_vol, link.down, link.delay));
    volunteer
}

/// The serialisation granularity: about 2 ms of the link's rate, at least one Ethernet frame, at most 64 KiB.
fn chunk_bytes(rate: Option<f64>) -> usize {
    rate.map_or(64 * 1024, |r| ((r * 0.002) as usize).clamp(1500, 64 * 1024))
}

/// A link serialiser: the time at which the last of `n` bytes handed over now has left, at `rate` bytes per second,
/// after everything handed over before. Bytes that were already waiting when the pump asked for them (`backlogged`)
/// leave right after the previous ones, even if the pump woke late (tokio's timer has millisecond resolution and
/// this machine is busy), so lateness does not leak into the rate; bytes that arrive on an idle link start now, so
/// idle time is not banked as credit.
#[derive(Debug)]
pub struct Serialiser {
    rate: Option<f64>,
    free_at: Instant,
}

impl Serialiser {
    /// A serialiser idle since `now`.
    pub fn new(rate: Option<f64>, now: Instant) -> Self {
        Self { rate, free_at: now }
    }

    pub fn take(&mut self, n: usize, now: Instant, backlogged: bool) -> Instant {
        let Some(rate) = self.rate else {
            return now;
        };
        let start = if backlogged {
            self.free_at
        } else {
            self.free_at.max(now)
        };
        self.free_at = start + Duration::from_secs_f64(n as f64 / rate);
        self.free_at
    }
}

/// Reads into `buf`; also says whether the bytes were already there (the read did not have to wait).
async fn read_noting_wait(
    src: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> io::Result<(usize, bool)> {
    let mut waited = false;
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *src).poll_read(cx, &mut rb) {
            Poll::Pending => {
                waited = true;
                Poll::Pending
            }
            Poll::Ready(r) => Poll::Ready(r.map(|()| (rb.filled().len(), !waited))),
        }
    })
    .await
}

/// Moves bytes from `src` to `dst` through a serialiser at `rate`, then a delay line of `delay`. Ends (shutting
/// `dst` down) at EOF, or when either side fails.
async fn pump(
    mut src: impl AsyncRead + Unpin,
    mut dst: impl AsyncWrite + Unpin,
    rate: Option<f64>,
    delay: Duration,
) {
    let chunk = chunk_bytes(rate);
    // The delay line: bounded by the bandwidth-delay product in steady state; the bound only matters when the far
    // side stops reading, and then the serialiser stops too.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let serialise = async move {
        let mut line = Serialiser::new(rate, Instant::now());
        let mut buf = vec![0u8; chunk];
        loop {
            let (n, backlogged) = match read_noting_wait(&mut src, &mut buf).await {
                Ok((0, _)) | Err(_) => break,
                Ok(r) => r,
            };
            let sent = line.take(n, Instant::now(), backlogged);
            sleep_until(sent).await;
            if tx.send((sent + delay, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let propagate = async move {
        while let Some((at, bytes)) = rx.recv().await {
            sleep_until(at).await;
            if dst.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = dst.shutdown().await;
    };
    tokio::join!(serialise, propagate);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialiser_spaces_chunks_at_the_rate() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Serialiser::new(Some(1000.0), t0);
        assert_eq!(s.take(500, t0, false), t0 + ms(500));
        // Handed over while the first is still leaving: queued behind it.
        assert_eq!(s.take(500, t0 + ms(100), true), t0 + ms(1000));
        // Waiting bytes picked up 30 ms late: they still leave right after the previous ones.
        assert_eq!(s.take(500, t0 + ms(1030), true), t0 + ms(1500));
        // Bytes arriving on a link idle since 1.5 s: they start when they arrive, no credit banked.
        let later = t0 + ms(5000);
        assert_eq!(s.take(1000, later, false), later + ms(1000));
        assert_eq!(Serialiser::new(None, t0).take(1 << 20, t0, true), t0);
    }

    #[test]
    fn named_links() {
        let home = Link::named("home").expect("home");
        assert_eq!(home.up, Some(1.25e6));
        assert_eq!(home.down, Some(6.25e6));
        assert_eq!(home.delay, Duration::from_millis(25));
        assert!(!Link::LAN.is_shaped());
        assert!(Link::named("dialup").is_none());
    }
}
