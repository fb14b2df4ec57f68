//! The inner loop: a worker's model on a device, trained H steps with AdamW
//! (warmup + cosine schedule, global-norm gradient clipping, optional
//! gradient accumulation), and the flat parameter view that bridges it to the
//! codec and the outer optimizer.
//!
//! Determinism: weights start from our own seeded PRNG, batches come from a
//! seeded sampler, and the AdamW update is element-wise tensor arithmetic.
//! On the CPU, candle's matmuls (the `gemm` crate) split the *output* tile
//! space across rayon threads and compute each output element's dot product
//! in one fixed order, and candle's reductions run sequentially per output
//! element; so for a fixed seed and a fixed thread count
//! (`RAYON_NUM_THREADS`), two runs give bit-identical parameters. On GPUs
//! cuBLAS may pick different algorithms run to run; the protocol does not
//! rely on inner-loop bit-identity, only on the outer step's (see
//! `barnraise_protocol::outer`).
//!
//! AdamW is written here rather than taken from candle-nn because the inner
//! loop needs global-norm clipping, a schedule, and no weight decay on norm
//! gains, and because its state must persist across rounds (a DiLoCo worker
//! keeps its inner optimizer state).

use crate::data::sampler::{BatchSampler, SampleError, check_vocab};
use crate::model::{Model, ModelConfig};
use barnraise_protocol::Hash;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Sequences per evaluation batch in [`Trainer::eval_loss`].
pub const EVAL_BATCH_SIZE: usize = 8;

/// Hyperparameters of one call to [`Trainer::train_inner`] (one round's inner
/// steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InnerConfig {
    /// Optimizer steps in this call (DiLoCo's H).
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    /// Linear warmup steps at the start of the schedule.
    pub warmup: usize,
    /// Length of the whole schedule in steps (e.g. rounds × H); 0 means this
    /// call's `steps`.
    pub schedule_steps: usize,
    /// Where in the schedule this call starts (e.g. round × H).
    pub start_step: usize,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub grad_clip: f64,
    /// Micro-batches summed into each optimizer step.
    pub accumulation: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Seed of the batch sampler: same seed, same batches.
    pub seed: u64,
}

impl Default for InnerConfig {
    fn default() -> Self {
        InnerConfig {
            steps: 30,
            batch_size: 8,
            seq_len: 64,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 10,
            schedule_steps: 0,
            start_step: 0,
            weight_decay: 0.1,
            grad_clip: 1.0,
            accumulation: 1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            seed: 0,
        }
    }
}

impl InnerConfig {
    /// Tokens one call trains on.
    pub fn tokens(&self) -> u64 {
        (self.steps * self.accumulation.max(1) * self.batch_size * self.seq_len) as u64
    }

    /// The learning rate at absolute schedule step `step`: linear warmup to
    /// `lr`, then a cosine down to `min_lr` at the end of the schedule.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let total = if self.schedule_steps == 0 {
            self.start_step + self.steps
        } else {
            self.schedule_steps
        };
        let span = total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).clamp(0.0, 1.0);
        self.min_lr
            + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What one call to [`Trainer::train_inner`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InnerReport {
    pub tokens: u64,
    /// Training loss of every step (mean over its micro-batches).
    pub losses: Vec<f32>,
    pub wall: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("training data: {0}")]
    Data(#[from] SampleError),
    #[error("{0}")]
    Config(String),
    #[error("flat parameter vector has {found} values, the model has {expected}")]
    ParamLength { expected: usize, found: usize },
    #[error("training diverged: loss is {loss} at step {step}")]
    Diverged { step: usize, loss: f32 },
    #[error("training was stopped after {steps} steps")]
    Stopped { steps: usize },
    #[error("unusable optimizer state: {0}")]
    OptimizerState(String),
}

/// AdamW moments for one parameter.
struct Moments {
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// One worker's model and inner optimizer state on a device.
pub struct Trainer {
    config: ModelConfig,
    device: Device,
    /// Variables sorted by name: the flat vector's order.
    vars: Vec<(String, Var)>,
    model: Model,
    moments: Vec<Moments>,
    /// AdamW steps taken so far (for bias correction).
    adam_steps: u64,
}

impl Trainer {
    /// A model with seeded initial weights on `device`.
    pub fn new(
        config: &ModelConfig,
        device: Device,
        init_seed: u64,
    ) -> Result<Trainer, TrainError> {
        config.validate().map_err(TrainError::Config)?;
        let mut vars = Vec::new();
        let mut moments = Vec::new();
        for (name, shape) in config.param_shapes() {
            let len = shape.iter().product();
            let init = Tensor::from_vec(
                config.init_param(&name, len, init_seed),
                shape.as_slice(),
                &device,
            )?;
            let zeros = init.zeros_like()?;
            // Decoupled weight decay on matrices only, not on norm gains.
            moments.push(Moments {
                m: zeros.clone(),
                v: zeros,
                decay: shape.len() >= 2,
            });
            vars.push((name, Var::from_tensor(&init)?));
        }
        let model = Model::new(config, &vars, &device)?;
        Ok(Trainer {
            config: config.clone(),
            device,
            vars,
            model,
            moments,
            adam_steps: 0,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn model(&self) -> &Model {
        &self.model
    }

    /// All parameters as one f32 vector, in name order.
    pub fn flat_params(&self) -> Result<Vec<f32>, TrainError> {
        let mut flat = Vec::with_capacity(self.config.params_count());
        for (_, var) in &self.vars {
            flat.extend(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(flat)
    }

    /// The SHA-256 of the flat parameters (as the protocol names params).
    pub fn params_hash(&self) -> Result<Hash, TrainError> {
        Ok(Hash::of_f32s(&self.flat_params()?))
    }

    /// Overwrites every parameter from a flat vector in name order.
    pub fn set_flat_params(&mut self, flat: &[f32]) -> Result<(), TrainError> {
        let expected = self.config.params_count();
        if flat.len() != expected {
            return Err(TrainError::ParamLength {
                expected,
                found: flat.len(),
            });
        }
        let mut offset = 0;
        for (_, var) in &self.vars {
            let shape = var.as_tensor().shape().clone();
            let len = shape.elem_count();
            let value = Tensor::from_slice(&flat[offset..offset + len], shape, &self.device)?;
            var.set(&value)?;
            offset += len;
        }
        Ok(())
    }

    /// Bytes of [`Trainer::optimizer_state`] for a model of `params` parameters.
    pub fn optimizer_state_len(params: usize) -> usize {
        8 + 8 * params
    }

    /// The inner optimizer's state, which with θ_r, the shards and the seed
    /// fixes a round of training: the AdamW step count (u64 LE), then every
    /// parameter's first moment, then every second moment, as f32 LE in
    /// name order. A spot check replays a worker's round from it.
    pub fn optimizer_state(&self) -> Result<Vec<u8>, TrainError> {
        let params = self.config.params_count();
        let mut out = Vec::with_capacity(Self::optimizer_state_len(params));
        out.extend_from_slice(&self.adam_steps.to_le_bytes());
        for which in [0, 1] {
            for moments in &self.moments {
                let t = if which == 0 { &moments.m } else { &moments.v };
                for x in t.flatten_all()?.to_vec1::<f32>()? {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Restores a state written by [`Trainer::optimizer_state`]. Refuses
    /// bytes of the wrong length, and moments that are not finite or second
    /// moments below zero, leaving the optimizer as it was.
    pub fn set_optimizer_state(&mut self, bytes: &[u8]) -> Result<(), TrainError> {
        let params = self.config.params_count();
        let expected = Self::optimizer_state_len(params);
        if bytes.len() != expected {
            return Err(TrainError::OptimizerState(format!(
                "{} bytes, expected {expected} for {params} parameters",
                bytes.len()
            )));
        }
        let (steps, rest) = bytes.split_at(8);
        let steps = u64::from_le_bytes(steps.try_into().unwrap_or_default());
        let floats: Vec<f32> = rest
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (m, v) = floats.split_at(params);
        if m.iter().chain(v).any(|x| !x.is_finite()) || v.iter().any(|&x| x < 0.0) {
            return Err(TrainError::OptimizerState(
                "moments that are not finite, or a negative second moment".into(),
            ));
        }
        let mut next = Vec::with_capacity(self.moments.len());
        let mut offset = 0;
        for moments in &self.moments {
            let shape = moments.m.shape().clone();
            let len = shape.elem_count();
            next.push(Moments {
                m: Tensor::from_slice(&m[offset..offset + len], shape.clone(), &self.device)?,
                v: Tensor::from_slice(&v[offset..offset + len], shape, &self.device)?,
                decay: moments.decay,
            });
            offset += len;
        }
        self.moments = next;
        self.adam_steps = steps;
        Ok(())
    }

    /// Forgets the AdamW moments (e.g. when a worker joins a run midway).
    pub fn reset_optimizer(&mut self) -> Result<(), TrainError> {
        for moments in &mut self.moments {
            moments.m = moments.m.zeros_like()?;
            moments.v = moments.v.zeros_like()?;
        }
        self.adam_steps = 0;
        Ok(())
    }

    fn batch_tensors(
        &self,
        sampler: &mut BatchSampler<'_>,
        batch_size: usize,
        seq_len: usize,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let (inputs, targets) = sampler.next_batch();
        let inputs = Tensor::from_vec(inputs, (batch_size, seq_len), &self.device)?;
        let targets = Tensor::from_vec(targets, (batch_size, seq_len), &self.device)?;
        Ok((inputs, targets))
    }

    fn check_shape(&self, batch_size: usize, seq_len: usize) -> Result<(), TrainError> {
        if seq_len > self.config.max_seq_len {
            return Err(TrainError::Config(format!(
                "sequence length {seq_len} exceeds the model's max_seq_len {}",
                self.config.max_seq_len
            )));
        }
        if batch_size == 0 || seq_len == 0 {
            return Err(SampleError::EmptyBatch {
                batch_size,
                seq_len,
            }
            .into());
        }
        Ok(())
    }

    /// Trains `cfg.steps` AdamW steps on batches sampled from `tokens`.
    pub fn train_inner(
        &mut self,
        tokens: &[u16],
        cfg: &InnerConfig,
    ) -> Result<InnerReport, TrainError> {
        self.train_inner_observed(tokens, cfg, &mut |_, _| true)
    }

    /// [`Trainer::train_inner`], calling `on_step(step, loss)` after every
    /// step (steps count from 1) — for progress display while a long inner
    /// loop runs. Returning `false` stops training there with
    /// [`TrainError::Stopped`] (a node shutting down, a round that closed).
    /// The callback does not change what is trained: the same seed gives
    /// the same params with or without it.
    pub fn train_inner_observed(
        &mut self,
        tokens: &[u16],
        cfg: &InnerConfig,
        on_step: &mut dyn FnMut(usize, f32) -> bool,
    ) -> Result<InnerReport, TrainError> {
        let started = Instant::now();
        self.check_shape(cfg.batch_size, cfg.seq_len)?;
        check_vocab(tokens, self.config.vocab_size)?;
        let accumulation = cfg.accumulation.max(1);
        let mut sampler = BatchSampler::new(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)?;
        let mut losses = Vec::with_capacity(cfg.steps);
        for step in 0..cfg.steps {
            let mut summed: Option<Vec<Tensor>> = None;
            let mut loss_sum = 0.0f32;
            for _ in 0..accumulation {
                let (inputs, targets) =
                    self.batch_tensors(&mut sampler, cfg.batch_size, cfg.seq_len)?;
                let loss = self.model.loss(&inputs, &targets)?;
                loss_sum += loss.to_scalar::<f32>()?;
                let grads = loss.backward()?;
                let mut grads_in_order = Vec::with_capacity(self.vars.len());
                for (name, var) in &self.vars {
                    let grad = grads.get(var.as_tensor()).cloned().ok_or_else(|| {
                        TrainError::Config(format!("parameter {name} received no gradient"))
                    })?;
                    grads_in_order.push(grad);
                }
                summed = Some(match summed {
                    None => grads_in_order,
                    Some(acc) => acc
                        .iter()
                        .zip(&grads_in_order)
                        .map(|(a, g)| a + g)
                        .collect::<Result<_, _>>()?,
                });
            }
            let loss = loss_sum / accumulation as f32;
            if !loss.is_finite() {
                return Err(TrainError::Diverged { step, loss });
            }
            losses.push(loss);
            let grads = summed.unwrap_or_default();
            self.adamw_step(&grads, cfg, cfg.lr_at(cfg.start_step + step), accumulation)?;
            if !on_step(step + 1, loss) {
                return Err(TrainError::Stopped { steps: step + 1 });
            }
        }
        Ok(InnerReport {
            tokens: cfg.tokens(),
            losses,
            wall: started.elapsed(),
        })
    }

    /// One AdamW update from summed gradients.
    fn adamw_step(
        &mut self,
        grads: &[Tensor],
        cfg: &InnerConfig,
        lr: f64,
        accumulation: usize,
    ) -> Result<(), TrainError> {
        // The mean over micro-batches, then clipped by global norm: one
        // scalar factor applied to every gradient.
        let mut scale = 1.0 / accumulation as f64;
        if cfg.grad_clip > 0.0 {
            let squares: Vec<Tensor> = grads
                .iter()
                .map(|g| g.sqr()?.sum_all())
                .collect::<Result<_, _>>()?;
            let norm = f64::from(Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?).sqrt()
                * scale;
            if norm > cfg.grad_clip {
                scale *= cfg.grad_clip / norm;
            }
        }
        self.adam_steps += 1;
        let t = self.adam_steps as i32;
        let bias1 = 1.0 - cfg.beta1.powi(t);
        let bias2 = 1.0 - cfg.beta2.powi(t);
        for ((grad, moments), (_, var)) in grads.iter().zip(&mut self.moments).zip(&self.vars) {
            let grad = grad.affine(scale, 0.0)?;
            moments.m = (moments.m.affine(cfg.beta1, 0.0)? + grad.affine(1.0 - cfg.beta1, 0.0)?)?;
            moments.v =
                (moments.v.affine(cfg.beta2, 0.0)? + grad.sqr()?.affine(1.0 - cfg.beta2, 0.0)?)?;
            let denom = moments
                .v
                .affine(1.0 / bias2, 0.0)?
                .sqrt()?
                .affine(1.0, cfg.eps)?;
            let update = moments.m.affine(lr / bias1, 0.0)?.div(&denom)?;
            let theta = var.as_tensor();
            let decayed = if moments.decay {
                theta.affine(1.0 - lr * cfg.weight_decay, 0.0)?
            } else {
                theta.clone()
            };
            var.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    /// Mean loss over `batches` batches of [`EVAL_BATCH_SIZE`] sequences at
    /// the model's full context, sampled with `seed` (fixed seed, fixed
    /// batches: comparable across arms and rounds).
    pub fn eval_loss(&self, tokens: &[u16], batches: usize, seed: u64) -> Result<f32, TrainError> {
        let seq_len = self
            .config
            .max_seq_len
            .min(tokens.len().saturating_sub(1))
            .max(1);
        self.eval_loss_with(tokens, batches, EVAL_BATCH_SIZE, seq_len, seed)
    }

    /// [`Trainer::eval_loss`] with an explicit batch shape.
    pub fn eval_loss_with(
        &self,
        tokens: &[u16],
        batches: usize,
        batch_size: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<f32, TrainError> {
        self.check_shape(batch_size, seq_len)?;
        check_vocab(tokens, self.config.vocab_size)?;
        let mut sampler = BatchSampler::new(tokens, batch_size, seq_len, seed)?;
        let mut total = 0.0f64;
        for _ in 0..batches.max(1) {
            let (inputs, targets) = self.batch_tensors(&mut sampler, batch_size, seq_len)?;
            let loss = self.model.loss(&inputs, &targets)?;
            total += f64::from(loss.to_scalar::<f32>()?);
        }
        Ok((total / batches.max(1) as f64) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Trainer, Vec<u16>, InnerConfig) {
        let model = ModelConfig::preset("tiny").unwrap();
        let trainer = Trainer::new(&model, Device::Cpu, 3).unwrap();
        let text = crate::data::corpus::generate(11, 6_000);
        let tokens = crate::data::tokenize_bytes(text.as_bytes());
        let cfg = InnerConfig {
            steps: 4,
            batch_size: 2,
            seq_len: 16,
            warmup: 1,
            seed: 5,
            ..InnerConfig::default()
        };
        (trainer, tokens, cfg)
    }

    #[test]
    fn observing_steps_reports_each_and_changes_nothing() {
        let (mut plain, tokens, cfg) = setup();
        let report = plain.train_inner(&tokens, &cfg).unwrap();
        let (mut observed, _, _) = setup();
        let mut seen = Vec::new();
        let observed_report = observed
            .train_inner_observed(&tokens, &cfg, &mut |step, loss| {
                seen.push((step, loss));
                true
            })
            .unwrap();
        assert_eq!(
            seen,
            report
                .losses
                .iter()
                .enumerate()
                .map(|(i, &l)| (i + 1, l))
                .collect::<Vec<_>>()
        );
        assert_eq!(observed_report.losses, report.losses);
        assert_eq!(
            observed.params_hash().unwrap(),
            plain.params_hash().unwrap()
        );
    }

    #[test]
    fn a_callback_can_stop_training() {
        let (mut trainer, tokens, cfg) = setup();
        let err = trainer
            .train_inner_observed(&tokens, &cfg, &mut |step, _| step < 2)
            .unwrap_err();
        assert!(matches!(err, TrainError::Stopped { steps: 2 }), "{err}");
    }
}

/// The inner configuration of round `round` of a run: `steps` inner steps
/// (the assignment's) on the run's batch, sequence length and learning-rate
/// schedule, sampling with `seed`. Nodes train with it and the coordinator's
/// spot checks replay with it, so the two cannot drift apart.
pub fn inner_for_round(
    run: &barnraise_protocol::messages::RunConfig,
    round: u64,
    steps: u32,
    seed: u64,
) -> InnerConfig {
    InnerConfig {
        steps: steps as usize,
        batch_size: run.batch_size as usize,
        seq_len: run.seq_len as usize,
        lr: f64::from(run.inner_lr),
        min_lr: f64::from(run.inner_lr) / 10.0,
        warmup: InnerConfig::default().warmup.min(steps as usize),
        schedule_steps: (run.total_rounds.max(1) as usize).saturating_mul(run.inner_steps as usize),
        start_step: (round as usize).saturating_mul(run.inner_steps as usize),
        seed,
        ..InnerConfig::default()
    }
}
