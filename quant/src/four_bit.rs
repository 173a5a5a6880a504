//! [`FourBitTensor`]: a weight stored as bitsandbytes-compatible 4-bit codes (NF4 or FP4) with
//! blockwise absmax, optionally double-quantized.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape,
    Storage, Tensor, WithDType,
};
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};

use crate::config::FourBitConfig;
use crate::dynamic::{
    dequantize_absmax_into, double_quantize, dynamic_map, DYNAMIC_MAP_LEN, NESTED_BLOCK_SIZE,
};
use crate::error::{Error, Result};
use crate::linear::FrozenWeight;
use crate::nf4::{
    check_block_size, dequantize_4bit_into, num_blocks, quantize_4bit, unpack_codes, QuantType,
};

use crate::cuda as gpu;

/// The second-level (double quantization) state of the absmax values.
#[derive(Debug, Clone)]
pub struct DoubleQuantState {
    /// One 8-bit code per 4-bit block (U8, `[n_blocks]`).
    pub codes: Tensor,
    /// The 256-entry code map the codes index (F32, `[256]`).
    pub map: Tensor,
    /// fp32 absmax of each nested block of `absmax - offset` (F32, `[ceil(n_blocks / block_size)]`).
    pub nested_absmax: Tensor,
    /// Added back after dequantizing: `mean(absmax)` at quantization time.
    pub offset: f32,
    /// Codes per nested block (bitsandbytes: 256).
    pub block_size: usize,
}

/// The per-block scales of an [`FourBitTensor`].
#[derive(Debug, Clone)]
pub enum FourBitAbsmax {
    /// fp32 absmax per block (F32, `[n_blocks]`).
    Fp32(Tensor),
    /// 8-bit double-quantized absmax.
    Double(DoubleQuantState),
}

/// A tensor quantized to 4 bits, NF4 or FP4, laid out as bitsandbytes does it (see
/// [`crate::nf4`]); bitsandbytes calls it `Params4bit`.
///
/// All its tensors live on one device. The element count, shape and original dtype are kept so
/// that [`FourBitTensor::dequantize`] can give the dense tensor back.
#[derive(Debug, Clone)]
pub struct FourBitTensor {
    packed: Tensor,
    absmax: FourBitAbsmax,
    code: [f32; 16],
    shape: Shape,
    dtype: DType,
    block_size: usize,
    quant_type: QuantType,
}

/// The float dtypes a weight may have.
pub(crate) fn check_float_dtype(dtype: DType, what: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 | DType::F64 => Ok(()),
        other => Err(Error::ShapeMismatch {
            name: what.to_string(),
            expected: "dtype f32, bf16, f16 or f64".into(),
            got: format!("{other:?}"),
        }),
    }
}

fn quantize_host(t: &Tensor, block_size: usize, qt: QuantType) -> Result<(Vec<u8>, Vec<f32>)> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("nf4 quantize: input not contiguous".into()))?;
    let cpu = match &*storage {
        Storage::Cpu(c) => c,
        _ => {
            return Err(candle_core::Error::Msg("nf4 quantize: input not on the CPU".into()).into())
        }
    };
    match cpu {
        CpuStorage::F32(v) => quantize_4bit(&v[start..end], block_size, qt),
        CpuStorage::BF16(v) => quantize_4bit(&v[start..end], block_size, qt),
        CpuStorage::F16(v) => quantize_4bit(&v[start..end], block_size, qt),
        CpuStorage::F64(v) => quantize_4bit(&v[start..end], block_size, qt),
        other => Err(Error::ShapeMismatch {
            name: "weight".into(),
            expected: "dtype f32, bf16, f16 or f64".into(),
            got: format!("{:?}", other.dtype()),
        }),
    }
}

fn expect_len(t: &Tensor, dtype: DType, len: usize, name: &str) -> Result<()> {
    if t.dtype() != dtype || t.elem_count() != len {
        return Err(Error::ShapeMismatch {
            name: name.to_string(),
            expected: format!("{dtype:?} with {len} elements"),
            got: format!("{:?} of shape {:?}", t.dtype(), t.dims()),
        });
    }
    Ok(())
}

impl FourBitTensor {
    /// Quantizes `w` (any shape; f32, bf16, f16 or f64) blockwise over its row-major flattening.
    ///
    /// The parts stay on `w`'s device. On the CPU the work is done in place by the Rust kernels;
    /// on a CUDA device by CUDA kernels, bit-exact with the CPU ones except that the
    /// double-quantization offset `mean(absmax)` is summed in another order (it may differ by an
    /// ulp; everything else is then exact for that offset); another device copies the weight to
    /// the host, quantizes and moves the parts back.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use moe_peft_quant::{FourBitConfig, FourBitTensor};
    ///
    /// let w = Tensor::randn(0f32, 0.02, (128, 64), &Device::Cpu)?.to_dtype(DType::BF16)?;
    /// let q = FourBitTensor::quantize(&w, &FourBitConfig::default())?;
    /// assert_eq!(q.dims(), &[128, 64]);
    /// assert_eq!(q.dtype(), DType::BF16);
    /// let back = q.dequantize(DType::F32)?;
    /// let err = (back - w.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(err < 0.03, "{err}");
    /// assert!((q.bits_per_param() - 4.127).abs() < 1e-3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn quantize(w: &Tensor, cfg: &FourBitConfig) -> Result<Self> {
        cfg.validate()?;
        let dtype = w.dtype();
        check_float_dtype(dtype, "weight")?;
        let n = w.elem_count();
        if n == 0 {
            return Err(Error::ShapeMismatch {
                name: "weight".into(),
                expected: "a non-empty tensor".into(),
                got: format!("shape {:?}", w.dims()),
            });
        }
        let device = w.device().clone();
        if device.is_cuda() {
            return Self::quantize_cuda(w, cfg);
        }
        let host = if device.is_cpu() {
            w.contiguous()?
        } else {
            w.to_device(&Device::Cpu)?.contiguous()?
        };
        let (packed, absmax) = quantize_host(&host, cfg.block_size, cfg.quant_type)?;
        drop(host);
        let n_blocks = absmax.len();
        let cpu = Device::Cpu;
        let absmax = if cfg.double_quant {
            let map = dynamic_map();
            let dq = double_quantize(&absmax, map, cfg.dq_block_size)?;
            let n_nested = dq.nested_absmax.len();
            FourBitAbsmax::Double(DoubleQuantState {
                codes: Tensor::from_vec(dq.codes, n_blocks, &cpu)?.to_device(&device)?,
                map: Tensor::from_slice(map, DYNAMIC_MAP_LEN, &cpu)?.to_device(&device)?,
                nested_absmax: Tensor::from_vec(dq.nested_absmax, n_nested, &cpu)?
                    .to_device(&device)?,
                offset: dq.offset,
                block_size: cfg.dq_block_size,
            })
        } else {
            FourBitAbsmax::Fp32(Tensor::from_vec(absmax, n_blocks, &cpu)?.to_device(&device)?)
        };
        let n_packed = packed.len();
        Ok(Self {
            packed: Tensor::from_vec(packed, n_packed, &cpu)?.to_device(&device)?,
            absmax,
            code: *cfg.quant_type.code(),
            shape: w.shape().clone(),
            dtype,
            block_size: cfg.block_size,
            quant_type: cfg.quant_type,
        })
    }

    /// [`FourBitTensor::quantize`] on a CUDA device: one fused absmax + 4-bit kernel, then (with
    /// double quantization) the mean and nested-quantization kernels; no host round trip apart
    /// from the 4-byte offset.
    fn quantize_cuda(w: &Tensor, cfg: &FourBitConfig) -> Result<Self> {
        let device = w.device().clone();
        let (packed, absmax) =
            gpu::quantize_4bit(&w.contiguous()?, cfg.block_size, cfg.quant_type)?;
        let absmax = if cfg.double_quant {
            let map = Tensor::from_slice(dynamic_map(), DYNAMIC_MAP_LEN, &device)?;
            let (codes, nested_absmax, offset) =
                gpu::double_quantize(&absmax, &map, cfg.dq_block_size)?;
            FourBitAbsmax::Double(DoubleQuantState {
                codes,
                map,
                nested_absmax,
                offset,
                block_size: cfg.dq_block_size,
            })
        } else {
            FourBitAbsmax::Fp32(absmax)
        };
        Ok(Self {
            packed,
            absmax,
            code: *cfg.quant_type.code(),
            shape: w.shape().clone(),
            dtype: w.dtype(),
            block_size: cfg.block_size,
            quant_type: cfg.quant_type,
        })
    }

    /// Builds a tensor from its parts, checking that they fit together: `packed` is U8 with
    /// `ceil(numel / 2)` elements (any shape; kept flat), the absmax (or its codes) has one value
    /// per block, a nested state has a 256-entry F32 map and one nested absmax per
    /// `block_size` codes, and everything is on `packed`'s device.
    pub fn from_parts(
        packed: Tensor,
        absmax: FourBitAbsmax,
        code: [f32; 16],
        shape: Shape,
        dtype: DType,
        block_size: usize,
        quant_type: QuantType,
    ) -> Result<Self> {
        check_block_size(block_size)?;
        check_float_dtype(dtype, "dtype")?;
        let n = shape.elem_count();
        expect_len(&packed, DType::U8, n.div_ceil(2), "packed codes")?;
        let n_blocks = num_blocks(n, block_size);
        let device = packed.device().clone();
        let same = |t: &Tensor, name: &str| -> Result<()> {
            if t.device().same_device(&device) {
                Ok(())
            } else {
                Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    expected: format!("device {:?}", device.location()),
                    got: format!("device {:?}", t.device().location()),
                })
            }
        };
        match &absmax {
            FourBitAbsmax::Fp32(a) => {
                expect_len(a, DType::F32, n_blocks, "absmax")?;
                same(a, "absmax")?;
            }
            FourBitAbsmax::Double(s) => {
                if s.block_size == 0 {
                    return Err(Error::InvalidBlockSize(0));
                }
                expect_len(&s.codes, DType::U8, n_blocks, "absmax codes")?;
                expect_len(&s.map, DType::F32, DYNAMIC_MAP_LEN, "nested_quant_map")?;
                expect_len(
                    &s.nested_absmax,
                    DType::F32,
                    n_blocks.div_ceil(s.block_size),
                    "nested_absmax",
                )?;
                same(&s.codes, "absmax codes")?;
                same(&s.map, "nested_quant_map")?;
                same(&s.nested_absmax, "nested_absmax")?;
            }
        }
        let flat = |t: Tensor| -> Result<Tensor> { Ok(t.flatten_all()?.contiguous()?) };
        let absmax = match absmax {
            FourBitAbsmax::Fp32(a) => FourBitAbsmax::Fp32(flat(a)?),
            FourBitAbsmax::Double(s) => FourBitAbsmax::Double(DoubleQuantState {
                codes: flat(s.codes)?,
                map: flat(s.map)?,
                nested_absmax: flat(s.nested_absmax)?,
                ..s
            }),
        };
        Ok(Self {
            packed: flat(packed)?,
            absmax,
            code,
            shape,
            dtype,
            block_size,
            quant_type,
        })
    }

    /// The dense tensor in `dtype` (f32, bf16, f16 or f64), on this tensor's device:
    /// `W[j] = dtype(code[nibble(j)] * absmax[j / block_size])`, with the absmax first
    /// dequantized as `map[q] * nested_absmax + offset` when double-quantized.
    ///
    /// Runs as one candle custom op on the tensor's device (CPU: `cpu_fwd`, CUDA: one fused
    /// kernel, `cuda_fwd`; bit-identical results); a device without kernels (Metal) copies the
    /// parts to the host and the result back.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        check_float_dtype(dtype, "output dtype")?;
        if !self.device().is_metal() {
            self.dequantize_here(dtype)
        } else {
            let dev = self.device().clone();
            Ok(self
                .to_device(&Device::Cpu)?
                .dequantize_here(dtype)?
                .to_device(&dev)?)
        }
    }

    /// Several tensors of one shape dequantized into one stacked tensor `[k, ..shape]`, equal bit
    /// for bit to stacking each one's [`Self::dequantize`]. On CUDA, tensors of one format (block
    /// size, code table, absmax kind and nested block size) take one launch instead of `k` (the
    /// routed experts of a MoE layer: 64 launches become one per projection type).
    pub fn dequantize_many(ts: &[&FourBitTensor], dtype: DType) -> Result<Tensor> {
        check_float_dtype(dtype, "output dtype")?;
        let Some(first) = ts.first() else {
            return Err(Error::ShapeMismatch {
                name: "dequantize_many".into(),
                expected: "at least one tensor".into(),
                got: "none".into(),
            });
        };
        if let Some(bad) = ts.iter().find(|t| t.shape != first.shape) {
            return Err(Error::ShapeMismatch {
                name: "dequantize_many".into(),
                expected: format!("{:?}", first.shape),
                got: format!("{:?}", bad.shape),
            });
        }
        #[cfg(feature = "cuda")]
        if let Some(t) = Self::dequantize_many_cuda(ts, dtype)? {
            return Ok(t);
        }
        let parts = ts
            .iter()
            .map(|t| t.dequantize(dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&parts, 0)?)
    }

    /// The one-launch path, when every tensor is on one CUDA device in one format and each
    /// output slice is 16-byte aligned.
    #[cfg(feature = "cuda")]
    fn dequantize_many_cuda(ts: &[&FourBitTensor], dtype: DType) -> Result<Option<Tensor>> {
        let first = ts[0];
        let Device::Cuda(dev) = first.device() else {
            return Ok(None);
        };
        let dq_bs = match &first.absmax {
            FourBitAbsmax::Fp32(_) => None,
            FourBitAbsmax::Double(s) => Some(s.block_size),
        };
        let same_format = ts.iter().all(|t| {
            t.device().same_device(first.device())
                && t.block_size == first.block_size
                && t.code == first.code
                && t.packed.is_contiguous()
                && match (&t.absmax, dq_bs) {
                    (FourBitAbsmax::Fp32(a), None) => a.is_contiguous(),
                    (FourBitAbsmax::Double(s), Some(b)) => {
                        s.block_size == b
                            && s.codes.is_contiguous()
                            && s.map.is_contiguous()
                            && s.nested_absmax.is_contiguous()
                    }
                    _ => false,
                }
        });
        // Each tensor's slice of the output must start 16-byte aligned: the kernel stores eight
        // values at a time with vector stores. Expert weights always qualify; other sizes take
        // the one-at-a-time path.
        // One CTA row per tensor: CUDA allows 65,535.
        if !same_format || (first.numel() * dtype.size_in_bytes()) % 16 != 0 || ts.len() > 65_535 {
            return Ok(None);
        }
        let addr = |t: &Tensor| -> Result<u64> { Ok(moe_peft_kernels::device_address(t)?.addr()) };
        let mut table = Vec::with_capacity(5 * ts.len());
        for t in ts {
            table.push(addr(&t.packed)?);
            match &t.absmax {
                FourBitAbsmax::Fp32(a) => table.extend([addr(a)?, 0, 0, 0]),
                FourBitAbsmax::Double(s) => table.extend([
                    addr(&s.codes)?,
                    addr(&s.map)?,
                    addr(&s.nested_absmax)?,
                    u64::from(s.offset.to_bits()),
                ]),
            }
        }
        let n = first.numel();
        let out = gpu::dequantize_4bit_many(
            dev,
            &table,
            ts.len(),
            n,
            first.block_size,
            &first.code,
            dq_bs,
            dtype,
        )?;
        let mut dims = vec![ts.len()];
        dims.extend_from_slice(first.shape.dims());
        // The borrowed tensors stay alive (`ts`) until the launch is queued; candle's stream
        // orders any later free after it.
        Ok(Some(Tensor::from_storage(
            Storage::Cuda(out),
            dims,
            candle_core::op::BackpropOp::none(),
            false,
        )))
    }

    fn dequantize_here(&self, dtype: DType) -> Result<Tensor> {
        let op = Dequant4bitOp {
            code: self.code,
            block_size: self.block_size,
            shape: self.shape.clone(),
            dtype,
        };
        match &self.absmax {
            FourBitAbsmax::Fp32(a) => Ok(self.packed.apply_op2_no_bwd(a, &op)?),
            FourBitAbsmax::Double(s) => Ok(self.packed.apply_op3_no_bwd(
                &s.codes,
                &s.nested_absmax,
                &Dequant4bitDqOp {
                    inner: op,
                    map: s.map.clone(),
                    absmax: AbsmaxDequantOp {
                        offset: s.offset,
                        block_size: s.block_size,
                    },
                },
            )?),
        }
    }

    fn absmax_here(&self) -> Result<Tensor> {
        match &self.absmax {
            FourBitAbsmax::Fp32(a) => Ok(a.clone()),
            FourBitAbsmax::Double(s) => Ok(s.codes.apply_op3_no_bwd(
                &s.map,
                &s.nested_absmax,
                &AbsmaxDequantOp {
                    offset: s.offset,
                    block_size: s.block_size,
                },
            )?),
        }
    }

    /// The fp32 absmax per block (F32, `[n_blocks]`), dequantized if double-quantized (a custom
    /// op on the CPU and on CUDA; other devices go through the host).
    pub fn absmax_f32(&self) -> Result<Tensor> {
        if !self.device().is_metal() {
            self.absmax_here()
        } else {
            let dev = self.device().clone();
            Ok(self
                .to_device(&Device::Cpu)?
                .absmax_here()?
                .to_device(&dev)?)
        }
    }

    /// The unpacked 4-bit codes, one per element (row-major), copied to the host.
    pub fn codes(&self) -> Result<Vec<u8>> {
        let packed = self.packed.to_vec1::<u8>()?;
        Ok(unpack_codes(&packed, self.numel()))
    }

    /// Moves every part to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let absmax = match &self.absmax {
            FourBitAbsmax::Fp32(a) => FourBitAbsmax::Fp32(a.to_device(device)?),
            FourBitAbsmax::Double(s) => FourBitAbsmax::Double(DoubleQuantState {
                codes: s.codes.to_device(device)?,
                map: s.map.to_device(device)?,
                nested_absmax: s.nested_absmax.to_device(device)?,
                offset: s.offset,
                block_size: s.block_size,
            }),
        };
        Ok(Self {
            packed: self.packed.to_device(device)?,
            absmax,
            ..self.clone()
        })
    }

    /// The packed codes (U8, `[ceil(numel / 2)]`, element `2j` in the high nibble of byte `j`).
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// The block scales.
    pub fn absmax(&self) -> &FourBitAbsmax {
        &self.absmax
    }

    /// Whether the absmax values are double-quantized.
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, FourBitAbsmax::Double(_))
    }

    /// The 16-entry code book used to dequantize (bitsandbytes `quant_map`).
    pub fn code(&self) -> &[f32; 16] {
        &self.code
    }

    /// NF4 or FP4.
    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }

    /// Elements per absmax block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of absmax blocks, `ceil(numel / block_size)`.
    pub fn num_blocks(&self) -> usize {
        num_blocks(self.numel(), self.block_size)
    }

    /// The original shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The original dimensions.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// The original dtype (what bitsandbytes records as `quant_state.dtype`).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device all parts live on.
    pub fn device(&self) -> &Device {
        self.packed.device()
    }

    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.elem_count()
    }

    /// Exact bytes held: the packed codes (`ceil(numel / 2)`), the absmax (4 bytes per block, or
    /// 1 byte per block plus 4 per nested block, the 1024-byte map and the 4-byte offset when
    /// double-quantized) and the 64-byte code book. Shape, dtype and block sizes are not counted.
    pub fn storage_bytes(&self) -> usize {
        let absmax = match &self.absmax {
            FourBitAbsmax::Fp32(a) => 4 * a.elem_count(),
            FourBitAbsmax::Double(s) => {
                s.codes.elem_count() + 4 * s.nested_absmax.elem_count() + 4 * s.map.elem_count() + 4
            }
        };
        self.packed.elem_count() + absmax + 4 * self.code.len()
    }

    /// Bits per parameter at the formula level: `4 + 32 / block_size`, or with double
    /// quantization `4 + 8 / block_size + 32 / (block_size * nested_block_size)`, i.e. 4.5 and
    /// 4.127 for blocks of 64 (nested 256). Padding of partial blocks and the per-tensor
    /// constants (map, offset, code book) are not counted; `8 * storage_bytes() / numel()` is the
    /// exact figure for this tensor.
    pub fn bits_per_param(&self) -> f64 {
        FourBitConfig {
            quant_type: self.quant_type,
            block_size: self.block_size,
            double_quant: self.is_double_quant(),
            dq_block_size: match &self.absmax {
                FourBitAbsmax::Double(s) => s.block_size,
                FourBitAbsmax::Fp32(_) => NESTED_BLOCK_SIZE,
            },
        }
        .bits_per_param()
    }
}

impl FrozenWeight for FourBitTensor {
    /// Dequantizes on every call (the dense copy is never cached).
    fn weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.dequantize(dtype).map_err(Error::into_candle)
    }
}

/// Contiguous slice of a CPU storage.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
    let v = s.as_slice::<T>().map_err(|_| {
        candle_core::Error::Msg(format!(
            "{what}: expected {:?}, got {:?}",
            T::DTYPE,
            s.dtype()
        ))
    })?;
    Ok(&v[a..b])
}

/// A mutable output buffer of one of the float types.
pub(crate) enum DenseSlice<'a> {
    F32(&'a mut [f32]),
    BF16(&'a mut [bf16]),
    F16(&'a mut [f16]),
    F64(&'a mut [f64]),
}

/// Allocates `n` zeroed elements of `dtype` and lets `fill` write them. The buffers come from
/// the zeroing allocator (`vec![0; n]`, lazily zeroed pages for large sizes), so the page faults
/// of a fresh output land in the parallel kernel instead of a serial fill.
pub(crate) fn dense_output(
    dtype: DType,
    n: usize,
    fill: impl Fn(DenseSlice<'_>) -> Result<()>,
) -> candle_core::Result<CpuStorage> {
    let e = Error::into_candle;
    Ok(match dtype {
        DType::F32 => {
            let mut v = vec![0f32; n];
            fill(DenseSlice::F32(&mut v)).map_err(e)?;
            CpuStorage::F32(v)
        }
        DType::BF16 => {
            let mut v: Vec<bf16> = vec![0u16; n].reinterpret_into();
            fill(DenseSlice::BF16(&mut v)).map_err(e)?;
            CpuStorage::BF16(v)
        }
        DType::F16 => {
            let mut v: Vec<f16> = vec![0u16; n].reinterpret_into();
            fill(DenseSlice::F16(&mut v)).map_err(e)?;
            CpuStorage::F16(v)
        }
        DType::F64 => {
            let mut v = vec![0f64; n];
            fill(DenseSlice::F64(&mut v)).map_err(e)?;
            CpuStorage::F64(v)
        }
        other => candle_core::bail!("unsupported output dtype {other:?}"),
    })
}

/// `packed (U8) × absmax (F32) → dense`: the 4-bit dequantization kernel as a candle op, so a
/// device kernel can slot in as `cuda_fwd`.
#[derive(Debug, Clone)]
struct Dequant4bitOp {
    code: [f32; 16],
    block_size: usize,
    shape: Shape,
    dtype: DType,
}

impl CustomOp2 for Dequant4bitOp {
    fn name(&self) -> &'static str {
        "dequantize-4bit"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let packed = cpu_slice::<u8>(s1, l1, "packed codes")?;
        let absmax = cpu_slice::<f32>(s2, l2, "absmax")?;
        let (code, bs) = (&self.code, self.block_size);
        let out = dense_output(self.dtype, self.shape.elem_count(), |o| match o {
            DenseSlice::F32(o) => dequantize_4bit_into(packed, absmax, code, bs, o),
            DenseSlice::BF16(o) => dequantize_4bit_into(packed, absmax, code, bs, o),
            DenseSlice::F16(o) => dequantize_4bit_into(packed, absmax, code, bs, o),
            DenseSlice::F64(o) => dequantize_4bit_into(packed, absmax, code, bs, o),
        })?;
        Ok((out, self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let packed = gpu::view::<u8>(s1, l1, "packed codes")?;
        let absmax = gpu::AbsmaxSource::Fp32(gpu::view::<f32>(s2, l2, "absmax")?);
        let out = gpu::dequantize_4bit(
            s1.device(),
            &packed,
            &absmax,
            &self.code,
            self.block_size,
            self.shape.elem_count(),
            self.dtype,
        )?;
        Ok((out, self.shape.clone()))
    }
}

/// `packed (U8) × absmax codes (U8) × nested_absmax (F32) → dense`, with the 256-entry map held
/// by the op: the 4-bit dequantization of a double-quantized tensor in one op (on CUDA one fused
/// kernel that rebuilds each block's absmax; on the CPU [`AbsmaxDequantOp`] then
/// [`Dequant4bitOp`], the reference).
#[derive(Debug, Clone)]
struct Dequant4bitDqOp {
    inner: Dequant4bitOp,
    map: Tensor,
    absmax: AbsmaxDequantOp,
}

impl CustomOp3 for Dequant4bitDqOp {
    fn name(&self) -> &'static str {
        "dequantize-4bit-double-quant"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (map, map_l) = self.map.storage_and_layout();
        let Storage::Cpu(map) = &*map else {
            candle_core::bail!("nested_quant_map is not on the CPU")
        };
        let (absmax, absmax_shape) = self.absmax.cpu_fwd(s2, l2, map, map_l, s3, l3)?;
        self.inner
            .cpu_fwd(s1, l1, &absmax, &Layout::contiguous(absmax_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (map, map_l) = self.map.storage_and_layout();
        let Storage::Cuda(map) = &*map else {
            candle_core::bail!("nested_quant_map is not on a CUDA device")
        };
        let absmax = gpu::AbsmaxSource::Double {
            codes: gpu::view::<u8>(s2, l2, "absmax codes")?,
            map: gpu::view::<f32>(map, map_l, "nested_quant_map")?,
            nested: gpu::view::<f32>(s3, l3, "nested_absmax")?,
            offset: self.absmax.offset,
            dq_bs: self.absmax.block_size,
        };
        let packed = gpu::view::<u8>(s1, l1, "packed codes")?;
        let out = gpu::dequantize_4bit(
            s1.device(),
            &packed,
            &absmax,
            &self.inner.code,
            self.inner.block_size,
            self.inner.shape.elem_count(),
            self.inner.dtype,
        )?;
        Ok((out, self.inner.shape.clone()))
    }
}

/// `codes (U8) × map (F32[256]) × nested_absmax (F32) → absmax (F32)`:
/// `map[q] * nested_absmax[k / block_size] + offset`.
#[derive(Debug, Clone)]
struct AbsmaxDequantOp {
    offset: f32,
    block_size: usize,
}

impl CustomOp3 for AbsmaxDequantOp {
    fn name(&self) -> &'static str {
        "dequantize-absmax-8bit"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = cpu_slice::<u8>(s1, l1, "absmax codes")?;
        let map = cpu_slice::<f32>(s2, l2, "nested_quant_map")?;
        let nested = cpu_slice::<f32>(s3, l3, "nested_absmax")?;
        let mut out = vec![0f32; q.len()];
        dequantize_absmax_into(q, map, nested, self.block_size, self.offset, &mut out)
            .map_err(Error::into_candle)?;
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let codes = gpu::view::<u8>(s1, l1, "absmax codes")?;
        let n = codes.len();
        let out = gpu::dequantize_absmax(
            s1.device(),
            &codes,
            &gpu::view::<f32>(s2, l2, "nested_quant_map")?,
            &gpu::view::<f32>(s3, l3, "nested_absmax")?,
            self.offset,
            self.block_size,
        )?;
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_keeps_shape_dtype_and_device() -> Result<()> {
        let w = Tensor::randn(0f32, 1., (3, 5, 7), &Device::Cpu)?;
        for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let q = FourBitTensor::quantize(&w.to_dtype(dt)?, &FourBitConfig::default())?;
            assert_eq!(q.dims(), &[3, 5, 7]);
            assert_eq!(q.dtype(), dt);
            assert!(q.device().is_cpu());
            assert_eq!(q.numel(), 105);
            assert_eq!(q.packed().dims(), &[53]);
            assert_eq!(q.num_blocks(), 2);
            let d = q.dequantize(dt)?;
            assert_eq!(d.dtype(), dt);
            assert_eq!(d.dims(), &[3, 5, 7]);
        }
        Ok(())
    }

    #[test]
    fn dequantize_many_stacks_each_dequantization_and_checks_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let ts: Vec<FourBitTensor> = (0..3)
            .map(|k| {
                let w = Tensor::randn(0f32, 1.0 + k as f32, (40, 70), &dev)?;
                FourBitTensor::quantize(&w, &FourBitConfig::default())
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&FourBitTensor> = ts.iter().collect();
        let many = FourBitTensor::dequantize_many(&refs, DType::BF16)?;
        assert_eq!(many.dims(), &[3, 40, 70]);
        for (k, t) in ts.iter().enumerate() {
            let a = many
                .get(k)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let b = t
                .dequantize(DType::BF16)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(a, b, "tensor {k}");
        }
        let other = FourBitTensor::quantize(
            &Tensor::randn(0f32, 1.0, (40, 71), &dev)?,
            &FourBitConfig::default(),
        )?;
        let e = FourBitTensor::dequantize_many(&[&ts[0], &other], DType::F32).unwrap_err();
        assert!(e.to_string().contains("40, 71"), "{e}");
        assert!(FourBitTensor::dequantize_many(&[], DType::F32).is_err());
        Ok(())
    }

    #[test]
    fn dequantize_matches_the_slice_kernels() -> Result<()> {
        let w = Tensor::randn(0f32, 1., (33, 31), &Device::Cpu)?;
        let q = FourBitTensor::quantize(&w, &FourBitConfig::nf4_no_double_quant())?;
        let flat = w.flatten_all()?.to_vec1::<f32>()?;
        let (p, a) = quantize_4bit(&flat, 64, QuantType::Nf4)?;
        assert_eq!(q.packed().to_vec1::<u8>()?, p);
        assert_eq!(q.absmax_f32()?.to_vec1::<f32>()?, a);
        let d = q.dequantize(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let codes = unpack_codes(&p, flat.len());
        for (j, v) in d.iter().enumerate() {
            assert_eq!(*v, crate::nf4::NF4_CODE[codes[j] as usize] * a[j / 64]);
        }
        Ok(())
    }

    #[test]
    fn non_contiguous_input_is_quantized_in_logical_order() -> Result<()> {
        let w = Tensor::randn(0f32, 1., (40, 24), &Device::Cpu)?;
        let wt = w.t()?;
        let a = FourBitTensor::quantize(&wt, &FourBitConfig::default())?;
        let b = FourBitTensor::quantize(&wt.contiguous()?, &FourBitConfig::default())?;
        assert_eq!(a.packed().to_vec1::<u8>()?, b.packed().to_vec1::<u8>()?);
        Ok(())
    }

    #[test]
    fn storage_bytes_and_bits() -> Result<()> {
        let w = Tensor::zeros((128, 128), DType::F32, &Device::Cpu)?;
        let q = FourBitTensor::quantize(&w, &FourBitConfig::default())?;
        // 8192 packed + 256 codes + 4 nested + 1024 map + 4 offset + 64 code book
        assert_eq!(q.storage_bytes(), 8192 + 256 + 4 + 1024 + 4 + 64);
        assert_eq!(q.bits_per_param(), 4.126953125);
        let q = FourBitTensor::quantize(&w, &FourBitConfig::nf4_no_double_quant())?;
        assert_eq!(q.storage_bytes(), 8192 + 1024 + 64);
        assert_eq!(q.bits_per_param(), 4.5);
        Ok(())
    }

    #[test]
    fn rejects_empty_and_integer_inputs() {
        let e = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(FourBitTensor::quantize(&e, &FourBitConfig::default()).is_err());
        let i = Tensor::zeros((4, 4), DType::U32, &Device::Cpu).unwrap();
        assert!(FourBitTensor::quantize(&i, &FourBitConfig::default()).is_err());
        let w = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        let q = FourBitTensor::quantize(&w, &FourBitConfig::default()).unwrap();
        assert!(q.dequantize(DType::U8).is_err());
    }

    #[test]
    fn from_parts_checks_lengths() -> Result<()> {
        let dev = Device::Cpu;
        let packed = Tensor::zeros(8, DType::U8, &dev)?;
        let absmax = FourBitAbsmax::Fp32(Tensor::ones(1, DType::F32, &dev)?);
        let shape = Shape::from((4, 4));
        let ok = FourBitTensor::from_parts(
            packed.clone(),
            absmax.clone(),
            *QuantType::Nf4.code(),
            shape.clone(),
            DType::F32,
            64,
            QuantType::Nf4,
        );
        assert!(ok.is_ok());
        let bad = FourBitTensor::from_parts(
            packed,
            absmax,
            *QuantType::Nf4.code(),
            Shape::from((4, 5)),
            DType::F32,
            64,
            QuantType::Nf4,
        );
        assert!(bad.is_err());
        Ok(())
    }
}
