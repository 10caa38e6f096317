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
        self.t += 1;
        match self.spec {
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let c1 = 1.0 - beta1.powi(self.t.min(i32::MAX as u64) as i32);
                let c2 = 1.0 - beta2.powi(self.t.min(i32::MAX as u64) as i32);
                let step = lr * c2.sqrt() / c1;
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
                    params[i] -= lr * self.m[i];
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
}
