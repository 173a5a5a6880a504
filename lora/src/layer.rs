//! `LoraLinear`: `y = base(x) + B·A·drop(x) · scaling`, the PEFT forward, around any frozen
//! [`LinearLike`] base (dense or quantized).
//!
//! Only the adapter path is scaled (candle-lora scales the base output too) and dropout runs
//! only in training. A and B are f32 `Var`s whatever the base dtype (the optimizer updates f32
//! master weights); the adapter runs in the activation dtype with A and B cast to it, as the
//! recipe's bf16 LoRA layers do, and the casts carry the gradients back to the f32 variables.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::{DType, ModuleT, Tensor, Var, D};
use moe_peft_kernels::dropout::{hash_dropout as dropout, segmented_dropout_add, splitmix64};
use moe_peft_model::grad::tracked;
use moe_peft_quant::{matmul_t, DenseLinear, LinearLike};

/// Shared state of deterministic dropout: a seed and the current micro-step, set by the
/// trainer. A mask is a pure function of (seed, micro-step, site, element), so a recomputed
/// forward (gradient checkpointing) and a resumed run draw exactly the same masks.
#[derive(Debug, Default)]
pub struct DropoutState {
    seed: AtomicU64,
    step: AtomicU64,
}

impl DropoutState {
    /// A state with a seed.
    pub fn new(seed: u64) -> Self {
        Self {
            seed: AtomicU64::new(seed),
            step: AtomicU64::new(0),
        }
    }

    /// Sets the micro-step whose masks the next forward draws.
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// The current micro-step.
    pub fn step(&self) -> u64 {
        self.step.load(Ordering::Relaxed)
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed.load(Ordering::Relaxed)
    }
}

/// FNV-1a of a site name: a stable per-site stream id.
pub fn site_hash(name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x1000_0000_01b3);
    }
    h
}

/// A LoRA adapter around a frozen base projection.
#[derive(Debug)]
pub struct LoraLinear {
    base: Arc<dyn LinearLike>,
    a: Var,
    b: Var,
    scaling: f64,
    dropout: f32,
    site_key: u64,
    state: Arc<DropoutState>,
    merged: RwLock<Option<Arc<dyn LinearLike>>>,
}

impl LoraLinear {
    /// Wraps `base` with `a` `(r, in)` and `b` `(out, r)` (f32 `Var`s).
    pub fn new(
        base: Arc<dyn LinearLike>,
        a: Var,
        b: Var,
        scaling: f64,
        dropout: f64,
        site: &str,
        state: Arc<DropoutState>,
    ) -> Self {
        Self {
            base,
            a,
            b,
            scaling,
            dropout: dropout as f32,
            site_key: site_hash(site),
            state,
            merged: RwLock::new(None),
        }
    }

    /// The frozen base.
    pub fn base(&self) -> &Arc<dyn LinearLike> {
        &self.base
    }

    /// A `(r, in)`.
    pub fn lora_a(&self) -> &Var {
        &self.a
    }

    /// B `(out, r)`.
    pub fn lora_b(&self) -> &Var {
        &self.b
    }

    /// `alpha / r` (or `alpha / √r`).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scaling · B·A` `(out, in)` in f32.
    pub fn delta_weight(&self) -> candle_core::Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(DType::F32)?;
        self.b.as_tensor().to_dtype(DType::F32)?.matmul(&a)? * self.scaling
    }

    /// `W + scaling·B·A` in `dtype` (dequantizing a quantized base).
    pub fn merged_weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let w = self.base.dense_weight(DType::F32)?;
        (w + self.delta_weight()?)?.to_dtype(dtype)
    }

    /// Whether the adapter is merged.
    pub fn is_merged(&self) -> bool {
        self.merged.read().map(|m| m.is_some()).unwrap_or(false)
    }

    /// Folds the adapter into a dense copy of the base (`dtype`); forward then uses it.
    /// Returns false if it was already merged.
    pub fn merge(&self, dtype: DType) -> candle_core::Result<bool> {
        let mut m = self
            .merged
            .write()
            .map_err(|_| candle_core::Error::Msg("adapter lock poisoned".into()))?;
        if m.is_some() {
            return Ok(false);
        }
        *m = Some(Arc::new(DenseLinear::new(self.merged_weight(dtype)?)));
        Ok(true)
    }

    /// Drops the merged copy. Returns false if it was not merged.
    pub fn unmerge(&self) -> candle_core::Result<bool> {
        let mut m = self
            .merged
            .write()
            .map_err(|_| candle_core::Error::Msg("adapter lock poisoned".into()))?;
        Ok(m.take().is_some())
    }

    /// The dropout key of the current micro-step (a function of seed, step and site).
    pub fn dropout_key(&self) -> u64 {
        splitmix64(self.state.seed() ^ splitmix64(self.state.step() ^ self.site_key))
    }

    /// The dropout probability.
    pub fn dropout_p(&self) -> f32 {
        self.dropout
    }
}

impl ModuleT for LoraLinear {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if let Ok(m) = self.merged.read() {
            if let Some(m) = m.as_ref() {
                return m.forward_t(x, train);
            }
        }
        // A frozen base takes the fused op (A and B are variables, so there is always a graph
        // to attach to); a trainable base keeps the autograd path, which trains it too.
        if self
            .base
            .as_any()
            .downcast_ref::<TrainableLinear>()
            .is_none()
        {
            return self.forward_fused(x, train);
        }
        let y = self.base.forward_t(x, train)?;
        let xa = if train && self.dropout > 0.0 {
            dropout(x, self.dropout, self.dropout_key())?
        } else {
            x.clone()
        };
        // The adapter runs in the activation dtype (the recipe casts LoRA layers to bf16 with
        // --bf16); A and B stay f32 variables and the casts carry their gradients back.
        let a = tracked(self.a.as_tensor()).to_dtype(xa.dtype())?;
        let b = tracked(self.b.as_tensor()).to_dtype(xa.dtype())?;
        let t = (matmul_t(&matmul_t(&xa, &a)?, &b)? * self.scaling)?;
        let t = t.to_dtype(y.dtype())?;
        y + t
    }
}

impl LoraLinear {
    /// `W x + s·B A drop(x)` as one op with a hand-written backward (the frozen base's input
    /// gradient and the adapter's three gradients): the graph keeps the output and the small
    /// `A drop(x)`, where autograd would keep the dropped input, `B A drop(x)`, its scaled copy
    /// and the base output too. Per row: `dx = Wᵀ dy + s·drop(Aᵀ (Bᵀ dy))`,
    /// `dB = s·dy (A drop(x))ᵀ`, `dA = s·(Bᵀ dy) drop(x)ᵀ`; the dropout mask is recomputed
    /// from its key.
    fn forward_fused(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let xd = x.detach();
        let dt = xd.dtype();
        let p = if train { self.dropout } else { 0.0 };
        let key = self.dropout_key();
        let drop_x = move |x: &Tensor| -> candle_core::Result<Tensor> {
            if p > 0.0 {
                dropout(x, p, key)
            } else {
                Ok(x.clone())
            }
        };
        let a = self.a.as_tensor().detach().to_dtype(dt)?;
        let b = self.b.as_tensor().detach().to_dtype(dt)?;
        let s = self.scaling;
        let y0 = self.base.forward_t(&xd, train)?;
        let xa = matmul_t(&drop_x(&xd)?, &a)?;
        let y = if y0.dtype() == dt && y0.is_contiguous() {
            // y0 += s·(A drop(x))·Bᵀ inside one GEMM (one group), no scale and add passes.
            let (k, n) = (xd.dim(D::Minus1)?, y0.dim(D::Minus1)?);
            let rows = xd.elem_count() / k;
            let xa2 = xa.reshape((rows, xa.dim(D::Minus1)?))?;
            moe_peft_kernels::grouped_matmul_add(
                y0.reshape((rows, n))?,
                &xa2,
                &[&b],
                &[rows],
                true,
                s,
            )?
            .reshape(y0.shape())?
        } else {
            let t = (matmul_t(&xa, &b)? * s)?.to_dtype(y0.dtype())?;
            (y0 + t)?
        };
        if !moe_peft_model::grad::is_grad_enabled() {
            return Ok(y);
        }
        let base = self.base.clone();
        let (a_dt, b_dt) = (self.a.dtype(), self.b.dtype());
        moe_peft_kernels::autograd::attach_backward3(
            x,
            self.a.as_tensor(),
            self.b.as_tensor(),
            y,
            move |dy| {
                let (k, n) = (xd.dim(D::Minus1)?, dy.dim(D::Minus1)?);
                let rows = xd.elem_count() / k;
                let dy2 = dy.to_dtype(dt)?.contiguous()?.reshape((rows, n))?;
                let w = base.dense_weight(dt)?;
                let dx = dy2.matmul(&w)?;
                drop(w);
                let xa2 = xa.reshape((rows, a.dim(0)?))?;
                let dyb = (dy2.matmul(&b)? * s)?; // (rows, r)
                let db = (dy2.t()?.matmul(&xa2)? * s)?; // (out, r)
                let xdrop = drop_x(&xd)?.reshape((rows, k))?;
                let da = dyb.t()?.matmul(&xdrop)?; // (r, in)
                drop(xdrop);
                // dx += drop(s·(dy B) A), in the GEMM (no dropout) or one dropout-add pass.
                let dx = if p > 0.0 {
                    let dxl = dyb.matmul(&a)?;
                    segmented_dropout_add(&dx, &dxl, p, &[rows], &[key])?;
                    dx
                } else {
                    moe_peft_kernels::grouped_matmul_add(dx, &dyb, &[&a], &[rows], false, 1.0)?
                };
                let dx = dx.reshape(xd.shape())?;
                Ok((Some(dx), Some(da.to_dtype(a_dt)?), Some(db.to_dtype(b_dt)?)))
            },
        )
    }
}

impl LinearLike for LoraLinear {
    fn in_features(&self) -> usize {
        self.base.in_features()
    }
    fn out_features(&self) -> usize {
        self.base.out_features()
    }
    fn dense_weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.merged_weight(dtype)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A fully trained projection (`modules_to_save` `lm_head`): `x·Wᵀ` with `W` an f32 `Var`.
#[derive(Debug, Clone)]
pub struct TrainableLinear {
    weight: Var,
}

impl TrainableLinear {
    /// Wraps a trainable weight `(out, in)`.
    pub fn new(weight: Var) -> Self {
        Self { weight }
    }

    /// The variable.
    pub fn var(&self) -> &Var {
        &self.weight
    }
}

impl ModuleT for TrainableLinear {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let w = tracked(self.weight.as_tensor()).to_dtype(x.dtype())?;
        matmul_t(x, &w)
    }
}

impl LinearLike for TrainableLinear {
    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    fn dense_weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.weight.as_tensor().to_dtype(dtype)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn adapter(alpha_over_r: f64, dropout: f64) -> candle_core::Result<LoraLinear> {
        let dev = Device::Cpu;
        let base = Arc::new(DenseLinear::new(Tensor::randn(0f32, 1., (6, 5), &dev)?));
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., (6, 2), &dev)?)?;
        Ok(LoraLinear::new(
            base,
            a,
            b,
            alpha_over_r,
            dropout,
            "s",
            Arc::new(DropoutState::new(1)),
        ))
    }

    /// The fused forward/backward against autograd through the same operations (dropout on).
    #[test]
    fn fused_adapter_gradients_equal_autograd() -> candle_core::Result<()> {
        let l = adapter(0.5, 0.3)?;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (2, 3, 6), &dev)?;
        let y = l.forward_t(x.as_tensor(), true)?;
        let g = (&y * &w)?.sum_all()?.backward()?;
        // Autograd reference: base, dropout and the two adapter matmuls as plain ops.
        let xd = dropout(x.as_tensor(), 0.3, l.dropout_key())?;
        let base = l.base().dense_weight(DType::F32)?;
        let want_y = (matmul_t(x.as_tensor(), &base)?
            + (matmul_t(
                &matmul_t(&xd, l.lora_a().as_tensor())?,
                l.lora_b().as_tensor(),
            )? * 0.5)?)?;
        let max = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max(&y, &want_y)? < 1e-5);
        let r = (&want_y * &w)?.sum_all()?.backward()?;
        for (what, t) in [
            ("x", x.as_tensor()),
            ("A", l.lora_a().as_tensor()),
            ("B", l.lora_b().as_tensor()),
        ] {
            let (a, b) = (g.get(t).expect("fused grad"), r.get(t).expect("autograd"));
            assert!(max(a, b)? < 1e-5, "{what}: {}", max(a, b)?);
        }
        Ok(())
    }

    #[test]
    fn forward_scales_only_the_adapter_and_merge_agrees() -> candle_core::Result<()> {
        let l = adapter(4.0, 0.0)?;
        let x = Tensor::randn(0f32, 1., (3, 5), &Device::Cpu)?;
        let y = l.forward_t(&x, false)?;
        let w = l.base().dense_weight(DType::F32)?;
        let want = (x.matmul(&w.t()?)?
            + (x.matmul(&l.lora_a().as_tensor().t()?)?
                .matmul(&l.lora_b().as_tensor().t()?)?
                * 4.0)?)?;
        let d = (&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        assert!(l.merge(DType::F32)?);
        assert!(!l.merge(DType::F32)?, "a second merge is refused");
        let ym = l.forward_t(&x, false)?;
        let d = (&y - &ym)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "merged differs by {d}");
        assert!(l.unmerge()?);
        Ok(())
    }

    #[test]
    fn dropout_only_in_training() -> candle_core::Result<()> {
        let l = adapter(1.0, 0.5)?;
        let x = Tensor::randn(0f32, 1., (3, 5), &Device::Cpu)?;
        let e1 = l.forward_t(&x, false)?.to_vec2::<f32>()?;
        let e2 = l.forward_t(&x, false)?.to_vec2::<f32>()?;
        assert_eq!(e1, e2);
        let t1 = l.forward_t(&x, true)?.to_vec2::<f32>()?;
        assert_ne!(e1, t1);
        Ok(())
    }
}
