//! The DeepSeekMoE decoder: RMSNorm, RoPE, causal multi-head attention, dense MLP, MoE layer
//! with softmax router, routed and shared experts and the load-balancing loss.
//!
//! The math follows `modeling_deepseek.py` (v1) of `deepseek-ai/deepseek-moe-16b-base`. Fused
//! kernels (RMSNorm, RoPE, attention softmax, SwiGLU, from `moe_peft_quant`) run outside
//! candle's graph with hand-written backwards (see `ops.rs`), each tested against autograd
//! through the composed ops, so gradients reach adapters on every projection.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use moe_peft_quant::{frozen_matmul, LinearLike};

use crate::config::{DeepSeekMoeConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::ops::{attention_core, combine_rows, dispatch_rows, softmax_f32};

/// A projection slot: a frozen base or an adapter wrapping one.
pub type Linear = Arc<dyn LinearLike>;

/// RMSNorm as DeepSeek computes it: in f32, cast back to the input dtype, then times the weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `weight` of shape `(hidden,)`, kept in f32.
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            eps,
        })
    }

    /// The weight (f32).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Normalizes over the last dimension.
    ///
    /// Computed outside the graph with a hand-written backward, so the graph keeps only the
    /// output (autograd through the f32 upcasts would keep six f32/bf16 copies of `x`):
    /// with `r = 1/√(mean(x²)+ε)`, `n = dt(x·r)`, `y = dt(n·w)`:
    /// `dn = dt(dy·w)` (the casts round the gradient as autograd does),
    /// `dx = r·dn − x·r³·Σ(dn·x)/H`, `dw = Σ_rows dy·n`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = moe_peft_kernels::norm::rms_norm(&x.detach(), &self.weight.detach(), self.eps)?;
        if !crate::grad::is_grad_enabled() || (!x.track_op() && !self.weight.track_op()) {
            return Ok(y);
        }
        let (x0, w, eps) = (x.detach(), self.weight.detach(), self.eps);
        let want_w = self.weight.track_op();
        Ok(moe_peft_kernels::attach_backward2(
            x,
            &self.weight,
            y,
            move |dy| {
                let dw = if want_w {
                    let dt = x0.dtype();
                    let xf = x0.to_dtype(DType::F32)?;
                    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
                        .sqrt()?
                        .recip()?;
                    let n = xf.broadcast_mul(&r)?.to_dtype(dt)?.to_dtype(DType::F32)?;
                    let prod = (dy.to_dtype(DType::F32)? * n)?;
                    let rows = prod.elem_count() / w.elem_count();
                    Some(
                        prod.reshape((rows, w.elem_count()))?
                            .sum(0)?
                            .reshape(w.shape())?,
                    )
                } else {
                    None
                };
                let dx = moe_peft_kernels::norm::rms_norm_backward(&x0, &w, dy, eps)?;
                Ok((Some(dx), dw))
            },
        )?)
    }
}

/// Rotary position embedding (non-interleaved `rotate_half` layout).
#[derive(Debug, Clone)]
pub struct Rotary {
    head_dim: usize,
    base: f64,
    max_positions: usize,
    scaling: Option<RopeScaling>,
}

impl Rotary {
    /// From the model config.
    pub fn new(cfg: &DeepSeekMoeConfig) -> Self {
        Self {
            head_dim: cfg.head_dim(),
            base: cfg.rope_theta,
            max_positions: cfg.max_position_embeddings,
            scaling: cfg.rope_scaling.clone(),
        }
    }

    fn inv_freq(&self, total_len: usize) -> Vec<f32> {
        let d = self.head_dim;
        let mut base = self.base;
        if let Some(s) = &self.scaling {
            if s.kind == "dynamic" && total_len > self.max_positions {
                let f = s.factor;
                base *= ((f * total_len as f64 / self.max_positions as f64) - (f - 1.0))
                    .powf(d as f64 / (d as f64 - 2.0));
            }
        }
        let base = base as f32;
        (0..d)
            .step_by(2)
            .map(|i| 1.0f32 / base.powf(i as f32 / d as f32))
            .collect()
    }

    /// `cos`, `sin` of shape `(len, head_dim / 2)` for positions `offset..offset+len` (HF's
    /// tables repeat this half twice).
    pub fn cos_sin(
        &self,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let inv = self.inv_freq(offset + len);
        let half = inv.len();
        let scale = match &self.scaling {
            Some(s) if s.kind == "linear" => 1.0 / s.factor as f32,
            _ => 1.0,
        };
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            let t = p as f32 * scale;
            for f in &inv {
                let a = t * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// What one forward pass shares across layers.
#[derive(Debug, Clone)]
pub struct ForwardContext {
    /// RoPE cosines `(seq, head_dim / 2)` in the activation dtype.
    pub cos: Tensor,
    /// RoPE sines `(seq, head_dim / 2)` in the activation dtype.
    pub sin: Tensor,
    /// Additive attention mask `(b, 1, seq, past+seq)` in the activation dtype (0 or that
    /// dtype's lowest finite value), or `None` when every query may see every key (one new
    /// token, no padding).
    pub mask: Option<Tensor>,
    /// Training mode (aux loss, adapter dropout).
    pub train: bool,
}

/// The additive mask of packed rows: `segments` `(b, seq)` numbers the examples of each row
/// (0 on padding), and a query sees a key when the key is not later and belongs to the same
/// example (padding sees earlier padding only). RoPE depends on positions only through their
/// differences, so an example keeps exactly the scores it would have at the start of its own
/// row.
pub fn segment_attention_mask(segments: &Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    let (b, seq) = segments.dims2()?;
    let q = Tensor::arange(0u32, seq as u32, device)?.reshape((seq, 1))?;
    let k = Tensor::arange(0u32, seq as u32, device)?.reshape((1, seq))?;
    let causal = k
        .broadcast_le(&q)?
        .unsqueeze(0)?
        .broadcast_as((b, seq, seq))?
        .to_dtype(DType::U8)?;
    let seg = segments.to_dtype(DType::U32)?;
    let same = seg
        .unsqueeze(2)?
        .broadcast_as((b, seq, seq))?
        .eq(&seg.unsqueeze(1)?.broadcast_as((b, seq, seq))?)?
        .to_dtype(DType::U8)?;
    let allowed = (causal * same)?;
    let lowest = match dtype {
        DType::F16 => -65504.0f32,
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN,
    };
    let zero = Tensor::zeros((b, seq, seq), DType::F32, device)?;
    let min = Tensor::full(lowest, (b, seq, seq), device)?;
    let mask = allowed
        .contiguous()?
        .where_cond(&zero, &min)?
        .unsqueeze(1)?;
    Ok(mask.to_dtype(dtype)?)
}

/// Builds the additive causal + key-padding mask in `dtype`: `0` or the dtype's lowest finite
/// value, as HF's eager path (`finfo.min`).
pub fn attention_mask(
    attention_mask: Option<&Tensor>,
    b: usize,
    seq: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let total = past + seq;
    if seq == 1 && attention_mask.is_none() {
        return Ok(None);
    }
    let q = Tensor::arange(past as u32, total as u32, device)?.reshape((seq, 1))?;
    let k = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
    let mut allowed = k
        .broadcast_le(&q)?
        .unsqueeze(0)?
        .broadcast_as((b, seq, total))?;
    if let Some(am) = attention_mask {
        let dims = am.dims();
        if dims != [b, total] {
            return Err(Error::InvalidInput(format!(
                "attention_mask has shape {dims:?}, expected [{b}, {total}]"
            )));
        }
        let keys = am
            .to_dtype(DType::U32)?
            .ne(0u32)?
            .unsqueeze(1)?
            .broadcast_as((b, seq, total))?;
        allowed = (allowed.to_dtype(DType::U8)? * keys.to_dtype(DType::U8)?)?;
    }
    let lowest = match dtype {
        DType::F16 => -65504.0f32,
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN,
    };
    let zero = Tensor::zeros((b, seq, total), DType::F32, device)?;
    let min = Tensor::full(lowest, (b, seq, total), device)?;
    let mask = allowed
        .contiguous()?
        .where_cond(&zero, &min)?
        .unsqueeze(1)?;
    Ok(Some(mask.to_dtype(dtype)?))
}

/// Cached keys and values of one layer, `(b, kv_heads, t, head_dim)`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Cached length.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// Causal multi-head attention with grouped key/value heads.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// From its four projections.
    pub fn new(cfg: &DeepSeekMoeConfig, q: Linear, k: Linear, v: Linear, o: Linear) -> Self {
        Self {
            q_proj: q,
            k_proj: k,
            v_proj: v,
            o_proj: o,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
        }
    }

    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let rep = self.heads / self.kv_heads;
        if rep == 1 {
            return Ok(x);
        }
        let (b, kv, t, d) = x.dims4()?;
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, kv, rep, t, d))?
            .reshape((b, kv * rep, t, d))?)
    }

    /// `x` of shape `(b, seq, hidden)`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &ForwardContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        x.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.q_proj.forward_t(x, ctx.train)?;
        let k = self.k_proj.forward_t(x, ctx.train)?;
        let v = self.v_proj.forward_t(x, ctx.train)?;
        // (b, s, heads·d) → (b, heads, s, d), RoPE on q and k: one graph op each.
        let rope = Some((&ctx.cos, &ctx.sin));
        let q = split_heads(&q, h, d, rope)?;
        let k = split_heads(&k, kvh, d, rope)?;
        let v = split_heads(&v, kvh, d, None)?;
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        // Scores in the activation dtype, softmax with f32 accumulation in one fused kernel
        // (the reference upcasts to f32 and casts back; same result up to the scale's rounding).
        // The probabilities are recomputed in backward (see `attention_core`).
        let y = attention_core(&q, &k, &v, ctx.mask.as_ref(), 1.0 / (d as f64).sqrt())?;
        Ok(self.o_proj.forward_t(&merge_heads(&y)?, ctx.train)?)
    }
}

/// `(b, s, heads·d)` → contiguous `(b, heads, s, d)`, rotated by `rope = (cos, sin)` if given,
/// as one op with a written-out backward (inverse rotation, then the transpose back): candle's
/// backward would add a zero-initialised gradient buffer per reshape, transpose and copy.
fn split_heads(
    x: &Tensor,
    heads: usize,
    d: usize,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    let split = |t: &Tensor| t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous();
    let y = split(&x.detach())?;
    let y = match rope {
        Some((cos, sin)) => candle_nn::rotary_emb::rope(&y, cos, sin)?,
        None => y,
    };
    let inverse = match rope {
        Some((cos, sin)) => Some((cos.clone(), sin.neg()?)),
        None => None,
    };
    Ok(moe_peft_kernels::attach_backward(x, y, move |g| {
        let g = match &inverse {
            Some((cos, neg_sin)) => candle_nn::rotary_emb::rope(&g.contiguous()?, cos, neg_sin)?,
            None => g.clone(),
        };
        g.transpose(1, 2)?.contiguous()?.reshape((b, s, heads * d))
    })?)
}

/// `(b, heads, s, d)` → `(b, s, heads·d)` as one op (the inverse of [`split_heads`] without RoPE).
fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, heads, s, d) = y.dims4()?;
    let out = y
        .detach()
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, heads * d))?;
    Ok(moe_peft_kernels::attach_backward(y, out, move |g| {
        g.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous()
    })?)
}

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (DeepSeekMoE).
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// ReLU.
    Relu,
}

impl Activation {
    fn from_name(name: &str) -> Self {
        match name {
            "gelu" => Self::Gelu,
            "relu" => Self::Relu,
            _ => Self::Silu,
        }
    }

    /// `grad · act'(x)`, the backward of [`Self::apply`].
    pub fn backward(self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let d = match self {
            Self::Silu => {
                let s = (x.neg()?.exp()? + 1.0)?.recip()?;
                let one_minus = (1.0 - &s)?;
                (&s * ((x * one_minus)? + 1.0)?)?
            }
            Self::Relu => x.gt(0.0)?.to_dtype(x.dtype())?,
            Self::Gelu => {
                let cdf = (((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?;
                let pdf =
                    ((x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt()))?;
                (cdf + (x * pdf)?)?
            }
        };
        Ok((grad * d)?)
    }

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => x.silu()?,
            Self::Gelu => x.gelu_erf()?,
            Self::Relu => x.relu()?,
        })
    }
}

/// `down(act(gate(x)) · up(x))`: the dense MLP, one routed expert, or the fused shared experts.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
    act: Activation,
}

impl Mlp {
    /// From its three projections.
    pub fn new(cfg: &DeepSeekMoeConfig, gate: Linear, up: Linear, down: Linear) -> Self {
        Self {
            gate_proj: gate,
            up_proj: up,
            down_proj: down,
            act: Activation::from_name(&cfg.hidden_act),
        }
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.act
    }

    /// Applies the MLP to `x` of any rank.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let g = self.gate_proj.forward_t(x, train)?;
        let u = self.up_proj.forward_t(x, train)?;
        let a = match self.act {
            // One fused pass each way; the graph keeps the output, not silu(g).
            Activation::Silu => {
                let (gd, ud) = (g.detach(), u.detach());
                let a = moe_peft_kernels::swiglu::swiglu(&gd, &ud)?;
                moe_peft_kernels::attach_backward2(&g, &u, a, move |da| {
                    let (dg, du) = moe_peft_kernels::swiglu::swiglu_backward(&gd, &ud, da)?;
                    Ok((Some(dg), Some(du)))
                })?
            }
            act => (act.apply(&g)? * u)?,
        };
        Ok(self.down_proj.forward_t(&a, train)?)
    }

    fn sites_mut(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        f(&format!("{prefix}.gate_proj"), &mut self.gate_proj)?;
        f(&format!("{prefix}.up_proj"), &mut self.up_proj)?;
        f(&format!("{prefix}.down_proj"), &mut self.down_proj)
    }

    fn sites(&self, prefix: &str, f: &mut dyn FnMut(&str, &Linear) -> Result<()>) -> Result<()> {
        f(&format!("{prefix}.gate_proj"), &self.gate_proj)?;
        f(&format!("{prefix}.up_proj"), &self.up_proj)?;
        f(&format!("{prefix}.down_proj"), &self.down_proj)
    }
}

/// The softmax router (`MoEGate`): frozen, computed in f32, top-k on the device.
#[derive(Debug, Clone)]
pub struct MoeGate {
    weight: Tensor,
    top_k: usize,
    norm_topk_prob: bool,
    alpha: f64,
    seq_aux: bool,
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
    pub fn new(cfg: &DeepSeekMoeConfig, weight: Tensor) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?.detach(),
            top_k: cfg.num_experts_per_tok.unwrap_or(1),
            norm_topk_prob: cfg.norm_topk_prob,
            alpha: cfg.aux_loss_alpha,
            seq_aux: cfg.seq_aux,
        })
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
        if self.norm_topk_prob && self.top_k > 1 {
            let denom = (w.sum_keepdim(1)? + 1e-20)?;
            w = w.broadcast_div(&denom)?;
        }
        Ok(Routing {
            scores,
            topk_idx: idx,
            topk_weight: w,
        })
    }

    /// The balancing loss of `modeling_deepseek.py` (seq-level when `seq_aux`), given the
    /// routing, the host copy of its flattened expert ids, and the batch layout. Padding
    /// positions count, as in the reference.
    pub fn aux_loss(
        &self,
        r: &Routing,
        flat: &[u32],
        b: usize,
        s: usize,
    ) -> Result<Option<Tensor>> {
        if self.alpha <= 0.0 {
            return Ok(None);
        }
        let e = self.weight.dim(0)?;
        let k = self.top_k;
        let dev = r.scores.device();
        let aux = if self.seq_aux {
            let mut ce = vec![0f32; b * e];
            for (p, &x) in flat.iter().enumerate() {
                let row = p / k / s;
                ce[row * e + x as usize] += 1.0;
            }
            let denom = (s * k) as f32 / e as f32;
            ce.iter_mut().for_each(|c| *c /= denom);
            let ce = Tensor::from_vec(ce, (b, e), dev)?;
            let p = r.scores.reshape((b, s, e))?.mean(1)?;
            ((ce * p)?.sum(1)?.mean(0)? * self.alpha)?
        } else {
            let mut ce = vec![0f32; e];
            for &x in flat {
                ce[x as usize] += 1.0;
            }
            let n = flat.len() as f32;
            let fi: Vec<f32> = ce.iter().map(|c| c / n * e as f32).collect();
            let fi = Tensor::from_vec(fi, e, dev)?;
            let pi = r.scores.mean(0)?;
            ((pi * fi)?.sum_all()? * self.alpha)?
        };
        Ok(Some(aux))
    }
}

/// A replacement for the per-expert loop: runs every routed expert on its contiguous slice
/// of `xs` (rows grouped by expert, `counts[e]` rows for expert `e`) and returns the outputs in
/// the same order. `Ok(None)` means "not handled here": the layer then runs its plain loop.
/// Adapters install one to fuse their math and backward across the experts of a layer.
pub trait ExpertsForward: Send + Sync + std::fmt::Debug {
    /// Computes `(rows, hidden)` for `xs` `(rows, hidden)`.
    fn forward(
        &self,
        experts: &[Mlp],
        xs: &Tensor,
        counts: &[usize],
        train: bool,
    ) -> Result<Option<Tensor>>;
}

/// A MoE layer: router, routed experts and optional fused shared experts.
#[derive(Debug, Clone)]
pub struct Moe {
    /// The router.
    pub gate: MoeGate,
    /// Routed experts.
    pub experts: Vec<Mlp>,
    /// Shared experts (one MLP of width `n_shared · moe_intermediate_size`).
    pub shared_experts: Option<Mlp>,
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

impl Moe {
    /// Applies the layer to `x` of shape `(b, seq, hidden)`; returns the output and, in
    /// training, the layer's aux loss.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (b, s, h) = x.dims3()?;
        let n = b * s;
        let k = self.gate.top_k;
        let x2 = x.reshape((n, h))?;
        let r = self.gate.route(&x2)?;
        let flat: Vec<u32> = r.topk_idx.flatten_all()?.to_vec1()?;
        let d = Dispatch::new(flat, self.experts.len())?;
        let dev = x.device();
        let order = Tensor::new(d.order.as_slice(), dev)?;
        let inverse = Tensor::new(d.inverse.as_slice(), dev)?;
        let src: Vec<u32> = d.order.iter().map(|&p| p / k as u32).collect();
        let src = Tensor::new(src.as_slice(), dev)?;
        let xs = dispatch_rows(&x2, &src, &inverse, k)?;
        let fused = match &self.experts_forward {
            Some(f) => f.forward(&self.experts, &xs, &d.counts, train)?,
            None => None,
        };
        let ys = match fused {
            Some(ys) => ys,
            None => {
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
        // Back to token order, then Σ_j w[n, j]·y[n, j, :] in f32 (the reference multiplies the
        // expert outputs by the f32 gate weights) as one batched (1×k)·(k×H) product per token:
        // contiguous operands, no broadcast or strided reduction.
        // (`combine_rows` keeps only its output in the graph.)
        let mut y = combine_rows(&ys, &r.topk_weight, &inverse, &order)?;
        if let Some(sh) = &self.shared_experts {
            y = (y + sh.forward(&x2, train)?)?;
        }
        let aux = if train {
            self.gate.aux_loss(&r, &d.flat, b, s)?
        } else {
            None
        };
        Ok((y.reshape((b, s, h))?, aux))
    }
}

/// The feed-forward block of a decoder layer.
#[derive(Debug, Clone)]
pub enum MoeOrMlp {
    /// Dense MLP (layers before `first_k_dense_replace`, or off `moe_layer_freq`).
    Mlp(Mlp),
    /// Mixture of experts.
    Moe(Moe),
}

/// One pre-norm decoder layer: `h + attn(ln1 h)`, then `h + mlp(ln2 h)`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Index of the layer.
    pub index: usize,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
    /// Feed-forward block.
    pub mlp: MoeOrMlp,
}

/// What a decoder layer returns.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// Hidden states `(b, seq, hidden)`.
    pub hidden: Tensor,
    /// The MoE balancing loss (training, MoE layers, `aux_loss_alpha > 0`).
    pub aux_loss: Option<Tensor>,
}

impl DecoderLayer {
    /// Runs the layer.
    pub fn forward(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<LayerOutput> {
        let x = self.input_layernorm.forward(h)?;
        let x = self.self_attn.forward(&x, ctx, cache)?;
        let h = (h + x)?;
        let x = self.post_attention_layernorm.forward(&h)?;
        let (x, aux_loss) = match &self.mlp {
            MoeOrMlp::Mlp(m) => (m.forward(&x, ctx.train)?, None),
            MoeOrMlp::Moe(m) => m.forward(&x, ctx.train)?,
        };
        Ok(LayerOutput {
            hidden: (h + x)?,
            aux_loss,
        })
    }

    /// Visits every projection of the layer with its HF module path.
    pub fn visit_sites_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        let p = format!("model.layers.{}", self.index);
        let a = &mut self.self_attn;
        f(&format!("{p}.self_attn.q_proj"), &mut a.q_proj)?;
        f(&format!("{p}.self_attn.k_proj"), &mut a.k_proj)?;
        f(&format!("{p}.self_attn.v_proj"), &mut a.v_proj)?;
        f(&format!("{p}.self_attn.o_proj"), &mut a.o_proj)?;
        match &mut self.mlp {
            MoeOrMlp::Mlp(m) => m.sites_mut(&format!("{p}.mlp"), f),
            MoeOrMlp::Moe(m) => {
                for (e, x) in m.experts.iter_mut().enumerate() {
                    x.sites_mut(&format!("{p}.mlp.experts.{e}"), f)?;
                }
                if let Some(sh) = &mut m.shared_experts {
                    sh.sites_mut(&format!("{p}.mlp.shared_experts"), f)?;
                }
                Ok(())
            }
        }
    }

    /// Visits every projection of the layer (read-only).
    pub fn visit_sites(&self, f: &mut dyn FnMut(&str, &Linear) -> Result<()>) -> Result<()> {
        let p = format!("model.layers.{}", self.index);
        let a = &self.self_attn;
        f(&format!("{p}.self_attn.q_proj"), &a.q_proj)?;
        f(&format!("{p}.self_attn.k_proj"), &a.k_proj)?;
        f(&format!("{p}.self_attn.v_proj"), &a.v_proj)?;
        f(&format!("{p}.self_attn.o_proj"), &a.o_proj)?;
        match &self.mlp {
            MoeOrMlp::Mlp(m) => m.sites(&format!("{p}.mlp"), f),
            MoeOrMlp::Moe(m) => {
                for (e, x) in m.experts.iter().enumerate() {
                    x.sites(&format!("{p}.mlp.experts.{e}"), f)?;
                }
                if let Some(sh) = &m.shared_experts {
                    sh.sites(&format!("{p}.mlp.shared_experts"), f)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The hand-written RMSNorm backward against autograd through the composed ops.
    #[test]
    fn rms_norm_gradients_equal_autograd() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 8), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 8, &dev)?)?;
        let norm = RmsNorm::new(w.as_tensor().clone(), 1e-6)?;
        let probe = Tensor::randn(0f32, 1., (2, 3, 8), &dev)?;
        let y = norm.forward(x.as_tensor())?;
        let g = (&y * &probe)?.sum_all()?.backward()?;
        let xf = x.as_tensor();
        let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?
            .sqrt()?
            .recip()?;
        let want = xf.broadcast_mul(&inv)?.broadcast_mul(w.as_tensor())?;
        assert!(max_diff(&y, &want)? < 1e-6);
        let r = (&want * &probe)?.sum_all()?.backward()?;
        for (what, t) in [("x", x.as_tensor()), ("weight", w.as_tensor())] {
            let d = max_diff(g.get(t).expect("hand"), r.get(t).expect("autograd"))?;
            assert!(d < 1e-5, "{what}: {d}");
        }
        Ok(())
    }

    /// The head split (with RoPE) and merge ops against autograd through reshape, transpose,
    /// copy and `rotate_half` written as plain ops.
    #[test]
    fn head_split_and_merge_gradients_equal_autograd() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let (b, s, h, d) = (2, 5, 3, 4);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, s, h * d), &dev)?)?;
        let cos = Tensor::randn(0f32, 1., (s, d / 2), &dev)?;
        let sin = Tensor::randn(0f32, 1., (s, d / 2), &dev)?;
        let probe = Tensor::randn(0f32, 1., (b, s, h * d), &dev)?;
        // HF's `x·cos + rotate_half(x)·sin` with full-width tables, as plain ops.
        let (cf, sf) = (
            Tensor::cat(&[&cos, &cos], 1)?,
            Tensor::cat(&[&sin, &sin], 1)?,
        );
        let composed = |x: &Tensor| -> Result<Tensor> {
            let y = x.reshape((b, s, h, d))?.transpose(1, 2)?.contiguous()?;
            let (x1, x2) = (y.narrow(3, 0, d / 2)?, y.narrow(3, d / 2, d / 2)?);
            let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
            let y = (y.broadcast_mul(&cf)? + rot.broadcast_mul(&sf)?)?;
            Ok(y.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
        };
        let y = merge_heads(&split_heads(x.as_tensor(), h, d, Some((&cos, &sin)))?)?;
        let want = composed(x.as_tensor())?;
        assert!(max_diff(&y, &want)? < 1e-6);
        let g = (&y * &probe)?.sum_all()?.backward()?;
        let r = (&want * &probe)?.sum_all()?.backward()?;
        let d = max_diff(
            g.get(x.as_tensor()).expect("ops"),
            r.get(x.as_tensor()).expect("autograd"),
        )?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }

    /// Attention with recomputed probabilities against autograd through the composed ops.
    #[test]
    fn attention_core_gradients_equal_autograd() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let var =
            |s: (usize, usize, usize, usize)| Var::from_tensor(&Tensor::randn(0f32, 1., s, &dev)?);
        let (q, k, v) = (var((2, 3, 5, 4))?, var((2, 3, 5, 4))?, var((2, 3, 5, 4))?);
        let pad = Tensor::new(&[[1u32, 1, 1, 1, 0], [0, 1, 1, 1, 1]], &dev)?;
        let mask = attention_mask(Some(&pad), 2, 5, 0, DType::F32, &dev)?;
        let probe = Tensor::randn(0f32, 1., (2, 3, 5, 4), &dev)?;
        let y = attention_core(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            mask.as_ref(),
            0.5,
        )?;
        let g = (&y * &probe)?.sum_all()?.backward()?;
        let mut scores = (q.as_tensor() * 0.5)?.matmul(&k.as_tensor().t()?)?;
        if let Some(m) = &mask {
            scores = scores.broadcast_add(m)?;
        }
        let want = softmax_f32(&scores)?.matmul(v.as_tensor())?;
        assert!(max_diff(&y, &want)? < 1e-5);
        let r = (&want * &probe)?.sum_all()?.backward()?;
        for (what, t) in [
            ("q", q.as_tensor()),
            ("k", k.as_tensor()),
            ("v", v.as_tensor()),
        ] {
            let d = max_diff(g.get(t).expect("hand"), r.get(t).expect("autograd"))?;
            assert!(d < 1e-5, "{what}: {d}");
        }
        Ok(())
    }

    #[test]
    fn batch_level_aux_loss_follows_the_reference_formula() -> candle_core::Result<()> {
        // Non-seq variant: alpha · Σ_e mean_t(scores[:, e]) · E · mean(one_hot(topk)[:, e]).
        let mut cfg = DeepSeekMoeConfig::tiny(16);
        cfg.seq_aux = false;
        cfg.n_routed_experts = Some(4);
        cfg.num_experts_per_tok = Some(2);
        cfg.aux_loss_alpha = 0.5;
        let gate = MoeGate::new(&cfg, Tensor::zeros((4, 64), DType::F32, &Device::Cpu)?)
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
        let gate = MoeGate::new(&cfg, Tensor::zeros((4, 64), DType::F32, &Device::Cpu)?)
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
