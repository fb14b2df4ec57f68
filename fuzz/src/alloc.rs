//! A counting global allocator, so each target can assert how much memory a
//! decoder may take for an input of a given size (docs/security.md).
//!
//! It counts the bytes Rust code has live and the highest that count
//! reached; [`peak_of`] resets the high-water mark to the live count, runs a
//! closure and reports how far above its start the count went. A growing
//! `realloc` is charged as old + new (both exist while the bytes are
//! copied), so the figure is never below the real peak. libFuzzer's own
//! C++ allocations go through `malloc` directly and are not counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

fn shrank(by: usize) {
    LIVE.fetch_sub(by, Relaxed);
}

// SAFETY: every call is passed straight to the system allocator with the
// caller's arguments; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, with a valid new size from the caller.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            grew(new_size);
            shrank(layout.size());
        }
        new
    }
}

/// Runs `f`; returns what it returned and the most bytes it had allocated
/// at once beyond what was live when it started (including what it returns).
pub fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let result = f();
    (result, PEAK.load(Relaxed).saturating_sub(base))
}

/// Panics (a finding, for libFuzzer) when `peak` is over `bound`.
#[track_caller]
pub fn assert_within(what: &str, input_len: usize, peak: usize, bound: usize) {
    assert!(
        peak <= bound,
        "{what}: a {input_len}-byte input took {peak} bytes at peak, over its bound of {bound}"
    );
}
