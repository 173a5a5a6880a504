//! The softmax router (`MoEGate`): top-k routing in f32 and the load-balancing auxiliary loss.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use moe_peft_quant::frozen_matmul;

use crate::arch::{Arch, AuxLoss};
use crate::error::Result;
use crate::ops::softmax_f32;

/// The softmax router (DeepSeekMoE's `MoEGate`, the `gate` Linear of the other families):
/// frozen, computed in f32, top-k on the device.
#[derive(Debug, Clone)]
pub struct MoeGate {
    weight: Tensor,
    top_k: usize,
    norm_topk: Option<f64>,
    aux: AuxLoss,
}

/// What one MoE layer contributes to transformers' `load_balancing_loss_func`, which pools the
/// router outputs of all MoE layers (see [`crate::aux::SwitchAux`]).
#[derive(Debug, Clone)]
pub struct RouterStats {
    /// `Σ_t m_t·softmax_t` over the layer's tokens `(experts,)`, f32, differentiable
    /// (`m_t` is 1 for a real token, 0 for padding).
    pub prob_sum: Tensor,
    /// `Σ_t m_t·[e among t's top-k]` per expert.
    pub counts: Vec<f64>,
    /// `Σ_t m_t`.
    pub tokens: f64,
}

/// The routing of one MoE layer.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Softmax probabilities `(tokens, experts)`, f32, differentiable.
    pub scores: Tensor,
    /// Chosen experts `(tokens, k)`, u32, in descending score order.
    pub topk_idx: Tensor,
    /// Their gate weights `(tokens, k)`, f32, differentiable (renormalized iff `norm_topk_prob`).
    pub topk_weight: Tensor,
}

impl MoeGate {
    /// `weight` of shape `(experts, hidden)`.
    pub fn new(arch: &Arch, weight: Tensor) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?.detach(),
            top_k: arch.top_k.max(1),
            norm_topk: arch.norm_topk,
            aux: arch.aux,
        })
    }

    /// The layer's load-balancing loss kind.
    pub fn aux_kind(&self) -> AuxLoss {
        self.aux
    }

    /// Sets the layer's load-balancing loss kind.
    pub fn set_aux_kind(&mut self, aux: AuxLoss) {
        self.aux = aux;
    }

    /// The router weight `(experts, hidden)`, f32.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Replaces the router weight. A `Var`'s tensor makes the router trainable (full
    /// fine-tuning): routing then records the weight gradient too.
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight;
    }

    /// The router weight, to replace (see [`Self::set_weight`]).
    pub fn weight_mut(&mut self) -> &mut Tensor {
        &mut self.weight
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Routes `x` of shape `(tokens, hidden)`.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let xf = x.to_dtype(DType::F32)?;
        let logits = if self.weight.track_op() && crate::grad::is_grad_enabled() {
            xf.matmul(&self.weight.t()?)?
        } else {
            frozen_matmul(&xf, &self.weight, Arc::new(self.weight.clone()))?
        };
        let scores = softmax_f32(&logits)?;
        let idx = scores
            .detach()
            .arg_sort_last_dim(false)?
            .narrow(1, 0, self.top_k)?
            .contiguous()?;
        let mut w = scores.gather(&idx, 1)?;
        // DeepSeekMoE renormalizes only for top-k > 1 (and adds eps); the others always divide.
        if let Some(eps) = self.norm_topk {
            if eps == 0.0 || self.top_k > 1 {
                let mut denom = w.sum_keepdim(1)?;
                if eps > 0.0 {
                    denom = (denom + eps)?;
                }
                w = w.broadcast_div(&denom)?;
            }
        }
        Ok(Routing {
            scores,
            topk_idx: idx,
            topk_weight: w,
        })
    }

    /// This layer's share of transformers' Switch balancing loss: the masked sums of the
    /// router probabilities and of the top-k choices. `weights` are the per-token masks, on the
    /// host and as an `(tokens,)` f32 tensor (`None`: every token counts).
    pub fn router_stats(
        &self,
        r: &Routing,
        flat: &[u32],
        weights: Option<(&[f32], &Tensor)>,
    ) -> Result<RouterStats> {
        let e = self.weight.dim(0)?;
        let k = self.top_k;
        let mut counts = vec![0f64; e];
        let (prob_sum, tokens) = match weights {
            Some((host, dev)) => {
                for (p, &x) in flat.iter().enumerate() {
                    counts[x as usize] += host[p / k] as f64;
                }
                let m = dev.to_dtype(DType::F32)?.unsqueeze(0)?;
                let tokens = host.iter().map(|&w| w as f64).sum();
                (m.matmul(&r.scores)?.squeeze(0)?, tokens)
            }
            None => {
                for &x in flat {
                    counts[x as usize] += 1.0;
                }
                (r.scores.sum(0)?, r.scores.dim(0)? as f64)
            }
        };
        Ok(RouterStats {
            prob_sum,
            counts,
            tokens,
        })
    }

    /// The balancing loss of `modeling_deepseek.py` (seq-level when `seq_aux`), given the
    /// routing, the host copy of its flattened expert ids, and the batch layout. Padding
    /// positions count, as in the reference. `None` unless this is a DeepSeekMoE router with
    /// `aux_loss_alpha > 0`.
    pub fn aux_loss(
        &self,
        r: &Routing,
        flat: &[u32],
        b: usize,
        s: usize,
    ) -> Result<Option<Tensor>> {
        let AuxLoss::DeepSeek { alpha, seq } = self.aux else {
            return Ok(None);
        };
        let e = self.weight.dim(0)?;
        let k = self.top_k;
        let dev = r.scores.device();
        let aux = if seq {
            let mut ce = vec![0f32; b * e];
            for (p, &x) in flat.iter().enumerate() {
                let row = p / k / s;
                ce[row * e + x as usize] += 1.0;
            }
            let denom = (s * k) as f32 / e as f32;
            ce.iter_mut().for_each(|c| *c /= denom);
            let ce = Tensor::from_vec(ce, (b, e), dev)?;
            let p = r.scores.reshape((b, s, e))?.mean(1)?;
            ((ce * p)?.sum(1)?.mean(0)? * alpha)?
        } else {
            let mut ce = vec![0f32; e];
            for &x in flat {
                ce[x as usize] += 1.0;
            }
            let n = flat.len() as f32;
            let fi: Vec<f32> = ce.iter().map(|c| c / n * e as f32).collect();
            let fi = Tensor::from_vec(fi, e, dev)?;
            let pi = r.scores.mean(0)?;
            ((pi * fi)?.sum_all()? * alpha)?
        };
        Ok(Some(aux))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeepSeekMoeConfig;
    use candle_core::Device;

    #[test]
    fn batch_level_aux_loss_follows_the_reference_formula() -> Result<()> {
        // Non-seq variant: alpha · Σ_e mean_t(scores[:, e]) · E · mean(one_hot(topk)[:, e]).
        let mut cfg = DeepSeekMoeConfig::tiny(16);
        cfg.seq_aux = false;
        cfg.n_routed_experts = Some(4);
        cfg.num_experts_per_tok = Some(2);
        cfg.aux_loss_alpha = 0.5;
        let gate = MoeGate::new(
            &cfg.arch()?,
            Tensor::zeros((4, 64), DType::F32, &Device::Cpu)?,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let scores = Tensor::new(
            &[
                [0.4f32, 0.3, 0.2, 0.1],
                [0.1, 0.2, 0.3, 0.4],
                [0.25, 0.25, 0.25, 0.25],
            ],
            &Device::Cpu,
        )?;
        let r = Routing {
            scores: scores.clone(),
            topk_idx: Tensor::new(&[[0u32, 1], [3, 2], [0, 1]], &Device::Cpu)?,
            topk_weight: Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?,
        };
        let flat = [0u32, 1, 3, 2, 0, 1];
        let aux = gate
            .aux_loss(&r, &flat, 1, 3)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .unwrap()
            .to_scalar::<f32>()?;
        // Pi = [0.25, 0.25, 0.25, 0.25]; counts [2, 2, 1, 1] / 6 · 4 = [4/3, 4/3, 2/3, 2/3].
        let want = 0.5 * 0.25 * (4.0 / 3.0 * 2.0 + 2.0 / 3.0 * 2.0);
        assert!((aux - want).abs() < 1e-6, "{aux} vs {want}");
        // Seq variant on one sequence of 3 tokens: ce = counts / (3·2/4), P = mean scores.
        cfg.seq_aux = true;
        let gate = MoeGate::new(
            &cfg.arch()?,
            Tensor::zeros((4, 64), DType::F32, &Device::Cpu)?,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let aux = gate
            .aux_loss(&r, &flat, 1, 3)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .unwrap()
            .to_scalar::<f32>()?;
        let ce = [2.0 / 1.5, 2.0 / 1.5, 1.0 / 1.5, 1.0 / 1.5];
        let want: f32 = 0.5 * ce.iter().map(|c| c * 0.25).sum::<f32>();
        assert!((aux - want).abs() < 1e-6, "{aux} vs {want}");
        Ok(())
    }
}
