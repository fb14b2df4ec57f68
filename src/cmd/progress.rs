//! Terminal progress for `barnraise up`: a bar for the run's rounds and one
//! line per node on a terminal; plain log lines otherwise (pipes, CI, --json).

use barnraise_coordinator::summary::CoordinatorEvent;
use barnraise_node::NodeEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

pub struct RunProgress {
    multi: MultiProgress,
    rounds: ProgressBar,
    nodes: Mutex<HashMap<u32, ProgressBar>>,
    inner_steps: u64,
    interactive: bool,
    enabled: bool,
}

impl RunProgress {
    pub fn new(rounds: u64, _nodes: u64, inner_steps: u64, enabled: bool) -> RunProgress {
        let interactive = enabled && std::io::stderr().is_terminal();
        let target = if interactive {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let bar = multi.add(ProgressBar::new(rounds));
        bar.set_style(
            ProgressStyle::with_template("rounds {bar:30.cyan/blue} {pos}/{len}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message("waiting for nodes to join");
        RunProgress {
            multi,
            rounds: bar,
            nodes: Mutex::new(HashMap::new()),
            inner_steps,
            interactive,
            enabled,
        }
    }

    fn say(&self, line: String) {
        if !self.enabled {
            return;
        }
        if self.interactive {
            self.multi.suspend(|| eprintln!("{line}"));
        } else {
            eprintln!("{line}");
        }
    }

    pub fn coordinator(&self, event: &CoordinatorEvent) {
        match event {
            CoordinatorEvent::NodeJoined { node } => {
                self.say(format!("node {} joined", node.short()))
            }
            CoordinatorEvent::RoundOpened { round, nodes } => {
                self.rounds
                    .set_message(format!("round {round} training on {nodes} nodes"));
                if !self.interactive {
                    self.say(format!("round {round} opened with {nodes} nodes"));
                }
            }
            CoordinatorEvent::RoundClosed {
                round,
                accepted,
                rejected,
                missing,
                mean_loss,
                eval_loss,
                params_hash,
            } => {
                self.rounds.inc(1);
                let loss =
                    |v: &Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
                // Every round but the last is evaluated after its manifest
                // is out (RoundEvaluated, below).
                let heldout = eval_loss
                    .map(|x| format!(", held-out loss {x:.3}"))
                    .unwrap_or_default();
                let mut line = format!(
                    "round {round} closed: {accepted} accepted, {} rejected, {missing} missing; train loss {}{heldout}; θ {}",
                    rejected.len(),
                    loss(mean_loss),
                    params_hash.short()
                );
                for r in rejected {
                    line.push_str(&format!(
                        "\n    rejected {}: {}",
                        r.node.short(),
                        r.reason.code()
                    ));
                }
                self.say(line);
            }
            CoordinatorEvent::RoundEvaluated { round, eval_loss } => {
                self.say(format!("round {round} held-out loss {eval_loss:.3}"))
            }
            CoordinatorEvent::RunFinished => self.rounds.set_message("finished"),
        }
    }

    pub fn node(&self, index: u32, event: &NodeEvent) {
        if !self.interactive {
            // Per-step progress would flood a log; the coordinator's round lines say enough.
            return;
        }
        let Ok(mut nodes) = self.nodes.lock() else {
            return;
        };
        let bar = nodes.entry(index).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(self.inner_steps));
            bar.set_style(
                ProgressStyle::with_template(
                    "  node {prefix} {bar:20.green/white} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(index.to_string());
            bar
        });
        match event {
            NodeEvent::TrainingProgress {
                round, step, loss, ..
            } => {
                bar.set_position(u64::from(*step));
                bar.set_message(format!("round {round} loss {loss:.3}"));
            }
            NodeEvent::Committed { round, bytes, .. } => {
                bar.set_message(format!("round {round} committed {bytes} B"));
            }
            NodeEvent::RoundApplied { round, matched, .. } => {
                bar.set_position(0);
                let verdict = if *matched {
                    "θ matches manifest"
                } else {
                    "θ MISMATCH, resyncing"
                };
                bar.set_message(format!("round {round} applied, {verdict}"));
            }
            _ => {}
        }
    }

    pub fn finish(&self) {
        self.rounds.finish();
        if let Ok(nodes) = self.nodes.lock() {
            for bar in nodes.values() {
                bar.finish_and_clear();
            }
        }
    }
}
