//! Grouped matrix products for mixture-of-experts layers: one product per group of consecutive
//! rows, each group with its own weight, in one call.
//!
//! On CUDA each product runs as a single `cublasGemmGroupedBatchedEx` (one launch for all the
//! experts of a layer instead of one GEMM per expert; a single group as a plain
//! `cublasGemmEx`), and [`grouped_matmul_add`] accumulates into its output in the same call.
//! [`grouped_matmul_tn`] (the experts' weight gradients, whose inner dimension is each group's
//! row count) runs small groups as one launch of a segmented tensor-core kernel
//! (`cuda/grouped.cu`), since cuBLAS launches each group of a different size on its own;
//! elsewhere they loop over the groups with candle's matmul, which is the reference the CUDA
//! path is tested against.

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{Result, Tensor};

fn check_x(x: &Tensor, counts: &[usize], what: &str) -> Result<(usize, usize)> {
    let (r, k) = x.dims2()?;
    let total: usize = counts.iter().sum();
    if total != r {
        candle_core::bail!("{what}: the groups hold {total} rows but the input has {r}")
    }
    Ok((r, k))
}

/// Checks the operands of [`grouped_matmul`]: returns `(rows, k, n)`.
fn check_weights(
    x: &Tensor,
    ws: &[&Tensor],
    counts: &[usize],
    transpose_w: bool,
    what: &str,
) -> Result<(usize, usize, usize)> {
    if ws.len() != counts.len() || ws.is_empty() {
        candle_core::bail!("{what}: {} weights for {} groups", ws.len(), counts.len())
    }
    let (r, k) = check_x(x, counts, what)?;
    let (a, b) = ws[0].dims2()?;
    let (wk, n) = if transpose_w { (b, a) } else { (a, b) };
    if wk != k {
        candle_core::bail!("{what}: input width {k}, weight {:?}", ws[0].dims())
    }
    for w in ws {
        if w.dims() != ws[0].dims() || w.dtype() != x.dtype() {
            candle_core::bail!("{what}: weights differ in shape or dtype")
        }
    }
    Ok((r, k, n))
}

/// `out[rows_g] = x[rows_g] · op(w_g)` for consecutive row groups of `x` (`counts[g]` rows,
/// zero allowed): `op(w) = wᵀ` with `w` of shape `(n, k)` when `transpose_w`, else `w` of shape
/// `(k, n)`. Every weight has the same shape and `x`'s dtype. Returns `(Σ counts, n)`.
pub fn grouped_matmul(
    x: &Tensor,
    ws: &[&Tensor],
    counts: &[usize],
    transpose_w: bool,
) -> Result<Tensor> {
    let (r, k, n) = check_weights(x, ws, counts, transpose_w, "grouped_matmul")?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32) && r > 0 {
        return cuda::grouped_matmul(x, ws, counts, transpose_w, k, n);
    }
    let _ = k;
    let mut outs = Vec::with_capacity(ws.len());
    let mut off = 0;
    for (w, &c) in ws.iter().zip(counts) {
        if c > 0 {
            let xg = x.narrow(0, off, c)?;
            outs.push(if transpose_w {
                xg.matmul(&w.t()?)?
            } else {
                xg.matmul(w)?
            });
        }
        off += c;
    }
    if outs.is_empty() {
        return Tensor::zeros((r, n), x.dtype(), x.device());
    }
    Tensor::cat(&outs, 0)
}

/// `y + alpha · grouped_matmul(x, ws, counts, transpose_w)`. On CUDA the product is
/// accumulated into `y`'s memory by the same cuBLAS call (`beta = 1`, each element rounded
/// once), so `y` must be a contiguous tensor that nothing else reads; elsewhere a new tensor.
pub fn grouped_matmul_add(
    y: Tensor,
    x: &Tensor,
    ws: &[&Tensor],
    counts: &[usize],
    transpose_w: bool,
    alpha: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32)
        && y.is_contiguous()
        && y.dtype() == x.dtype()
    {
        let (r, k, n) = check_weights(x, ws, counts, transpose_w, "grouped_matmul_add")?;
        if y.dims() != [r, n] {
            candle_core::bail!(
                "grouped_matmul_add: accumulator {:?} for ({r}, {n})",
                y.dims()
            )
        }
        if r > 0 {
            cuda::grouped_matmul_into(&y, x, ws, counts, transpose_w, (k, n), (alpha as f32, 1.0))?;
        }
        return Ok(y);
    }
    let t = grouped_matmul(x, ws, counts, transpose_w)?;
    y + (t * alpha)?
}

static TN_KERNEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Groups of at most this many rows on average (and none above four times as many: one
/// block loops over a group's rows) take the segmented kernel; larger ones cuBLAS. Measured on
/// an H200 at DeepSeekMoE-16B's expert shapes (BENCHMARKS.md): at 96 rows per expert (1×1024
/// tokens) the single launch makes the step 36 % shorter than cuBLAS's launch per group (0.283
/// against 0.441 s); at 1,536 rows (16×1024) a first version of the kernel (2-byte loads) took
/// 5× as long as cuBLAS, and the present one was not measured there.
pub const TN_KERNEL_MAX_MEAN_ROWS: usize = 512;

/// Whether [`grouped_matmul_tn`] of bf16/f16 operands on CUDA may run as one launch of this
/// crate's segmented kernel (the default: when the groups average at most
/// [`TN_KERNEL_MAX_MEAN_ROWS`] rows) or always as cuBLAS's grouped GEMM, which launches each
/// group of a different row count on its own (to measure the difference).
pub fn set_tn_kernel(on: bool) {
    TN_KERNEL.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// `out[g] = a[rows_g]ᵀ · b[rows_g]` for consecutive row groups (`counts[g]` rows; an empty
/// group gives zeros): the per-expert weight gradients. `a` is `(R, m)`, `b` is `(R, n)`;
/// returns `(groups, m, n)`.
pub fn grouped_matmul_tn(a: &Tensor, b: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let (r, m) = check_x(a, counts, "grouped_matmul_tn")?;
    let (rb, n) = b.dims2()?;
    if rb != r || a.dtype() != b.dtype() {
        candle_core::bail!(
            "grouped_matmul_tn: {:?} and {:?} do not fit",
            a.dims(),
            b.dims()
        )
    }
    #[cfg(feature = "cuda")]
    if a.device().is_cuda()
        && matches!(a.dtype(), DType::BF16 | DType::F16)
        && TN_KERNEL.load(std::sync::atomic::Ordering::Relaxed)
        && r <= TN_KERNEL_MAX_MEAN_ROWS * counts.len()
        && counts.iter().all(|&c| c <= 4 * TN_KERNEL_MAX_MEAN_ROWS)
        && counts.len() <= 65535
    {
        return cuda::segmented_tn(a, b, counts, m, n);
    }
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() && matches!(a.dtype(), DType::BF16 | DType::F16 | DType::F32) {
        return cuda::grouped_matmul_tn(a, b, counts, m, n);
    }
    let mut outs = Vec::with_capacity(counts.len());
    let mut off = 0;
    for &c in counts {
        outs.push(if c > 0 {
            a.narrow(0, off, c)?.t()?.matmul(&b.narrow(0, off, c)?)?
        } else {
            Tensor::zeros((m, n), a.dtype(), a.device())?
        });
        off += c;
    }
    Tensor::stack(&outs, 0)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::ffi::{c_int, c_void};

    use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Result, Tensor};

    /// The device address of a contiguous tensor's first element, and its element size.
    fn address(t: &Tensor) -> Result<crate::device::DeviceAddress<'_>> {
        if !t.is_contiguous() {
            candle_core::bail!("grouped GEMM: operands must be contiguous")
        }
        crate::device::device_address(t)
    }

    fn data_type(d: DType) -> cublas::cudaDataType_t {
        match d {
            DType::BF16 => cublas::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => cublas::cudaDataType_t::CUDA_R_16F,
            _ => cublas::cudaDataType_t::CUDA_R_32F,
        }
    }

    fn empty(rows: usize, cols: usize, like: &Tensor, zero: bool) -> Result<Tensor> {
        if zero {
            return Tensor::zeros((rows, cols), like.dtype(), like.device());
        }
        // Every element is written by the GEMMs (the groups tile the rows).
        crate::device::uninit_cuda((rows, cols), like.dtype(), like)
    }

    /// One GEMM per group, column-major as cuBLAS sees row-major data.
    struct Group {
        ta: cublas::cublasOperation_t,
        tb: cublas::cublasOperation_t,
        m: c_int,
        n: c_int,
        k: c_int,
        a: u64,
        lda: c_int,
        b: u64,
        ldb: c_int,
        c: u64,
        ldc: c_int,
    }

    fn run(like: &Tensor, groups: &[Group], alpha: f32, beta: f32) -> Result<()> {
        if groups.is_empty() {
            return Ok(());
        }
        let candle_core::Device::Cuda(dev) = like.device() else {
            candle_core::bail!("not CUDA")
        };
        let dt = data_type(like.dtype());
        if let [one] = groups {
            // A single group: a plain GEMM, no pointer arrays to upload.
            let blas = dev.cublas_handle();
            // SAFETY: the operands are live, contiguous and sized by the m/n/k/ld values.
            let status = unsafe {
                cublas::cublasGemmEx(
                    *blas.handle(),
                    one.ta,
                    one.tb,
                    one.m,
                    one.n,
                    one.k,
                    &alpha as *const f32 as *const c_void,
                    one.a as *const c_void,
                    dt,
                    one.lda,
                    one.b as *const c_void,
                    dt,
                    one.ldb,
                    &beta as *const f32 as *const c_void,
                    one.c as *mut c_void,
                    dt,
                    one.ldc,
                    cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            };
            if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                candle_core::bail!("cublasGemmEx: {status:?}")
            }
            return Ok(());
        }
        let stream = dev.cuda_stream();
        let g = groups.len();
        let mut ptrs: Vec<u64> = Vec::with_capacity(3 * g);
        ptrs.extend(groups.iter().map(|x| x.a));
        ptrs.extend(groups.iter().map(|x| x.b));
        ptrs.extend(groups.iter().map(|x| x.c));
        let dptrs = stream.clone_htod(&ptrs).w()?;
        let (base, _sync) = dptrs.device_ptr(&stream);
        let ta: Vec<_> = groups.iter().map(|x| x.ta).collect();
        let tb: Vec<_> = groups.iter().map(|x| x.tb).collect();
        let m: Vec<c_int> = groups.iter().map(|x| x.m).collect();
        let n: Vec<c_int> = groups.iter().map(|x| x.n).collect();
        let k: Vec<c_int> = groups.iter().map(|x| x.k).collect();
        let lda: Vec<c_int> = groups.iter().map(|x| x.lda).collect();
        let ldb: Vec<c_int> = groups.iter().map(|x| x.ldb).collect();
        let ldc: Vec<c_int> = groups.iter().map(|x| x.ldc).collect();
        let alpha = vec![alpha; g];
        let beta = vec![beta; g];
        let sizes = vec![1 as c_int; g];
        let blas = dev.cublas_handle();
        // SAFETY: host arrays have one entry per group; the device pointer array holds 3·g
        // addresses of live, contiguous operands sized by the m/n/k/ld values above.
        let status = unsafe {
            cublas::cublasGemmGroupedBatchedEx(
                *blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                m.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                alpha.as_ptr() as *const c_void,
                base as *const *const c_void,
                dt,
                lda.as_ptr(),
                (base + 8 * g as u64) as *const *const c_void,
                dt,
                ldb.as_ptr(),
                beta.as_ptr() as *const c_void,
                (base + 16 * g as u64) as *const *mut c_void,
                dt,
                ldc.as_ptr(),
                g as c_int,
                sizes.as_ptr(),
                cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        };
        if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            candle_core::bail!("cublasGemmGroupedBatchedEx: {status:?}")
        }
        Ok(())
    }

    /// `y = alpha · x·op(w_g) + beta · y` per group, in `y`'s memory.
    pub(super) fn grouped_matmul_into(
        y: &Tensor,
        x: &Tensor,
        ws: &[&Tensor],
        counts: &[usize],
        transpose_w: bool,
        (k, n): (usize, usize),
        (alpha, beta): (f32, f32),
    ) -> Result<()> {
        use cublas::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
        let x = x.contiguous()?;
        let (xa, es) = {
            let a = address(&x)?;
            (a.addr(), a.elem_size())
        };
        let oa = address(y)?.addr();
        let ws: Vec<Tensor> = ws.iter().map(|w| w.contiguous()).collect::<Result<_>>()?;
        let mut groups = Vec::new();
        let mut off = 0usize;
        for (w, &c) in ws.iter().zip(counts) {
            if c > 0 {
                let wa = address(w)?.addr();
                groups.push(Group {
                    ta: if transpose_w { T } else { N },
                    tb: N,
                    m: n as c_int,
                    n: c as c_int,
                    k: k as c_int,
                    a: wa,
                    lda: (if transpose_w { k } else { n }) as c_int,
                    b: xa + (off * k * es) as u64,
                    ldb: k as c_int,
                    c: oa + (off * n * es) as u64,
                    ldc: n as c_int,
                });
            }
            off += c;
        }
        run(&x, &groups, alpha, beta)
    }

    pub(super) fn grouped_matmul(
        x: &Tensor,
        ws: &[&Tensor],
        counts: &[usize],
        transpose_w: bool,
        k: usize,
        n: usize,
    ) -> Result<Tensor> {
        let r: usize = counts.iter().sum();
        let out = empty(r, n, x, false)?;
        grouped_matmul_into(&out, x, ws, counts, transpose_w, (k, n), (1.0, 0.0))?;
        Ok(out)
    }

    /// One launch of `grouped_tn_*` (grouped.cu) for every group.
    pub(super) fn segmented_tn(
        a: &Tensor,
        b: &Tensor,
        counts: &[usize],
        m: usize,
        n: usize,
    ) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/grouped.ptx"));
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let g = counts.len();
        let out = empty(g * m, n, &a, false)?;
        if g == 0 || m == 0 || n == 0 {
            return out.reshape((g, m, n));
        }
        let candle_core::Device::Cuda(dev) = a.device() else {
            candle_core::bail!("not CUDA")
        };
        let name = match a.dtype() {
            DType::BF16 => "grouped_tn_bf16",
            _ => "grouped_tn_f16",
        };
        let f = dev.get_or_load_custom_func(name, "moe_peft_kernels_grouped", PTX)?;
        let mut starts = Vec::with_capacity(g);
        let mut off = 0u64;
        for &c in counts {
            starts.push(off);
            off += c as u64;
        }
        let cnt: Vec<u32> = counts.iter().map(|&c| c as u32).collect();
        let stream = dev.cuda_stream();
        let (ds, dc) = (
            stream.clone_htod(&starts).w()?,
            stream.clone_htod(&cnt).w()?,
        );
        let (aa, ba, oa) = (
            address(&a)?.addr(),
            address(&b)?.addr(),
            address(&out)?.addr(),
        );
        let (m32, n32) = (m as u32, n as u32);
        // 16-byte loads when every row of both operands starts on a 16-byte boundary.
        let vec = i32::from(m % 8 == 0 && n % 8 == 0 && aa % 16 == 0 && ba % 16 == 0);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(64) as u32, m.div_ceil(64) as u32, g as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = f.builder();
        l.arg(&aa)
            .arg(&ba)
            .arg(&oa)
            .arg(&ds)
            .arg(&dc)
            .arg(&m32)
            .arg(&n32)
            .arg(&vec);
        // SAFETY: a (R, m) and b (R, n) are contiguous with R = Σ counts, out (g·m, n) of their
        // dtype; `starts`/`counts` hold g entries; the signature is in grouped.cu.
        unsafe { l.launch(cfg) }.w()?;
        out.reshape((g, m, n))
    }

    pub(super) fn grouped_matmul_tn(
        a: &Tensor,
        b: &Tensor,
        counts: &[usize],
        m: usize,
        n: usize,
    ) -> Result<Tensor> {
        use cublas::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let g = counts.len();
        let out = empty(g * m, n, &a, counts.contains(&0))?;
        let (aa, es) = {
            let d = address(&a)?;
            (d.addr(), d.elem_size())
        };
        let ba = address(&b)?.addr();
        let oa = address(&out)?.addr();
        let mut groups = Vec::new();
        let mut off = 0usize;
        for (i, &c) in counts.iter().enumerate() {
            if c > 0 {
                groups.push(Group {
                    ta: N,
                    tb: T,
                    m: n as c_int,
                    n: m as c_int,
                    k: c as c_int,
                    a: ba + (off * n * es) as u64,
                    lda: n as c_int,
                    b: aa + (off * m * es) as u64,
                    ldb: m as c_int,
                    c: oa + (i * m * n * es) as u64,
                    ldc: n as c_int,
                });
            }
            off += c;
        }
        run(&a, &groups, 1.0, 0.0)?;
        out.reshape((g, m, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn grouped_products_equal_per_group_matmuls() -> Result<()> {
        let dev = Device::Cpu;
        let counts = [3usize, 0, 5, 1];
        let x = Tensor::randn(0f32, 1.0, (9, 6), &dev)?;
        let ws: Vec<Tensor> = (0..4)
            .map(|_| Tensor::randn(0f32, 1.0, (4, 6), &dev))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = ws.iter().collect();
        let y = grouped_matmul(&x, &refs, &counts, true)?;
        assert_eq!(y.dims(), [9, 4]);
        let row = |i: usize, g: usize| -> Result<Vec<f32>> {
            x.narrow(0, i, 1)?
                .matmul(&ws[g].t()?)?
                .flatten_all()?
                .to_vec1()
        };
        assert_eq!(
            y.narrow(0, 4, 1)?.flatten_all()?.to_vec1::<f32>()?,
            row(4, 2)?
        );
        assert_eq!(
            y.narrow(0, 8, 1)?.flatten_all()?.to_vec1::<f32>()?,
            row(8, 3)?
        );
        let t = grouped_matmul_tn(&x, &y, &counts)?;
        assert_eq!(t.dims(), [4, 6, 4]);
        assert_eq!(t.get(1)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        let want = x.narrow(0, 3, 5)?.t()?.matmul(&y.narrow(0, 3, 5)?)?;
        let d = (t.get(2)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5);
        Ok(())
    }
}
