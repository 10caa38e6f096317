//! Optimizers applied by the coordinator to the aggregated gradient (and by the single-process trainer).

use serde::{Deserialize, Serialize};

/// Optimizer and its hyperparameters, as an owner declares them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    /// Adam (Kingma & Ba 2015) with bias correction.
    Adam {
        lr: f32,
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        #[serde(default = "default_eps")]
        eps: f32,
    },
    /// SGD with (heavy-ball) momentum; `momentum = 0` is plain SGD.
    Sgd {
        lr: f32,
        #[serde(default)]
        momentum: f32,
    },
}

fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl OptimizerSpec {
    /// Rejects learning rates and moments that cannot train.
    pub fn validate(&self) -> Result<(), String> {
        let ok_lr = |lr: f32| lr.is_finite() && lr > 0.0 && lr <= 10.0;
        match *self {
            Self::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                if !ok_lr(lr) {
                    return Err(format!("adam lr must be in (0, 10], got {lr}"));
                }
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return Err("adam betas must be in [0, 1)".into());
                }
                if !(eps.is_finite() && eps > 0.0) {
                    return Err("adam eps must be positive".into());
                }
            }
            Self::Sgd { lr, momentum } => {
                if !ok_lr(lr) {
                    return Err(format!("sgd lr must be in (0, 10], got {lr}"));
                }
                if !(0.0..1.0).contains(&momentum) {
                    return Err("sgd momentum must be in [0, 1)".into());
                }
            }
        }
        Ok(())
    }
}

/// How the learning rate changes over a job's steps: a factor applied to the optimizer's `lr`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The optimizer's `lr` throughout.
    #[default]
    Constant,
    /// Linear warm-up over `warmup_steps`, then cosine decay to `min_ratio × lr` at the job's last step.
    Cosine {
        #[serde(default)]
        warmup_steps: u64,
        #[serde(default = "default_min_ratio")]
        min_ratio: f32,
    },
}

fn default_min_ratio() -> f32 {
    0.1
}

impl LrSchedule {
    /// The factor for the update that takes the model from step `step` to `step + 1` of `total`.
    pub fn factor(&self, step: u64, total: u64) -> f32 {
        match *self {
            Self::Constant => 1.0,
            Self::Cosine {
                warmup_steps,
                min_ratio,
            } => {
                if step < warmup_steps {
                    return (step + 1) as f32 / warmup_steps as f32;
                }
                let span = total.saturating_sub(warmup_steps).max(1) as f64;
                let t = ((step - warmup_steps) as f64 / span).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                (min_ratio as f64 + (1.0 - min_ratio as f64) * cos) as f32
            }
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Self::Cosine { min_ratio, .. } = *self
            && !(0.0..=1.0).contains(&min_ratio)
        {
            return Err(format!(
                "lr_schedule min_ratio must be in [0, 1], got {min_ratio}"
            ));
        }
        Ok(())
    }
}

/// Optimizer state for one model: moments and the step count. Serialised into checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    pub spec: OptimizerSpec,
    /// Steps taken so far (Adam's bias correction needs it).
    pub t: u64,
    /// First moment (Adam) or velocity (SGD).
    pub m: Vec<f32>,
    /// Second moment (Adam only; empty for SGD).
    pub v: Vec<f32>,
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec, params: usize) -> Self {
        let v = if matches!(spec, OptimizerSpec::Adam { .. }) {
            vec![0.0; params]
        } else {
            Vec::new()
        };
        Self {
            spec,
            t: 0,
            m: vec![0.0; params],
            v,
        }
    }

    /// Applies one update in place: `params -= f(grad)`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        self.step_scaled(params, grad, 1.0, 0.0);
    }

    /// One update with the learning rate scaled by `lr_scale` (a schedule) and decoupled weight decay
    /// (AdamW-style: `params -= lr × lr_scale × weight_decay × params` before the gradient step).
    pub fn step_scaled(
        &mut self,
        params: &mut [f32],
        grad: &[f32],
        lr_scale: f32,
        weight_decay: f32,
    ) {
        self.t += 1;
        let base = match self.spec {
            OptimizerSpec::Adam { lr, .. } | OptimizerSpec::Sgd { lr, .. } => lr,
        };
        if weight_decay > 0.0 {
            let keep = 1.0 - base * lr_scale * weight_decay;
            params.iter_mut().for_each(|p| *p *= keep);
        }
        match self.spec {
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let c1 = 1.0 - beta1.powi(self.t.min(i32::MAX as u64) as i32);
                let c2 = 1.0 - beta2.powi(self.t.min(i32::MAX as u64) as i32);
                let step = lr * lr_scale * c2.sqrt() / c1;
                for i in 0..params.len() {
                    let g = grad[i];
                    self.m[i] = beta1 * self.m[i] + (1.0 - beta1) * g;
                    self.v[i] = beta2 * self.v[i] + (1.0 - beta2) * g * g;
                    params[i] -= step * self.m[i] / (self.v[i].sqrt() + eps * c2.sqrt());
                }
            }
            OptimizerSpec::Sgd { lr, momentum } => {
                for i in 0..params.len() {
                    self.m[i] = momentum * self.m[i] + grad[i];
                    params[i] -= lr * lr_scale * self.m[i];
                }
            }
        }
    }

    /// State as bytes for a checkpoint: `t` (u64 LE), then `m`, then `v` as f32 LE.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.t.to_le_bytes().to_vec();
        out.extend_from_slice(&crate::protocol::f32_bytes(&self.m));
        out.extend_from_slice(&crate::protocol::f32_bytes(&self.v));
        out
    }

    /// Restores state written by [`Optimizer::to_bytes`]; `None` if the bytes do not fit `spec` and `params`.
    pub fn from_bytes(spec: OptimizerSpec, params: usize, bytes: &[u8]) -> Option<Self> {
        let fresh = Self::new(spec, params);
        if bytes.len() != 8 + 4 * (fresh.m.len() + fresh.v.len()) {
            return None;
        }
        let t = u64::from_le_bytes(bytes[..8].try_into().ok()?);
        let floats = crate::protocol::f32s(&bytes[8..]);
        let (m, v) = floats.split_at(fresh.m.len());
        Some(Self {
            spec,
            t,
            m: m.to_vec(),
            v: v.to_vec(),
        })
    }
}

/// The outer optimizer of a `local` job (DiLoCo): Nesterov momentum on the pseudo-gradient `g = −Δ̄` (the mean
/// verified delta, negated), applied to the coordinator's master parameters θ*. Its state is the velocity only:
/// unlike the inner optimizers it persists across rounds (it is checkpointed with the job).
#[derive(Debug, Clone, PartialEq)]
pub struct Nesterov {
    pub lr: f32,
    pub momentum: f32,
    /// Velocity `u`, one value per parameter.
    pub u: Vec<f32>,
}

impl Nesterov {
    pub fn new(lr: f32, momentum: f32, params: usize) -> Self {
        Self {
            lr,
            momentum,
            u: vec![0.0; params],
        }
    }

    /// One outer step: `u ← μu + g`, `θ ← θ − lr·(g + μu)` with `g = −delta`.
    pub fn step(&mut self, params: &mut [f32], delta: &[f32]) {
        for i in 0..params.len() {
            let g = -delta[i];
            self.u[i] = self.momentum * self.u[i] + g;
            params[i] -= self.lr * (g + self.momentum * self.u[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_minimises_a_quadratic_and_round_trips() {
        let mut opt = Optimizer::new(
            OptimizerSpec::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            2,
        );
        let mut p = vec![3.0f32, -2.0];
        for _ in 0..500 {
            let g = vec![2.0 * p[0], 2.0 * p[1]];
            opt.step(&mut p, &g);
        }
        assert!(p.iter().all(|v| v.abs() < 1e-2), "{p:?}");
        let back = Optimizer::from_bytes(opt.spec, 2, &opt.to_bytes()).unwrap();
        assert_eq!(back, opt);
    }

    #[test]
    fn cosine_schedule_warms_up_and_decays_to_its_floor() {
        let s = LrSchedule::Cosine {
            warmup_steps: 10,
            min_ratio: 0.1,
        };
        assert!((s.factor(0, 110) - 0.1).abs() < 1e-6);
        assert!((s.factor(9, 110) - 1.0).abs() < 1e-6);
        assert!((s.factor(10, 110) - 1.0).abs() < 1e-6);
        assert!((s.factor(60, 110) - 0.55).abs() < 1e-4);
        assert!((s.factor(110, 110) - 0.1).abs() < 1e-6);
        assert_eq!(LrSchedule::Constant.factor(5, 10), 1.0);
    }

    #[test]
    fn weight_decay_shrinks_parameters_without_a_gradient() {
        let mut opt = Optimizer::new(
            OptimizerSpec::Sgd {
                lr: 0.1,
                momentum: 0.0,
            },
            1,
        );
        let mut p = vec![2.0f32];
        opt.step_scaled(&mut p, &[0.0], 0.5, 0.2);
        assert!((p[0] - 2.0 * (1.0 - 0.1 * 0.5 * 0.2)).abs() < 1e-6);
    }

    #[test]
    fn sgd_momentum_step_is_exact() {
        let mut opt = Optimizer::new(
            OptimizerSpec::Sgd {
                lr: 0.5,
                momentum: 0.9,
            },
            1,
        );
        let mut p = vec![1.0f32];
        opt.step(&mut p, &[1.0]);
        opt.step(&mut p, &[1.0]);
        assert!((p[0] - (1.0 - 0.5 - 0.5 * 1.9)).abs() < 1e-6);
    }

    #[test]
    fn nesterov_with_zero_momentum_and_unit_lr_applies_the_delta() {
        let mut n = Nesterov::new(1.0, 0.0, 2);
        let mut p = vec![1.0f32, 2.0];
        n.step(&mut p, &[0.5, -1.0]);
        assert_eq!(p, vec![1.5, 1.0]);
        // With momentum the second identical step goes further than the first.
        let mut n = Nesterov::new(0.7, 0.9, 1);
        let mut p = vec![0.0f32];
        n.step(&mut p, &[1.0]);
        let first = p[0];
        assert!((first - 0.7 * 1.9).abs() < 1e-6);
        n.step(&mut p, &[1.0]);
        assert!(p[0] - first > first);
    }
}
