//! Hostile nodes on purpose, for `barnraise bench attacks` and the attack
//! tests (docs/security.md, "The attack suite"). A node started with an
//! [`Adversary`] (see [`crate::daemon::run_node_with`]) trains honestly, then
//! hands the adversary its Δ, its encoded payload and its signed commit, and
//! sends whatever comes back. Nothing here is reachable from a config file
//! or the CLI of a node: only code that embeds nodes can make one hostile.
//!
//! The attacks that need to know other updates (ALIE, IPM, a scaled copy)
//! get them from a [`Board`] shared by every node of one in-process run:
//! colluders post their honest Δ there, which is what three cooperating
//! attackers can always do; the copier reads an honest node's Δ, which a
//! real copier gets by fetching a committed update from the mesh.

use barnraise_protocol::Hash;
use barnraise_protocol::codec::HEADER_LEN;
use barnraise_protocol::messages::Commit;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What an adversary may change about a node's round. Every method has an
/// honest default.
pub trait Adversary: Send + Sync {
    /// This round's honest Δ, before encoding; may be replaced. Runs on a
    /// blocking thread, so it may wait for colluders.
    fn corrupt_delta(&self, _round: u64, _delta: &mut Vec<f32>) {}
    /// The encoded payload; its bytes may be changed (the commit names
    /// whatever results).
    fn corrupt_payload(&self, _round: u64, _payload: &mut Vec<u8>) {}
    /// Extra commits to sign and send after the real one.
    fn spam(&self, _round: u64, _commit: &Commit) -> Vec<Commit> {
        Vec::new()
    }
    /// The round's commit was answered and its update announced.
    fn committed(&self, _round: u64) {}
}

/// The attack suite of issue #13, one name per attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attack {
    /// Δ negated.
    SignFlip,
    /// Δ × 1000.
    Scale1000,
    /// A NaN written into the payload's first value.
    Nan,
    /// Gaussian noise with the norm of the attacker's honest Δ.
    Noise,
    /// "A little is enough" (Baruch et al. 2019): the colluders' mean minus
    /// z standard deviations per coordinate, z chosen so the result still
    /// looks like a member of the crowd.
    Alie,
    /// Inner product manipulation (Xie et al. 2020): −ε × the colluders' mean.
    Ipm,
    /// An honest node's Δ of this round, × 1.02.
    Copy,
    /// The attacker's own Δ of the round before, sent again.
    Replay,
    /// Zero updates for the first half of the run, then noise.
    ZeroThenNoise,
    /// Four declared workers, one trained, four workers' tokens claimed (and
    /// a join declaring 64 workers, which the harness sends).
    Inflate,
    /// 1,000 refused commits per attacker per round.
    CommitSpam,
    /// Garbage joins from fresh identities (sent by the harness; the
    /// attacker nodes themselves train honestly).
    JoinFlood,
}

impl Attack {
    pub const ALL: [Attack; 12] = [
        Attack::SignFlip,
        Attack::Scale1000,
        Attack::Nan,
        Attack::Noise,
        Attack::Alie,
        Attack::Ipm,
        Attack::Copy,
        Attack::Replay,
        Attack::ZeroThenNoise,
        Attack::Inflate,
        Attack::CommitSpam,
        Attack::JoinFlood,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::SignFlip => "sign-flip",
            Attack::Scale1000 => "scale-1000",
            Attack::Nan => "nan",
            Attack::Noise => "noise",
            Attack::Alie => "alie",
            Attack::Ipm => "ipm",
            Attack::Copy => "copy-1.02",
            Attack::Replay => "stale-replay",
            Attack::ZeroThenNoise => "zero-then-noise",
            Attack::Inflate => "token-inflation",
            Attack::CommitSpam => "commit-spam",
            Attack::JoinFlood => "join-flood",
        }
    }

    /// Whether the attack is in the updates themselves (as opposed to the
    /// service: spam, floods, inflated claims).
    pub fn poisons_updates(self) -> bool {
        !matches!(
            self,
            Attack::Inflate | Attack::CommitSpam | Attack::JoinFlood
        )
    }
}

impl std::fmt::Display for Attack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Attack {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Attack::ALL
            .into_iter()
            .find(|a| a.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = Attack::ALL.iter().map(|a| a.name()).collect();
                format!("unknown attack `{s}`: expected one of {}", names.join(", "))
            })
    }
}

/// Refused commits one spamming attacker sends per round.
pub const SPAM_COMMITS: usize = 1_000;
/// How long a colluder waits for the others' Δ before acting on what it has.
pub const COLLUDE_WAIT: Duration = Duration::from_secs(300);

/// The Δs posted in one in-process run, by round: `(node index, attacker?, Δ)`.
#[derive(Default)]
pub struct Board {
    posted: Mutex<BTreeMap<u64, Vec<Post>>>,
    changed: Condvar,
}

/// One node's Δ of one round.
#[derive(Clone)]
struct Post {
    index: usize,
    attacker: bool,
    delta: Arc<Vec<f32>>,
    /// Its commit was answered and the update announced: a copier can
    /// fetch it from then on, not before.
    committed: bool,
}

impl Board {
    pub fn new() -> Arc<Board> {
        Arc::new(Board::default())
    }

    fn post(&self, round: u64, index: usize, attacker: bool, delta: Arc<Vec<f32>>) {
        let mut posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        // Two rounds are enough for a replay; older ones are dropped.
        posted.retain(|&r, _| r + 2 > round);
        posted.entry(round).or_default().push(Post {
            index,
            attacker,
            delta,
            committed: false,
        });
        self.changed.notify_all();
    }

    fn mark_committed(&self, round: u64, index: usize) {
        let mut posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(post) = posted
            .get_mut(&round)
            .and_then(|posts| posts.iter_mut().find(|p| p.index == index))
        {
            post.committed = true;
        }
        self.changed.notify_all();
    }

    /// Waits until `enough` holds for this round's posts, or `COLLUDE_WAIT`
    /// passes, and returns what was posted.
    fn wait_for(&self, round: u64, enough: impl Fn(&[Post]) -> bool) -> Vec<Post> {
        let until = Instant::now() + COLLUDE_WAIT;
        let mut posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = posted.get(&round).cloned().unwrap_or_default();
            let left = until.saturating_duration_since(Instant::now());
            if enough(&now) || left.is_zero() {
                return now;
            }
            posted = self
                .changed
                .wait_timeout(posted, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn own(&self, round: u64, index: usize) -> Option<Arc<Vec<f32>>> {
        let posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        posted
            .get(&round)?
            .iter()
            .find(|p| p.index == index)
            .map(|p| p.delta.clone())
    }
}

/// One node of an attack run: honest ones only post their Δ; attackers
/// post their honest Δ and then attack.
pub struct Player {
    pub board: Arc<Board>,
    pub index: usize,
    /// The attack, for an attacker.
    pub attack: Option<Attack>,
    /// Nodes in the run, and how many of them collude (ALIE and IPM wait
    /// for all colluders).
    pub nodes: usize,
    pub attackers: usize,
    /// The run's rounds (the zero-then-noise attacker switches half-way).
    pub rounds: u64,
}

impl Adversary for Player {
    fn corrupt_delta(&self, round: u64, delta: &mut Vec<f32>) {
        let honest = Arc::new(delta.clone());
        // The replay needs last round's Δ before this round's is posted.
        let previous = self.board.own(round.wrapping_sub(1), self.index);
        self.board
            .post(round, self.index, self.attack.is_some(), honest.clone());
        let Some(attack) = self.attack else {
            return;
        };
        let seed = round.wrapping_mul(1_000_003) ^ self.index as u64;
        match attack {
            Attack::SignFlip => delta.iter_mut().for_each(|d| *d = -*d),
            Attack::Scale1000 => delta.iter_mut().for_each(|d| *d *= 1000.0),
            Attack::Noise => *delta = noise_like(delta, seed),
            Attack::ZeroThenNoise if round < self.rounds.div_ceil(2) => delta.fill(0.0),
            Attack::ZeroThenNoise => *delta = noise_like(delta, seed),
            Attack::Alie | Attack::Ipm => {
                let colluders = self.board.wait_for(round, |posted| {
                    posted.iter().filter(|p| p.attacker).count() >= self.attackers
                });
                let ours: Vec<&[f32]> = colluders
                    .iter()
                    .filter(|p| p.attacker)
                    .map(|p| p.delta.as_slice())
                    .collect();
                *delta = if attack == Attack::Alie {
                    alie(&ours, alie_z(self.nodes, self.attackers))
                } else {
                    ipm(&ours, IPM_EPSILON)
                };
            }
            Attack::Copy => {
                // Only an update already committed can be fetched.
                let victim = |p: &&Post| !p.attacker && p.committed;
                let posted = self
                    .board
                    .wait_for(round, |posted| posted.iter().any(|p| victim(&p)));
                if let Some(post) = posted.iter().find(victim) {
                    *delta = post.delta.iter().map(|v| v * 1.02).collect();
                }
            }
            Attack::Replay => {
                if let Some(previous) = previous {
                    *delta = previous.as_ref().clone();
                }
            }
            Attack::Nan | Attack::Inflate | Attack::CommitSpam | Attack::JoinFlood => {}
        }
    }

    fn committed(&self, round: u64) {
        self.board.mark_committed(round, self.index);
    }

    fn corrupt_payload(&self, _round: u64, payload: &mut Vec<u8>) {
        if self.attack == Some(Attack::Nan)
            && let Some(first) = payload.get_mut(HEADER_LEN..HEADER_LEN + 4)
        {
            // fp32's first value, int8's first scale, top-k's first range:
            // a float in every codec.
            first.copy_from_slice(&f32::NAN.to_le_bytes());
        }
    }

    fn spam(&self, round: u64, commit: &Commit) -> Vec<Commit> {
        if self.attack != Some(Attack::CommitSpam) {
            return Vec::new();
        }
        (0..SPAM_COMMITS)
            .map(|i| {
                let mut spam = commit.clone();
                // Half claim this round again with other payloads, half
                // claim rounds that are not open.
                if i % 2 == 0 {
                    spam.update_hash = Hash::of(format!("spam {round} {i}").as_bytes());
                } else {
                    spam.round = round + 1 + i as u64;
                }
                spam
            })
            .collect()
    }
}

/// IPM's ε: small enough to look like a weak honest update, large enough to
/// point the step backwards.
pub const IPM_EPSILON: f32 = 0.5;

/// ALIE's z for n nodes of which f attack: the largest shift that still
/// leaves the attackers inside the majority, z = Φ⁻¹((n − s) / n) with
/// s = ⌊n/2 + 1⌋ − f.
pub fn alie_z(nodes: usize, attackers: usize) -> f32 {
    let n = nodes.max(1) as f64;
    let s = ((nodes / 2 + 1) as f64 - attackers as f64).max(0.0);
    let p = ((n - s) / n).clamp(0.5, 0.999);
    inverse_normal_cdf(p) as f32
}

/// Per coordinate, mean − z · standard deviation of `updates`.
pub fn alie(updates: &[&[f32]], z: f32) -> Vec<f32> {
    let Some(first) = updates.first() else {
        return Vec::new();
    };
    let n = updates.len() as f32;
    (0..first.len())
        .map(|i| {
            let mean = updates.iter().map(|u| u[i]).sum::<f32>() / n;
            let var = updates.iter().map(|u| (u[i] - mean).powi(2)).sum::<f32>() / n;
            mean - z * var.sqrt()
        })
        .collect()
}

/// −ε × the mean of `updates`.
pub fn ipm(updates: &[&[f32]], epsilon: f32) -> Vec<f32> {
    let Some(first) = updates.first() else {
        return Vec::new();
    };
    let n = updates.len() as f32;
    (0..first.len())
        .map(|i| -epsilon * updates.iter().map(|u| u[i]).sum::<f32>() / n)
        .collect()
}

/// Gaussian noise, seeded, with the L2 norm of `like`.
pub fn noise_like(like: &[f32], seed: u64) -> Vec<f32> {
    let mut rng = barnraise_trainer::rng::Rng::new(seed);
    let mut noise: Vec<f32> = (0..like.len()).map(|_| rng.normal() as f32).collect();
    let (target, have) = (l2(like), l2(&noise));
    if have > 0.0 {
        let scale = (target / have) as f32;
        noise.iter_mut().for_each(|v| *v *= scale);
    }
    noise
}

fn l2(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt()
}

/// Φ⁻¹(p) for p in (0, 1), by bisection on the error function's series:
/// accurate to 1e-6, which is all ALIE's z needs.
fn inverse_normal_cdf(p: f64) -> f64 {
    let cdf = |x: f64| 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let (mut lo, mut hi) = (-8.0f64, 8.0f64);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// erf(x), Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    if x < 0.0 { -y } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_names_round_trip_and_unknown_ones_are_refused() {
        for attack in Attack::ALL {
            assert_eq!(attack.name().parse::<Attack>().unwrap(), attack);
        }
        let error = "gentle".parse::<Attack>().unwrap_err();
        assert!(
            error.contains("sign-flip") && error.contains("join-flood"),
            "{error}"
        );
    }

    #[test]
    fn alie_z_matches_the_paper_for_ten_nodes_three_attackers() {
        // n = 10, f = 3: s = 3, z = Φ⁻¹(0.7) ≈ 0.5244.
        assert!((alie_z(10, 3) - 0.5244).abs() < 1e-3, "{}", alie_z(10, 3));
        assert!((inverse_normal_cdf(0.975) - 1.95996).abs() < 1e-4);
    }

    #[test]
    fn alie_and_ipm_are_what_they_claim() {
        let a = [1.0f32, 2.0, 0.0];
        let b = [3.0f32, 2.0, 0.0];
        let shifted = alie(&[&a, &b], 1.0);
        assert_eq!(shifted, vec![1.0, 2.0, 0.0]);
        assert_eq!(ipm(&[&a, &b], 0.5), vec![-1.0, -1.0, 0.0]);
    }

    #[test]
    fn noise_has_the_norm_it_mimics_and_no_direction() {
        let like: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.01).sin()).collect();
        let noise = noise_like(&like, 3);
        assert!((l2(&noise) / l2(&like) - 1.0).abs() < 1e-4);
        let dot: f64 = noise
            .iter()
            .zip(&like)
            .map(|(&x, &y)| f64::from(x) * f64::from(y))
            .sum();
        assert!((dot / (l2(&noise) * l2(&like))).abs() < 0.1);
        assert_ne!(noise, noise_like(&like, 4), "seeded differently");
    }

    #[test]
    fn colluders_see_each_other_and_the_copier_copies_an_honest_node() {
        let board = Board::new();
        let player = |index, attack| Player {
            board: board.clone(),
            index,
            attack,
            nodes: 5,
            attackers: 2,
            rounds: 4,
        };
        let honest = player(0, None);
        let mut d0 = vec![1.0f32, 1.0];
        honest.corrupt_delta(0, &mut d0);
        assert_eq!(d0, vec![1.0, 1.0], "honest nodes keep their Δ");
        // The copier waits for the honest commit, as a real one must.
        let late = {
            let honest = player(0, None);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                honest.committed(0);
            })
        };
        let copier = player(1, Some(Attack::Copy));
        let mut d1 = vec![5.0f32, 5.0];
        copier.corrupt_delta(0, &mut d1);
        assert_eq!(d1, vec![1.02, 1.02]);
        late.join().unwrap();
        // IPM waits for both colluders' honest Δ (1's was posted above).
        let ipm_player = player(2, Some(Attack::Ipm));
        let mut d2 = vec![3.0f32, 1.0];
        ipm_player.corrupt_delta(0, &mut d2);
        assert_eq!(d2, vec![-2.0, -1.5], "−½ × mean of (5,5) and (3,1)");
        // The replayer sends round 0's Δ in round 1.
        let replayer = player(3, Some(Attack::Replay));
        let mut r0 = vec![7.0f32];
        replayer.corrupt_delta(0, &mut r0);
        assert_eq!(r0, vec![7.0], "nothing to replay in round 0");
        let mut r1 = vec![8.0f32];
        replayer.corrupt_delta(1, &mut r1);
        assert_eq!(r1, vec![7.0]);
    }

    #[test]
    fn nan_lands_in_the_payload_and_spam_is_a_thousand_commits() {
        let nan = Player {
            board: Board::new(),
            index: 0,
            attack: Some(Attack::Nan),
            nodes: 2,
            attackers: 1,
            rounds: 2,
        };
        let mut payload = vec![0u8; HEADER_LEN + 8];
        nan.corrupt_payload(0, &mut payload);
        let first = f32::from_le_bytes(payload[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap());
        assert!(first.is_nan());
        let commit = Commit {
            run_id: "r".into(),
            round: 2,
            base_params_hash: Hash::of(b"t"),
            update_hash: Hash::of(b"u"),
            update_bytes: 1,
            tokens: 1,
            losses: vec![],
            compute_ms: 1,
            workers: 1,
            shares: vec![],
        };
        assert!(nan.spam(2, &commit).is_empty());
        let spammer = Player {
            attack: Some(Attack::CommitSpam),
            ..nan
        };
        let spam = spammer.spam(2, &commit);
        assert_eq!(spam.len(), SPAM_COMMITS);
        assert!(spam.iter().all(|c| *c != commit));
    }
}
