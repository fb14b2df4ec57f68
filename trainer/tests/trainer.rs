//! Trainer integration tests: learning, determinism, the flat view, shards
//! and their bad inputs, checkpoints, and a small end-to-end bench run.

use barnraise_protocol::Hash;
use barnraise_protocol::codec::CodecConfig;
use barnraise_trainer::bench::{
    ArmKind, ArmSpec, DilocoBenchConfig, PARITY_PCT, run_arm, run_diloco,
};
use barnraise_trainer::checkpoint::{self, CheckpointError, CheckpointMeta};
use barnraise_trainer::data::manifest::{
    DatasetError, DatasetManifest, MANIFEST_FILE, ShardingConfig, build_dataset,
    collect_input_files, tokenize_files,
};
use barnraise_trainer::data::{
    SHARD_HEADER_BYTES, Shard, ShardError, corpus, encode_shard, shard_path, tokenize_bytes,
    write_shard, write_shard_named,
};
use barnraise_trainer::device::{self, DeviceSpec};
use barnraise_trainer::{InnerConfig, ModelConfig, TrainError, Trainer};
use candle_core::Device;
use proptest::prelude::*;
use std::path::Path;

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").expect("tiny preset exists")
}

fn corpus_tokens(seed: u64, bytes: usize) -> Vec<u16> {
    tokenize_bytes(corpus::generate(seed, bytes).as_bytes())
}

fn quick_inner(steps: usize, seed: u64) -> InnerConfig {
    InnerConfig {
        steps,
        batch_size: 4,
        seq_len: 32,
        warmup: 2,
        seed,
        ..InnerConfig::default()
    }
}

#[test]
fn tiny_model_learns_the_builtin_corpus() {
    let train = corpus_tokens(1, 200_000);
    let heldout = corpus_tokens(2, 50_000);
    let mut trainer = Trainer::new(&tiny(), Device::Cpu, 7).expect("trainer");
    let before = trainer.eval_loss(&heldout, 4, 99).expect("eval");
    // Uniform over 256 bytes is ln 256 = 5.55; a fresh model starts near it.
    assert!(before > 5.0, "initial loss {before}");
    let cfg = InnerConfig {
        steps: 200,
        batch_size: 8,
        seq_len: 64,
        warmup: 20,
        seed: 3,
        ..InnerConfig::default()
    };
    let report = trainer.train_inner(&train, &cfg).expect("train");
    assert_eq!(report.losses.len(), 200);
    assert_eq!(report.tokens, 200 * 8 * 64);
    let after = trainer.eval_loss(&heldout, 4, 99).expect("eval");
    eprintln!(
        "tiny: held-out loss {before:.3} -> {after:.3} after 200 steps ({:.1} s)",
        report.wall.as_secs_f64()
    );
    // Well below the start: the corpus has a small lexicon and grammar.
    assert!(after < 0.5 * before, "held-out loss {before} -> {after}");
    let first: f32 = report.losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = report.losses[190..].iter().sum::<f32>() / 10.0;
    assert!(last < 0.5 * first, "training loss {first} -> {last}");
}

#[test]
fn same_seed_gives_bit_identical_params_on_cpu() {
    let tokens = corpus_tokens(5, 20_000);
    let run = |init_seed: u64, data_seed: u64| -> Hash {
        let mut trainer = Trainer::new(&tiny(), Device::Cpu, init_seed).expect("trainer");
        let cfg = InnerConfig {
            accumulation: 2,
            ..quick_inner(6, data_seed)
        };
        trainer.train_inner(&tokens, &cfg).expect("train");
        // A second call continues the optimizer state, as a worker does.
        trainer
            .train_inner(
                &tokens,
                &InnerConfig {
                    start_step: 6,
                    ..cfg
                },
            )
            .expect("train");
        trainer.params_hash().expect("hash")
    };
    let a = run(1, 2);
    assert_eq!(a, run(1, 2), "same seeds, different params");
    assert_ne!(a, run(1, 3), "data seed has no effect");
    assert_ne!(a, run(4, 2), "init seed has no effect");
}

/// The one-pass CPU kernels (trainer/src/cpu_ops.rs) and the hand-written
/// backward they run under (trainer/src/model/backprop.rs) are the same
/// arithmetic as candle's primitives and autograd up to float rounding: a
/// round trained through each from the same θ, moments and batches ends at
/// nearly the same update and held-out loss.
#[test]
fn cpu_kernels_train_as_candles_primitives_do() {
    let tokens = corpus_tokens(3, 20_000);
    let heldout = corpus_tokens(4, 10_000);
    let round = |kernels: bool| {
        let mut t = Trainer::new(&tiny(), Device::Cpu, 5).expect("trainer");
        t.set_cpu_kernels(kernels);
        let before = t.flat_params().expect("params");
        t.train_inner(&tokens, &quick_inner(6, 3)).expect("train");
        let after = t.flat_params().expect("params");
        let delta: Vec<f32> = before.iter().zip(&after).map(|(b, a)| b - a).collect();
        (delta, t.eval_loss(&heldout, 2, 8).expect("eval"))
    };
    let ((kernel, kernel_loss), (plain, plain_loss)) = (round(true), round(false));
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff: Vec<f32> = kernel.iter().zip(&plain).map(|(a, b)| a - b).collect();
    let relative = norm(&diff) / norm(&plain);
    assert!(norm(&plain) > 0.0);
    assert!(relative < 1e-3, "updates differ by {relative} relative");
    assert!(
        (kernel_loss - plain_loss).abs() < 1e-4,
        "held-out {kernel_loss} against {plain_loss}"
    );
    eprintln!(
        "kernels against primitives: update {relative:e} relative, loss {kernel_loss} / {plain_loss}"
    );
}

/// A spot check replays one worker's round on another machine from θ_r and
/// the worker's optimizer state: restoring the state must reproduce the
/// round bit for bit, and a state of the wrong length or with a negative
/// second moment is refused, leaving the trainer as it was.
#[test]
fn a_round_replays_bit_for_bit_from_the_saved_optimizer_state() {
    let tokens = corpus_tokens(5, 20_000);
    let mut worker = Trainer::new(&tiny(), Device::Cpu, 1).expect("trainer");
    // Round 0 leaves moments behind; round 1 is what gets checked.
    worker
        .train_inner(&tokens, &quick_inner(4, 2))
        .expect("train");
    let theta = worker.flat_params().expect("params");
    let state = worker.optimizer_state().expect("state");
    assert_eq!(
        state.len(),
        Trainer::optimizer_state_len(tiny().params_count())
    );
    let round1 = InnerConfig {
        start_step: 4,
        ..quick_inner(4, 9)
    };
    worker.train_inner(&tokens, &round1).expect("train");
    let honest = worker.params_hash().expect("hash");

    let mut checker = Trainer::new(&tiny(), Device::Cpu, 77).expect("trainer");
    checker.set_flat_params(&theta).expect("theta");
    checker.set_optimizer_state(&state).expect("state");
    checker.train_inner(&tokens, &round1).expect("train");
    assert_eq!(
        checker.params_hash().expect("hash"),
        honest,
        "replay differs"
    );

    // Without the state (fresh moments) the round comes out different:
    // the state is what makes the replay exact.
    let mut fresh = Trainer::new(&tiny(), Device::Cpu, 77).expect("trainer");
    fresh.set_flat_params(&theta).expect("theta");
    fresh.train_inner(&tokens, &round1).expect("train");
    assert_ne!(fresh.params_hash().expect("hash"), honest);

    let before = checker.optimizer_state().expect("state");
    assert!(
        checker
            .set_optimizer_state(&state[..state.len() - 4])
            .is_err()
    );
    let mut negative = state.clone();
    let last = negative.len() - 4;
    negative[last..].copy_from_slice(&(-1.0f32).to_le_bytes());
    assert!(checker.set_optimizer_state(&negative).is_err());
    assert_eq!(
        checker.optimizer_state().expect("state"),
        before,
        "a refused state changed it"
    );
}

#[test]
fn flat_view_round_trips() {
    let cfg = tiny();
    let a = Trainer::new(&cfg, Device::Cpu, 1).expect("trainer");
    let mut b = Trainer::new(&cfg, Device::Cpu, 2).expect("trainer");
    let flat = a.flat_params().expect("flat");
    assert_eq!(flat.len(), cfg.params_count());
    assert_eq!(
        flat,
        cfg.init_flat(1),
        "trainer init differs from the config's seeded init"
    );
    assert_ne!(
        b.params_hash().expect("hash"),
        a.params_hash().expect("hash")
    );
    b.set_flat_params(&flat).expect("set");
    assert_eq!(b.flat_params().expect("flat"), flat);
    // Same params, same function.
    let heldout = corpus_tokens(3, 5_000);
    assert_eq!(
        a.eval_loss(&heldout, 1, 0).expect("eval"),
        b.eval_loss(&heldout, 1, 0).expect("eval")
    );
    // A changed value lands in the right place.
    let mut changed = flat.clone();
    changed[12_345] = 0.5;
    b.set_flat_params(&changed).expect("set");
    assert_eq!(b.flat_params().expect("flat"), changed);
    assert!(matches!(
        b.set_flat_params(&flat[1..]),
        Err(TrainError::ParamLength { .. })
    ));
}

#[test]
fn training_rejects_unusable_data() {
    let mut trainer = Trainer::new(&tiny(), Device::Cpu, 1).expect("trainer");
    let mut tokens = corpus_tokens(1, 1000);
    assert!(matches!(
        trainer.train_inner(&tokens[..10], &quick_inner(1, 0)),
        Err(TrainError::Data(_))
    ));
    tokens[500] = 4000;
    let err = trainer
        .train_inner(&tokens, &quick_inner(1, 0))
        .expect_err("out-of-vocabulary token accepted");
    assert!(err.to_string().contains("4000"), "{err}");
    let long = InnerConfig {
        seq_len: 1000,
        ..quick_inner(1, 0)
    };
    assert!(matches!(
        trainer.train_inner(&tokens, &long),
        Err(TrainError::Config(_))
    ));
}

#[test]
fn schedule_warms_up_then_decays() {
    let cfg = InnerConfig {
        lr: 1.0,
        min_lr: 0.1,
        warmup: 10,
        schedule_steps: 110,
        ..InnerConfig::default()
    };
    assert!((cfg.lr_at(0) - 0.1).abs() < 1e-12);
    assert!((cfg.lr_at(9) - 1.0).abs() < 1e-12);
    assert!((cfg.lr_at(60) - 0.55).abs() < 1e-9);
    assert!((cfg.lr_at(110) - 0.1).abs() < 1e-12);
    assert!((cfg.lr_at(500) - 0.1).abs() < 1e-12);
}

#[test]
fn shard_round_trip_and_content_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens: Vec<u16> = (0..5000u32).map(|i| (i * 7919 % 65536) as u16).collect();
    let (hash, path) = write_shard_named(dir.path(), &tokens).expect("write");
    assert_eq!(path, shard_path(dir.path(), &hash));
    let shard = Shard::read(&path).expect("read");
    assert_eq!(shard.tokens, tokens);
    assert_eq!(shard.hash, hash);
    let bytes = std::fs::read(&path).expect("bytes");
    assert_eq!(bytes.len(), SHARD_HEADER_BYTES + 2 * tokens.len());
    // llm.c header: magic, version, count as little-endian i32.
    assert_eq!(&bytes[0..4], &20240520i32.to_le_bytes());
    assert_eq!(&bytes[4..8], &1i32.to_le_bytes());
    assert_eq!(&bytes[8..12], &5000i32.to_le_bytes());
    // An arbitrary name is not checked; read_expecting checks anyway.
    let plain = dir.path().join("train.bin");
    assert_eq!(write_shard(&plain, &tokens).expect("write"), hash);
    assert_eq!(
        Shard::read_expecting(&plain, hash).expect("read").tokens,
        tokens
    );
    assert!(matches!(
        Shard::read_expecting(&plain, Hash::of(b"other")),
        Err(ShardError::HashMismatch { .. })
    ));
}

fn expect_shard_error(path: &Path, what: &str, check: impl Fn(&ShardError) -> bool) {
    match Shard::read(path) {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => {
            assert!(check(&e), "{what}: wrong error {e:?}");
            let message = e.to_string();
            assert!(
                message.contains(&path.display().to_string()),
                "{what}: message does not name the file: {message}"
            );
        }
    }
}

#[test]
fn bad_shards_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = corpus_tokens(1, 3000);
    let good = encode_shard(&tokens, dir.path()).expect("encode");

    let truncated = dir.path().join("truncated.bin");
    std::fs::write(&truncated, &good[..good.len() - 3]).expect("write");
    expect_shard_error(&truncated, "truncated", |e| {
        matches!(e, ShardError::Length { .. })
    });

    let short = dir.path().join("short.bin");
    std::fs::write(&short, &good[..100]).expect("write");
    expect_shard_error(&short, "header cut", |e| {
        matches!(e, ShardError::TooShort { len: 100, .. })
    });

    let mut magic = good.clone();
    magic[0] ^= 0xff;
    let wrong_magic = dir.path().join("magic.bin");
    std::fs::write(&wrong_magic, &magic).expect("write");
    expect_shard_error(&wrong_magic, "wrong magic", |e| {
        matches!(e, ShardError::Magic { .. })
    });

    let mut version = good.clone();
    version[4] = 2;
    let wrong_version = dir.path().join("version.bin");
    std::fs::write(&wrong_version, &version).expect("write");
    expect_shard_error(&wrong_version, "wrong version", |e| {
        matches!(e, ShardError::Version { found: 2, .. })
    });

    let mut negative = good.clone();
    negative[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    let negative_count = dir.path().join("negative.bin");
    std::fs::write(&negative_count, &negative).expect("write");
    expect_shard_error(&negative_count, "negative count", |e| {
        matches!(e, ShardError::Length { declared: -5, .. })
    });

    // One flipped token: still well-formed, but no longer the named content.
    let (_, named) = write_shard_named(dir.path(), &tokens).expect("write");
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    std::fs::write(&named, &tampered).expect("write");
    expect_shard_error(&named, "tampered", |e| {
        matches!(e, ShardError::HashMismatch { .. })
    });

    expect_shard_error(&dir.path().join("missing.bin"), "missing", |e| {
        matches!(e, ShardError::Read { .. })
    });
}

#[test]
fn llmc_files_import_as_they_are_with_val_held_out() {
    use barnraise_trainer::data::manifest::import_llmc;
    let dir = tempfile::tempdir().expect("tempdir");
    // GPT-2-sized token ids, written in llm.c's layout by our own writer.
    let train: Vec<u16> = (0..10_000u32).map(|i| (i * 7919 % 50_257) as u16).collect();
    let val: Vec<u16> = (0..3_000u32)
        .map(|i| (i * 104_729 % 50_257) as u16)
        .collect();
    let train_path = dir.path().join("fineweb_train_000001.bin");
    let val_path = dir.path().join("fineweb_val_000000.bin");
    barnraise_trainer::data::write_shard(&train_path, &train).expect("write");
    barnraise_trainer::data::write_shard(&val_path, &val).expect("write");
    let out = dir.path().join("ds");
    let files = vec![train_path.clone(), val_path.clone()];
    let manifest = import_llmc(&files, &out, 4096, 50_257, None).expect("import");
    assert_eq!(manifest.vocab_size, 50_257);
    assert_eq!(manifest.tokenizer, "unknown");
    assert_eq!((manifest.train.len(), manifest.heldout.len()), (3, 1));
    let read = |entries: &[barnraise_trainer::data::ShardEntry]| -> Vec<u16> {
        entries
            .iter()
            .flat_map(|e| {
                Shard::read(&shard_path(&out, &e.hash))
                    .expect("shard")
                    .tokens
            })
            .collect()
    };
    assert_eq!(read(&manifest.train), train, "the tokens as they were");
    assert_eq!(read(&manifest.heldout), val);
    // A token past the vocabulary, a corrupt file and no validation file
    // are refused, naming the problem.
    let err = import_llmc(&files, &dir.path().join("small"), 4096, 1000, None).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let mut bytes = std::fs::read(&train_path).expect("read");
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&train_path, bytes).expect("write");
    assert!(import_llmc(&files, &dir.path().join("bad"), 4096, 50_257, None).is_err());
    let err = import_llmc(&[val_path], &dir.path().join("v"), 4096, 50_257, None).unwrap_err();
    assert!(err.to_string().contains("validation"), "{err}");
}

#[test]
fn shard_command_pipeline_builds_a_dataset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("text");
    std::fs::create_dir_all(input.join("sub")).expect("mkdir");
    std::fs::write(input.join("a.txt"), corpus::generate(1, 30_000)).expect("write");
    std::fs::write(input.join("sub/b.txt"), corpus::generate(2, 20_000)).expect("write");
    let files = collect_input_files(std::slice::from_ref(&input)).expect("collect");
    assert_eq!(files.len(), 2);
    let tokens = tokenize_files(&files).expect("tokenize");
    assert_eq!(tokens.len(), 50_002, "two documents joined by a blank line");
    let out = dir.path().join("shards");
    let config = ShardingConfig {
        shard_tokens: 16_384,
        heldout_fraction: 0.1,
    };
    let manifest = build_dataset(&tokens, &out, config).expect("build");
    assert_eq!(
        manifest.train_tokens() + manifest.heldout_tokens(),
        tokens.len() as u64
    );
    assert_eq!(manifest.heldout_tokens(), 5001);
    assert_eq!(manifest.train.len(), 3);
    let loaded = DatasetManifest::load(&out.join(MANIFEST_FILE)).expect("manifest");
    assert_eq!(loaded, manifest);
    let mut rebuilt = Vec::new();
    for entry in manifest.train.iter().chain(&manifest.heldout) {
        let shard = Shard::read(&shard_path(&out, &entry.hash)).expect("shard");
        assert_eq!(shard.tokens.len() as u64, entry.tokens);
        rebuilt.extend(shard.tokens);
    }
    assert_eq!(rebuilt, tokens);
    // Same input, same shards.
    assert_eq!(
        build_dataset(&tokens, &dir.path().join("again"), config).expect("build"),
        manifest
    );
}

#[test]
fn empty_and_missing_inputs_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").expect("write");
    let err = tokenize_files(std::slice::from_ref(&empty)).expect_err("empty text accepted");
    assert!(matches!(err, DatasetError::EmptyInput { .. }));
    assert!(err.to_string().contains("empty.txt"), "{err}");
    let empty_dir = dir.path().join("nothing");
    std::fs::create_dir(&empty_dir).expect("mkdir");
    let err =
        collect_input_files(std::slice::from_ref(&empty_dir)).expect_err("empty dir accepted");
    assert!(err.to_string().contains("nothing"), "{err}");
    let missing = dir.path().join("missing.txt");
    let err =
        collect_input_files(std::slice::from_ref(&missing)).expect_err("missing file accepted");
    assert!(err.to_string().contains("missing.txt"), "{err}");
    let err = build_dataset(
        &[1, 2, 3],
        &dir.path().join("out"),
        ShardingConfig::default(),
    )
    .expect_err("3 tokens");
    assert!(matches!(err, DatasetError::TooSmall { .. }));
}

#[test]
fn checkpoints_round_trip_and_refuse_other_configs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = tiny();
    let params = cfg.init_flat(11);
    let momentum: Vec<f32> = params.iter().map(|p| p * 0.5).collect();
    let meta = CheckpointMeta {
        run: "test-run".to_string(),
        round: 7,
        params_hash: Hash::of_f32s(&params),
    };
    let path = dir.path().join("ckpt.safetensors");
    checkpoint::save(&path, &cfg, &params, Some(&momentum), &meta).expect("save");
    let loaded = checkpoint::load(&path, &cfg).expect("load");
    assert_eq!(loaded.params, params);
    assert_eq!(loaded.outer_momentum.as_deref(), Some(momentum.as_slice()));
    assert_eq!(loaded.meta, meta);
    assert_eq!(loaded.config, cfg);

    // The weights are an ordinary safetensors file under the Llama names.
    let bytes = std::fs::read(&path).expect("bytes");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    assert_eq!(
        st.tensor("model.embed_tokens.weight")
            .expect("embed")
            .shape(),
        &[256, 64]
    );

    // Loading without knowing the model reads its config from the metadata.
    let any = checkpoint::load_any(&path).expect("load_any");
    assert_eq!((any.config, any.params), (cfg.clone(), params.clone()));
    // A header that names a model far larger than the file is refused
    // before anything is allocated for it.
    let mut huge = cfg.clone();
    huge.d_model = 4096;
    huge.n_heads = 32;
    huge.d_ff = 11008;
    let header = serde_json::json!({
        "__metadata__": {"barnraise.model_config": serde_json::to_string(&huge).unwrap()},
    })
    .to_string();
    let mut forged = (header.len() as u64).to_le_bytes().to_vec();
    forged.extend_from_slice(header.as_bytes());
    let forged_path = dir.path().join("forged.safetensors");
    std::fs::write(&forged_path, &forged).expect("write");
    let err = checkpoint::load_any(&forged_path).expect_err("forged accepted");
    assert!(err.to_string().contains("cannot hold"), "{err}");

    let mut other = cfg.clone();
    other.n_layers = 3;
    let err = checkpoint::load(&path, &other).expect_err("other config accepted");
    assert!(matches!(err, CheckpointError::ConfigMismatch { .. }));
    assert!(
        err.to_string().contains("ckpt.safetensors") && err.to_string().contains("3 layers"),
        "{err}"
    );

    let wrong_hash = CheckpointMeta {
        params_hash: Hash::of(b"x"),
        ..meta.clone()
    };
    assert!(matches!(
        checkpoint::save(&path, &cfg, &params, None, &wrong_hash),
        Err(CheckpointError::HashMismatch { .. })
    ));

    // Corrupt: a flipped weight byte fails the params hash; garbage and
    // truncation fail the format; none panic.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, &flipped).expect("write");
    assert!(matches!(
        checkpoint::load(&corrupt, &cfg),
        Err(CheckpointError::HashMismatch { .. } | CheckpointError::Tensor { .. })
    ));
    std::fs::write(&corrupt, &bytes[..bytes.len() / 2]).expect("write");
    let err = checkpoint::load(&corrupt, &cfg).expect_err("truncated accepted");
    assert!(err.to_string().contains("corrupt.safetensors"), "{err}");
    std::fs::write(&corrupt, b"not a checkpoint").expect("write");
    assert!(matches!(
        checkpoint::load(&corrupt, &cfg),
        Err(CheckpointError::Format { .. })
    ));
}

/// A bench config small enough for a test: `workers` workers, `h` inner
/// steps, `rounds` rounds of 2×32-token batches.
fn quick_bench(workers: usize, h: usize, rounds: usize) -> DilocoBenchConfig {
    let mut cfg = DilocoBenchConfig::for_preset("tiny").expect("preset");
    cfg.workers = workers;
    cfg.inner_steps = h;
    cfg.rounds = rounds;
    cfg.batch_size = 2;
    cfg.seq_len = 32;
    cfg.warmup = 2;
    cfg.corpus_bytes = 20_000;
    cfg.eval_batches = 1;
    cfg
}

/// Parses an arm spec for a test.
fn arm_spec(text: &str) -> ArmSpec {
    text.parse().unwrap_or_else(|e| panic!("{e}"))
}

/// Runs one DiLoCo arm of `cfg` given by its spec text.
fn run_spec(cfg: &DilocoBenchConfig, spec: &str) -> barnraise_trainer::bench::ArmReport {
    run_arm(
        cfg,
        &Device::Cpu,
        "d",
        ArmKind::Diloco(arm_spec(spec)),
        &mut |_| {},
    )
    .expect("arm")
}

/// Every arm trains on the same tokens whatever its H, sends exactly its
/// codec's payloads (the warm-up's denser ones first), and the Pareto table
/// is computed from the losses and bytes it reports.
#[test]
fn diloco_bench_runs_every_arm_at_equal_tokens() {
    let mut cfg = quick_bench(2, 3, 2);
    cfg.arms = vec![
        arm_spec("int8:256"),
        arm_spec("topk:4096:64:2"),
        arm_spec("topk:4096:64:2,h=6,olr=0.9"),
        arm_spec("topk:4096:64:2,warm=1024:1,decay=0.95"),
    ];
    let mut events = 0;
    let report = run_diloco(&cfg, &Device::Cpu, &mut |_| events += 1).expect("bench");
    // Two rounds each, except the h=6 arm's single round.
    assert_eq!(events, 2 * 5 + 1);
    assert_eq!(report.arms.len(), 6);
    let labels: Vec<&str> = report.arms.iter().map(|a| a.arm.as_str()).collect();
    assert_eq!(labels, ["a", "b", "c", "d", "e", "f"]);
    let params = cfg.model.params_count() as u64;
    for arm in &report.arms {
        assert_eq!(arm.tokens, cfg.total_tokens(), "arm {}", arm.arm);
        assert!(
            arm.heldout_loss.is_finite() && arm.heldout_loss < report.initial_heldout_loss,
            "arm {}",
            arm.arm
        );
        assert_eq!(arm.inner_steps * arm.rounds, 6, "arm {}", arm.arm);
    }
    assert_eq!((report.arms[4].inner_steps, report.arms[4].rounds), (6, 1));
    // (a) sends a gradient per step, (b) one fp32 update per round.
    assert_eq!(report.arms[0].bytes_per_worker, 6 * params * 4);
    // DiLoCo arms: one payload of the codec's exact size per round.
    let len = |codec: &str| arm_spec(codec).schedule.codec.encoded_len(params as usize) as u64;
    assert_eq!(report.arms[1].bytes_per_worker, 2 * len("fp32"));
    assert_eq!(report.arms[2].bytes_per_worker, 2 * len("int8:256"));
    assert_eq!(report.arms[3].bytes_per_worker, 2 * len("topk:4096:64:2"));
    assert_eq!(report.arms[4].bytes_per_worker, len("topk:4096:64:2"));
    // The warm-up sends 1024 of each chunk in round 0, then 64.
    assert_eq!(
        report.arms[5].bytes_per_worker,
        len("topk:4096:1024:2") + len("topk:4096:64:2")
    );
    for arm in &report.arms[1..] {
        let bits = arm.bytes_per_worker as f64 * 8.0 / (arm.rounds as u64 * params) as f64;
        assert!((arm.bits_per_param - bits).abs() < 1e-9, "arm {}", arm.arm);
        let reduction = report.arms[0].bytes_per_worker as f64 / arm.bytes_per_worker as f64;
        assert!((arm.reduction_vs_dp - reduction).abs() < 1e-9);
    }
    // The two top-k arms that differ only in H end in different places, and
    // the decay and warm-up reach their arm.
    assert_ne!(report.arms[3].heldout_loss, report.arms[4].heldout_loss);
    assert_ne!(report.arms[3].heldout_loss, report.arms[5].heldout_loss);
    // The gaps are the losses' gaps to (b) and (a); the Pareto flags and the
    // best arm at parity follow from the losses and reductions.
    let gap = |x: f32, base: f32| f64::from((x - base) / base) * 100.0;
    let (dp, fp32) = (report.arms[0].heldout_loss, report.arms[1].heldout_loss);
    for arm in &report.arms {
        assert_eq!(arm.gap_vs_fp32_pct, gap(arm.heldout_loss, fp32));
        assert_eq!(arm.gap_vs_dp_pct, gap(arm.heldout_loss, dp));
        let dominated = report.arms.iter().any(|o| {
            o.arm != arm.arm
                && o.reduction_vs_dp >= arm.reduction_vs_dp
                && o.heldout_loss <= arm.heldout_loss
                && (o.reduction_vs_dp > arm.reduction_vs_dp || o.heldout_loss < arm.heldout_loss)
        });
        assert_eq!(arm.pareto, !dominated, "arm {}", arm.arm);
    }
    let at_parity = report.arms[2..]
        .iter()
        .filter(|a| a.gap_vs_fp32_pct <= PARITY_PCT)
        .max_by(|x, y| x.reduction_vs_dp.total_cmp(&y.reduction_vs_dp))
        .map(|a| a.arm.clone());
    assert_eq!(report.best_at_parity, at_parity);
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["arms"][3]["name"], "diloco-topk");
    assert_eq!(json["arms"][4]["spec"], "topk:4096:64:2,h=6,olr=0.9");
    assert_eq!(
        json["config"]["arms"][3],
        "topk:4096:64:2,decay=0.95,warm=1024:1"
    );
    for field in [
        "bits_per_param",
        "reduction_vs_dp",
        "gap_vs_fp32_pct",
        "gap_vs_dp_pct",
        "pareto",
        "seeds_at_parity",
        "inner_steps",
        "rounds",
    ] {
        assert!(!json["arms"][5][field].is_null(), "{field}");
    }
    assert_eq!(json["parity_pct"], PARITY_PCT);
    let table = report.to_string();
    assert!(table.contains("(d) diloco-topk"), "{table}");
    assert!(table.contains("topk:4096:64:2,h=6,olr=0.9"), "{table}");
    // Only error-feedback arms report the loss with their residuals flushed.
    for (i, arm) in report.runs[0].arms.iter().enumerate() {
        let flushed = arm.heldout_residual_flushed;
        assert_eq!(flushed.is_some(), i >= 3, "arm {}", arm.arm);
        assert!(flushed.is_none_or(f32::is_finite));
    }
}

/// An arm that cannot run is refused before anything trains.
#[test]
fn diloco_bench_refuses_bad_arms_before_training() {
    let mut cfg = quick_bench(2, 3, 2);
    for (spec, expect) in [
        (arm_spec("topk:4096:64:2,h=4"), "must divide"),
        (
            {
                let mut spec = arm_spec("topk:4096:64:2");
                spec.schedule.decay = Some(-0.1);
                spec
            },
            "decay",
        ),
    ] {
        cfg.arms = vec![arm_spec("int8:256"), spec];
        let mut events = 0;
        let error = run_diloco(&cfg, &Device::Cpu, &mut |_| events += 1).expect_err("bad arm");
        assert!(error.to_string().contains(expect), "{error}");
        assert_eq!(events, 0, "trained before refusing {spec}");
    }
}

/// The top-k arm's error-feedback decay is applied (decay 0 drops what was
/// not sent and ends elsewhere than plain error feedback).
#[test]
fn diloco_bench_error_feedback_decay_reaches_the_topk_arm() {
    let cfg = quick_bench(2, 3, 2);
    let arm = |spec: &str| run_spec(&cfg, spec);
    let (plain, none) = (arm("topk:4096:64:2"), arm("topk:4096:64:2,decay=0"));
    assert_ne!(plain.heldout_loss, none.heldout_loss);
    assert_eq!(
        plain.heldout_loss,
        arm("topk:4096:64:2,decay=1").heldout_loss
    );
}

/// `delay=1` (overlapped rounds, docs/architecture.md): round 0 trains from
/// θ_0 either way, so the first score is the synchronous arm's to the bit;
/// from round 1 the workers train from the θ one round back, and the arms
/// part ways. `delay=0` is the synchronous arm itself.
#[test]
fn diloco_bench_delayed_outer_step_matches_sync_in_round_zero_only() {
    let mut cfg = quick_bench(2, 3, 3);
    cfg.eval_every = 1;
    let arm = |spec: &str| run_spec(&cfg, spec);
    let (sync, delayed) = (arm("fp32"), arm("fp32,delay=1"));
    assert_eq!(sync.heldout_per_round.len(), 3);
    assert_eq!(sync.heldout_per_round[0], delayed.heldout_per_round[0]);
    assert_ne!(sync.heldout_per_round[1], delayed.heldout_per_round[1]);
    assert_ne!(sync.heldout_loss, delayed.heldout_loss);
    assert_eq!(sync.tokens, delayed.tokens);
    assert_eq!(
        arm("fp32,delay=0").heldout_per_round,
        sync.heldout_per_round
    );
}

/// `delay=1,eager=1`: with one worker and plain averaging the worker's own
/// update is the round's average, so starting from θ_{r−1} minus it is
/// starting from θ_r, and the arm is the synchronous one up to rounding;
/// the plain delayed arm is not.
#[test]
fn diloco_bench_eager_delayed_step_is_synchronous_for_one_worker() {
    let mut cfg = quick_bench(1, 3, 4);
    cfg.eval_every = 1;
    cfg.outer.lr = 1.0;
    cfg.outer.momentum = 0.0;
    let arm = |spec: &str| run_spec(&cfg, spec);
    let (sync, eager, delayed) = (
        arm("fp32"),
        arm("fp32,delay=1,eager=1"),
        arm("fp32,delay=1"),
    );
    assert_eq!(sync.heldout_per_round.len(), 4);
    for (s, e) in sync.heldout_per_round.iter().zip(&eager.heldout_per_round) {
        assert!(
            (s - e).abs() < 1e-4,
            "{:?} vs {:?}",
            sync.heldout_per_round,
            eager.heldout_per_round
        );
    }
    assert!(
        (sync.heldout_loss - delayed.heldout_loss).abs() > 1e-3,
        "{} vs {}",
        sync.heldout_loss,
        delayed.heldout_loss
    );
}

/// `overlap=S` (overlap within a round, docs/architecture.md): the first
/// update leaves after H − S steps, so the arm parts from the synchronous
/// one in round 0; it trains on the same tokens; `overlap=0` is the
/// synchronous arm to the bit, and S ≥ H is refused before training.
#[test]
fn diloco_bench_overlap_within_a_round_trains_the_same_tokens() {
    let mut cfg = quick_bench(2, 4, 3);
    cfg.eval_every = 1;
    let arm = |spec: &str| run_spec(&cfg, spec);
    let (sync, overlapped) = (arm("fp32"), arm("fp32,overlap=2"));
    assert_eq!(sync.tokens, overlapped.tokens);
    assert_ne!(sync.heldout_per_round[0], overlapped.heldout_per_round[0]);
    assert!(overlapped.heldout_loss.is_finite());
    assert_eq!(
        arm("fp32,overlap=0").heldout_per_round,
        sync.heldout_per_round
    );
    // `fold=1` moves the carried steps into the next update instead of
    // the next start: round 0 carries nothing yet, so it is the overlap
    // arm's to the bit; from round 1 they part.
    let folded = arm("fp32,overlap=2,fold=1");
    assert_eq!(folded.tokens, sync.tokens);
    assert_eq!(folded.heldout_per_round[0], overlapped.heldout_per_round[0]);
    assert_ne!(folded.heldout_per_round[1], overlapped.heldout_per_round[1]);
    assert!(folded.heldout_loss.is_finite());
    // `from=K` holds nothing back before round K: with K past the last
    // round it is the synchronous arm to the bit; with K = 1 round 0 is.
    assert_eq!(
        arm("fp32,overlap=2,from=3").heldout_per_round,
        sync.heldout_per_round
    );
    let late = arm("fp32,overlap=2,from=1");
    assert_eq!(late.heldout_per_round[0], sync.heldout_per_round[0]);
    assert_ne!(late.heldout_per_round[1], sync.heldout_per_round[1]);
    assert_eq!(late.tokens, sync.tokens);
    // `eager=1` starts the S steps from the outer step's preview with the
    // worker's own update: with plain averaging (outer lr 1, no momentum)
    // that is θ_r minus the update, the plain arm's start, to the bit; with
    // momentum it is not.
    assert_eq!(
        arm("fp32,overlap=2,eager=1").heldout_per_round,
        overlapped.heldout_per_round
    );
    let mut momentum = cfg.clone();
    momentum.outer.lr = 0.7;
    momentum.outer.momentum = 0.9;
    let with_momentum = |spec: &str| run_spec(&momentum, spec);
    assert_ne!(
        with_momentum("fp32,overlap=2,eager=1").heldout_per_round[1],
        with_momentum("fp32,overlap=2").heldout_per_round[1]
    );
    let error = run_arm(
        &cfg,
        &Device::Cpu,
        "d",
        ArmKind::Diloco(arm_spec("fp32,overlap=4")),
        &mut |_| {},
    )
    .expect_err("overlap = H");
    assert!(
        error.to_string().contains("fewer than the arm's H = 4"),
        "{error}"
    );
}

/// `seeds: N` runs the whole bench on seeds `seed`..`seed + N`: each seed's
/// run is the one-seed bench on that seed (deterministic, independent of the
/// other seeds), the seeds give different losses, and each arm's summary is
/// the mean, spread and list of its per-seed losses. With one seed the
/// summary is that seed's run.
#[test]
fn diloco_bench_over_seeds_reports_every_seed_and_their_mean() {
    let mut cfg = quick_bench(2, 3, 2);
    cfg.seed = 7;
    cfg.seeds = 2;
    let multi = run_diloco(&cfg, &Device::Cpu, &mut |_| {}).expect("bench");
    let single = |seed: u64| {
        let mut one = cfg.clone();
        one.seed = seed;
        one.seeds = 1;
        run_diloco(&one, &Device::Cpu, &mut |_| {}).expect("bench")
    };
    let (first, second) = (single(7), single(8));
    assert_eq!(multi.runs.len(), 2);
    for (run, alone) in multi.runs.iter().zip([&first, &second]) {
        assert_eq!(alone.runs.len(), 1);
        let alone_run = &alone.runs[0];
        assert_eq!(run.seed, alone.config.seed);
        assert_eq!(run.seed, alone_run.seed);
        assert_eq!(run.initial_heldout_loss, alone_run.initial_heldout_loss);
        assert_eq!(run.fp32_vs_dp_pct, alone_run.fp32_vs_dp_pct);
        assert_eq!(run.arms.len(), 4);
        for (a, b) in run.arms.iter().zip(&alone_run.arms) {
            assert_eq!(a.heldout_per_round, b.heldout_per_round, "arm {}", a.arm);
            assert_eq!(a.tokens, b.tokens);
            assert_eq!(a.bytes_per_worker, b.bytes_per_worker);
        }
    }
    // Without the references (data-parallel and DiLoCo fp32) the other
    // arms are the same runs, and the reductions are still against the
    // data-parallel bytes.
    let mut skipping = cfg.clone();
    skipping.seeds = 1;
    skipping.skip_dp = true;
    skipping.skip_fp32 = true;
    let skipped = run_diloco(&skipping, &Device::Cpu, &mut |_| {}).expect("bench");
    let kept = &first.runs[0].arms;
    for (reference, ran) in skipped.runs[0].arms.iter().zip(kept).take(2) {
        assert!(reference.heldout_loss.is_nan() && reference.heldout_per_round.is_empty());
        assert_eq!(
            reference.bytes_per_worker, ran.bytes_per_worker,
            "arm {}",
            ran.arm
        );
        assert_eq!(
            reference.reduction_vs_dp, ran.reduction_vs_dp,
            "arm {}",
            ran.arm
        );
        assert_eq!(reference.tokens, ran.tokens);
    }
    let dp_summary = &skipped.arms[0];
    assert!(!dp_summary.pareto && dp_summary.tokens_per_s == 0.0);
    for (a, b) in skipped.runs[0].arms.iter().zip(kept).skip(2) {
        assert_eq!(a.heldout_per_round, b.heldout_per_round, "arm {}", a.arm);
        assert_eq!(a.reduction_vs_dp, b.reduction_vs_dp);
        assert!(a.gap_vs_fp32_pct.is_nan() && a.gap_vs_dp_pct.is_nan());
    }
    // One seed: the summary is that seed's run, the gaps its gaps.
    for (summary, arm) in first.arms.iter().zip(&first.runs[0].arms) {
        assert_eq!(summary.heldout_loss, arm.heldout_loss);
        assert_eq!(summary.heldout_per_seed, vec![arm.heldout_loss]);
        assert_eq!(summary.heldout_std, 0.0);
        assert_eq!(
            (summary.heldout_min, summary.heldout_max),
            (arm.heldout_loss, arm.heldout_loss)
        );
    }
    assert_eq!(first.fp32_vs_dp_pct, first.runs[0].fp32_vs_dp_pct);
    assert_eq!(
        first.arms[3].gap_vs_fp32_pct_seed_mean,
        first.runs[0].arms[3].gap_vs_fp32_pct
    );
    // The seeds differ: other data, weights and batches, other losses.
    assert_ne!(
        multi.runs[0].initial_heldout_loss,
        multi.runs[1].initial_heldout_loss
    );
    for (a, b) in multi.runs[0].arms.iter().zip(&multi.runs[1].arms) {
        assert_ne!(a.heldout_loss, b.heldout_loss, "arm {}", a.arm);
    }
    // Two seeds: mean, spread and list of the per-seed losses.
    for (i, summary) in multi.arms.iter().enumerate() {
        let (x, y) = (
            multi.runs[0].arms[i].heldout_loss,
            multi.runs[1].arms[i].heldout_loss,
        );
        assert_eq!(summary.arm, multi.runs[0].arms[i].arm);
        assert_eq!(summary.heldout_per_seed, vec![x, y]);
        assert!(
            (summary.heldout_loss - (x + y) / 2.0).abs() <= 1e-6,
            "arm {}",
            summary.arm
        );
        assert_eq!(
            (summary.heldout_min, summary.heldout_max),
            (x.min(y), x.max(y))
        );
        let std = (x - y).abs() / 2f32.sqrt();
        assert!(
            (summary.heldout_std - std).abs() <= 1e-6,
            "arm {}",
            summary.arm
        );
        assert_eq!(summary.tokens, cfg.total_tokens());
    }
    let gap = |x: f32, base: f32| f64::from((x - base) / base) * 100.0;
    assert_eq!(
        multi.fp32_vs_dp_pct,
        gap(multi.arms[1].heldout_loss, multi.arms[0].heldout_loss)
    );
    let seed_mean =
        (multi.runs[0].arms[3].gap_vs_fp32_pct + multi.runs[1].arms[3].gap_vs_fp32_pct) / 2.0;
    assert!((multi.arms[3].gap_vs_fp32_pct_seed_mean - seed_mean).abs() <= 1e-9);
    let at_parity = multi
        .runs
        .iter()
        .filter(|r| r.arms[3].gap_vs_fp32_pct <= PARITY_PCT);
    assert_eq!(multi.arms[3].seeds_at_parity, at_parity.count());
    // The JSON keeps every seed's figures.
    let json = serde_json::to_value(&multi).expect("json");
    assert_eq!(json["runs"][1]["seed"], 8);
    assert_eq!(json["runs"][1]["arms"][3]["name"], "diloco-topk");
    assert_eq!(
        json["arms"][3]["heldout_per_seed"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(multi.to_string().contains("2 seeds (7..=8)"));
    // No seeds is a config error.
    cfg.seeds = 0;
    assert!(run_diloco(&cfg, &Device::Cpu, &mut |_| {}).is_err());
}

/// With one worker, fp32 updates and plain averaging (outer lr 1, momentum
/// 0), a DiLoCo round moves the global params exactly where the worker went,
/// and the worker keeps its AdamW state and its place in the schedule across
/// rounds; the data-parallel arm at k=1 is one model trained on the same
/// batches. So the two arms must agree up to f32 rounding of θ − (θ − θ').
/// A DiLoCo arm that reset its inner optimizer or schedule each round, fed a
/// worker the wrong stream, or mis-scaled the outer step would split them.
#[test]
fn one_worker_diloco_with_plain_averaging_matches_data_parallel() {
    let mut cfg = quick_bench(1, 4, 3);
    cfg.eval_batches = 2;
    cfg.eval_every = 2;
    cfg.outer.lr = 1.0;
    cfg.outer.momentum = 0.0;
    let arm = |cfg: &DilocoBenchConfig, kind| {
        run_arm(cfg, &Device::Cpu, "probe", kind, &mut |_| {}).expect("arm")
    };
    let dp = arm(&cfg, ArmKind::DataParallel);
    let diloco = arm(&cfg, ArmKind::Diloco(ArmSpec::codec(CodecConfig::Fp32)));
    // Scored after round 2 and after the last round only.
    assert_eq!(dp.heldout_per_round.len(), 2);
    assert_eq!(diloco.heldout_per_round.len(), 2);
    assert_eq!(dp.tokens, diloco.tokens);
    for (a, b) in dp.heldout_per_round.iter().zip(&diloco.heldout_per_round) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "dp {a} vs diloco {b}");
    }
    // The outer step matters: an outer lr of 0.5 leaves the params halfway.
    cfg.outer.lr = 0.5;
    let damped = arm(&cfg, ArmKind::Diloco(ArmSpec::codec(CodecConfig::Fp32)));
    assert!(
        (damped.heldout_loss - dp.heldout_loss).abs() > 1e-3,
        "outer lr 0.5 gave {} like dp {}",
        damped.heldout_loss,
        dp.heldout_loss
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn shard_bytes_round_trip(tokens in proptest::collection::vec(any::<u16>(), 0..2000)) {
        let path = Path::new("mem.bin");
        let bytes = encode_shard(&tokens, path).expect("encode");
        let shard = Shard::decode(&bytes, path).expect("decode");
        prop_assert_eq!(shard.tokens, tokens);
        prop_assert_eq!(shard.hash, Hash::of(&bytes));
    }

    #[test]
    fn shard_decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..3000), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            bytes[0..4].copy_from_slice(&20240520i32.to_le_bytes());
            bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
        }
        // Any bytes: a shard or an error, never a panic.
        let _ = Shard::decode(&bytes, Path::new("fuzz.bin"));
    }
}

// ---------------------------------------------------------------------------
// Device tests. They train on the device named by BARNRAISE_TEST_DEVICE
// (`cuda:0`, ...; `scripts/gpu-check.sh` sets it) with the precision named by
// BARNRAISE_TEST_PRECISION (default auto). Without it they say so and run on
// the CPU, where they still check the same properties. Each prints its
// measured figure, and appends it as a JSON line to BARNRAISE_TEST_REPORT
// when that names a file.

fn test_device() -> (Device, String) {
    let spec = std::env::var("BARNRAISE_TEST_DEVICE").ok();
    match spec {
        Some(text) => {
            let spec: DeviceSpec = text.parse().expect("BARNRAISE_TEST_DEVICE");
            let device = device::select(spec).expect("open the test device");
            (device, text)
        }
        None => {
            eprintln!(
                "BARNRAISE_TEST_DEVICE is not set: no GPU selected, device tests run on the CPU"
            );
            (Device::Cpu, "cpu".into())
        }
    }
}

fn test_trainer(model: &ModelConfig, device: &Device, seed: u64) -> Trainer {
    let precision: barnraise_trainer::precision::Precision =
        std::env::var("BARNRAISE_TEST_PRECISION")
            .unwrap_or_else(|_| "auto".into())
            .parse()
            .expect("BARNRAISE_TEST_PRECISION");
    let mut trainer = Trainer::new(model, device.clone(), seed).expect("trainer");
    trainer.set_precision(precision).expect("precision");
    trainer
}

fn report_figure(test: &str, device: &str, figures: serde_json::Value) {
    let line = serde_json::json!({ "test": test, "device": device, "figures": figures });
    eprintln!("{line}");
    if let Ok(path) = std::env::var("BARNRAISE_TEST_REPORT") {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("report file");
        writeln!(file, "{line}").expect("write report");
    }
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(f64::MIN_POSITIVE)
}

/// Same seed, same device: the same params, within a tolerance that
/// allows for GPU libraries picking other algorithms (exact on the CPU).
#[test]
fn on_device_training_is_deterministic_within_tolerance() {
    let (device, name) = test_device();
    let tokens = corpus_tokens(3, 20_000);
    let run = || {
        let mut trainer = test_trainer(&tiny(), &device, 5);
        trainer
            .train_inner(&tokens, &quick_inner(6, 8))
            .expect("train");
        trainer.flat_params().expect("params")
    };
    let (a, b) = (run(), run());
    let diff = rel_diff(&a, &b);
    report_figure(
        "determinism",
        &name,
        serde_json::json!({ "relative_diff": diff }),
    );
    if name == "cpu" {
        assert_eq!(a, b, "the CPU must be bit-identical");
    }
    assert!(diff < 1e-4, "two runs differ by {diff}");
}

#[test]
fn on_device_loss_falls() {
    let (device, name) = test_device();
    let tokens = corpus_tokens(4, 40_000);
    let mut trainer = test_trainer(&tiny(), &device, 6);
    let report = trainer
        .train_inner(&tokens, &quick_inner(40, 2))
        .expect("train");
    let head: f32 = report.losses[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = report.losses[35..].iter().sum::<f32>() / 5.0;
    report_figure(
        "loss_falls",
        &name,
        serde_json::json!({ "first5": head, "last5": tail }),
    );
    assert!(tail < head * 0.85, "loss {head} -> {tail}");
}

/// A worker's state saved mid-run (params to a checkpoint file, AdamW state
/// as bytes) and restored into a fresh trainer on the device continues
/// exactly as the original does.
#[test]
fn on_device_checkpoint_round_trip_continues_the_run() {
    let (device, name) = test_device();
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = corpus_tokens(5, 20_000);
    let cfg = tiny();
    let mut original = test_trainer(&cfg, &device, 7);
    original
        .train_inner(&tokens, &quick_inner(3, 1))
        .expect("train");
    let params = original.flat_params().expect("params");
    let meta = CheckpointMeta {
        run: "device-test".into(),
        round: 1,
        params_hash: Hash::of_f32s(&params),
    };
    let path = dir.path().join("worker.safetensors");
    checkpoint::save(&path, &cfg, &params, None, &meta).expect("save");
    let optimizer = original.optimizer_state().expect("optimizer state");

    let mut restored = test_trainer(&cfg, &device, 99);
    let loaded = checkpoint::load(&path, &cfg).expect("load");
    restored
        .set_flat_params(&loaded.params)
        .expect("set params");
    restored
        .set_optimizer_state(&optimizer)
        .expect("set optimizer");
    assert_eq!(restored.params_hash().expect("hash"), meta.params_hash);

    let next = quick_inner(3, 2);
    original.train_inner(&tokens, &next).expect("train on");
    restored
        .train_inner(&tokens, &next)
        .expect("train restored");
    let diff = rel_diff(
        &restored.flat_params().expect("params"),
        &original.flat_params().expect("params"),
    );
    report_figure(
        "checkpoint_round_trip",
        &name,
        serde_json::json!({ "relative_diff": diff }),
    );
    assert!(diff < 1e-4, "restored run differs by {diff}");
}

/// The update a GPU computes (with the precision policy it runs under)
/// against the CPU's f32 update for the same seed, data and steps on `tiny`.
/// Tolerances: f32 compute 1e-2 relative; bf16 compute 0.1 relative and
/// cosine ≥ 0.99 (bf16 keeps 8 bits of mantissa, and AdamW's normalisation
/// magnifies the rounding of near-zero gradients; candle's CPU bf16 against
/// CPU f32 measured 0.023 and 0.9997).
#[test]
fn on_device_update_agrees_with_the_cpu() {
    let (device, name) = test_device();
    let tokens = corpus_tokens(6, 20_000);
    let cfg = tiny();
    let inner = quick_inner(5, 3);
    let start = cfg.init_flat(9);
    let delta = |trainer: &mut Trainer| -> Vec<f32> {
        trainer.train_inner(&tokens, &inner).expect("train");
        let end = trainer.flat_params().expect("params");
        start.iter().zip(&end).map(|(s, e)| s - e).collect()
    };
    let mut on_device = test_trainer(&cfg, &device, 9);
    let dtype = on_device.compute_dtype();
    let device_delta = delta(&mut on_device);
    let mut on_cpu = Trainer::new(&cfg, Device::Cpu, 9).expect("cpu trainer");
    let cpu_delta = delta(&mut on_cpu);
    let diff = rel_diff(&device_delta, &cpu_delta);
    let cos = cosine(&device_delta, &cpu_delta);
    let precision = barnraise_trainer::precision::dtype_name(dtype);
    report_figure(
        "gpu_vs_cpu_update",
        &name,
        serde_json::json!({ "precision": precision, "relative_diff": diff, "cosine": cos }),
    );
    if dtype == candle_core::DType::F32 {
        assert!(diff < 1e-2, "f32 update differs from the CPU's by {diff}");
    } else {
        assert!(
            diff < 0.1 && cos > 0.99,
            "{precision} update: diff {diff}, cosine {cos}"
        );
    }
}

/// Out of memory at the first step is an error that names the fix, and the
/// device still trains afterwards. Only on a GPU: on the CPU an allocation
/// this large would be the operating system's problem, not ours.
#[test]
fn on_device_out_of_memory_is_a_clear_error_and_the_device_survives() {
    let (device, name) = test_device();
    if name == "cpu" {
        eprintln!("no GPU selected: the out-of-memory test needs one");
        return;
    }
    let large = ModelConfig::preset("large").expect("large");
    let tokens = corpus_tokens(7, 1 << 20);
    let mut trainer = test_trainer(&large, &device, 1);
    // Attention scores alone: 64 × 16 heads × 1024² × 4 bytes = 4 GiB per
    // copy, several copies per layer, 24 layers: far over any GPU. (Each
    // tensor stays under 2³¹ elements: larger ones fail as an invalid kernel
    // launch before any allocation, which is another error.)
    let huge = InnerConfig {
        batch_size: 64,
        seq_len: 1024,
        ..quick_inner(1, 1)
    };
    let error = trainer
        .train_inner(&tokens, &huge)
        .expect_err("must run out of memory");
    report_figure(
        "out_of_memory",
        &name,
        serde_json::json!({ "error": error.to_string() }),
    );
    assert!(
        matches!(error, TrainError::OutOfMemory { step: 0, .. }),
        "{error}"
    );
    drop(trainer);
    let mut small = test_trainer(&tiny(), &device, 2);
    small
        .train_inner(&corpus_tokens(8, 20_000), &quick_inner(2, 1))
        .expect("trains after OOM");
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    line.split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .expect("kB")
        * 1024
}

/// A step's graph (every activation) must be freed when the step ends: if
/// persistent state (AdamW moments) or a gradient kept a reference into it,
/// memory would grow by a step's activations every step. On a GPU that
/// ran `medium` out of memory on the second step.
#[test]
fn training_steps_do_not_retain_their_graphs() {
    // Resident memory is the whole process's, and the other tests of this
    // binary run beside this one: measure in a child process that runs
    // this test alone.
    if std::env::var_os("BARNRAISE_MEASURE_RSS").is_none() {
        let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "training_steps_do_not_retain_their_graphs",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BARNRAISE_MEASURE_RSS", "1")
            .output()
            .expect("run the measuring child");
        let stdout = String::from_utf8_lossy(&child.stdout);
        let stderr = String::from_utf8_lossy(&child.stderr);
        assert!(child.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "the child ran no test: {stdout}"
        );
        eprintln!("{}", stderr.trim());
        return;
    }
    let small = ModelConfig::preset("small").expect("small");
    let tokens = corpus_tokens(9, 200_000);
    let mut trainer = Trainer::new(&small, Device::Cpu, 1).expect("trainer");
    let inner = |steps| InnerConfig {
        batch_size: 8,
        seq_len: 128,
        ..quick_inner(steps, 3)
    };
    trainer.train_inner(&tokens, &inner(3)).expect("warm up");
    let before = resident_bytes();
    trainer.train_inner(&tokens, &inner(12)).expect("train");
    let after = resident_bytes();
    let grown = after.saturating_sub(before) as f64 / (1u64 << 20) as f64;
    eprintln!("resident memory grew {grown:.0} MiB over 12 steps");
    // One step's activations for `small` at 8 × 128 are about 150 MiB.
    assert!(
        grown < 200.0,
        "resident memory grew {grown:.0} MiB over 12 steps"
    );
}
