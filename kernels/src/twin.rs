//! Shared pieces of the CPU twins of the element-wise and row kernels (softmax, RMSNorm,
//! SwiGLU, cross-entropy): they read f32/bf16 storage as f32, round where the kernels round,
//! and store f32 results back in the kernel's dtype.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout};

/// The contiguous elements of `s` under `l` as f32 (`op` and `what` name them in errors).
pub(crate) fn to_f32s(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<Vec<f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("{op}: f32 or bf16 only, not {:?}", s.dtype()),
    })
}

/// `v` rounded to `dtype` and widened back (identity for f32), as a kernel's store and reload.
pub(crate) fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// f32 results stored in `dtype` (f32 or bf16, rounded to nearest even).
pub(crate) fn from_f32s(dtype: DType, v: Vec<f32>, op: &str) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        d => candle_core::bail!("{op}: f32 or bf16 only, not {d:?}"),
    })
}
