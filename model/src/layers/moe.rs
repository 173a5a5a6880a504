//! The MoE block: dispatch of tokens to routed experts, the per-expert loop or a fused replacement ([`ExpertsForward`]), combine, shared experts.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::ops::{combine_rows, dispatch_rows, routed_node};
use moe_peft_kernels::rows::gather_rows;

use super::{ForwardContext, Mlp, MoeGate, RouterStats};

/// What an [`ExpertsForward`] made of a layer's routed experts.
#[derive(Debug, Clone)]
pub enum ExpertsOutput {
    /// The outputs `(rows, hidden)`, in the rows' order.
    Computed(Tensor),
    /// This layer's experts are not ones it handles (e.g. a merged adapter, mixed kinds): the
    /// layer runs its plain per-expert loop instead.
    Declined,
}

/// The backward of routed experts run outside the graph: from the gradient of their outputs
/// `(rows, hidden)` to the gradient of their inputs (the experts' own trainable gradients go
/// where the implementation sends them).
pub type ExpertsBackward = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// A replacement for the per-expert loop: runs every routed expert on its contiguous slice
/// of `xs` (rows grouped by expert, `counts[e]` rows for expert `e`) and returns the outputs in
/// the same order, or declines. Adapters install one to fuse their math and backward across
/// the experts of a layer.
pub trait ExpertsForward: Send + Sync + std::fmt::Debug {
    /// Computes `(rows, hidden)` for `xs` `(rows, hidden)`.
    fn forward(
        &self,
        experts: &[Mlp],
        xs: &Tensor,
        counts: &[usize],
        train: bool,
    ) -> Result<ExpertsOutput>;

    /// Training: computes the outputs of `xs` (outside the graph) and returns them with their
    /// backward, so that the layer makes dispatch, experts and combine one graph node. `None`:
    /// the layer calls [`Self::forward`] instead.
    fn forward_detached(
        &self,
        _experts: &[Mlp],
        _xs: &Tensor,
        _counts: &[usize],
    ) -> Result<Option<(Tensor, ExpertsBackward)>> {
        Ok(None)
    }
}

/// A MoE layer: router, routed experts and optional fused shared experts.
#[derive(Debug, Clone)]
pub struct Moe {
    /// The router.
    pub gate: MoeGate,
    /// Routed experts.
    pub experts: Vec<Mlp>,
    /// Shared experts (one MLP of width `n_shared · moe_intermediate_size`; Qwen2-MoE's
    /// `shared_expert`).
    pub shared_experts: Option<Mlp>,
    /// Qwen2-MoE's `shared_expert_gate` `(1, hidden)`: the shared output is scaled by
    /// `sigmoid(x·gᵀ)` per token.
    pub shared_expert_gate: Option<Tensor>,
    /// An optional replacement of the per-expert loop.
    pub experts_forward: Option<Arc<dyn ExpertsForward>>,
}

/// Tokens grouped by expert: built once per layer from one device-to-host copy of the top-k ids.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// Top-k ids flattened token-major (`tokens · k`).
    pub flat: Vec<u32>,
    /// Tokens per expert.
    pub counts: Vec<usize>,
    /// `order[i]` = flattened (token, slot) position of the i-th row in expert order.
    pub order: Vec<u32>,
    /// Inverse of `order`.
    pub inverse: Vec<u32>,
}

impl Dispatch {
    /// Stable counting sort of the flattened top-k ids by expert.
    pub fn new(flat: Vec<u32>, experts: usize) -> Result<Self> {
        let mut counts = vec![0usize; experts];
        for &e in &flat {
            let e = e as usize;
            if e >= experts {
                return Err(Error::InvalidInput(format!(
                    "router chose expert {e} of {experts}"
                )));
            }
            counts[e] += 1;
        }
        let mut start = vec![0usize; experts];
        for i in 1..experts {
            start[i] = start[i - 1] + counts[i - 1];
        }
        let mut order = vec![0u32; flat.len()];
        let mut inverse = vec![0u32; flat.len()];
        for (p, &e) in flat.iter().enumerate() {
            let slot = &mut start[e as usize];
            order[*slot] = p as u32;
            inverse[p] = *slot as u32;
            *slot += 1;
        }
        Ok(Self {
            flat,
            counts,
            order,
            inverse,
        })
    }
}

/// What a MoE layer returns besides its output (training only).
#[derive(Debug, Clone, Default)]
pub struct MoeAux {
    /// DeepSeekMoE's per-layer balancing loss.
    pub loss: Option<Tensor>,
    /// The layer's share of the Switch balancing loss (Qwen-MoE, Mixtral, OLMoE).
    pub router: Option<RouterStats>,
}

impl Moe {
    /// Applies the layer to `x` of shape `(b, seq, hidden)`; returns the output and, in
    /// training, what the layer adds to the balancing loss.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardContext) -> Result<(Tensor, MoeAux)> {
        let train = ctx.train;
        let (b, s, h) = x.dims3()?;
        let n = b * s;
        let k = self.gate.top_k();
        let x2 = x.reshape((n, h))?;
        let r = self.gate.route(&x2)?;
        let flat: Vec<u32> = r.topk_idx.flatten_all()?.to_vec1()?;
        let d = Dispatch::new(flat, self.experts.len())?;
        let dev = x.device();
        let order = Tensor::new(d.order.as_slice(), dev)?;
        let inverse = Tensor::new(d.inverse.as_slice(), dev)?;
        let src: Vec<u32> = d.order.iter().map(|&p| p / k as u32).collect();
        let src = Tensor::new(src.as_slice(), dev)?;
        // Training through an implementation that runs the experts outside the graph: dispatch,
        // experts and combine are one node (no gradient buffers for the dispatched rows and
        // the expert outputs, the largest tensors of the layer).
        let detached = match &self.experts_forward {
            Some(f) if train && x2.track_op() && crate::ops::routed_node_enabled() => {
                let xs = gather_rows(&x2.detach(), &src)?;
                f.forward_detached(&self.experts, &xs, &d.counts)?
            }
            _ => None,
        };
        // Σ_j w[n, j]·y[n, j, :] in f32 (the reference multiplies the expert outputs by the f32
        // gate weights), reading the rows in expert order in place (`combine_rows`).
        let mut y = match detached {
            Some((ys, backward)) => {
                routed_node(&x2, &r.topk_weight, ys, backward, &inverse, &order)?
            }
            None => {
                let xs = dispatch_rows(&x2, &src, &inverse, k)?;
                let fused = match &self.experts_forward {
                    Some(f) => f.forward(&self.experts, &xs, &d.counts, train)?,
                    None => ExpertsOutput::Declined,
                };
                let ys = match fused {
                    ExpertsOutput::Computed(ys) => ys,
                    ExpertsOutput::Declined => {
                        let mut outs = Vec::with_capacity(self.experts.len());
                        let mut off = 0;
                        for (e, expert) in self.experts.iter().enumerate() {
                            let c = d.counts[e];
                            if c == 0 {
                                continue;
                            }
                            outs.push(expert.forward(&xs.narrow(0, off, c)?, train)?);
                            off += c;
                        }
                        Tensor::cat(&outs, 0)?
                    }
                };
                combine_rows(&ys, &r.topk_weight, &inverse, &order)?
            }
        };
        if let Some(sh) = &self.shared_experts {
            let mut ys = sh.forward(&x2, train)?;
            if let Some(g) = &self.shared_expert_gate {
                let gate = x2.matmul(&g.to_dtype(x2.dtype())?.t()?)?;
                ys = ys.broadcast_mul(&candle_nn::ops::sigmoid(&gate)?)?;
            }
            y = (y + ys)?;
        }
        let mut aux = MoeAux::default();
        if train {
            aux.loss = self.gate.aux_loss(&r, &d.flat, b, s)?;
            if let crate::arch::AuxLoss::Switch { .. } = self.gate.aux_kind() {
                let w = ctx.token_weights.as_ref().map(|(h, t)| (h.as_slice(), t));
                aux.router = Some(self.gate.router_stats(&r, &d.flat, w)?);
            }
        }
        Ok((y.reshape((b, s, h))?, aux))
    }
}
