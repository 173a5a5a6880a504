//! Row-wise absmax int8 weights ([`Int8Tensor`]) and their frozen linear layer ([`Int8Linear`]),
//! for the recipe's `--bits 8`.
//!
//! Each row `r` of a `(out, in)` weight is stored as `q[r, c] = round(W[r, c] * (127 / absmax_r))`
//! (round half to even, as `torch.round`) with `absmax_r = max_c |W[r, c]|` in fp32: the
//! vector-wise quantization of bitsandbytes' `int8_vectorwise_quant` with `threshold = 0`.
//! Dequantization is `W'[r, c] = (q[r, c] * absmax_r) * (1 / 127)`, so
//! `|W - W'| <= absmax_r / 254` up to fp32 rounding.
//!
//! This is **not** LLM.int8(): there is no fp16 outlier decomposition (`threshold = 6.0`
//! splitting outlier input columns into an fp16 GEMM) and no int8 GEMM. The whole weight is
//! quantized row-wise; forward dequantizes it and runs a dense GEMM in the input's dtype.

use std::any::Any;
use std::sync::Arc;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, ModuleT, Shape, Tensor};
use rayon::prelude::*;

use crate::cuda as gpu;
use crate::error::{Error, Result};
use crate::four_bit::{check_float_dtype, cpu_slice, dense_output, DenseSlice};
use crate::linear::{frozen_matmul, FrozenWeight, LinearLike};
use crate::nf4::{InElem, OutElem};

/// A weight quantized to int8 per row (see the module docs). The codes are kept as the bytes of
/// `i8` values in a U8 tensor (candle has no i8 dtype).
#[derive(Debug, Clone)]
pub struct Int8Tensor {
    q: Tensor,
    scale: Tensor,
    shape: Shape,
    dtype: DType,
}

fn quantize_rows<T: InElem>(w: &[T], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let rows = w.len() / cols;
    let mut q = vec![0u8; w.len()];
    let mut scale = vec![0f32; rows];
    q.par_chunks_mut(cols)
        .zip(scale.par_iter_mut())
        .zip(w.par_chunks(cols))
        .for_each(|((qr, s), wr)| {
            let m = wr.iter().fold(0f32, |m, &v| m.max(v.to_f32().abs()));
            *s = m;
            let f = if m > 0.0 { 127.0f32 / m } else { 0.0 };
            for (o, &v) in qr.iter_mut().zip(wr) {
                let r = (v.to_f32() * f).round_ties_even().clamp(-127.0, 127.0);
                *o = (r as i8) as u8;
            }
        });
    (q, scale)
}

fn dequantize_rows<T: OutElem>(q: &[u8], scale: &[f32], out: &mut [T]) -> Result<()> {
    let rows = scale.len();
    if rows == 0 || q.len() != out.len() || q.len() % rows != 0 {
        return Err(Error::ShapeMismatch {
            name: "int8 weight".into(),
            expected: format!("a multiple of {rows} codes"),
            got: format!("{} codes", q.len()),
        });
    }
    let cols = q.len() / rows;
    out.par_chunks_mut(cols)
        .zip(q.par_chunks(cols))
        .zip(scale.par_iter())
        .for_each(|((o, qr), &s)| {
            for (o, &c) in o.iter_mut().zip(qr) {
                *o = T::from_f32(((c as i8) as f32 * s) * (1.0 / 127.0));
            }
        });
    Ok(())
}

impl Int8Tensor {
    /// Quantizes `w` (2-D `(rows, cols)`, or any rank with the last dimension as the row) with one
    /// fp32 absmax per row. The parts stay on `w`'s device: computed there by a CUDA kernel on a
    /// CUDA device (bit-identical with the CPU), on the host otherwise.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let dtype = w.dtype();
        check_float_dtype(dtype, "weight")?;
        let cols = w.dims().last().copied().unwrap_or(1);
        if w.elem_count() == 0 || cols == 0 {
            return Err(Error::ShapeMismatch {
                name: "weight".into(),
                expected: "a non-empty tensor".into(),
                got: format!("shape {:?}", w.dims()),
            });
        }
        let device = w.device().clone();
        let rows = w.elem_count() / cols;
        if device.is_cuda() {
            let (q, scale) = gpu::int8_quantize(&w.contiguous()?, rows, cols)?;
            return Ok(Self {
                q,
                scale,
                shape: w.shape().clone(),
                dtype,
            });
        }
        let flat = w.flatten_all()?;
        let (q, scale) = match dtype {
            DType::BF16 => quantize_rows(&flat.to_vec1::<half::bf16>()?, cols),
            DType::F16 => quantize_rows(&flat.to_vec1::<half::f16>()?, cols),
            DType::F64 => quantize_rows(&flat.to_vec1::<f64>()?, cols),
            _ => quantize_rows(&flat.to_vec1::<f32>()?, cols),
        };
        let cpu = Device::Cpu;
        Ok(Self {
            q: Tensor::from_vec(q, (rows, cols), &cpu)?.to_device(&device)?,
            scale: Tensor::from_vec(scale, rows, &cpu)?.to_device(&device)?,
            shape: w.shape().clone(),
            dtype,
        })
    }

    /// The dense weight in `dtype`, on this tensor's device (a custom op on the CPU and on CUDA;
    /// other devices go through the host).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        check_float_dtype(dtype, "output dtype")?;
        let op = Int8DequantOp {
            shape: self.shape.clone(),
            dtype,
        };
        if !self.q.device().is_metal() {
            Ok(self.q.apply_op2_no_bwd(&self.scale, &op)?)
        } else {
            let cpu = Device::Cpu;
            let out = self
                .q
                .to_device(&cpu)?
                .apply_op2_no_bwd(&self.scale.to_device(&cpu)?, &op)?;
            Ok(out.to_device(self.q.device())?)
        }
    }

    /// The codes as `i8`, row-major (copied to the host).
    pub fn codes(&self) -> Result<Vec<i8>> {
        Ok(self
            .q
            .flatten_all()?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|b| b as i8)
            .collect())
    }

    /// The fp32 absmax per row.
    pub fn row_absmax(&self) -> &Tensor {
        &self.scale
    }

    /// The original shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The original dimensions.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// The original dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the parts live on.
    pub fn device(&self) -> &Device {
        self.q.device()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.elem_count()
    }

    /// Moves the parts to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            q: self.q.to_device(device)?,
            scale: self.scale.to_device(device)?,
            ..self.clone()
        })
    }

    /// Bytes held: one per element plus four per row.
    pub fn storage_bytes(&self) -> usize {
        self.q.elem_count() + 4 * self.scale.elem_count()
    }

    /// Bits per parameter: `8 + 32 / cols`.
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.storage_bytes() as f64 / self.numel() as f64
    }
}

impl FrozenWeight for Int8Tensor {
    fn weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.dequantize(dtype).map_err(Error::into_candle)
    }
}

/// `codes (U8 holding i8) × row absmax (F32) → dense`.
#[derive(Debug, Clone)]
struct Int8DequantOp {
    shape: Shape,
    dtype: DType,
}

impl CustomOp2 for Int8DequantOp {
    fn name(&self) -> &'static str {
        "dequantize-int8-rowwise"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = cpu_slice::<u8>(s1, l1, "int8 codes")?;
        let s = cpu_slice::<f32>(s2, l2, "row absmax")?;
        let out = dense_output(self.dtype, self.shape.elem_count(), |o| match o {
            DenseSlice::F32(o) => dequantize_rows(q, s, o),
            DenseSlice::BF16(o) => dequantize_rows(q, s, o),
            DenseSlice::F16(o) => dequantize_rows(q, s, o),
            DenseSlice::F64(o) => dequantize_rows(q, s, o),
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
        use candle_core::backend::BackendStorage;
        let q = gpu::view::<u8>(s1, l1, "int8 codes")?;
        let s = gpu::view::<f32>(s2, l2, "row absmax")?;
        let out = gpu::int8_dequantize(s1.device(), &q, &s, self.dtype)?;
        Ok((out, self.shape.clone()))
    }
}

/// A frozen linear layer over a row-wise int8 weight `(out, in)`: dequantize, then GEMM; input
/// gradient only (see the module docs for what it is not).
#[derive(Debug, Clone)]
pub struct Int8Linear {
    weight: Arc<Int8Tensor>,
}

impl Int8Linear {
    /// Wraps a 2-D int8 weight.
    pub fn new(weight: Int8Tensor) -> Result<Self> {
        if weight.dims().len() != 2 {
            return Err(Error::ShapeMismatch {
                name: "Int8Linear weight".into(),
                expected: "a 2-D (out, in) weight".into(),
                got: format!("shape {:?}", weight.dims()),
            });
        }
        Ok(Self {
            weight: Arc::new(weight),
        })
    }

    /// Quantizes a dense `(out, in)` weight and wraps it.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        Self::new(Int8Tensor::quantize(weight)?)
    }

    /// The quantized weight.
    pub fn weight(&self) -> &Arc<Int8Tensor> {
        &self.weight
    }
}

impl ModuleT for Int8Linear {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let w = self
            .weight
            .dequantize(x.dtype())
            .map_err(Error::into_candle)?;
        let source: Arc<dyn FrozenWeight> = self.weight.clone();
        frozen_matmul(x, &w, source)
    }
}

impl LinearLike for Int8Linear {
    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    fn dense_weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.weight.dequantize(dtype).map_err(Error::into_candle)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rowwise_error_bound() -> Result<()> {
        let w = Tensor::randn(0f32, 1., (64, 96), &Device::Cpu)?;
        let w = w.broadcast_mul(&Tensor::arange(1f32, 65., &Device::Cpu)?.reshape((64, 1))?)?;
        let q = Int8Tensor::quantize(&w)?;
        let d = q.dequantize(DType::F32)?.to_vec2::<f32>()?;
        let w2 = w.to_vec2::<f32>()?;
        let am = q.row_absmax().to_vec1::<f32>()?;
        let codes = q.codes()?;
        assert!(codes.iter().all(|&c| c >= -127));
        let mut worst = 0f32;
        for r in 0..64 {
            let m = w2[r].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(am[r], m);
            // the row's max hits the code ±127 exactly
            assert!(codes[r * 96..(r + 1) * 96].iter().any(|&c| c.abs() == 127));
            for c in 0..96 {
                let e = (d[r][c] - w2[r][c]).abs();
                // half a step plus fp32 rounding of the scale product
                assert!(
                    e <= m / 254.0 * (1.0 + 1e-5) + 1e-7,
                    "row {r} col {c}: {e} vs {m}"
                );
                worst = worst.max(e / m);
            }
        }
        assert!(
            worst > 0.0039 && worst <= 1.0 / 254.0 * (1.0 + 1e-5),
            "{worst}"
        );
        Ok(())
    }

    #[test]
    fn zero_row_and_rounding() -> Result<()> {
        let w = Tensor::new(&[[0f32, 0., 0.], [1.0, -0.5, 0.25]], &Device::Cpu)?;
        let q = Int8Tensor::quantize(&w)?;
        assert_eq!(q.codes()?, vec![0, 0, 0, 127, -64, 32]); // -63.5 -> -64 (ties to even)
        let d = q.dequantize(DType::F32)?.to_vec2::<f32>()?;
        assert_eq!(d[0], vec![0.0, 0.0, 0.0]);
        assert!((d[1][0] - 1.0).abs() < 1e-6);
        assert!((q.bits_per_param() - (8.0 + 32.0 / 3.0)).abs() < 1e-12);
        Ok(())
    }
}
