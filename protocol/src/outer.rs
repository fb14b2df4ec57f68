//! The outer optimizer of a DiLoCo round: every party (coordinator, every
//! node, every auditor) turns the round's accepted pseudo-gradients into
//! θ_{r+1} with these two functions, so the result must be the same bits
//! everywhere.
//!
//! Bit-identity comes from three choices:
//! - every element is computed by the same short sequence of f32 operations,
//!   written out one by one (Rust never fuses them into FMAs or reorders
//!   them, because it has no fast-math);
//! - the weighted mean sums the deltas in the order the caller lists them
//!   (the manifest's order), never in parallel or in a tree;
//! - weights are normalised once, in f64, in list order, then rounded to f32.
//!
//! A pseudo-gradient is Δ = θ_r − θ_local, so it points *against* the
//! direction the workers moved; the step is θ_{r+1} = θ_r − lr · u, where u is
//! plain momentum or its Nesterov look-ahead (PyTorch's `SGD(nesterov=True)`
//! with no dampening, as in the DiLoCo paper).

use serde::{Deserialize, Serialize};

/// Outer-step hyperparameters of a run. The defaults are DiLoCo's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OuterConfig {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
}

impl Default for OuterConfig {
    fn default() -> Self {
        OuterConfig {
            lr: 0.7,
            momentum: 0.9,
            nesterov: true,
        }
    }
}

/// The outer optimizer's state: the momentum buffer, one value per parameter.
/// It is part of the global state of a run (checkpoints carry it), because
/// every party must apply the same step.
#[derive(Debug, Clone, PartialEq)]
pub struct OuterOptimizer {
    config: OuterConfig,
    momentum: Vec<f32>,
}

impl OuterOptimizer {
    /// A fresh optimizer for `params` parameters, with zero momentum.
    pub fn new(config: OuterConfig, params: usize) -> Self {
        OuterOptimizer {
            config,
            momentum: vec![0.0; params],
        }
    }

    /// Resumes from a momentum buffer saved earlier (e.g. from a checkpoint).
    pub fn from_state(config: OuterConfig, momentum: Vec<f32>) -> Self {
        OuterOptimizer { config, momentum }
    }

    pub fn config(&self) -> &OuterConfig {
        &self.config
    }

    pub fn momentum(&self) -> &[f32] {
        &self.momentum
    }

    /// The momentum buffer, moved out (to be saved off the async threads;
    /// [`OuterOptimizer::from_state`] puts it back).
    pub fn into_momentum(self) -> Vec<f32> {
        self.momentum
    }

    /// Applies one outer step in place: `params` holds θ_r on entry and
    /// θ_{r+1} on return; `avg_delta` is the round's aggregated
    /// pseudo-gradient.
    ///
    /// # Panics
    /// If the three lengths differ: that is a programming error, since every
    /// update is checked for length when it is decoded.
    pub fn step(&mut self, params: &mut [f32], avg_delta: &[f32]) {
        self.check_lengths(params.len(), avg_delta.len());
        let config = self.config;
        for ((p, m), &d) in params
            .iter_mut()
            .zip(self.momentum.iter_mut())
            .zip(avg_delta)
        {
            let (moved, buffer) = element_step(&config, *p, *m, d);
            *m = buffer;
            *p = moved;
        }
    }

    /// Where [`OuterOptimizer::step`] would take `params` if `avg_delta`
    /// were the round's average, written into `out`, leaving the momentum
    /// as it is: the same rounded operations, so a node and a replay that
    /// preview from the same state land on the same bits (a `bench diloco`
    /// arm starts held-back steps there: docs/architecture.md, "How many
    /// steps a round can hold back").
    ///
    /// # Panics
    /// If the lengths differ, as [`OuterOptimizer::step`].
    pub fn preview_into(&self, params: &[f32], avg_delta: &[f32], out: &mut Vec<f32>) {
        self.check_lengths(params.len(), avg_delta.len());
        out.clear();
        out.extend(
            params
                .iter()
                .zip(&self.momentum)
                .zip(avg_delta)
                .map(|((&p, &m), &d)| element_step(&self.config, p, m, d).0),
        );
    }

    fn check_lengths(&self, params: usize, delta: usize) {
        assert_eq!(params, delta, "outer step: params and delta lengths differ");
        assert_eq!(
            params,
            self.momentum.len(),
            "outer step: params and momentum lengths differ"
        );
    }
}

/// One element of the outer step: `(θ's new value, the new momentum)` from
/// θ's value `p`, the momentum `m` and the average's `d`. Each line is one
/// rounded f32 operation; keep them separate.
#[inline]
fn element_step(config: &OuterConfig, p: f32, m: f32, d: f32) -> (f32, f32) {
    let decayed = config.momentum * m;
    let buffer = decayed + d;
    let update = if config.nesterov {
        let look_ahead = config.momentum * buffer;
        d + look_ahead
    } else {
        buffer
    };
    let scaled = config.lr * update;
    (p - scaled, buffer)
}

/// Writes the weighted mean of `deltas` into `out`: Σ_j (w_j / Σw) · Δ_j,
/// summed in list order for every element.
///
/// Weights are usually token counts. When the total weight is zero (or not a
/// finite positive number) there is nothing to average and `out` is zeroed,
/// so a round with no usable updates leaves the params where they are.
///
/// # Panics
/// If a delta's length differs from `out`'s (a programming error: updates are
/// length-checked when decoded).
pub fn weighted_mean_into(deltas: &[(&[f32], f32)], out: &mut [f32]) {
    out.fill(0.0);
    let mut total = 0.0f64;
    for &(delta, weight) in deltas {
        assert_eq!(
            delta.len(),
            out.len(),
            "weighted mean: delta length differs from output"
        );
        total += f64::from(weight);
    }
    if !(total.is_finite() && total > 0.0) {
        return;
    }
    for &(delta, weight) in deltas {
        let share = (f64::from(weight) / total) as f32;
        for (o, &d) in out.iter_mut().zip(delta) {
            let term = share * d;
            *o += term;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_nesterov_matches_hand_computed_steps() {
        // Two steps with lr 0.5, momentum 0.5 (exact in binary, so the
        // expected values below are exact).
        let cfg = OuterConfig {
            lr: 0.5,
            momentum: 0.5,
            nesterov: true,
        };
        let mut opt = OuterOptimizer::new(cfg, 2);
        let mut params = [1.0f32, -2.0];
        // Step 1: m = 0*0.5 + d = d; u = d + 0.5 m = 1.5 d; θ -= 0.5 u = 0.75 d.
        opt.step(&mut params, &[1.0, 2.0]);
        assert_eq!(opt.momentum(), &[1.0, 2.0]);
        assert_eq!(params, [0.25, -3.5]);
        // Step 2 with d = (2, -4): m = 0.5m + d = (2.5, -3); u = d + 0.5m = (3.25, -5.5);
        // θ -= 0.5u → (0.25 - 1.625, -3.5 + 2.75).
        opt.step(&mut params, &[2.0, -4.0]);
        assert_eq!(opt.momentum(), &[2.5, -3.0]);
        assert_eq!(params, [-1.375, -0.75]);
    }

    #[test]
    fn outer_plain_momentum_and_defaults() {
        let cfg = OuterConfig {
            lr: 0.5,
            momentum: 0.5,
            nesterov: false,
        };
        let mut opt = OuterOptimizer::new(cfg, 1);
        let mut params = [0.0f32];
        opt.step(&mut params, &[1.0]); // m = 1, θ = -0.5
        opt.step(&mut params, &[1.0]); // m = 1.5, θ = -0.5 - 0.75
        assert_eq!(params, [-1.25]);
        assert_eq!(
            OuterConfig::default(),
            OuterConfig {
                lr: 0.7,
                momentum: 0.9,
                nesterov: true
            }
        );
    }

    #[test]
    fn outer_default_matches_reference_in_f64() {
        // DiLoCo defaults over a few rounds against an f64 reference of the
        // same recurrence: they agree to f32 rounding.
        let cfg = OuterConfig::default();
        let deltas = [[0.3f32, -0.1, 0.02], [0.25, -0.05, 0.0], [-0.1, 0.2, 0.01]];
        let mut opt = OuterOptimizer::new(cfg, 3);
        let mut params = [1.0f32, 0.5, -0.25];
        let mut ref_params = [1.0f64, 0.5, -0.25];
        let mut ref_m = [0.0f64; 3];
        for d in &deltas {
            opt.step(&mut params, d);
            for i in 0..3 {
                let di = f64::from(d[i]);
                ref_m[i] = 0.9 * ref_m[i] + di;
                ref_params[i] -= 0.7 * (di + 0.9 * ref_m[i]);
            }
        }
        for i in 0..3 {
            assert!(
                (f64::from(params[i]) - ref_params[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                params[i],
                ref_params[i]
            );
        }
    }

    #[test]
    fn outer_resumes_from_saved_state() {
        let cfg = OuterConfig::default();
        let mut a = OuterOptimizer::new(cfg, 2);
        let mut pa = [0.1f32, 0.2];
        a.step(&mut pa, &[0.01, -0.02]);
        let mut b = OuterOptimizer::from_state(cfg, a.momentum().to_vec());
        let mut pb = pa;
        a.step(&mut pa, &[0.03, 0.04]);
        b.step(&mut pb, &[0.03, 0.04]);
        assert_eq!(pa.map(f32::to_bits), pb.map(f32::to_bits));
    }

    #[test]
    fn a_preview_lands_where_the_step_does_and_moves_no_momentum() {
        for cfg in [
            OuterConfig::default(),
            OuterConfig {
                nesterov: false,
                ..OuterConfig::default()
            },
        ] {
            let mut opt = OuterOptimizer::new(cfg, 3);
            let mut params = [0.5f32, -0.25, 2.0];
            opt.step(&mut params, &[0.1, 0.2, -0.3]);
            let momentum = opt.momentum().to_vec();
            let delta = [0.07f32, -0.011, 0.3];
            let mut preview = Vec::new();
            opt.preview_into(&params, &delta, &mut preview);
            assert_eq!(
                opt.momentum(),
                &momentum[..],
                "the preview moved the momentum"
            );
            opt.step(&mut params, &delta);
            assert_eq!(
                preview.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                params.map(f32::to_bits).to_vec()
            );
        }
    }

    #[test]
    fn outer_weighted_mean_hand_computed() {
        let a = [1.0f32, 2.0, -4.0];
        let b = [3.0f32, 6.0, 4.0];
        let mut out = [9.0f32; 3];
        // Weights 1 and 3: shares 0.25 and 0.75.
        weighted_mean_into(&[(&a, 1.0), (&b, 3.0)], &mut out);
        assert_eq!(out, [2.5, 5.0, 2.0]);
        weighted_mean_into(&[(&a, 0.0)], &mut out);
        assert_eq!(out, [0.0; 3]);
        weighted_mean_into(&[], &mut out);
        assert_eq!(out, [0.0; 3]);
    }

    #[test]
    fn outer_weighted_mean_is_order_fixed_and_repeatable() {
        let xs: Vec<Vec<f32>> = (0..5)
            .map(|j| {
                (0..257)
                    .map(|i| ((i * 31 + j * 7) % 97) as f32 * 0.013 - 0.6)
                    .collect()
            })
            .collect();
        let inputs: Vec<(&[f32], f32)> = xs
            .iter()
            .enumerate()
            .map(|(j, x)| (x.as_slice(), 100.0 + j as f32))
            .collect();
        let mut first = vec![0.0f32; 257];
        let mut second = vec![0.0f32; 257];
        weighted_mean_into(&inputs, &mut first);
        weighted_mean_into(&inputs, &mut second);
        assert_eq!(first, second);
        // And it is a mean: close to the f64 weighted mean.
        let total: f64 = inputs.iter().map(|(_, w)| f64::from(*w)).sum();
        for i in 0..257 {
            let expect: f64 = inputs
                .iter()
                .map(|(x, w)| f64::from(*w) * f64::from(x[i]))
                .sum::<f64>()
                / total;
            assert!((f64::from(first[i]) - expect).abs() < 1e-5);
        }
    }
}
