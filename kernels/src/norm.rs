//! RMSNorm as DeepSeek computes it, forward and input gradient as one kernel each (a warp per row):
//! `r = 1/√(mean(x²) + ε)` in f32, `n = T(x·r)`, `y = T(f32(n)·w)`; backward
//! `dx = T(r·dn − x·r³·Σ(dn·x)/H)` with `dn = f32(T(dy·w))` (the rounding autograd through the
//! casts gives). The composed version takes a dozen f32 passes over the activations. CPU and
//! CUDA compute the same f32 expressions (row sums in different orders). Not differentiable:
//! the model attaches the backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::twin::{from_f32s, round_to as rnd, to_f32s};

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let s: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (s / row.len() as f32 + eps).sqrt()
}

struct RmsForward {
    eps: f32,
}

impl CustomOp2 for RmsForward {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dt = x.dtype();
        let (xv, wv) = (
            to_f32s(x, lx, "rms_norm", "input")?,
            to_f32s(w, lw, "rms_norm", "weight")?,
        );
        let h = wv.len();
        let mut out = vec![0f32; xv.len()];
        for (row, o) in xv.chunks(h).zip(out.chunks_mut(h)) {
            let inv = inv_rms(row, self.eps);
            for ((o, &x), &w) in o.iter_mut().zip(row).zip(&wv) {
                *o = rnd(dt, x * inv) * w;
            }
        }
        Ok((from_f32s(dt, out, "rms_norm")?, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::run(x, lx, w, lw, None, self.eps)
    }
}

struct RmsBackward {
    eps: f32,
}

impl CustomOp3 for RmsBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        dy: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dt = x.dtype();
        let (xv, wv, gv) = (
            to_f32s(x, lx, "rms_norm", "input")?,
            to_f32s(w, lw, "rms_norm", "weight")?,
            to_f32s(dy, ld, "rms_norm", "gradient")?,
        );
        if gv.len() != xv.len() {
            candle_core::bail!("rms_norm backward: gradient and input differ in size")
        }
        let h = wv.len();
        let mut out = vec![0f32; xv.len()];
        for ((row, g), o) in xv.chunks(h).zip(gv.chunks(h)).zip(out.chunks_mut(h)) {
            let inv = inv_rms(row, self.eps);
            let dn: Vec<f32> = g.iter().zip(&wv).map(|(g, w)| rnd(dt, g * w)).collect();
            let d: f32 = dn.iter().zip(row).map(|(a, b)| a * b).sum();
            let coef = -(inv * inv * inv) * d / h as f32;
            for ((o, &x), &dn) in o.iter_mut().zip(row).zip(&dn) {
                *o = dn * inv + x * coef;
            }
        }
        Ok((from_f32s(dt, out, "rms_norm")?, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        dy: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::run(x, lx, w, lw, Some((dy, ld)), self.eps)
    }
}

fn check(x: &Tensor, w: &Tensor) -> candle_core::Result<bool> {
    let h = x.dim(D::Minus1)?;
    if w.dims() != [h] {
        candle_core::bail!("rms_norm: weight {:?} for rows of {h}", w.dims())
    }
    Ok(matches!(x.dtype(), DType::F32 | DType::BF16))
}

/// The composed forward (any float dtype): the reference for the kernels.
fn composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let n = xf.broadcast_mul(&inv)?.to_dtype(dt)?;
    n.to_dtype(DType::F32)?.broadcast_mul(w)?.to_dtype(dt)
}

/// `T(f32(T(x·r))·w)` with `r = 1/√(mean(x²)+ε)` over the last dimension; `w` f32 of the
/// row length.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let w = w.to_dtype(DType::F32)?;
    if !check(x, &w)? {
        return composed(x, &w, eps);
    }
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &RmsForward { eps: eps as f32 })
}

/// The input gradient of [`rms_norm`] for upstream gradient `dy` (of `x`'s shape).
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let w = w.to_dtype(DType::F32)?;
    if x.dims() != dy.dims() {
        candle_core::bail!(
            "rms_norm backward: gradient {:?} for {:?}",
            dy.dims(),
            x.dims()
        )
    }
    if !check(x, &w)? {
        let dt = x.dtype();
        let h = x.dim(D::Minus1)? as f64;
        let xf = x.to_dtype(DType::F32)?;
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        let dn = dy
            .to_dtype(DType::F32)?
            .broadcast_mul(&w)?
            .to_dtype(dt)?
            .to_dtype(DType::F32)?;
        let s = (&dn * &xf)?.sum_keepdim(D::Minus1)?;
        let coef = ((r.sqr()? * &r)? * s)?.affine(-1.0 / h, 0.0)?;
        return (dn.broadcast_mul(&r)? + xf.broadcast_mul(&coef)?)?.to_dtype(dt);
    }
    x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &dy.to_dtype(x.dtype())?.contiguous()?,
        &RmsBackward { eps: eps as f32 },
    )
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
    const MODULE: &str = "moe_peft_kernels_norm";

    fn range(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("rms_norm: {what} must be contiguous")))
    }

    pub(super) fn run(
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        dy: Option<(&CudaStorage, &Layout)>,
        eps: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = range(lx, "input")?;
        let (w0, w1) = range(lw, "weight")?;
        let h = w1 - w0;
        let rows = (b - a) / h.max(1);
        let dev = x.device().clone();
        let (rows64, h32) = (rows as u64, h as u32);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let wv = w.as_cuda_slice::<f32>()?.slice(w0..w1);
        macro_rules! go {
            ($t:ty, $fwd:literal, $bwd:literal) => {{
                let xv = x.as_cuda_slice::<$t>()?.slice(a..b);
                // SAFETY: every element is written by the kernel (one warp per row).
                let out = unsafe { dev.alloc::<$t>((b - a).max(1)) }?;
                if rows > 0 {
                    match dy {
                        None => {
                            let f = dev.get_or_load_custom_func($fwd, MODULE, PTX)?;
                            let mut bld = f.builder();
                            bld.arg(&xv)
                                .arg(&wv)
                                .arg(&out)
                                .arg(&rows64)
                                .arg(&h32)
                                .arg(&eps);
                            // SAFETY: the arguments match `rms_fwd_*` in norm.cu.
                            unsafe { bld.launch(cfg) }.w()?;
                        }
                        Some((g, lg)) => {
                            let (g0, g1) = range(lg, "gradient")?;
                            if g1 - g0 != b - a {
                                candle_core::bail!("rms_norm backward: sizes differ")
                            }
                            let gv = g.as_cuda_slice::<$t>()?.slice(g0..g1);
                            let f = dev.get_or_load_custom_func($bwd, MODULE, PTX)?;
                            let mut bld = f.builder();
                            bld.arg(&xv)
                                .arg(&wv)
                                .arg(&gv)
                                .arg(&out)
                                .arg(&rows64)
                                .arg(&h32)
                                .arg(&eps);
                            // SAFETY: the arguments match `rms_bwd_*` in norm.cu.
                            unsafe { bld.launch(cfg) }.w()?;
                        }
                    }
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match x.dtype() {
            DType::F32 => go!(f32, "rms_fwd_f32", "rms_bwd_f32"),
            DType::BF16 => go!(half::bf16, "rms_fwd_bf16", "rms_bwd_bf16"),
            d => candle_core::bail!("rms_norm: f32 or bf16 only, not {d:?}"),
        };
        Ok((out, lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn kernels_match_the_composed_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 4, 16), &dev)?;
        let w = Tensor::randn(1f32, 0.2, 16, &dev)?;
        let dy = Tensor::randn(0f32, 1., (3, 4, 16), &dev)?;
        let max = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max(&rms_norm(&x, &w, 1e-6)?, &composed(&x, &w, 1e-6)?)? < 1e-6);
        // The backward formula written as plain f32 ops against the kernel's CPU twin.
        let want = {
            let xf = &x;
            let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?
                .sqrt()?
                .recip()?;
            let dn = dy.broadcast_mul(&w)?;
            let s = (&dn * xf)?.sum_keepdim(D::Minus1)?;
            let coef = ((r.sqr()? * &r)? * s)?.affine(-1.0 / 16.0, 0.0)?;
            (dn.broadcast_mul(&r)? + xf.broadcast_mul(&coef)?)?
        };
        assert!(max(&rms_norm_backward(&x, &w, &dy, 1e-6)?, &want)? < 1e-5);
        assert!(rms_norm(&x, &Tensor::ones(3, DType::F32, &dev)?, 1e-6).is_err());
        Ok(())
    }
}
