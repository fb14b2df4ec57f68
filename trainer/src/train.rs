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
use crate::precision::{Precision, PrecisionError};
use barnraise_protocol::Hash;
use candle_core::{DType, Device, Tensor, Var};
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
    /// Batches of the seed's stream to pass over before the first step, so
    /// that a round trained in two calls draws what one call would
    /// (`bench diloco`'s `overlap=S`). 0 for nodes.
    pub skip_batches: usize,
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
            skip_batches: 0,
        }
    }
}

impl InnerConfig {
    /// Tokens one call trains on.
    pub fn tokens(&self) -> u64 {
        (self.steps * self.accumulation.max(1) * self.batch_size * self.seq_len) as u64
    }

    /// The same step as micro-batches of at most `max_sequences` sequences
    /// (the largest divisor of `batch_size` that fits), their gradients
    /// summed: for a GPU that cannot hold the run's whole batch at once.
    /// The sampler draws windows one after another from one stream, so the
    /// micro-batches are the same sequences; only the summation order of
    /// the gradient differs.
    pub fn with_micro_batches(&self, max_sequences: usize) -> InnerConfig {
        let max = max_sequences.max(1);
        if self.batch_size <= max {
            return self.clone();
        }
        let micro = (1..=max)
            .rev()
            .find(|d| self.batch_size.is_multiple_of(*d))
            .unwrap_or(1);
        InnerConfig {
            batch_size: micro,
            accumulation: self.accumulation.max(1) * (self.batch_size / micro),
            ..self.clone()
        }
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
    #[error(transparent)]
    Precision(#[from] PrecisionError),
    #[error(
        "the device ran out of memory at step {step} ({detail}): lower the batch size \
         (gradient accumulation keeps the tokens per step; a node: --micro-batch), \
         shorten the sequence, or use --precision bf16"
    )]
    OutOfMemory { step: usize, detail: String },
}

impl TrainError {
    /// A tensor error that is the device running out of memory becomes
    /// [`TrainError::OutOfMemory`], which names the fix; others pass.
    fn at_step(self, step: usize) -> TrainError {
        match self {
            TrainError::Tensor(e) => {
                let detail = e.to_string();
                let lower = detail.to_ascii_lowercase();
                if lower.contains("out_of_memory") || lower.contains("out of memory") {
                    TrainError::OutOfMemory { step, detail }
                } else if let Some(hint) = crate::device::cuda_error_hint(&detail) {
                    TrainError::Config(format!("the GPU failed at step {step}: {detail}; {hint}"))
                } else {
                    TrainError::Tensor(e)
                }
            }
            other => other,
        }
    }
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
    /// When set, each step waits for the device after its forward, backward
    /// and optimizer phases and adds their wall time here.
    phases: Option<PhaseSeconds>,
}

/// Wall time spent in each phase of the steps taken while phase timing
/// was on ([`Trainer::time_phases`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseSeconds {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
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
        let mut model = Model::new(config, &vars, &device)?;
        model.set_compute_dtype(Precision::Auto.compute_dtype(&device)?);
        Ok(Trainer {
            config: config.clone(),
            device,
            vars,
            model,
            moments,
            adam_steps: 0,
            phases: None,
        })
    }

    /// Whether f32 on the CPU runs the one-pass kernels (the default) or
    /// candle's primitives; see [`Model::set_cpu_kernels`].
    pub fn set_cpu_kernels(&mut self, on: bool) {
        self.model.set_cpu_kernels(on);
    }

    /// Sets the precision policy (crate::precision) and returns the dtype
    /// the passes will compute in. Weights and optimizer state stay f32.
    pub fn set_precision(&mut self, precision: Precision) -> Result<DType, TrainError> {
        let dtype = precision.compute_dtype(&self.device)?;
        self.model.set_compute_dtype(dtype);
        Ok(dtype)
    }

    /// Turns phase timing on (from zero) or off. It synchronises the device
    /// three times a step, so it slows a GPU a little: `bench train` uses it
    /// on extra steps only.
    pub fn time_phases(&mut self, on: bool) {
        self.phases = on.then(PhaseSeconds::default);
    }

    /// The phase times gathered since [`Trainer::time_phases`] turned it on.
    pub fn phase_seconds(&self) -> Option<PhaseSeconds> {
        self.phases
    }

    /// Adds the time since `*mark` to one phase, after waiting for the
    /// device; moves the mark.
    fn phase_done(
        &mut self,
        mark: &mut Instant,
        phase: fn(&mut PhaseSeconds) -> &mut f64,
    ) -> Result<(), TrainError> {
        if let Some(phases) = self.phases.as_mut() {
            self.device.synchronize()?;
            let now = Instant::now();
            *phase(phases) += (now - *mark).as_secs_f64();
            *mark = now;
        }
        Ok(())
    }

    /// The dtype the forward and backward passes compute in.
    pub fn compute_dtype(&self) -> DType {
        self.model.compute_dtype()
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
        sampler.skip(cfg.skip_batches);
        let mut losses = Vec::with_capacity(cfg.steps);
        for step in 0..cfg.steps {
            let loss = self
                .train_step(&mut sampler, cfg, step, accumulation)
                .map_err(|e| e.at_step(step))?;
            losses.push(loss);
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

    /// One optimizer step of [`Trainer::train_inner_observed`]; its loss.
    fn train_step(
        &mut self,
        sampler: &mut BatchSampler<'_>,
        cfg: &InnerConfig,
        step: usize,
        accumulation: usize,
    ) -> Result<f32, TrainError> {
        let mut summed: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0f32;
        for _ in 0..accumulation {
            let (inputs, targets) = self.batch_tensors(sampler, cfg.batch_size, cfg.seq_len)?;
            let mut mark = Instant::now();
            let grads = if self.model.cpu_kernels_apply() {
                // f32 on the CPU: the model's own backward, without
                // autograd's bookkeeping (crate::model::backprop).
                let tape = self.model.cpu_forward(&inputs, &targets)?;
                self.phase_done(&mut mark, |p| &mut p.forward)?;
                loss_sum += tape.loss;
                tape.backward(&self.model)?
            } else {
                let loss = self.model.loss(&inputs, &targets)?;
                self.phase_done(&mut mark, |p| &mut p.forward)?;
                loss_sum += loss.to_scalar::<f32>()?;
                loss.backward()?
            };
            self.phase_done(&mut mark, |p| &mut p.backward)?;
            let mut grads_in_order = Vec::with_capacity(self.vars.len());
            for (name, var) in &self.vars {
                // Detached: a gradient leaves the backward pass as a value.
                // One that still referenced the forward graph would keep
                // every activation alive through the AdamW moments, step
                // after step (`training_steps_do_not_retain_their_graphs`).
                let grad = grads
                    .get(var.as_tensor())
                    .map(Tensor::detach)
                    .ok_or_else(|| {
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
        let grads = summed.unwrap_or_default();
        let mut mark = Instant::now();
        self.adamw_step(&grads, cfg, cfg.lr_at(cfg.start_step + step), accumulation)?;
        self.phase_done(&mut mark, |p| &mut p.optimizer)?;
        Ok(loss)
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
        // f32 on the CPU: crate::cpu_ops' parallel kernels, the same
        // arithmetic in a few passes instead of a dozen on one thread.
        let fused = self.model.cpu_kernels_apply();
        if cfg.grad_clip > 0.0 {
            let sum_sq = if fused {
                crate::cpu_ops::sum_of_squares(grads)?
            } else {
                let squares: Vec<Tensor> = grads
                    .iter()
                    .map(|g| g.sqr()?.sum_all())
                    .collect::<Result<_, _>>()?;
                f64::from(Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?)
            };
            let norm = sum_sq.sqrt() * scale;
            if norm > cfg.grad_clip {
                scale *= cfg.grad_clip / norm;
            }
        }
        self.adam_steps += 1;
        let t = self.adam_steps as i32;
        let bias1 = 1.0 - cfg.beta1.powi(t);
        let bias2 = 1.0 - cfg.beta2.powi(t);
        if fused {
            let inputs: Vec<crate::cpu_ops::AdamInput<'_>> = grads
                .iter()
                .zip(&self.moments)
                .zip(&self.vars)
                .map(|((grad, moments), (_, var))| crate::cpu_ops::AdamInput {
                    theta: var.as_tensor(),
                    grad,
                    m: &moments.m,
                    v: &moments.v,
                    step: crate::cpu_ops::AdamStep {
                        grad_scale: scale as f32,
                        beta1: cfg.beta1 as f32,
                        one_minus_beta1: (1.0 - cfg.beta1) as f32,
                        beta2: cfg.beta2 as f32,
                        one_minus_beta2: (1.0 - cfg.beta2) as f32,
                        inv_bias2: (1.0 / bias2) as f32,
                        step: (lr / bias1) as f32,
                        eps: cfg.eps as f32,
                        decay: if moments.decay {
                            (1.0 - lr * cfg.weight_decay) as f32
                        } else {
                            1.0
                        },
                    },
                })
                .collect();
            let updated = crate::cpu_ops::adamw(&inputs)?;
            for ((theta, m, v), (moments, (_, var))) in updated
                .into_iter()
                .zip(self.moments.iter_mut().zip(&self.vars))
            {
                (moments.m, moments.v) = (m, v);
                var.set(&theta)?;
            }
            return Ok(());
        }
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

    fn relative_diff(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (num / den).sqrt()
    }

    /// The CPU's fused AdamW (crate::cpu_ops::adamw) is the tensor
    /// version's arithmetic: the same bits without clipping, and with
    /// clipping (whose norm is summed differently) the same to rounding.
    #[test]
    fn fused_adamw_is_the_tensor_versions_arithmetic() {
        for clip in [0.0, 0.05] {
            let (mut fused, _, mut cfg) = setup();
            let (mut tensors, _, _) = setup();
            tensors.set_cpu_kernels(false);
            assert!(fused.model.cpu_kernels_apply() && !tensors.model.cpu_kernels_apply());
            cfg.grad_clip = clip;
            let mut rng = crate::rng::Rng::new(9);
            for step in 0..3 {
                let grads: Vec<Tensor> = fused
                    .vars
                    .iter()
                    .map(|(_, v)| {
                        let values: Vec<f32> = (0..v.elem_count())
                            .map(|_| rng.normal() as f32 * 0.1)
                            .collect();
                        Tensor::from_vec(values, v.shape(), &Device::Cpu).unwrap()
                    })
                    .collect();
                let lr = cfg.lr_at(step);
                fused.adamw_step(&grads, &cfg, lr, 2).unwrap();
                tensors.adamw_step(&grads, &cfg, lr, 2).unwrap();
            }
            let flat = |t: &Trainer| -> Vec<f32> {
                t.vars
                    .iter()
                    .flat_map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect()
            };
            let (a, b) = (flat(&fused), flat(&tensors));
            let moments = |t: &Trainer| -> Vec<f32> {
                t.moments
                    .iter()
                    .flat_map(|m| {
                        let mut v = m.m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        v.extend(m.v.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                        v
                    })
                    .collect()
            };
            if clip == 0.0 {
                assert!(a == b, "parameters differ without clipping");
                assert!(moments(&fused) == moments(&tensors), "moments differ");
            } else {
                let gap = relative_diff(&a, &b);
                assert!(gap < 1e-6, "parameters {gap} apart with clipping");
                assert!(relative_diff(&moments(&fused), &moments(&tensors)) < 1e-5);
            }
            // And the step moved something.
            let (start, _, _) = setup();
            assert!(relative_diff(&flat(&start), &a) > 1e-4);
        }
    }

    /// The bf16 policy on candle's CPU bf16 kernels: it really computes in
    /// bf16 (results differ from f32), stays close to f32, keeps weights and
    /// optimizer state f32, and trains (loss falls).
    #[test]
    fn bf16_policy_computes_in_bf16_and_keeps_f32_masters() {
        let (mut full, tokens, cfg) = setup();
        let (mut mixed, _, _) = setup();
        assert_eq!(full.compute_dtype(), DType::F32);
        assert_eq!(mixed.set_precision(Precision::Bf16).unwrap(), DType::BF16);
        assert_eq!(mixed.compute_dtype(), DType::BF16);

        let ids = Tensor::from_vec(
            tokens[..32]
                .iter()
                .map(|&t| u32::from(t))
                .collect::<Vec<_>>(),
            (2, 16),
            &Device::Cpu,
        )
        .unwrap();
        let logits_full = full.model().forward(&ids).unwrap();
        let logits_mixed = mixed.model().forward(&ids).unwrap();
        assert_eq!(logits_mixed.dtype(), DType::F32, "logits come back in f32");
        let a: Vec<f32> = logits_full.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = logits_mixed.flatten_all().unwrap().to_vec1().unwrap();
        let diff = relative_diff(&b, &a);
        assert!(
            diff > 0.0,
            "bf16 logits are bit-identical to f32: no cast happened"
        );
        assert!(diff < 3e-2, "bf16 logits are {diff} away from f32");

        let steps = InnerConfig { steps: 12, ..cfg };
        let full_report = full.train_inner(&tokens, &steps).unwrap();
        let mixed_report = mixed.train_inner(&tokens, &steps).unwrap();
        for trainer in [&full, &mixed] {
            for (_, var) in &trainer.vars {
                assert_eq!(var.dtype(), DType::F32);
            }
            for m in &trainer.moments {
                assert_eq!((m.m.dtype(), m.v.dtype()), (DType::F32, DType::F32));
            }
        }
        let first = mixed_report.losses[0];
        let last = *mixed_report.losses.last().unwrap();
        assert!(last < first, "bf16 loss did not fall: {first} -> {last}");
        let gap = (last - full_report.losses[11]).abs() / full_report.losses[11];
        assert!(
            gap < 0.05,
            "bf16 final loss {last} vs f32 {}",
            full_report.losses[11]
        );
        let drift = relative_diff(&mixed.flat_params().unwrap(), &full.flat_params().unwrap());
        assert!(
            drift < 1e-2,
            "bf16 params drifted {drift} from f32's after 12 steps"
        );
    }

    /// Micro-batches train on the same sequences as the whole batch: the
    /// params agree up to the gradient's summation order.
    #[test]
    fn micro_batches_train_the_same_step() {
        let (mut whole, tokens, cfg) = setup();
        let cfg = InnerConfig {
            batch_size: 6,
            ..cfg
        };
        let split = cfg.with_micro_batches(4);
        assert_eq!((split.batch_size, split.accumulation), (3, 2));
        assert_eq!(split.tokens(), cfg.tokens());
        assert_eq!(cfg.with_micro_batches(8), cfg);
        assert_eq!(cfg.with_micro_batches(0).batch_size, 1);
        let (mut micro, _, _) = setup();
        let a = whole.train_inner(&tokens, &cfg).unwrap();
        let b = micro.train_inner(&tokens, &split).unwrap();
        for (x, y) in a.losses.iter().zip(&b.losses) {
            assert!((x - y).abs() < 1e-4, "losses {x} vs {y}");
        }
        let drift = relative_diff(&micro.flat_params().unwrap(), &whole.flat_params().unwrap());
        assert!(drift < 1e-5, "micro-batched params drifted {drift}");
    }

    #[test]
    fn out_of_memory_errors_name_the_fix() {
        let oom = TrainError::Tensor(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ))
        .at_step(3);
        let text = oom.to_string();
        assert!(
            matches!(oom, TrainError::OutOfMemory { step: 3, .. }),
            "{text}"
        );
        assert!(text.contains("lower the batch size"), "{text}");
        let other = TrainError::Tensor(candle_core::Error::Msg("shape mismatch".into())).at_step(3);
        assert!(matches!(other, TrainError::Tensor(_)));
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

/// Overlapped rounds (docs/architecture.md, "Overlapped rounds"): the part
/// of a round's `inner` (its whole plan, as [`inner_for_round`] gives it)
/// a worker trains before its commit when it holds back `held_back` steps
/// for after it.
pub fn before_commit(inner: &InnerConfig, held_back: u32) -> InnerConfig {
    InnerConfig {
        steps: inner.steps.saturating_sub(held_back as usize),
        ..inner.clone()
    }
}

/// The last `steps` steps of a round's `inner`: a worker's tail, trained
/// after its commit on the batches and learning rates a worker that did
/// not hold them back would have used.
pub fn tail_of(inner: &InnerConfig, steps: u32) -> InnerConfig {
    let steps = (steps as usize).min(inner.steps);
    let before = inner.steps - steps;
    InnerConfig {
        steps,
        start_step: inner.start_step + before,
        skip_batches: inner.skip_batches + before * inner.accumulation.max(1),
        ..inner.clone()
    }
}

/// Where a worker's tail starts: θ_{r−1} minus the node's decoded update
/// of round r − 1, the point its commit sent (a replay can start there too).
pub fn tail_start(theta: &[f32], decoded_update: &[f32]) -> Vec<f32> {
    theta
        .iter()
        .zip(decoded_update)
        .map(|(t, d)| t - d)
        .collect()
}

/// What a worker's tail added: `tail_end − tail_start`, element by element.
pub fn tail_offset(tail_start: &[f32], tail_end: &[f32]) -> Vec<f32> {
    tail_start
        .iter()
        .zip(tail_end)
        .map(|(s, e)| e - s)
        .collect()
}

/// Where a worker with a carried tail starts round r: θ_r plus what the
/// tail added ([`tail_offset`]), element by element, so that the node and a
/// replay land on the same bits.
pub fn carried_start(theta: &[f32], offset: &[f32]) -> Vec<f32> {
    theta.iter().zip(offset).map(|(t, o)| t + o).collect()
}
