//! The framing guard in front of hyper: every HTTP/1 request byte passes
//! [`membrane_codec::http1::Framer`] before hyper's parser sees it (see there for why). A refused
//! head reaches hyper as the framer's stand-in request; [`GuardState`] tells the service which
//! request that is, so it answers with the refusal and `Connection: close`.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use membrane_codec::http1::Framer;
pub use membrane_codec::http1::{Limits, Refusal, Upgrades};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// State shared between a connection's guard and its service.
#[derive(Debug)]
pub struct GuardState {
    /// Index (0-based, in arrival order) of the request that stands in for a refused head;
    /// `u64::MAX` while nothing was refused.
    refused_index: AtomicU64,
    refusal: OnceLock<Refusal>,
    /// Bytes moved in either direction: the idle timer watches it.
    activity: AtomicU64,
    /// When the head being collected got its first byte (nanoseconds since [`epoch`], 0: no
    /// head in progress). hyper never sees a partial head, so its header timer cannot run;
    /// the connection task enforces the header timeout from this.
    head_started: AtomicU64,
}

/// The zero of [`GuardState`]'s timestamps.
fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_nanos() -> u64 {
    (epoch().elapsed().as_nanos() as u64).max(1)
}

impl Default for GuardState {
    fn default() -> GuardState {
        GuardState {
            refused_index: AtomicU64::new(u64::MAX),
            refusal: OnceLock::new(),
            activity: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
        }
    }
}

impl GuardState {
    /// The refusal that request `index` stands in for, if it is the stand-in.
    pub fn refusal_for(&self, index: u64) -> Option<&Refusal> {
        if self.refused_index.load(Ordering::Acquire) == index {
            self.refusal.get()
        } else {
            None
        }
    }

    /// A counter that moves whenever bytes move.
    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    /// How long the head now being received has been arriving, if one is.
    pub fn head_age(&self) -> Option<std::time::Duration> {
        match self.head_started.load(Ordering::Relaxed) {
            0 => None,
            t => Some(std::time::Duration::from_nanos(
                now_nanos().saturating_sub(t),
            )),
        }
    }
}

/// The guard around one accepted connection.
#[derive(Debug)]
pub struct Guard<S> {
    inner: S,
    state: std::sync::Arc<GuardState>,
    framer: Framer,
    /// Validated bytes not yet handed to hyper, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
}

impl<S> Guard<S> {
    /// Guards `inner`, whose requests may switch to `upgrades`.
    pub fn new(
        inner: S,
        limits: Limits,
        upgrades: Upgrades,
        state: std::sync::Arc<GuardState>,
    ) -> Guard<S> {
        Guard {
            inner,
            state,
            framer: Framer::new(limits, upgrades),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Guards the rest of a connection that the direct path (`crate::direct`) began: `framer`
    /// has seen every byte read so far, and `pending` holds the validated bytes nobody consumed
    /// yet (they start at a request head).
    pub fn resume(
        inner: S,
        framer: Framer,
        pending: Vec<u8>,
        state: std::sync::Arc<GuardState>,
    ) -> Guard<S> {
        let mut guard = Guard {
            inner,
            state,
            framer,
            out: pending,
            out_pos: 0,
        };
        guard.note_progress();
        guard
    }

    /// Publishes the framer's news to the service and the connection task.
    fn note_progress(&mut self) {
        if let Some((index, refusal)) = self.framer.refused()
            && self.state.refusal.set(refusal.clone()).is_ok()
        {
            self.state.refused_index.store(*index, Ordering::Release);
        }
        let started = self.state.head_started.load(Ordering::Relaxed);
        match (self.framer.head_in_progress(), started) {
            (true, 0) => self
                .state
                .head_started
                .store(now_nanos(), Ordering::Relaxed),
            (false, t) if t != 0 => self.state.head_started.store(0, Ordering::Relaxed),
            _ => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    // Idle connections should not keep a body-sized buffer.
                    if this.out.capacity() > 1024 {
                        this.out = Vec::new();
                    } else {
                        this.out.clear();
                    }
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.framer.failed() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    e.to_string(),
                )));
            }
            // Whatever follows a refused head is never read: hyper closes after answering.
            if this.framer.is_refused() {
                return Poll::Pending;
            }
            {
                // Nothing to check: read straight into hyper's buffer.
                if this.framer.is_passthrough() {
                    let before = buf.filled().len();
                    let r = Pin::new(&mut this.inner).poll_read(cx, buf);
                    let moved = (buf.filled().len() - before) as u64;
                    this.state.activity.fetch_add(moved, Ordering::Relaxed);
                    return r;
                }
            }
            // A stack buffer: an idle connection holds no read buffer of its own. Left
            // uninitialized (the socket fills what is read), not zeroed on every read.
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
            let mut rb = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let read = rb.filled();
                    if read.is_empty() {
                        // EOF: a partial head is simply dropped with the connection.
                        return Poll::Ready(Ok(()));
                    }
                    this.state
                        .activity
                        .fetch_add(read.len() as u64, Ordering::Relaxed);
                    this.framer.feed(read, &mut this.out);
                    this.note_progress();
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.state.activity.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            this.state.activity.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
