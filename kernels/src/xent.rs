//! Cross-entropy rows of the LM head as one kernel per direction: `loss[r] = log Σ_j
//! exp(x[r,j] − m) + m − x[r, t[r]]` with `m = max_j x[r,j]`, and the softmax `exp(x − m)/Σ`
//! for the backward, in f32 from logits in their own dtype (the reference takes bf16 logits to
//! f32). The composed version casts the logits to f32 and makes about seven passes each way.
//! CPU and CUDA compute the same expressions (the CPU sums in f64, CUDA in f32 per thread then
//! a tree). Not differentiable.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

use crate::twin::{from_f32s, to_f32s};

fn rows_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<(Vec<f32>, usize)> {
    let v = l.dims()[l.dims().len() - 1];
    Ok((to_f32s(s, l, "cross-entropy", "logits")?, v))
}

/// Row max and `Σ exp(x − max)` (each term in f32, summed in f64: a sequential f32 sum over a
/// 100k vocabulary would be the least accurate part).
fn max_sum(row: &[f32]) -> (f32, f32) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (
        m,
        row.iter().map(|x| (x - m).exp() as f64).sum::<f64>() as f32,
    )
}

struct Loss;

impl CustomOp2 for Loss {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xv, v) = rows_of(x, lx)?;
        let (CpuStorage::U32(tv), Some((t0, t1))) = (t, lt.contiguous_offsets()) else {
            candle_core::bail!("cross-entropy: targets must be contiguous u32")
        };
        let tv = &tv[t0..t1];
        let out: Vec<f32> = xv
            .chunks(v)
            .zip(tv)
            .map(|(row, &t)| {
                let (m, s) = max_sum(row);
                match row.get(t as usize) {
                    Some(x) => (s.ln() + m) - x,
                    None => f32::NAN,
                }
            })
            .collect();
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        t: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::loss(x, lx, t, lt)
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "cross-entropy-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xv, v) = rows_of(x, lx)?;
        let mut out = Vec::with_capacity(xv.len());
        for row in xv.chunks(v) {
            let (m, s) = max_sum(row);
            out.extend(row.iter().map(|x| (x - m).exp() / s));
        }
        Ok((
            from_f32s(x.dtype(), out, "cross-entropy")?,
            lx.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax(x, lx)
    }
}

/// Per-row cross-entropy `(rows,)` in f32 of logits `(rows, vocab)` against u32 `targets`
/// `(rows,)` (a target outside the vocabulary gives NaN).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (r, _) = logits.dims2()?;
    if targets.dims() != [r] {
        candle_core::bail!("cross-entropy: {:?} targets for {r} rows", targets.dims())
    }
    if !matches!(logits.dtype(), DType::F32 | DType::BF16) {
        let l = logits.to_dtype(DType::F32)?;
        let max = l.max_keepdim(D::Minus1)?;
        let lse = (l
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + max)?;
        let picked = l.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
        return (lse - picked)?.squeeze(1);
    }
    logits
        .contiguous()?
        .apply_op2_no_bwd(&targets.to_dtype(DType::U32)?.contiguous()?, &Loss)
}

/// Row softmax of `(rows, vocab)` logits computed in f32, returned in the logits' dtype.
pub fn softmax_rows(logits: &Tensor) -> candle_core::Result<Tensor> {
    logits.dims2()?;
    if !matches!(logits.dtype(), DType::F32 | DType::BF16) {
        let l = logits.to_dtype(DType::F32)?;
        let e = l.broadcast_sub(&l.max_keepdim(D::Minus1)?)?.exp()?;
        return e
            .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .to_dtype(logits.dtype());
    }
    logits.contiguous()?.apply_op1_no_bwd(&Softmax)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/xent.ptx"));
    const MODULE: &str = "moe_peft_kernels_xent";

    fn shape(l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("cross-entropy: logits must be contiguous")
        };
        let v = l.dims()[l.dims().len() - 1];
        Ok((a, b, (b - a) / v.max(1), v))
    }

    fn cfg(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn loss(
        x: &CudaStorage,
        lx: &Layout,
        t: &CudaStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b, rows, v) = shape(lx)?;
        let Some((t0, t1)) = lt.contiguous_offsets() else {
            candle_core::bail!("cross-entropy: targets must be contiguous")
        };
        if t1 - t0 != rows {
            candle_core::bail!("cross-entropy: {} targets for {rows} rows", t1 - t0)
        }
        let dev = x.device().clone();
        // SAFETY: one value per row is written.
        let out = unsafe { dev.alloc::<f32>(rows.max(1)) }?;
        if rows > 0 {
            let tv = t.as_cuda_slice::<u32>()?.slice(t0..t1);
            let v32 = v as u32;
            macro_rules! go {
                ($t:ty, $name:literal) => {{
                    let xv = x.as_cuda_slice::<$t>()?.slice(a..b);
                    let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                    let mut bld = f.builder();
                    bld.arg(&xv).arg(&tv).arg(&out).arg(&v32);
                    // SAFETY: the arguments match `xent_fwd_*` in xent.cu.
                    unsafe { bld.launch(cfg(rows)) }.w()?;
                }};
            }
            match x.dtype() {
                DType::F32 => go!(f32, "xent_fwd_f32"),
                DType::BF16 => go!(half::bf16, "xent_fwd_bf16"),
                d => candle_core::bail!("cross-entropy: f32 or bf16 logits, not {d:?}"),
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
    }

    pub(super) fn softmax(
        x: &CudaStorage,
        lx: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b, rows, v) = shape(lx)?;
        let dev = x.device().clone();
        let v32 = v as u32;
        macro_rules! go {
            ($t:ty, $name:literal) => {{
                // SAFETY: every element is written.
                let out = unsafe { dev.alloc::<$t>((b - a).max(1)) }?;
                if rows > 0 {
                    let xv = x.as_cuda_slice::<$t>()?.slice(a..b);
                    let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                    let mut bld = f.builder();
                    bld.arg(&xv).arg(&out).arg(&v32);
                    // SAFETY: the arguments match `xent_bwd_*` in xent.cu.
                    unsafe { bld.launch(cfg(rows)) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match x.dtype() {
            DType::F32 => go!(f32, "xent_bwd_f32"),
            DType::BF16 => go!(half::bf16, "xent_bwd_bf16"),
            d => candle_core::bail!("cross-entropy: f32 or bf16 logits, not {d:?}"),
        };
        Ok((out, lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_match_the_composed_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let l = Tensor::randn(0f32, 3., (6, 50), &dev)?;
        let t = Tensor::new(&[0u32, 49, 7, 7, 20, 1], &dev)?;
        let max = l.max_keepdim(D::Minus1)?;
        let lse = (l
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let want = (lse - l.gather(&t.unsqueeze(1)?, 1)?)?.squeeze(1)?;
        let got = cross_entropy_rows(&l, &t)?;
        let d = (got - want)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        let e = l.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let d = (softmax_rows(&l)? - p)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        let bad = cross_entropy_rows(&l, &Tensor::new(&[0u32, 50, 0, 0, 0, 0], &dev)?)?;
        assert!(bad.to_vec1::<f32>()?[1].is_nan());
        Ok(())
    }
}
