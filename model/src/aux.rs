//! transformers' Switch balancing loss (`load_balancing_loss_func`, used by Qwen-MoE, Mixtral
//! and OLMoE), split into per-layer terms so that gradient checkpointing can recompute one layer
//! at a time.
//!
//! transformers concatenates the router logits of all `L` MoE layers and computes, with `m_t`
//! the attention mask of token `t` and `N = L·Σ_t m_t`,
//! `aux = E · Σ_e F_e·P_e`, `F_e = Σ_{l,t} m_t·[e ∈ topk(l,t)] / N`,
//! `P_e = Σ_{l,t} m_t·softmax(l,t)_e / N`, and the loss gains `coef · aux`.
//! `F` is a constant of the pass (no gradient), so `coef·aux = Σ_l w·S_l` with
//! `w_e = coef·E·C_e / N²`, `C_e = N·F_e` and `S_l = Σ_t m_t·softmax(l,t)` (the layer's
//! [`RouterStats::prob_sum`]): one dot product per layer once every layer has routed.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::layers::RouterStats;

/// The Switch loss of one forward pass, as weights on each layer's probability sums.
#[derive(Debug, Clone)]
pub struct SwitchAux {
    weights: Tensor,
    value: f64,
}

impl SwitchAux {
    /// The loss of a pass whose MoE layers gave `stats` (in any order), times `coef`. `None`
    /// when there are no MoE layers or no counted token.
    pub fn new(coef: f64, stats: &[RouterStats]) -> Result<Option<Self>> {
        let Some(first) = stats.first() else {
            return Ok(None);
        };
        let e = first.counts.len();
        let n: f64 = stats.iter().map(|s| s.tokens).sum();
        if n <= 0.0 || e == 0 {
            return Ok(None);
        }
        let mut c = vec![0f64; e];
        for s in stats {
            if s.counts.len() != e {
                return Err(Error::InvalidInput(format!(
                    "MoE layers route to {} and {} experts; the Switch loss needs one count",
                    e,
                    s.counts.len()
                )));
            }
            for (a, b) in c.iter_mut().zip(&s.counts) {
                *a += b;
            }
        }
        let w: Vec<f64> = c.iter().map(|&ce| coef * e as f64 * ce / (n * n)).collect();
        let sums: Vec<Tensor> = stats.iter().map(|s| s.prob_sum.detach()).collect();
        let p: Vec<Vec<f32>> = Tensor::stack(&sums, 0)?.to_dtype(DType::F32)?.to_vec2()?;
        let value = p
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&w)
                    .map(|(&x, &we)| x as f64 * we)
                    .sum::<f64>()
            })
            .sum();
        let w32: Vec<f32> = w.iter().map(|&x| x as f32).collect();
        let weights = Tensor::from_vec(w32, e, first.prob_sum.device())?;
        Ok(Some(Self { weights, value }))
    }

    /// The loss value (`coef · aux`).
    pub fn value(&self) -> f64 {
        self.value
    }

    /// One layer's term `w·S_l`, a differentiable f32 scalar; the terms of all layers sum to
    /// the loss.
    pub fn layer_term(&self, s: &RouterStats) -> Result<Tensor> {
        Ok((&s.prob_sum * &self.weights)?.sum_all()?)
    }
}
