//! Row softmax kernels for attention: the masked forward (`softmax(x + mask)` without
//! materialising the broadcast sum) and the softmax backward `p ⊙ (dp − Σ dp ⊙ p)`, each one
//! kernel (a warp per row, re-reading the row from cache). candle's broadcast add of a `(b, 1, s, s)` mask to `(b, h, s, s)` scores
//! and its broadcast multiply in the backward go through a strided path several times slower
//! than a contiguous pass. CPU and CUDA compute in f32 (summation orders differ). Not
//! differentiable: callers attach their own backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use crate::twin::{from_f32s, to_f32s};

#[cfg(feature = "cuda")]
fn range(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("softmax: {what} must be contiguous")))
}

/// `softmax(x + mask)` over the last dimension of `x` `(b, h, sq, c)`.
struct MaskedSoftmax {
    mask: Option<Tensor>,
    h: usize,
    sq: usize,
    mask_batched: bool,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = to_f32s(s, l, "softmax", "scores")?;
        let c = l.dims()[l.dims().len() - 1];
        let mask = match &self.mask {
            Some(m) => {
                let (ms, ml) = m.storage_and_layout();
                let Storage::Cpu(ms) = &*ms else {
                    candle_core::bail!("softmax: mask on another device")
                };
                Some(to_f32s(ms, ml, "softmax", "mask")?)
            }
            None => None,
        };
        let mut out = vec![0f32; x.len()];
        for (r, (row, o)) in x.chunks(c).zip(out.chunks_mut(c)).enumerate() {
            let mrow = mask.as_ref().map(|m| {
                let (qi, bi) = (r % self.sq, r / (self.h * self.sq));
                let mr = if self.mask_batched { bi } else { 0 } * self.sq + qi;
                &m[mr * c..(mr + 1) * c]
            });
            let v = |j: usize| row[j] + mrow.map_or(0.0, |m| m[j]);
            let max = (0..c).map(v).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = (0..c).map(|j| (v(j) - max).exp()).sum();
            let inv = 1.0 / sum;
            for (j, o) in o.iter_mut().enumerate() {
                *o = (v(j) - max).exp() * inv;
            }
        }
        Ok((from_f32s(s.dtype(), out, "softmax")?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::masked_softmax(self, s, l)
    }
}

/// `p ⊙ (dp − Σ dp ⊙ p)` over the last dimension.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        lp: &Layout,
        dp: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dtype = p.dtype();
        let p = to_f32s(p, lp, "softmax backward", "probabilities")?;
        let dp = to_f32s(dp, ld, "softmax backward", "gradient")?;
        if p.len() != dp.len() {
            candle_core::bail!(
                "softmax backward: {} probabilities, {} gradients",
                p.len(),
                dp.len()
            )
        }
        let c = lp.dims()[lp.dims().len() - 1];
        let mut out = vec![0f32; p.len()];
        for ((pr, dr), o) in p.chunks(c).zip(dp.chunks(c)).zip(out.chunks_mut(c)) {
            let d: f32 = pr.iter().zip(dr).map(|(p, d)| p * d).sum();
            for ((o, p), g) in o.iter_mut().zip(pr).zip(dr) {
                *o = p * (g - d);
            }
        }
        Ok((
            from_f32s(dtype, out, "softmax backward")?,
            lp.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        lp: &Layout,
        dp: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_backward(p, lp, dp, ld)
    }
}

/// `softmax(x + mask)` over the last dimension of contiguous scores `x` of shape
/// `(b, h, sq, c)`, `mask` (never differentiated) of shape `(1 or b, 1, sq, c)`, read in place
/// of a broadcast sum. f32 or bf16; computed in f32.
pub fn masked_softmax(x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (b, h, sq, c) = x.dims4()?;
    let mask = match mask {
        Some(m) => {
            let (mb, mh, ms, mc) = m.dims4()?;
            if !(mb == 1 || mb == b) || mh != 1 || ms != sq || mc != c {
                candle_core::bail!(
                    "masked_softmax: mask {:?} does not broadcast to scores {:?}",
                    m.dims(),
                    x.dims()
                )
            }
            Some(m.to_dtype(x.dtype())?.contiguous()?)
        }
        None => None,
    };
    if !matches!(x.dtype(), DType::F32 | DType::BF16) {
        // Other dtypes (f16) through the composed ops, with f32 accumulation as above.
        let v = match &mask {
            Some(m) => x.broadcast_add(m)?,
            None => x.clone(),
        }
        .to_dtype(DType::F32)?;
        let e = v
            .broadcast_sub(&v.max_keepdim(candle_core::D::Minus1)?)?
            .exp()?;
        return e
            .broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?
            .to_dtype(x.dtype());
    }
    let mask_batched = mask.as_ref().is_some_and(|m| m.dims()[0] == b && b > 1);
    x.contiguous()?.apply_op1_no_bwd(&MaskedSoftmax {
        mask,
        h,
        sq,
        mask_batched,
    })
}

/// The softmax backward over the last dimension: `p ⊙ (dp − Σ dp ⊙ p)` for probabilities `p`
/// and their upstream gradient `dp` of the same shape. f32 or bf16; computed in f32.
pub fn softmax_backward(p: &Tensor, dp: &Tensor) -> candle_core::Result<Tensor> {
    if p.dims() != dp.dims() {
        candle_core::bail!("softmax_backward: {:?} and {:?}", p.dims(), dp.dims())
    }
    if !matches!(p.dtype(), DType::F32 | DType::BF16) {
        let (pf, df) = (p.to_dtype(DType::F32)?, dp.to_dtype(DType::F32)?);
        let d = (&pf * &df)?.sum_keepdim(candle_core::D::Minus1)?;
        return (pf * df.broadcast_sub(&d)?)?.to_dtype(p.dtype());
    }
    p.contiguous()?
        .apply_op2_no_bwd(&dp.to_dtype(p.dtype())?.contiguous()?, &SoftmaxBackward)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Shape, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));
    const MODULE: &str = "moe_peft_kernels_softmax";

    fn cfg(rows: usize) -> LaunchConfig {
        // One warp per row, 8 warps per block.
        LaunchConfig {
            grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn masked_softmax(
        op: &super::MaskedSoftmax,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = super::range(l, "scores")?;
        let dims = l.dims();
        let c = dims[dims.len() - 1];
        let rows = (b - a) / c.max(1);
        let dev = s.device().clone();
        let (h, sq, mb) = (op.h as u32, op.sq as u32, i32::from(op.mask_batched));
        let (c32, rows64) = (c as u32, rows as u64);
        let mask_guard = op.mask.as_ref().map(|m| m.storage_and_layout());
        macro_rules! go {
            ($t:ty, $name:literal) => {{
                let x = s.as_cuda_slice::<$t>()?.slice(a..b);
                // SAFETY: every element is written by the kernel (one warp per row).
                let out = unsafe { dev.alloc::<$t>((b - a).max(1)) }?;
                let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut builder = f.builder();
                builder.arg(&x);
                let null = 0u64;
                let mview;
                match &mask_guard {
                    Some((ms, ml)) => {
                        let Storage::Cuda(ms) = &**ms else {
                            candle_core::bail!("softmax: mask on another device")
                        };
                        let (m0, m1) = super::range(ml, "mask")?;
                        mview = ms.as_cuda_slice::<$t>()?.slice(m0..m1);
                        builder.arg(&mview);
                    }
                    None => {
                        builder.arg(&null);
                    }
                }
                builder
                    .arg(&out)
                    .arg(&rows64)
                    .arg(&c32)
                    .arg(&h)
                    .arg(&sq)
                    .arg(&mb);
                if rows > 0 {
                    // SAFETY: the arguments match `masked_softmax_*` in softmax.cu.
                    unsafe { builder.launch(cfg(rows)) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => go!(f32, "masked_softmax_f32"),
            DType::BF16 => go!(half::bf16, "masked_softmax_bf16"),
            d => candle_core::bail!("softmax: f32 or bf16 only, not {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    pub(super) fn softmax_backward(
        p: &CudaStorage,
        lp: &Layout,
        dp: &CudaStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = super::range(lp, "probabilities")?;
        let (c0, c1) = super::range(ld, "gradient")?;
        if b - a != c1 - c0 {
            candle_core::bail!("softmax backward: operands differ in size")
        }
        let dims = lp.dims();
        let c = dims[dims.len() - 1];
        let rows = (b - a) / c.max(1);
        let dev = p.device().clone();
        let (c32, rows64) = (c as u32, rows as u64);
        macro_rules! go {
            ($t:ty, $name:literal) => {{
                let pv = p.as_cuda_slice::<$t>()?.slice(a..b);
                let dv = dp.as_cuda_slice::<$t>()?.slice(c0..c1);
                // SAFETY: every element is written by the kernel (one warp per row).
                let out = unsafe { dev.alloc::<$t>((b - a).max(1)) }?;
                if rows > 0 {
                    let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                    let mut builder = f.builder();
                    builder.arg(&pv).arg(&dv).arg(&out).arg(&rows64).arg(&c32);
                    // SAFETY: the arguments match `softmax_bwd_*` in softmax.cu.
                    unsafe { builder.launch(cfg(rows)) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match p.dtype() {
            DType::F32 => go!(f32, "softmax_bwd_f32"),
            DType::BF16 => go!(half::bf16, "softmax_bwd_bf16"),
            d => candle_core::bail!("softmax: f32 or bf16 only, not {d:?}"),
        };
        Ok((out, lp.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn masked_softmax_and_backward_match_the_composed_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
        for mb in [1usize, 2] {
            let mask = Tensor::randn(0f32, 1., (mb, 1, 4, 5), &dev)?;
            let got = masked_softmax(&x, Some(&mask))?;
            let v = x.broadcast_add(&mask)?;
            let e = v.broadcast_sub(&v.max_keepdim(D::Minus1)?)?.exp()?;
            let want = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let d = (got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-6, "mask batch {mb}: {d}");
            let dp = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
            let ds = softmax_backward(&want, &dp)?;
            let s = (&dp * &want)?.sum_keepdim(D::Minus1)?;
            let ref_ds = (&want * dp.broadcast_sub(&s)?)?;
            let d = (ds - ref_ds)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-6, "backward: {d}");
        }
        let plain = masked_softmax(&x, None)?;
        let sums = plain
            .sum_keepdim(D::Minus1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
        assert!(masked_softmax(&x, Some(&Tensor::zeros((1, 1, 3, 5), DType::F32, &dev)?)).is_err());
        Ok(())
    }
}
