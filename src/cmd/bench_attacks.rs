//! `barnraise bench attacks`: the attack suite (docs/security.md). A clean
//! run, then one run per attack with the same nodes and seed, each a real
//! coordinator and real nodes in this process over loopback.

use barnraise::attacks::{self, SuiteConfig};
use barnraise_node::redteam::Attack;
use clap::Args as ClapArgs;
use std::path::PathBuf;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Attacks to run, e.g. `--attack alie --attack nan` [default: all 12:
    /// sign-flip, scale-1000, nan, noise, alie, ipm, copy-1.02,
    /// stale-replay, zero-then-noise, token-inflation, commit-spam,
    /// join-flood].
    #[arg(long = "attack")]
    pub attacks: Vec<String>,
    /// Nodes per run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=32))]
    pub nodes: u32,
    /// How many of them attack.
    #[arg(long, default_value_t = 3)]
    pub attackers: u32,
    /// Outer rounds per run.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub rounds: u64,
    /// Inner steps per round.
    #[arg(long, default_value_t = 12)]
    pub inner_steps: u32,
    /// Update codec of every run.
    #[arg(long, default_value = "int8")]
    pub codec: String,
    /// Aggregation rule of every run: mean, trimmed-mean:F, centered-clip:TAU.
    #[arg(long, default_value = "trimmed-mean:0.1")]
    pub aggregation: String,
    /// Seeds the nodes' keys (and so their shards).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Runs the whole suite for this many seeds (seed, seed+1, ...) and
    /// compares mean losses: one seed's loss moves by a few percent with
    /// the shards the honest nodes happen to draw.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10))]
    pub seeds: u64,
    /// Where the runs' ledgers and blobs go [default: a temporary folder,
    /// removed afterwards].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let attacks = if args.attacks.is_empty() {
        Attack::ALL.to_vec()
    } else {
        args.attacks
            .iter()
            .map(|a| a.parse::<Attack>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    if args.attackers == 0 || args.attackers >= args.nodes {
        anyhow::bail!(
            "--attackers must be between 1 and --nodes − 1 (got {} of {})",
            args.attackers,
            args.nodes
        );
    }
    let temp;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("barnraise-attacks-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let config = SuiteConfig {
        nodes: args.nodes as usize,
        attackers: args.attackers as usize,
        rounds: args.rounds,
        inner_steps: args.inner_steps,
        codec: args.codec.clone(),
        aggregation: args.aggregation.clone(),
        seed: args.seed,
        ..SuiteConfig::standard(data_dir)
    };
    if !args.json {
        eprintln!(
            "barnraise bench attacks: {} nodes ({} attacking), {} rounds of {} steps on `{}`, codec {}, rule {}; {} runs",
            config.nodes,
            config.attackers,
            config.rounds,
            config.inner_steps,
            config.model,
            config.codec,
            config.aggregation,
            attacks.len() + 1
        );
    }
    let json = args.json;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut per_seed = Vec::new();
    for seed in args.seed..args.seed + args.seeds {
        let config = SuiteConfig {
            seed,
            data_dir: config.data_dir.join(format!("seed-{seed}")),
            ..config.clone()
        };
        if !json && args.seeds > 1 {
            eprintln!(" seed {seed}");
        }
        per_seed.push(runtime.block_on(attacks::run_suite(&config, &attacks, |o| {
            if !json {
                eprintln!(
                    "  {:<16} loss {:.4}{}  ({:.0} s)",
                    o.attack.as_deref().unwrap_or("(clean)"),
                    o.final_loss,
                    if o.attack.is_some() {
                        format!(", caught {}, neutralised {}", o.caught, o.neutralised)
                    } else {
                        String::new()
                    },
                    o.wall_seconds
                );
            }
        }))?);
    }
    let outcomes = attacks::combine(&per_seed);
    let clean_loss = outcomes.first().map(|o| o.final_loss);
    let held = outcomes
        .iter()
        .filter(|o| o.attack.is_some())
        .all(|o| o.caught || o.neutralised);
    if json {
        let report = serde_json::json!({
            "nodes": config.nodes,
            "attackers": config.attackers,
            "rounds": config.rounds,
            "inner_steps": config.inner_steps,
            "model": config.model,
            "codec": config.codec,
            "aggregation": config.aggregation,
            "seeds": (args.seed..args.seed + args.seeds).collect::<Vec<_>>(),
            "clean_loss": clean_loss,
            "all_caught_or_neutralised": held,
            "attacks": outcomes.iter().filter(|o| o.attack.is_some()).collect::<Vec<_>>(),
            "runs": per_seed,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", attacks::table(&outcomes));
        println!("{:?}", attacks::tally(&outcomes));
    }
    if !held {
        anyhow::bail!("at least one attack was neither caught nor neutralised");
    }
    Ok(())
}
