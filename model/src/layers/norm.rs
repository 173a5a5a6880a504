//! RMSNorm as DeepSeek computes it, with its kernel forward and hand-written backward.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

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

    /// The weight, to replace (a `Var`'s tensor makes it trainable).
    pub fn weight_mut(&mut self) -> &mut Tensor {
        &mut self.weight
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}
