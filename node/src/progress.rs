//! What an operator sees: progress bars for downloads and training when
//! stderr is a terminal, nothing extra otherwise (the logs already say it).

use crate::daemon::NodeEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// Shows `events` as bars until the channel closes. With `bars` false it
/// only drains the channel.
pub fn spawn_display(
    mut events: mpsc::Receiver<NodeEvent>,
    bars: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !bars {
            while events.recv().await.is_some() {}
            return;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let bytes_style = ProgressStyle::with_template(
            "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let steps_style = ProgressStyle::with_template(
            "{msg:>24} [{bar:30}] {pos}/{len} steps, {elapsed} ({eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let mut downloads: HashMap<String, ProgressBar> = HashMap::new();
        let mut training: Option<ProgressBar> = None;
        while let Some(event) = events.recv().await {
            match event {
                NodeEvent::Downloading { what, done, total } => {
                    let bar = downloads.entry(what.clone()).or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(total));
                        bar.set_style(bytes_style.clone());
                        bar.set_message(format!("fetching {what}"));
                        bar
                    });
                    bar.set_length(total);
                    bar.set_position(done);
                    if total > 0 && done >= total {
                        bar.finish_and_clear();
                        downloads.remove(&what);
                    }
                }
                NodeEvent::TrainingStarted { round, steps } => {
                    let bar = multi.add(ProgressBar::new(u64::from(steps)));
                    bar.set_style(steps_style.clone());
                    bar.set_message(format!("round {round}: training"));
                    bar.enable_steady_tick(Duration::from_millis(500));
                    training = Some(bar);
                }
                NodeEvent::TrainingProgress { round, step, loss } => {
                    if let Some(bar) = &training {
                        bar.set_position(u64::from(step));
                        bar.set_message(format!("round {round}: loss {loss:.3}"));
                    }
                }
                NodeEvent::Committed {
                    round,
                    bytes,
                    tokens,
                    ..
                } => {
                    if let Some(bar) = training.take() {
                        bar.finish_and_clear();
                    }
                    let _ = multi.println(format!(
                        "round {round}: trained on {tokens} tokens, sent a {bytes}-byte update"
                    ));
                }
                NodeEvent::RoundApplied {
                    round,
                    params_hash,
                    matched,
                } => {
                    let verdict = if matched {
                        "matches the manifest"
                    } else {
                        "does NOT match the manifest; resyncing"
                    };
                    let _ = multi.println(format!(
                        "round {round} applied: params {} {verdict}",
                        params_hash.short()
                    ));
                }
                NodeEvent::Joined {
                    node,
                    run_id,
                    round,
                } => {
                    let _ = multi.println(format!(
                        "joined run {run_id} at round {round} as {}",
                        node.short()
                    ));
                }
                NodeEvent::Warning { message } => {
                    let _ = multi.println(format!("warning: {message}"));
                }
                _ => {}
            }
        }
        for (_, bar) in downloads {
            bar.finish_and_clear();
        }
    })
}
