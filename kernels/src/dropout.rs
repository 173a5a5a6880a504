//! Deterministic inverted dropout with counter-based masks, as LoRA layers apply it to the
//! input of A: element `i` (row-major) of a tensor is kept, and scaled by `1 / (1 - p)`, iff
//! `u(key, i) >= p`, `u` the top 24 bits of `splitmix64(key ^ i · 0xD6E8FEB86659FD93)` over
//! 2^24. The mask is a pure function of `(key, i)`, so a recomputed forward (gradient
//! checkpointing), a resumed run and the backward draw the same one, on the CPU and in the CUDA
//! kernels (`cuda/dropout.cu`) alike.
//!
//! Three ops: [`hash_dropout`] (differentiable: its backward is the same mask on the gradient),
//! [`segmented_dropout`] (consecutive row groups, each with its own key, in one launch: the
//! experts of a MoE layer) and [`segmented_dropout_add`] (the same, added in place into an
//! accumulator).

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// The splitmix64 finalizer: a bijective 64-bit mix (Steele, Lea, Flood, "Fast splittable
/// pseudorandom number generators", 2014).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout with a counter-based mask: element `i` is kept iff
/// `u(key, i) ≥ p`, `u` uniform in [0, 1) from splitmix64. Linear in `x`, so its backward is
/// the same op applied to the gradient.
#[derive(Debug, Clone, Copy)]
struct HashDropout {
    p: f32,
    key: u64,
}

impl HashDropout {
    fn keep(&self, i: usize) -> bool {
        let u = (splitmix64(self.key ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 40)
            as f32
            / (1u64 << 24) as f32;
        u >= self.p
    }

    /// The inverted-dropout scale `1 / (1 - p)` (fp32).
    fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    fn run<T: Copy + Send + Sync>(&self, v: &[T], mul: impl Fn(T, f32) -> T + Sync) -> Vec<T> {
        let scale = self.scale();
        v.iter()
            .enumerate()
            .map(|(i, &x)| mul(x, if self.keep(i) { scale } else { 0.0 }))
            .collect()
    }
}

impl CustomOp1 for HashDropout {
    fn name(&self) -> &'static str {
        "hash-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("hash-dropout: input must be contiguous")
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..b], |x, m| x * m)),
            CpuStorage::BF16(v) => {
                CpuStorage::BF16(self.run(&v[a..b], |x, m| half::bf16::from_f32(x.to_f32() * m)))
            }
            CpuStorage::F16(v) => {
                CpuStorage::F16(self.run(&v[a..b], |x, m| half::f16::from_f32(x.to_f32() * m)))
            }
            _ => candle_core::bail!("hash-dropout: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    /// The same mask computed in-kernel (`src/cuda/dropout.cu`: the same u64 splitmix64 and
    /// comparison, the same fp32 multiply and rounding), so CPU and CUDA outputs are
    /// bit-identical for every non-NaN input. 8 elements per thread and step with 16-byte
    /// loads/stores, 256-thread CTAs, grid-stride.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        use candle_core::CudaStorage;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
        const THREADS: u32 = 256;

        fn run<T: CudaDType + DeviceRepr>(
            op: &HashDropout,
            s: &CudaStorage,
            l: &Layout,
            name: &str,
        ) -> candle_core::Result<CudaStorage> {
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("hash-dropout: input must be contiguous")
            };
            let dev = s.device();
            let x = s.as_cuda_slice::<T>()?.slice(a..b);
            let n = (b - a) as u64;
            // SAFETY: the kernel writes all n elements (one is allocated for n = 0).
            let out = unsafe { dev.alloc::<T>((b - a).max(1)) }?;
            if n > 0 {
                let func = dev.get_or_load_custom_func(name, "moe_peft_kernels_dropout", PTX)?;
                let scale = op.scale();
                let cfg = LaunchConfig {
                    grid_dim: (n.div_ceil(8 * THREADS as u64).clamp(1, 16_384) as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut builder = func.builder();
                builder
                    .arg(&x)
                    .arg(&n)
                    .arg(&op.p)
                    .arg(&scale)
                    .arg(&op.key)
                    .arg(&out);
                // SAFETY: the argument list matches `DROPOUT` in dropout.cu.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        let out = match s.dtype() {
            DType::F32 => run::<f32>(self, s, l, "hash_dropout_f32")?,
            DType::BF16 => run::<half::bf16>(self, s, l, "hash_dropout_bf16")?,
            DType::F16 => run::<half::f16>(self, s, l, "hash_dropout_f16")?,
            other => candle_core::bail!("hash-dropout: unsupported dtype {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dropout(grad, self.p, self.key)?))
    }
}

/// [`HashDropout`] over consecutive segments of one tensor, each with its own key: the same
/// masks as one dropout per segment, in one launch (the experts of a MoE layer).
#[derive(Debug, Clone)]
struct SegmentedDropout {
    p: f32,
    /// Element offsets of the segments, with the total at the end.
    starts: Vec<u64>,
    keys: Vec<u64>,
}

impl SegmentedDropout {
    fn run<T: Copy>(&self, v: &[T], mul: impl Fn(T, f32) -> T) -> Vec<T> {
        let mut out = Vec::with_capacity(v.len());
        for (s, &key) in self.keys.iter().enumerate() {
            let (a, b) = (self.starts[s] as usize, self.starts[s + 1] as usize);
            let d = HashDropout { p: self.p, key };
            let scale = d.scale();
            out.extend(
                v[a..b]
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| mul(x, if d.keep(i) { scale } else { 0.0 })),
            );
        }
        out
    }
}

impl CustomOp1 for SegmentedDropout {
    fn name(&self) -> &'static str {
        "segmented-hash-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("segmented dropout: input must be contiguous")
        };
        if self.starts.last().copied() != Some((b - a) as u64) {
            candle_core::bail!("segmented dropout: segments do not cover the input")
        }
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..b], |x, m| x * m)),
            CpuStorage::BF16(v) => {
                CpuStorage::BF16(self.run(&v[a..b], |x, m| half::bf16::from_f32(x.to_f32() * m)))
            }
            CpuStorage::F16(v) => {
                CpuStorage::F16(self.run(&v[a..b], |x, m| half::f16::from_f32(x.to_f32() * m)))
            }
            _ => candle_core::bail!("segmented dropout: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        use candle_core::CudaStorage;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));

        fn run<T: CudaDType + DeviceRepr>(
            op: &SegmentedDropout,
            s: &CudaStorage,
            l: &Layout,
            name: &str,
        ) -> candle_core::Result<CudaStorage> {
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("segmented dropout: input must be contiguous")
            };
            if op.starts.last().copied() != Some((b - a) as u64) {
                candle_core::bail!("segmented dropout: segments do not cover the input")
            }
            let dev = s.device();
            let x = s.as_cuda_slice::<T>()?.slice(a..b);
            let n = (b - a) as u64;
            // SAFETY: the kernel writes all n elements (one is allocated for n = 0).
            let out = unsafe { dev.alloc::<T>((b - a).max(1)) }?;
            if n > 0 {
                let stream = dev.cuda_stream();
                let starts = stream.clone_htod(&op.starts).w()?;
                let keys = stream.clone_htod(&op.keys).w()?;
                let nseg = op.keys.len() as u32;
                let func = dev.get_or_load_custom_func(name, "moe_peft_kernels_dropout", PTX)?;
                let scale = 1.0f32 / (1.0 - op.p);
                let cfg = seg_launch_config(n);
                let no_acc = 0u64;
                let mut builder = func.builder();
                builder
                    .arg(&x)
                    .arg(&n)
                    .arg(&op.p)
                    .arg(&scale)
                    .arg(&starts)
                    .arg(&keys)
                    .arg(&nseg)
                    .arg(&out)
                    .arg(&no_acc);
                // SAFETY: the argument list matches `DROPOUT_SEG` in dropout.cu.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        let out = match s.dtype() {
            DType::F32 => run::<f32>(self, s, l, "hash_dropout_seg_f32")?,
            DType::BF16 => run::<half::bf16>(self, s, l, "hash_dropout_seg_bf16")?,
            DType::F16 => run::<half::f16>(self, s, l, "hash_dropout_seg_f16")?,
            other => candle_core::bail!("segmented dropout: unsupported dtype {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(self.clone())?))
    }
}

/// Launch shape of `hash_dropout_seg_*` (8 elements per thread).
#[cfg(feature = "cuda")]
fn seg_launch_config(n: u64) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (n.div_ceil(8 * 256).clamp(1, 16_384) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `acc += segmented_dropout(x)` in place, rounding as the two ops would (see
/// [`segmented_dropout_add`]).
struct SegmentedDropoutAdd(SegmentedDropout);

impl candle_core::InplaceOp2 for SegmentedDropoutAdd {
    fn name(&self) -> &'static str {
        "segmented-hash-dropout-add"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        la: &Layout,
        x: &CpuStorage,
        lx: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((a0, a1)), Some((x0, x1))) = (la.contiguous_offsets(), lx.contiguous_offsets())
        else {
            candle_core::bail!("segmented dropout: operands must be contiguous")
        };
        if a1 - a0 != x1 - x0 || self.0.starts.last().copied() != Some((x1 - x0) as u64) {
            candle_core::bail!("segmented dropout: segments do not cover the input")
        }
        match (acc, x) {
            (CpuStorage::F32(a), CpuStorage::F32(v)) => {
                let d = self.0.run(&v[x0..x1], |x, m| x * m);
                a[a0..a1].iter_mut().zip(d).for_each(|(a, d)| *a += d);
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(v)) => {
                let d = self
                    .0
                    .run(&v[x0..x1], |x, m| half::bf16::from_f32(x.to_f32() * m));
                a[a0..a1]
                    .iter_mut()
                    .zip(d)
                    .for_each(|(a, d)| *a = half::bf16::from_f32(a.to_f32() + d.to_f32()));
            }
            (CpuStorage::F16(a), CpuStorage::F16(v)) => {
                let d = self
                    .0
                    .run(&v[x0..x1], |x, m| half::f16::from_f32(x.to_f32() * m));
                a[a0..a1]
                    .iter_mut()
                    .zip(d)
                    .for_each(|(a, d)| *a = half::f16::from_f32(a.to_f32() + d.to_f32()));
            }
            _ => candle_core::bail!("segmented dropout: operands of one float dtype"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        la: &Layout,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::{DevicePtrMut, DeviceRepr, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
        let (Some((a0, a1)), Some((x0, x1))) = (la.contiguous_offsets(), lx.contiguous_offsets())
        else {
            candle_core::bail!("segmented dropout: operands must be contiguous")
        };
        let op = &self.0;
        if a1 - a0 != x1 - x0 || op.starts.last().copied() != Some((x1 - x0) as u64) {
            candle_core::bail!("segmented dropout: segments do not cover the input")
        }
        let n = (x1 - x0) as u64;
        if n == 0 {
            return Ok(());
        }
        fn go<T: CudaDType + DeviceRepr>(
            op: &SegmentedDropout,
            acc: &mut candle_core::CudaStorage,
            (a0, a1): (usize, usize),
            x: &candle_core::CudaStorage,
            (x0, x1): (usize, usize),
            name: &str,
        ) -> candle_core::Result<()> {
            let dev = x.device().clone();
            let stream = dev.cuda_stream();
            let starts = stream.clone_htod(&op.starts).w()?;
            let keys = stream.clone_htod(&op.keys).w()?;
            let nseg = op.keys.len() as u32;
            let n = (x1 - x0) as u64;
            let scale = 1.0f32 / (1.0 - op.p);
            let func = dev.get_or_load_custom_func(name, "moe_peft_kernels_dropout", PTX)?;
            let xv = x.as_cuda_slice::<T>()?.slice(x0..x1);
            let mut av = acc.as_cuda_slice_mut::<T>()?.slice_mut(a0..a1);
            let (ap, _sync) = av.device_ptr_mut(&stream);
            let mut builder = func.builder();
            builder
                .arg(&xv)
                .arg(&n)
                .arg(&op.p)
                .arg(&scale)
                .arg(&starts)
                .arg(&keys)
                .arg(&nseg)
                .arg(&ap)
                .arg(&ap);
            // SAFETY: the argument list matches `DROPOUT_SEG` in dropout.cu; `out` and `acc`
            // are the same buffer, each element read and written by one thread.
            unsafe { builder.launch(seg_launch_config(n)) }.w()?;
            Ok(())
        }
        match x.dtype() {
            DType::F32 => go::<f32>(op, acc, (a0, a1), x, (x0, x1), "hash_dropout_seg_f32"),
            DType::BF16 => {
                go::<half::bf16>(op, acc, (a0, a1), x, (x0, x1), "hash_dropout_seg_bf16")
            }
            DType::F16 => go::<half::f16>(op, acc, (a0, a1), x, (x0, x1), "hash_dropout_seg_f16"),
            other => candle_core::bail!("segmented dropout: unsupported dtype {other:?}"),
        }
    }
}

/// Element offsets of consecutive groups of `rows[g]` rows of width `w`, with the total last.
fn segment_starts(rows: &[usize], w: usize) -> Vec<u64> {
    std::iter::once(0)
        .chain(rows.iter().scan(0u64, |acc, &c| {
            *acc += (c * w) as u64;
            Some(*acc)
        }))
        .collect()
}

/// `acc += segmented_dropout(x, p, rows, keys)` in place, in one pass (each sum rounded as the
/// dropout followed by an addition would be). `acc` must be a contiguous tensor of `x`'s shape
/// and dtype that nothing else reads: it is written, not replaced. Not differentiable.
pub fn segmented_dropout_add(
    acc: &Tensor,
    x: &Tensor,
    p: f32,
    rows: &[usize],
    keys: &[u64],
) -> candle_core::Result<()> {
    let (r, w) = x.dims2()?;
    if rows.iter().sum::<usize>() != r || rows.len() != keys.len() || acc.dims() != x.dims() {
        candle_core::bail!(
            "segmented dropout: {} groups of rows for {r} rows, accumulator {:?}",
            rows.len(),
            acc.dims()
        )
    }
    if acc.dtype() != x.dtype() || !acc.is_contiguous() {
        candle_core::bail!(
            "segmented dropout: the accumulator must be contiguous, of the input's dtype"
        )
    }
    let starts = segment_starts(rows, w);
    acc.inplace_op2(
        &x.contiguous()?,
        &SegmentedDropoutAdd(SegmentedDropout {
            p,
            starts,
            keys: keys.to_vec(),
        }),
    )
}

/// Dropout of the consecutive row groups of `x` (`rows[g]` rows, all the same width), group
/// `g` with `keys[g]`: the masks of one [`hash_dropout`] per group, in one op.
pub fn segmented_dropout(
    x: &Tensor,
    p: f32,
    rows: &[usize],
    keys: &[u64],
) -> candle_core::Result<Tensor> {
    let (r, w) = x.dims2()?;
    if rows.iter().sum::<usize>() != r || rows.len() != keys.len() {
        candle_core::bail!(
            "segmented dropout: {} groups of rows for {r} rows",
            rows.len()
        )
    }
    let starts = segment_starts(rows, w);
    x.contiguous()?.apply_op1(SegmentedDropout {
        p,
        starts,
        keys: keys.to_vec(),
    })
}

/// Applies [`HashDropout`] as a custom op on the input's device (the CPU or the CUDA kernel;
/// both draw the same mask).
fn dropout(x: &Tensor, p: f32, key: u64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(HashDropout { p, key })
}

/// The deterministic inverted dropout LoRA layers apply in training: element `i` of `x`
/// (row-major) is kept, and scaled by `1 / (1 - p)`, iff `u(key, i) >= p` with `u` in [0, 1)
/// drawn from splitmix64; the mask is a pure function of `(key, i)` and identical on the CPU and
/// on CUDA. f32, bf16 or f16; differentiable (the backward applies the same mask).
pub fn hash_dropout(x: &Tensor, p: f32, key: u64) -> candle_core::Result<Tensor> {
    dropout(x, p, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn segmented_dropout_add_equals_dropout_then_add() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let rows = [3usize, 0, 4];
        let keys = [7u64, 8, 9];
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::randn(0f32, 1., (7, 10), &dev)?.to_dtype(dtype)?;
            let acc = Tensor::randn(0f32, 1., (7, 10), &dev)?.to_dtype(dtype)?;
            let want = (&acc + segmented_dropout(&x, 0.4, &rows, &keys)?)?;
            let got = acc.copy()?;
            segmented_dropout_add(&got, &x, 0.4, &rows, &keys)?;
            let d = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{dtype:?}");
            assert!(segmented_dropout_add(&got, &x, 0.4, &[7], &[1, 2]).is_err());
        }
        Ok(())
    }

    #[test]
    fn dropout_is_deterministic_and_keeps_about_1_minus_p() -> candle_core::Result<()> {
        let x = Tensor::ones((64, 256), DType::F32, &Device::Cpu)?;
        let a = dropout(&x, 0.25, 7)?;
        let b = dropout(&x, 0.25, 7)?;
        let c = dropout(&x, 0.25, 8)?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        assert_ne!(a.to_vec2::<f32>()?, c.to_vec2::<f32>()?);
        let kept = a
            .ne(0f32)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        let mean = a.mean_all()?.to_scalar::<f32>()?;
        assert!(
            (mean - 1.0).abs() < 0.02,
            "inverted dropout keeps the mean: {mean}"
        );
        Ok(())
    }
}
