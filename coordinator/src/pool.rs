//! Independent jobs of a round close, on a few threads.
//!
//! The close's usefulness probes and spot-check replays do not depend on
//! each other: each is a forward pass or a replayed round on its own copy
//! of the model. Run one after another they kept every other core idle
//! while all nodes waited for the manifest (docs/architecture.md, "Closing
//! a round"). [`run`] hands them to `states.len()` scoped threads, each
//! with its own per-thread state (a model), and gives the results back in
//! job order, so what the close records never depends on which thread ran
//! what or in which order they finished.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many threads a close may use: `configured`, or the machine's
/// parallelism when it is 0.
pub fn threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `job(state, index, item)` for every item, each thread with one of
/// `states` (at most one thread per item, at least one), and returns the
/// results in the order of `items`. Threads take the next job as they
/// finish one, so put the longest jobs first. With one state (or one item)
/// everything runs on the calling thread.
pub fn run<S, T, R, F>(states: &mut [S], items: &[T], job: F) -> Vec<R>
where
    S: Send,
    T: Sync,
    R: Send,
    F: Fn(&mut S, usize, &T) -> R + Sync,
{
    let threads = states.len().min(items.len());
    if threads <= 1 {
        let Some(state) = states.first_mut() else {
            return Vec::new();
        };
        return items
            .iter()
            .enumerate()
            .map(|(i, item)| job(state, i, item))
            .collect();
    }
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for state in states.iter_mut().take(threads) {
            let (next, results, job) = (&next, &results, &job);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let result = job(state, i, item);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    // Every index below items.len() was taken by exactly one thread and
    // written before the scope joined; a poisoned slot means that job
    // panicked, and the scope has already propagated the panic.
    results
        .into_iter()
        .filter_map(|slot| slot.into_inner().ok().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::thread::ThreadId;

    #[test]
    fn results_come_back_in_job_order_whatever_the_threads() {
        let items: Vec<u64> = (0..50).collect();
        for threads in [1, 2, 3, 8, 64] {
            let mut states: Vec<u64> = vec![0; threads];
            // Uneven jobs, so threads finish out of order.
            let out = run(&mut states, &items, |seen, i, &x| {
                *seen += 1;
                if x % 7 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(3));
                }
                (i, x * x)
            });
            let expected: Vec<(usize, u64)> = items.iter().map(|&x| (x as usize, x * x)).collect();
            assert_eq!(out, expected, "{threads} threads");
            // Every job ran once, on some thread's state.
            assert_eq!(states.iter().sum::<u64>(), items.len() as u64);
        }
    }

    #[test]
    fn jobs_run_on_several_threads_at_once() {
        // Two jobs that each wait for the other to start: they only finish
        // if they run at the same time.
        let started = AtomicUsize::new(0);
        let items = [0, 1];
        let mut states = vec![(); 2];
        let ids: Vec<ThreadId> = run(&mut states, &items, |_, _, _| {
            started.fetch_add(1, Ordering::SeqCst);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while started.load(Ordering::SeqCst) < 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the other job never started"
                );
                std::thread::yield_now();
            }
            std::thread::current().id()
        });
        let distinct: HashSet<ThreadId> = ids.into_iter().collect();
        assert_eq!(distinct.len(), 2);
    }

    #[test]
    fn no_items_or_no_states_run_nothing() {
        let mut none: Vec<()> = Vec::new();
        assert!(run(&mut none, &[1, 2], |_, _, &x: &i32| x).is_empty());
        let mut one = vec![()];
        assert!(run(&mut one, &[] as &[i32], |_, _, &x| x).is_empty());
        assert_eq!(threads(3), 3);
        assert!(threads(0) >= 1);
    }
}
