//! Guests' stderr, bounded: what a policy component writes to its WASI stderr goes to `tracing`
//! (target `stllm::guest`, one event per line, at `info`), at most [`GUEST_LOG_CAP`] bytes per
//! request; the rest is dropped (counted, and reported once). A guest cannot fill the host's
//! terminal or logs, nor block on them: writes always succeed at once.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Most bytes of stderr a guest may log per request.
pub const GUEST_LOG_CAP: usize = 64 << 10;
/// Longest line kept (a longer one is cut there).
const MAX_LINE: usize = 4 << 10;

#[derive(Debug, Default)]
struct State {
    /// Bytes taken this request (logged or dropped)
    written: usize,
    dropped: usize,
    line: Vec<u8>,
    warned: bool,
}

impl State {
    fn take(&mut self, buf: &[u8]) {
        let room = GUEST_LOG_CAP.saturating_sub(self.written);
        let (keep, drop) = buf.split_at(buf.len().min(room));
        self.written += keep.len();
        for &b in keep {
            if b == b'\n' {
                self.flush_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        if !drop.is_empty() {
            self.dropped += drop.len();
            if !self.warned {
                self.warned = true;
                self.flush_line();
                tracing::warn!(target: "stllm::guest", cap = GUEST_LOG_CAP, "the guest's stderr reached its cap for this request: the rest is dropped");
            }
        }
    }

    fn flush_line(&mut self) {
        if !self.line.is_empty() {
            let text = String::from_utf8_lossy(&self.line);
            tracing::info!(target: "stllm::guest", "{text}");
            self.line.clear();
        }
    }
}

/// A guest instance's stderr (cloned into its WASI context; [`GuestLog::reset`] at each request).
#[derive(Debug, Clone, Default)]
pub struct GuestLog(Arc<Mutex<State>>);

impl GuestLog {
    /// Start a request's budget; what the last one left unfinished (a line without a newline)
    /// is logged now. Returns the bytes the last request dropped.
    pub fn reset(&self) -> usize {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.flush_line();
        let dropped = s.dropped;
        *s = State::default();
        dropped
    }

    fn write(&self, buf: &[u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take(buf);
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for GuestLog {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_up_to_the_cap_and_the_rest_is_dropped() {
        let log = GuestLog::default();
        log.write(b"hello\nwor");
        log.write(b"ld\n");
        {
            let s = log.0.lock().unwrap();
            assert_eq!((s.written, s.dropped, s.line.len()), (12, 0, 0));
        }
        log.write(&vec![b'x'; GUEST_LOG_CAP]);
        {
            let s = log.0.lock().unwrap();
            assert_eq!(s.written, GUEST_LOG_CAP);
            assert_eq!(s.dropped, 12);
            assert!(s.line.len() <= MAX_LINE);
        }
        assert_eq!(log.reset(), 12);
        log.write(b"next request\n");
        assert_eq!(log.0.lock().unwrap().written, 13);
    }
}
