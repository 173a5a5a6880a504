//! Casting many adapter matrices at once. A MoE layer's fused experts need every A and B
//! (64 experts × 3 projections × 2) in the activation dtype on each call; one cast launch per
//! matrix is ~400 tiny kernels whose launch cost the GPU waits on right after the routing
//! synchronisation. On CUDA, f32 → bf16 runs here as one launch into one buffer, each result a
//! view of it; elsewhere (and for other dtypes) it is `to_dtype` per tensor. Values are those
//! of `to_dtype` (round to nearest even).

use candle_core::{DType, Result, Tensor};

/// `t.detach().to_dtype(dtype)` for every tensor.
pub fn cast_many(ts: &[&Tensor], dtype: DType) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if dtype == DType::BF16
        && ts.len() > 1
        && ts.iter().all(|t| {
            t.dtype() == DType::F32 && t.is_contiguous() && t.device().same_device(ts[0].device())
        })
        && ts[0].device().is_cuda()
    {
        return cuda::cast_many(ts);
    }
    ts.iter().map(|t| t.detach().to_dtype(dtype)).collect()
}

/// The bit pattern of every element of a float tensor (f32, bf16 or f16, any device), in
/// row-major order: what a bit-identity check between a CPU twin and its CUDA kernel compares.
/// bf16 and f16 patterns are widened to `u32` unchanged.
pub fn bit_patterns(t: &Tensor) -> Result<Vec<u32>> {
    let t = t.flatten_all()?.to_device(&candle_core::Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| u32::from(v.to_bits()))
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .map(|v| u32::from(v.to_bits()))
            .collect(),
        other => candle_core::bail!("bit_patterns: {other:?} is not a float dtype"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_patterns_of_each_float_dtype() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let t = Tensor::new(&[1.0f32, -0.0, 2.5], &dev)?;
        assert_eq!(
            bit_patterns(&t)?,
            vec![0x3f80_0000, 0x8000_0000, 0x4020_0000]
        );
        assert_eq!(
            bit_patterns(&t.to_dtype(DType::BF16)?)?,
            vec![0x3f80, 0x8000, 0x4020]
        );
        assert_eq!(
            bit_patterns(&t.to_dtype(DType::F16)?)?,
            vec![0x3c00, 0x8000, 0x4100]
        );
        assert!(bit_patterns(&t.to_dtype(DType::U8)?).is_err());
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Result, Storage, Tensor};

    use crate::adamw::cuda::{MODULE, PTX};

    pub(super) fn cast_many(ts: &[&Tensor]) -> Result<Vec<Tensor>> {
        let candle_core::Device::Cuda(dev) = ts[0].device() else {
            candle_core::bail!("cast_many: not CUDA")
        };
        let stream = dev.cuda_stream();
        let mut src = Vec::with_capacity(ts.len());
        let mut offs = Vec::with_capacity(ts.len());
        let mut lens = Vec::with_capacity(ts.len());
        let mut total = 0u64;
        for t in ts {
            src.push(crate::device::device_address(t)?.addr());
            offs.push(total);
            let n = t.elem_count() as u64;
            lens.push(n);
            // Keep every view 16-byte aligned (8 bf16).
            total += n.div_ceil(8) * 8;
        }
        // SAFETY: every element a view covers is written by the kernel.
        let out = unsafe { dev.alloc::<half::bf16>(total.max(1) as usize) }?;
        let d_src = stream.clone_htod(&src).w()?;
        let d_offs = stream.clone_htod(&offs).w()?;
        let d_lens = stream.clone_htod(&lens).w()?;
        let f = dev.get_or_load_custom_func("cast_multi_f32_bf16", MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (ts.len() as u32, 4, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = f.builder();
        b.arg(&d_src).arg(&d_offs).arg(&d_lens).arg(&out);
        // SAFETY: the arguments match `cast_multi_f32_bf16` in adamw.cu; each source is a live
        // contiguous f32 tensor of lens[t] elements, the buffer holds offsets[t] + lens[t].
        unsafe { b.launch(cfg) }.w()?;
        let buf = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
            total.max(1) as usize,
            candle_core::op::BackpropOp::none(),
            false,
        );
        ts.iter()
            .zip(offs.iter().zip(&lens))
            .map(|(t, (&o, &n))| buf.narrow(0, o as usize, n as usize)?.reshape(t.shape()))
            .collect()
    }
}
