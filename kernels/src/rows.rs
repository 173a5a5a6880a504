//! Row gather `x[idx]` for the MoE dispatch, and the attention heads' transposes built on it.
//! candle's `index_select` moves one element per thread; on CUDA, rows that are whole 16-byte
//! words are copied here a warp per row with 16-byte accesses. Elsewhere (and for other
//! shapes) it is `index_select`.

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::Tensor;

/// `x[idx]` along dimension 0 of a 2-D `x`, `idx` of dtype u32 with every index below the
/// number of rows (on CUDA an index out of range gives a zero row; elsewhere an error). Not
/// differentiable (callers attach their own backward).
pub fn gather_rows(x: &Tensor, idx: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && idx.dtype() == DType::U32 && x.rank() == 2 {
        let (_, h) = x.dims2()?;
        let row_bytes = h * x.dtype().size_in_bytes();
        if row_bytes % 16 == 0 && row_bytes > 0 {
            return cuda::gather_rows(&x.contiguous()?, &idx.contiguous()?);
        }
    }
    x.index_select(idx, 0)
}

/// `x` `(a, b, c, d)` with dimensions 1 and 2 swapped, contiguous `(a, c, b, d)`: the
/// attention heads' split and merge. On CUDA, when a `d` row is whole 16-byte words, one
/// [`gather_rows`] launch over the `d` rows (a warp per row, 16-byte accesses) with the row
/// order cached per shape; candle's strided copy computes every element's index instead and
/// is several times slower. Elsewhere `transpose(1, 2)` then `contiguous()` (the same values).
pub fn swap_dims12(x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (a, b, c, d) = x.dims4()?;
        if (d * x.dtype().size_in_bytes()) % 16 == 0 && d > 0 {
            let idx = swap_index(a, b, c, x.device())?;
            let rows = x.contiguous()?.reshape((a * b * c, d))?;
            return gather_rows(&rows, &idx)?.reshape((a, c, b, d));
        }
    }
    x.dims4()?;
    x.transpose(1, 2)?.contiguous()
}

/// The rows of `(a, b, c, ·)` in `(a, c, b, ·)` order, built once per shape and device.
#[cfg(feature = "cuda")]
fn swap_index(
    a: usize,
    b: usize,
    c: usize,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Key = (usize, usize, usize, candle_core::DeviceLocation);
    static CACHE: OnceLock<Mutex<HashMap<Key, Tensor>>> = OnceLock::new();
    let key = (a, b, c, dev.location());
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    // (Another `Device` of the same GPU has its own stream: its tensors are not shared.)
    if let Some(t) = cache.lock().ok().and_then(|m| m.get(&key).cloned()) {
        if t.device().same_device(dev) {
            return Ok(t);
        }
    }
    if a * b * c > u32::MAX as usize {
        candle_core::bail!("swap_dims12: {a}×{b}×{c} rows do not fit u32 indices")
    }
    let mut idx = Vec::with_capacity(a * b * c);
    for i in 0..a {
        for k in 0..c {
            for j in 0..b {
                idx.push(((i * b + j) * c + k) as u32);
            }
        }
    }
    let t = Tensor::from_vec(idx, a * b * c, dev)?;
    if let Ok(mut m) = cache.lock() {
        // A few shapes per run (heads, key/value heads; training and generation lengths).
        if m.len() >= 64 {
            m.clear();
        }
        m.insert(key, t.clone());
    }
    Ok(t)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rows.ptx"));
    const MODULE: &str = "moe_peft_kernels_rows";

    fn address(t: &Tensor) -> candle_core::Result<u64> {
        Ok(crate::device::device_address(t)?.addr())
    }

    pub(super) fn gather_rows(x: &Tensor, idx: &Tensor) -> candle_core::Result<Tensor> {
        let (n, h) = x.dims2()?;
        let m = idx.dims1()?;
        if m == 0 {
            return Tensor::zeros((0, h), x.dtype(), x.device());
        }
        let candle_core::Device::Cuda(dev) = x.device() else {
            candle_core::bail!("gather_rows: not CUDA")
        };
        let xa = address(x)?;
        if xa % 16 != 0 {
            return x.index_select(idx, 0);
        }
        if !matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32) {
            return x.index_select(idx, 0);
        }
        // Every element is written by the kernel (fresh allocations are 256-byte aligned).
        let out = crate::device::uninit_cuda((m, h), x.dtype(), x)?;
        let (ia, oa) = (address(idx)?, address(&out)?);
        let n = n as u64;
        let words = (h * x.dtype().size_in_bytes() / 16) as u32;
        let rows = m as u64;
        let f = dev.get_or_load_custom_func("gather_rows16", MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = f.builder();
        b.arg(&xa).arg(&n).arg(&ia).arg(&oa).arg(&rows).arg(&words);
        // SAFETY: `x` is (n, h) contiguous at xa (16-byte aligned), `idx` holds m u32 (indices
        // >= n are not read), `out` (m, h) at oa; rows are whole 16-byte words.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}
