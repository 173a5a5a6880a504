//! CUDA launchers for the kernels of `kernels/cuda/nf4.cu` and `kernels/cuda/int8.cu`, which
//! the kernels crate compiles to PTX (only with the `cuda` feature) and exports as
//! `moe_peft_kernels::ptx`.
//!
//! The kernels are bit-exact with the CPU kernels of [`crate::nf4`], [`crate::dynamic`] and
//! [`crate::int8`] (same comparisons, same fp32 roundings, no FMA contraction), with one
//! documented exception: the double-quantization offset `mean(absmax)` is an fp64 sum in a
//! different order (a deterministic two-stage tree instead of a left-to-right loop), rounded once
//! to fp32, so it can differ from the CPU value by an ulp in rare cases (bitsandbytes' CUDA and
//! CPU backends differ the same way). Everything downstream of the offset is then exact for that
//! offset. Without the `cuda` feature the public-in-crate entry points keep their signatures and
//! return an error, so call sites need no `cfg`.

#[cfg(feature = "cuda")]
pub(crate) use imp::*;
#[cfg(not(feature = "cuda"))]
pub(crate) use stub::*;

#[cfg(not(feature = "cuda"))]
mod stub {
    use candle_core::{Result, Tensor};

    use crate::nf4::QuantType;

    /// Blockwise 4-bit quantization of a contiguous CUDA tensor: `(packed U8 [ceil(n / 2)],
    /// absmax F32 [n_blocks])`, both on the input's device.
    pub(crate) fn quantize_4bit(
        _w: &Tensor,
        _bs: usize,
        _qt: QuantType,
    ) -> Result<(Tensor, Tensor)> {
        candle_core::bail!("moe-peft-quant was built without the `cuda` feature")
    }

    /// Double quantization of a CUDA absmax vector: `(codes U8, nested_absmax F32, offset)`.
    pub(crate) fn double_quantize(
        _absmax: &Tensor,
        _map: &Tensor,
        _dq_bs: usize,
    ) -> Result<(Tensor, Tensor, f32)> {
        candle_core::bail!("moe-peft-quant was built without the `cuda` feature")
    }

    /// Row-wise int8 quantization of a contiguous CUDA tensor: `(codes U8 [rows, cols], absmax
    /// F32 [rows])`.
    pub(crate) fn int8_quantize(
        _w: &Tensor,
        _rows: usize,
        _cols: usize,
    ) -> Result<(Tensor, Tensor)> {
        candle_core::bail!("moe-peft-quant was built without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{
        bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor,
    };
    use half::{bf16, f16};

    use crate::nf4::{QuantType, FP4_THRESHOLDS, NF4_THRESHOLDS};

    const NF4_PTX: &str = moe_peft_kernels::ptx::NF4;
    const NF4_MODULE: &str = "moe_peft_quant_nf4";
    const INT8_PTX: &str = moe_peft_kernels::ptx::INT8;
    const INT8_MODULE: &str = "moe_peft_quant_int8";

    /// Threads per CTA of every kernel here.
    const THREADS: u32 = 256;
    /// CTA cap when the SM count or the occupancy cannot be read.
    const FALLBACK_MAX_CTAS: u64 = 1024;

    /// `ctas` 256-thread CTAs, capped at one full wave (SMs × 8 CTAs, the hardware limit of
    /// 2048 resident threads per SM): the kernels are grid-stride, so a bigger problem loops
    /// instead of launching short-lived CTAs that each restage their shared-memory tables. The
    /// SM count is read from the driver once per process, not on every launch.
    fn grid(dev: &CudaDevice, ctas: u64) -> LaunchConfig {
        use std::sync::OnceLock;
        static SMS: OnceLock<Option<u64>> = OnceLock::new();
        let sms = *SMS.get_or_init(|| {
            dev.cuda_stream()
                .context()
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .ok()
                .and_then(|s| u64::try_from(s).ok())
        });
        let cap = match sms {
            Some(s) if s > 0 => s * (2048 / THREADS as u64),
            _ => FALLBACK_MAX_CTAS,
        };
        LaunchConfig {
            grid_dim: (ctas.clamp(1, cap) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F64 => "f64",
            other => bail!("no CUDA kernel for dtype {other:?}"),
        })
    }

    fn u32_len(n: usize, what: &str) -> Result<u32> {
        u32::try_from(n).map_err(|_| {
            candle_core::Error::Msg(format!("{what}: {n} is too large for the CUDA kernels"))
        })
    }

    /// The contiguous part of a CUDA storage described by `l`.
    pub(crate) fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            bail!("{what} must be contiguous")
        };
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => bail!("{what} is not on a CUDA device"),
        }
    }

    /// A fresh output buffer of `n` elements (at least one, so a zero-size request still gets
    /// a valid allocation).
    fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every element that the result's layout exposes is written by the kernel.
        unsafe { dev.alloc::<T>(n.max(1)) }
    }

    fn tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    }

    fn table16(values: &[f32]) -> [f32; 16] {
        let mut t = [0f32; 16];
        for (d, s) in t.iter_mut().zip(values) {
            *d = *s;
        }
        t
    }

    // ----------------------------------------------------------------------------------------
    // 4-bit quantization

    /// Fused blockwise absmax + NF4/FP4 codes + packing (`quantize_{nf4,fp4}_<dtype>`): one
    /// launch, 256-thread CTAs (at most one wave, grid-stride), a group of `min(bs / 8, 32)`
    /// lanes per block.
    pub(crate) fn quantize_4bit(w: &Tensor, bs: usize, qt: QuantType) -> Result<(Tensor, Tensor)> {
        if bs < 8 || !bs.is_power_of_two() {
            bail!("CUDA 4-bit quantization needs a power-of-two block size >= 8, got {bs}");
        }
        let n = w.elem_count();
        let n_blocks = n.div_ceil(bs);
        let n_packed = n.div_ceil(2);
        let (storage, layout) = w.storage_and_layout();
        let s = cuda_storage(&storage, "weight")?;
        let dev = s.device().clone();
        let dtype = s.dtype();
        let (kind, thr) = match qt {
            QuantType::Nf4 => ("nf4", table16(&NF4_THRESHOLDS)),
            QuantType::Fp4 => ("fp4", table16(&FP4_THRESHOLDS)),
        };
        let name = format!("quantize_{kind}_{}", suffix(dtype)?);
        let func = dev.get_or_load_custom_func(&name, NF4_MODULE, NF4_PTX)?;
        let packed = alloc::<u8>(&dev, n_packed)?;
        let absmax = alloc::<f32>(&dev, n_blocks)?;
        let per_warp = 32 / (bs / 8).min(32);
        let warps = n_blocks.div_ceil(per_warp) as u64;
        let cfg = grid(&dev, (warps * 32).div_ceil(THREADS as u64));
        let (n64, bs32) = (n as u64, bs as u32);
        macro_rules! launch {
            ($t:ty) => {{
                let x = view::<$t>(s, layout, "weight")?;
                let mut b = func.builder();
                b.arg(&x)
                    .arg(&n64)
                    .arg(&bs32)
                    .arg(&thr)
                    .arg(&packed)
                    .arg(&absmax);
                // SAFETY: argument list matches `QUANTIZE4` in nf4.cu; sizes checked above.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        if n > 0 {
            match dtype {
                DType::F32 => launch!(f32),
                DType::BF16 => launch!(bf16),
                DType::F16 => launch!(f16),
                DType::F64 => launch!(f64),
                other => bail!("no CUDA kernel for dtype {other:?}"),
            }
        }
        drop(storage);
        let packed = tensor(CudaStorage::wrap_cuda_slice(packed, dev.clone()), n_packed);
        let absmax = tensor(CudaStorage::wrap_cuda_slice(absmax, dev), n_blocks);
        Ok((packed, absmax))
    }

    /// Double quantization on the device: `offset = mean(absmax)` (`sum_f32_partial` with up to
    /// 256 CTAs, then `mean_f32_final` with one), then `nested_quantize` (one 256-thread CTA per
    /// nested block) for the nested absmax and the 8-bit codes. The offset comes back to the host
    /// with one 4-byte copy at the end (a stream synchronization).
    pub(crate) fn double_quantize(
        absmax: &Tensor,
        map: &Tensor,
        dq_bs: usize,
    ) -> Result<(Tensor, Tensor, f32)> {
        if dq_bs == 0 {
            bail!("nested block size must be positive");
        }
        let n = absmax.elem_count();
        let n32 = u32_len(n, "number of absmax blocks")?;
        let n_nested = n.div_ceil(dq_bs);
        let (a_st, a_l) = absmax.storage_and_layout();
        let (m_st, m_l) = map.storage_and_layout();
        let a_cs = cuda_storage(&a_st, "absmax")?;
        let dev = a_cs.device().clone();
        let a = view::<f32>(a_cs, a_l, "absmax")?;
        let m = view::<f32>(
            cuda_storage(&m_st, "nested_quant_map")?,
            m_l,
            "nested_quant_map",
        )?;
        if m.len() != 256 {
            bail!("nested_quant_map must have 256 entries, got {}", m.len());
        }
        let codes = alloc::<u8>(&dev, n)?;
        let nested = alloc::<f32>(&dev, n_nested)?;
        let offset = alloc::<f32>(&dev, 1)?;
        if n > 0 {
            let partials = (n as u64).div_ceil(THREADS as u64 * 16).clamp(1, 256);
            let partial = alloc::<f64>(&dev, partials as usize)?;
            let f = dev.get_or_load_custom_func("sum_f32_partial", NF4_MODULE, NF4_PTX)?;
            let mut b = f.builder();
            b.arg(&a).arg(&n32).arg(&partial);
            // SAFETY: matches `sum_f32_partial`; `partial` has one slot per CTA.
            // exactly `partials` CTAs (not capped): the summation order depends on n only
            let cfg = LaunchConfig {
                grid_dim: (partials as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            let f = dev.get_or_load_custom_func("mean_f32_final", NF4_MODULE, NF4_PTX)?;
            let p32 = partials as u32;
            let mut b = f.builder();
            b.arg(&partial).arg(&p32).arg(&n32).arg(&offset);
            // SAFETY: matches `mean_f32_final`, launched as one CTA of 256 threads.
            unsafe { b.launch(grid(&dev, 1)) }.w()?;
            let f = dev.get_or_load_custom_func("nested_quantize", NF4_MODULE, NF4_PTX)?;
            let dq32 = u32_len(dq_bs, "nested block size")?;
            let mut b = f.builder();
            b.arg(&a)
                .arg(&n32)
                .arg(&offset)
                .arg(&dq32)
                .arg(&m)
                .arg(&codes)
                .arg(&nested);
            // SAFETY: matches `nested_quantize`; codes has n and nested n_nested elements.
            unsafe { b.launch(grid(&dev, n_nested as u64)) }.w()?;
        }
        let off = if n > 0 {
            dev.clone_dtoh(&offset)?.first().copied().unwrap_or(0.0)
        } else {
            0.0
        };
        drop((a_st, m_st));
        let codes = tensor(CudaStorage::wrap_cuda_slice(codes, dev.clone()), n);
        let nested = tensor(CudaStorage::wrap_cuda_slice(nested, dev), n_nested);
        Ok((codes, nested, off))
    }

    // ----------------------------------------------------------------------------------------
    // 4-bit dequantization (the `cuda_fwd` of the custom ops in `tensor.rs`)

    /// Where the per-block absmax of a 4-bit dequantization comes from.
    pub(crate) enum AbsmaxSource<'a> {
        /// fp32 absmax per block.
        Fp32(CudaView<'a, f32>),
        /// Double-quantized: `map[codes[k]] * nested[k / dq_bs] + offset`.
        Double {
            codes: CudaView<'a, u8>,
            map: CudaView<'a, f32>,
            nested: CudaView<'a, f32>,
            offset: f32,
            dq_bs: usize,
        },
    }

    /// `dequant4_<dtype>[_dq]`: 8 outputs per thread and step (one 32-bit load of packed codes,
    /// 16-byte stores), 256-thread CTAs, at most one wave, grid-stride; the fused `_dq` variant
    /// rebuilds each block's absmax from its 8-bit code in the same launch.
    pub(crate) fn dequantize_4bit(
        dev: &CudaDevice,
        packed: &CudaView<'_, u8>,
        absmax: &AbsmaxSource<'_>,
        code: &[f32; 16],
        bs: usize,
        n: usize,
        dtype: DType,
    ) -> Result<CudaStorage> {
        if bs < 8 || !bs.is_power_of_two() {
            bail!("CUDA 4-bit dequantization needs a power-of-two block size >= 8, got {bs}");
        }
        let n_blocks = n.div_ceil(bs);
        if packed.len() != n.div_ceil(2) {
            bail!("packed codes: {} bytes for {n} elements", packed.len());
        }
        let (n64, bs_log2) = (n as u64, bs.trailing_zeros());
        let name = match absmax {
            AbsmaxSource::Fp32(a) => {
                if a.len() != n_blocks {
                    bail!("absmax: {} values for {n_blocks} blocks", a.len());
                }
                format!("dequant4_{}", suffix(dtype)?)
            }
            AbsmaxSource::Double {
                codes,
                map,
                nested,
                dq_bs,
                ..
            } => {
                if codes.len() != n_blocks
                    || map.len() != 256
                    || *dq_bs == 0
                    || nested.len() != n_blocks.div_ceil(*dq_bs)
                {
                    bail!(
                        "double-quantized absmax: {} codes, {} map entries, {} nested values \
                         for {n_blocks} blocks",
                        codes.len(),
                        map.len(),
                        nested.len()
                    );
                }
                u32_len(n_blocks, "number of blocks")?;
                format!("dequant4_{}_dq", suffix(dtype)?)
            }
        };
        let func = dev.get_or_load_custom_func(&name, NF4_MODULE, NF4_PTX)?;
        let cfg = grid(dev, (n as u64).div_ceil(8).div_ceil(THREADS as u64));
        macro_rules! launch {
            ($t:ty) => {{
                let out = alloc::<$t>(dev, n)?;
                if n > 0 {
                    let dq32 = match absmax {
                        AbsmaxSource::Double { dq_bs, .. } => *dq_bs as u32,
                        AbsmaxSource::Fp32(_) => 1,
                    };
                    let mut b = func.builder();
                    b.arg(packed).arg(&n64).arg(&bs_log2).arg(code);
                    match absmax {
                        AbsmaxSource::Fp32(a) => {
                            b.arg(a);
                        }
                        AbsmaxSource::Double {
                            codes,
                            map,
                            nested,
                            offset,
                            ..
                        } => {
                            b.arg(codes).arg(map).arg(nested).arg(offset).arg(&dq32);
                        }
                    }
                    b.arg(&out);
                    // SAFETY: matches `DEQUANT4` in nf4.cu; lengths checked above.
                    unsafe { b.launch(cfg) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match dtype {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(bf16),
            DType::F16 => launch!(f16),
            DType::F64 => launch!(f64),
            other => bail!("no CUDA kernel for dtype {other:?}"),
        })
    }

    /// `dequant4_many_<dtype>[_dq]`: `k` tensors of `n` elements each (same block size, code
    /// table and absmax format) into one `[k·n]` buffer in one launch. `table` holds five u64 per
    /// tensor: the device addresses of its packed codes, its fp32 absmax (or 8-bit absmax codes),
    /// its map and nested absmax (double quantization), and its offset's f32 bits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dequantize_4bit_many(
        dev: &CudaDevice,
        table: &[u64],
        k: usize,
        n: usize,
        bs: usize,
        code: &[f32; 16],
        dq_bs: Option<usize>,
        dtype: DType,
    ) -> Result<CudaStorage> {
        if bs < 8 || !bs.is_power_of_two() || table.len() != 5 * k || k == 0 {
            bail!(
                "dequantize_4bit_many: block size {bs}, {} table entries for {k} tensors",
                table.len()
            );
        }
        let k32 = u32_len(k, "number of tensors")?;
        let name = match dq_bs {
            Some(_) => format!("dequant4_many_{}_dq", suffix(dtype)?),
            None => format!("dequant4_many_{}", suffix(dtype)?),
        };
        let func = dev.get_or_load_custom_func(&name, NF4_MODULE, NF4_PTX)?;
        let needed = (n as u64).div_ceil(8).div_ceil(THREADS as u64).max(1);
        let cap = u64::from(grid(dev, u64::MAX).grid_dim.0);
        let x = needed.min((cap / k as u64).max(1)) as u32;
        let cfg = LaunchConfig {
            grid_dim: (x, k32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let d_table = dev.cuda_stream().clone_htod(table).w()?;
        let (n64, bs_log2) = (n as u64, bs.trailing_zeros());
        macro_rules! launch {
            ($t:ty) => {{
                let out = alloc::<$t>(dev, k * n)?;
                if n > 0 {
                    let mut b = func.builder();
                    b.arg(&d_table).arg(&n64).arg(&bs_log2).arg(code);
                    let dq32 = dq_bs.map(|d| d as u32).unwrap_or(1);
                    if dq_bs.is_some() {
                        b.arg(&dq32);
                    }
                    b.arg(&out);
                    // SAFETY: matches `DEQUANT4_MANY` in nf4.cu; every table row addresses live
                    // buffers of the sizes the caller checked.
                    unsafe { b.launch(cfg) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match dtype {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(bf16),
            DType::F16 => launch!(f16),
            DType::F64 => launch!(f64),
            other => bail!("no CUDA kernel for dtype {other:?}"),
        })
    }

    /// `absmax_dequant`: `map[q[k]] * nested[k / dq_bs] + offset` into a fresh F32 buffer;
    /// 256-thread CTAs, one element per thread and step.
    pub(crate) fn dequantize_absmax(
        dev: &CudaDevice,
        codes: &CudaView<'_, u8>,
        map: &CudaView<'_, f32>,
        nested: &CudaView<'_, f32>,
        offset: f32,
        dq_bs: usize,
    ) -> Result<CudaStorage> {
        let n = codes.len();
        if map.len() != 256 || dq_bs == 0 || nested.len() != n.div_ceil(dq_bs) {
            bail!(
                "double-quantized absmax: {n} codes, {} map entries, {} nested values",
                map.len(),
                nested.len()
            );
        }
        let n32 = u32_len(n, "number of absmax blocks")?;
        let dq32 = u32_len(dq_bs, "nested block size")?;
        let out = alloc::<f32>(dev, n)?;
        if n > 0 {
            let f = dev.get_or_load_custom_func("absmax_dequant", NF4_MODULE, NF4_PTX)?;
            let mut b = f.builder();
            b.arg(codes)
                .arg(&n32)
                .arg(map)
                .arg(nested)
                .arg(&offset)
                .arg(&dq32)
                .arg(&out);
            // SAFETY: matches `absmax_dequant`; lengths checked above.
            unsafe { b.launch(grid(dev, (n as u64).div_ceil(THREADS as u64))) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    // ----------------------------------------------------------------------------------------
    // int8

    /// `int8_quantize_<dtype>`: one 256-thread CTA per row (grid-stride over rows).
    pub(crate) fn int8_quantize(w: &Tensor, rows: usize, cols: usize) -> Result<(Tensor, Tensor)> {
        let (r32, c32) = (u32_len(rows, "rows")?, u32_len(cols, "columns")?);
        let (storage, layout) = w.storage_and_layout();
        let s = cuda_storage(&storage, "weight")?;
        let dev = s.device().clone();
        let dtype = s.dtype();
        let func = dev.get_or_load_custom_func(
            &format!("int8_quantize_{}", suffix(dtype)?),
            INT8_MODULE,
            INT8_PTX,
        )?;
        let q = alloc::<u8>(&dev, rows * cols)?;
        let scale = alloc::<f32>(&dev, rows)?;
        macro_rules! launch {
            ($t:ty) => {{
                let x = view::<$t>(s, layout, "weight")?;
                if x.len() != rows * cols {
                    bail!("weight: {} elements for {rows} x {cols}", x.len());
                }
                let mut b = func.builder();
                b.arg(&x).arg(&r32).arg(&c32).arg(&q).arg(&scale);
                // SAFETY: matches `INT8_KERNELS` in int8.cu; sizes checked above.
                unsafe { b.launch(grid(&dev, rows as u64)) }.w()?;
            }};
        }
        if rows * cols > 0 {
            match dtype {
                DType::F32 => launch!(f32),
                DType::BF16 => launch!(bf16),
                DType::F16 => launch!(f16),
                DType::F64 => launch!(f64),
                other => bail!("no CUDA kernel for dtype {other:?}"),
            }
        }
        drop(storage);
        let q = tensor(CudaStorage::wrap_cuda_slice(q, dev.clone()), (rows, cols));
        let scale = tensor(CudaStorage::wrap_cuda_slice(scale, dev), rows);
        Ok((q, scale))
    }

    /// `int8_dequant_<dtype>`: rows on the grid's y axis, 4 columns per thread (one 32-bit load)
    /// on x; both grid-stride.
    pub(crate) fn int8_dequantize(
        dev: &CudaDevice,
        q: &CudaView<'_, u8>,
        scale: &CudaView<'_, f32>,
        dtype: DType,
    ) -> Result<CudaStorage> {
        let rows = scale.len();
        if rows == 0 || q.len() % rows != 0 {
            bail!("int8 weight: {} codes for {rows} rows", q.len());
        }
        let cols = q.len() / rows;
        let (r32, c32) = (u32_len(rows, "rows")?, u32_len(cols, "columns")?);
        let inv127: f32 = 1.0 / 127.0;
        let func = dev.get_or_load_custom_func(
            &format!("int8_dequant_{}", suffix(dtype)?),
            INT8_MODULE,
            INT8_PTX,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (
                (cols as u64).div_ceil(4 * THREADS as u64).clamp(1, 64) as u32,
                rows.clamp(1, 65_535) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($t:ty) => {{
                let out = alloc::<$t>(dev, q.len())?;
                if !q.is_empty() {
                    let mut b = func.builder();
                    b.arg(q)
                        .arg(&r32)
                        .arg(&c32)
                        .arg(scale)
                        .arg(&inv127)
                        .arg(&out);
                    // SAFETY: matches `INT8_KERNELS` in int8.cu; sizes checked above.
                    unsafe { b.launch(cfg) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match dtype {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(bf16),
            DType::F16 => launch!(f16),
            DType::F64 => launch!(f64),
            other => bail!("no CUDA kernel for dtype {other:?}"),
        })
    }
}
