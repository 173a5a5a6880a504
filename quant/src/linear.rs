//! Frozen linear layers behind one small trait.
//!
//! A frozen linear computes `y = x Wᵀ` and passes gradients to `x` only. candle's own `matmul`
//! backward also computes the weight gradient, a full `(out, in)` GEMM per layer that a frozen
//! weight never uses, so every frozen projection here goes through [`frozen_matmul`], which
//! records a custom op whose backward returns `grad_y · W` and nothing else.

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, ModuleT, Tensor};

/// A linear projection `y = x Wᵀ` with `W` of shape `(out_features, in_features)`.
///
/// Implemented by the frozen bases of this crate ([`DenseLinear`], [`crate::FourBitLinear`],
/// [`crate::Int8Linear`]) and by adapters that wrap them.
pub trait LinearLike: ModuleT + Send + Sync + Debug {
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// Dense weight `(out, in)` in `dtype`, dequantized if needed (for merge and export).
    fn dense_weight(&self, dtype: DType) -> candle_core::Result<Tensor>;
    /// Downcasting hook, so callers can find what a trait object wraps.
    fn as_any(&self) -> &dyn Any;
}

/// Where the backward of a frozen projection gets its weight from.
pub trait FrozenWeight: Send + Sync + Debug {
    /// The dense weight `(out, in)` in `dtype`; may be materialized on demand.
    fn weight(&self, dtype: DType) -> candle_core::Result<Tensor>;
}

impl FrozenWeight for Tensor {
    fn weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.to_dtype(dtype)
    }
}

/// `x · Wᵀ` over the last dimension of `x` (any rank), as a 2-D GEMM.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((m, k))?.matmul(&w.t()?)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// `g · W` over the last dimension of `g` (any rank), as a 2-D GEMM.
fn matmul_last(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = g.dims();
    let n = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let y = g.contiguous()?.reshape((m, n))?.matmul(w)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(1)?);
    y.reshape(out)
}

/// `x · Wᵀ` for a frozen `W`: forward with `w_now` (already in `x`'s dtype), backward
/// `grad · W` with the weight fetched again from `source` (so a quantized source can
/// dequantize on demand instead of keeping `w_now` alive). No weight gradient is ever computed.
pub fn frozen_matmul(
    x: &Tensor,
    w_now: &Tensor,
    source: Arc<dyn FrozenWeight>,
) -> candle_core::Result<Tensor> {
    let y = matmul_t(&x.detach(), w_now)?;
    let dtype = x.dtype();
    moe_peft_kernels::attach_backward(x, y, move |grad| {
        let w = source.weight(grad.dtype())?;
        matmul_last(grad, &w)?.to_dtype(dtype)
    })
}

/// A frozen dense projection (f32, bf16 or f16 weight, no bias).
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: Tensor,
    shared: Arc<dyn FrozenWeight>,
}

impl DenseLinear {
    /// Wraps a weight of shape `(out, in)`.
    pub fn new(weight: Tensor) -> Self {
        let weight = weight.detach();
        Self {
            shared: Arc::new(weight.clone()),
            weight,
        }
    }

    /// The weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl ModuleT for DenseLinear {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() {
            self.weight.clone()
        } else {
            self.weight.to_dtype(x.dtype())?
        };
        frozen_matmul(x, &w, self.shared.clone())
    }
}

impl LinearLike for DenseLinear {
    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    fn dense_weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.weight.to_dtype(dtype)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_matmul_gives_input_grad_only() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 4, 3), &dev)?)?;
        let lin = DenseLinear::new(w.clone());
        let y = lin.forward_t(x.as_tensor(), true)?;
        let reference = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "forward differs by {diff}");
        let g = Tensor::randn(0f32, 1., (2, 4, 5), &dev)?;
        let grads = (&y * &g)?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("input gradient");
        let expected = g.broadcast_matmul(&w)?;
        let diff = (gx - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "input gradient differs by {diff}");
        Ok(())
    }
}
