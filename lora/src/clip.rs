//! Gradient clipping as `torch.nn.utils.clip_grad_norm_`: the global L2 norm over every
//! gradient and the coefficient `max_norm / (norm + 1e-6)`, applied when below 1.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Global L2 norm of the gradients (per-tensor sums of squares on the device, in f64, so the
/// CPU's and CUDA's different summation orders differ only at f64 rounding). The trainer uses
/// the one-pass [`moe_peft_kernels::FlatGrads::norm`] instead.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut parts = Vec::new();
    for g in grads.iter().flatten() {
        parts.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
    }
    if parts.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&parts, 0)?.to_dtype(DType::F64)?.sum_all()?;
    Ok(total.to_scalar::<f64>()?.sqrt())
}

/// torch's `clip_grad_norm_` coefficient for a global norm `norm`: `max_norm / (norm + 1e-6)`
/// when that is below 1, else 1 (also 1 when `max_norm <= 0`, clipping off).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// Scales gradients so their global norm is at most `max_norm` (torch's
/// `clip_grad_norm_`, coefficient [`clip_coefficient`]). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clipping_matches_torch() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![
            Some(Tensor::new(&[3.0f32, 0.0], &dev)?),
            None,
            Some(Tensor::new(&[4.0f32], &dev)?),
        ];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].as_ref().unwrap().to_vec1::<f32>()?;
        assert!((a[0] - 3.0 / (5.0 + 1e-6) as f32).abs() < 1e-7);
        Ok(())
    }
}
