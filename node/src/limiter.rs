//! Bandwidth caps: a token bucket per direction, shared by every transfer.
//!
//! A transfer asks for its bytes before it sends (upload) or after it
//! receives (download) a chunk and sleeps until the bucket has them, so the
//! average rate stays under the cap while a single chunk may still go out at
//! line speed. The bucket holds at most one second of tokens, so an idle
//! node cannot save up a burst larger than that.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A shared byte-rate cap; `None` inside means unlimited.
#[derive(Clone, Debug, Default)]
pub struct RateLimiter {
    inner: Option<Arc<Mutex<Bucket>>>,
}

#[derive(Debug)]
struct Bucket {
    bytes_per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    /// A cap of `bytes_per_second`; `None` or 0 means no cap.
    pub fn new(bytes_per_second: Option<u64>) -> RateLimiter {
        match bytes_per_second {
            Some(rate) if rate > 0 => RateLimiter {
                inner: Some(Arc::new(Mutex::new(Bucket {
                    bytes_per_second: rate as f64,
                    tokens: rate as f64,
                    refilled: Instant::now(),
                }))),
            },
            _ => RateLimiter { inner: None },
        }
    }

    pub fn unlimited() -> RateLimiter {
        RateLimiter { inner: None }
    }

    pub fn is_limited(&self) -> bool {
        self.inner.is_some()
    }

    /// Waits until `bytes` may pass. Callers hold the lock while sleeping on
    /// purpose: waiting transfers queue in order instead of all waking at once.
    pub async fn acquire(&self, bytes: u64) {
        let Some(bucket) = &self.inner else { return };
        let mut bucket = bucket.lock().await;
        let now = Instant::now();
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * bucket.bytes_per_second).min(bucket.bytes_per_second);
        bucket.refilled = now;
        bucket.tokens -= bytes as f64;
        if bucket.tokens < 0.0 {
            // Going into debt and sleeping it off lets a chunk larger than
            // the one-second bucket pass instead of waiting forever.
            let wait = -bucket.tokens / bucket.bytes_per_second;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            bucket.tokens = 0.0;
            bucket.refilled = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cap_spreads_bytes_over_time() {
        let limiter = RateLimiter::new(Some(1000));
        let start = Instant::now();
        // The first second's worth passes at once, then 3000 more bytes need 3 s.
        for _ in 0..4 {
            limiter.acquire(1000).await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
        let unlimited = RateLimiter::new(None);
        let start = Instant::now();
        unlimited.acquire(u64::MAX).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
