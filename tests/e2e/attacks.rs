//! The attack suite in small (docs/security.md, "The attack suite"): one
//! test per attack, each a real coordinator and five real nodes, two of
//! them hostile, for two rounds. `barnraise bench attacks` runs the full
//! size with loss gaps against a clean run.

use super::run;
use barnraise::attacks::{Outcome, SuiteConfig, run_one};
use barnraise_node::redteam::Attack;

fn small(dir: &std::path::Path) -> SuiteConfig {
    SuiteConfig {
        nodes: 5,
        attackers: 2,
        rounds: 2,
        inner_steps: 8,
        flood_peers: 4,
        flood_joins: 50,
        ..SuiteConfig::standard(dir.to_path_buf())
    }
}

fn attacked(attack: Attack, tweak: impl FnOnce(&mut SuiteConfig)) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small(dir.path());
    tweak(&mut config);
    let mut outcome = None;
    run(async {
        outcome = Some(run_one(&config, Some(attack), None).await.unwrap());
    });
    let outcome = outcome.unwrap();
    assert_eq!(outcome.rounds_closed, 2, "{outcome:#?}");
    assert!(outcome.final_loss.is_finite(), "{outcome:#?}");
    outcome
}

/// Every poisoned update was rejected, for the reason given.
fn caught_for(attack: Attack, reason: &str) {
    let outcome = attacked(attack, |_| {});
    assert!(outcome.caught, "{outcome:#?}");
    assert_eq!(outcome.attack.as_deref(), Some(attack.name()));
    assert!(
        outcome.reasons.iter().any(|r| r == reason),
        "expected `{reason}`: {outcome:#?}"
    );
}

#[test]
fn attack_sign_flip_is_caught() {
    caught_for(Attack::SignFlip, "sign-flipped");
}

#[test]
fn attack_scale_1000_is_caught() {
    caught_for(Attack::Scale1000, "norm-too-large");
}

#[test]
fn attack_nan_is_caught() {
    caught_for(Attack::Nan, "non-finite");
}

#[test]
fn attack_noise_of_matching_norm_is_caught_by_the_round_bar() {
    caught_for(Attack::Noise, "not-useful");
}

#[test]
fn attack_ipm_is_caught() {
    let outcome = attacked(Attack::Ipm, |_| {});
    assert!(outcome.caught, "{outcome:#?}");
}

#[test]
fn attack_copy_scaled_by_1_02_is_caught() {
    caught_for(Attack::Copy, "copycat");
}

#[test]
fn attack_stale_replay_is_caught() {
    caught_for(Attack::Replay, "replay");
}

#[test]
fn attack_zero_then_noise_is_caught() {
    let outcome = attacked(Attack::ZeroThenNoise, |_| {});
    assert!(outcome.caught, "{outcome:#?}");
    // Zeros are too small; the noise that follows is not useful.
    assert!(
        outcome.reasons.iter().any(|r| r == "norm-too-small"),
        "{outcome:#?}"
    );
    assert!(
        outcome.reasons.iter().any(|r| r == "not-useful"),
        "{outcome:#?}"
    );
}

#[test]
fn attack_alie_colluders_count_as_one_node() {
    // ALIE is built to look honest, and its update helps the model; what
    // stops it is that colluders send the same vector, so all but one are
    // copies. Its share of the mean is then one node's.
    let outcome = attacked(Attack::Alie, |_| {});
    assert_eq!(outcome.attacker_updates, 4, "{outcome:#?}");
    assert!(
        outcome.attacker_accepted <= 2,
        "one per round at most: {outcome:#?}"
    );
    assert!(
        outcome.reasons.iter().any(|r| r == "copycat"),
        "{outcome:#?}"
    );
}

#[test]
fn attack_token_inflation_is_refused_at_join_and_caught_by_spot_checks() {
    let outcome = attacked(Attack::Inflate, |c| {
        c.verify = Some(barnraise_coordinator::VerifyConfig {
            spot_check_fraction: 1.0,
            ..Default::default()
        });
    });
    assert!(outcome.caught, "{outcome:#?}");
    assert!(
        outcome
            .reasons
            .iter()
            .any(|r| r.contains("64 workers") && r.contains("at most 4")),
        "{outcome:#?}"
    );
    // Caught in round 0 and trained one worker on probation after: credited
    // less than claimed.
    assert!(
        outcome.attacker_credited_tokens < outcome.attacker_claimed_tokens,
        "{outcome:#?}"
    );
}

#[test]
fn attack_commit_spam_leaves_the_manifest_small_and_the_run_going() {
    let outcome = attacked(Attack::CommitSpam, |_| {});
    assert!(outcome.caught, "{outcome:#?}");
    // 4,000 refused commits; a handful of ledger rows and a small manifest.
    assert!(outcome.refusals_recorded <= 32, "{outcome:#?}");
    assert!(outcome.largest_manifest_bytes < 16 * 1024, "{outcome:#?}");
    assert!(
        outcome.refusals_unrecorded + outcome.rate_limited >= 1_000,
        "{outcome:#?}"
    );
}

#[test]
fn attack_join_flood_is_counted_not_written() {
    let outcome = attacked(Attack::JoinFlood, |_| {});
    assert!(outcome.caught, "{outcome:#?}");
    assert_eq!(outcome.refusals_recorded, 0, "{outcome:#?}");
    assert!(
        outcome
            .reasons
            .iter()
            .any(|r| r == "200 garbage joins sent"),
        "{outcome:#?}"
    );
}
