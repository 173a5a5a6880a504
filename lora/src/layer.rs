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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, ModuleT, Shape, Tensor, Var, D};
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

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
                let func = dev.get_or_load_custom_func(name, "moe_peft_lora_dropout", PTX)?;
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
                let func = dev.get_or_load_custom_func(name, "moe_peft_lora_dropout", PTX)?;
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
            let func = dev.get_or_load_custom_func(name, "moe_peft_lora_dropout", PTX)?;
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
pub(crate) fn dropout(x: &Tensor, p: f32, key: u64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(HashDropout { p, key })
}

/// The deterministic inverted dropout LoRA layers apply in training: element `i` of `x`
/// (row-major) is kept, and scaled by `1 / (1 - p)`, iff `u(key, i) >= p` with `u` in [0, 1)
/// drawn from splitmix64; the mask is a pure function of `(key, i)` and identical on the CPU and
/// on CUDA. f32, bf16 or f16; differentiable (the backward applies the same mask).
pub fn hash_dropout(x: &Tensor, p: f32, key: u64) -> candle_core::Result<Tensor> {
    dropout(x, p, key)
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
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling
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
            moe_peft_quant::grouped_matmul_add(
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
        moe_peft_quant::autograd::with_grad3(
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
                    moe_peft_quant::grouped_matmul_add(dx, &dyb, &[&a], &[rows], false, 1.0)?
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
    fn dropout_is_deterministic_keeps_about_1_minus_p_and_only_in_training(
    ) -> candle_core::Result<()> {
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
