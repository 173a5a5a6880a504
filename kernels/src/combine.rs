//! The MoE combine `y[t] = Σ_j w[t, j]·ys[inverse[t·k + j]]` and its two gradients, with f32
//! sums and the expert outputs read in place: no token-ordered or f32 copy of `ys` (at
//! DeepSeekMoE-16B's 16×1024 tokens that copy is 800 MB per layer and pass).
//!
//! `ys` `(n·k, h)` holds the expert outputs in expert order (f32, bf16 or f16), `w` `(n, k)` the
//! f32 gate weights, `inverse[t·k + j]` the row of `ys` that token `t`'s `j`-th expert wrote and
//! `order` its inverse permutation. Each sum runs over `j` (or the hidden dimension) with fused
//! multiply-adds in f32 and is rounded once to the output's dtype. The CPU functions are the
//! reference: the CUDA kernels give the same bits (the weight gradient's dot products are
//! summed as 32 strided partial sums folded pairwise, the order of a warp reduction, on both).
//! A row index out of range is an error here and a zero row on CUDA (as [`crate::gather_rows`]).
//! Not differentiable: the model attaches the backward.

use candle_core::{DType, Tensor};

fn check(ys: &Tensor, w: &Tensor, idx: &Tensor) -> candle_core::Result<(usize, usize, usize)> {
    let (nk, h) = ys.dims2()?;
    let (n, k) = w.dims2()?;
    if n * k != nk || idx.dims1()? != nk {
        candle_core::bail!(
            "combine: {nk} expert rows and {} indices for {n} tokens × {k}",
            idx.dims1()?
        )
    }
    if w.dtype() != DType::F32 || idx.dtype() != DType::U32 {
        candle_core::bail!("combine: gate weights must be f32 and indices u32")
    }
    if !matches!(ys.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("combine: f32, bf16 or f16 rows, not {:?}", ys.dtype())
    }
    Ok((n, k, h))
}

fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn host_u32(t: &Tensor) -> candle_core::Result<Vec<u32>> {
    t.flatten_all()?.to_vec1::<u32>()
}

fn checked_rows(idx: &[u32], rows: usize) -> candle_core::Result<()> {
    if let Some(&i) = idx.iter().find(|&&i| i as usize >= rows) {
        candle_core::bail!("combine: row index {i} of {rows} rows")
    }
    Ok(())
}

/// `y[t, :] = Σ_j w[t, j]·ys[inverse[t·k + j], :]`, `(n, h)` in `ys`' dtype.
pub fn combine_rows_forward(
    ys: &Tensor,
    w: &Tensor,
    inverse: &Tensor,
) -> candle_core::Result<Tensor> {
    let (n, k, h) = check(ys, w, inverse)?;
    #[cfg(feature = "cuda")]
    if ys.device().is_cuda() {
        return cuda::launch(cuda::Kind::Forward, ys, w, inverse, (n, k, h));
    }
    let (yv, wv, inv) = (host_f32(ys)?, host_f32(w)?, host_u32(inverse)?);
    checked_rows(&inv, n * k)?;
    let mut out = vec![0f32; n * h];
    for t in 0..n {
        let o = &mut out[t * h..(t + 1) * h];
        for j in 0..k {
            let (wj, r) = (wv[t * k + j], inv[t * k + j] as usize * h);
            for (c, o) in o.iter_mut().enumerate() {
                *o = wj.mul_add(yv[r + c], *o);
            }
        }
    }
    Tensor::from_vec(out, (n, h), ys.device())?.to_dtype(ys.dtype())
}

/// The gradient of `ys`: `dys[p, :] = w[o]·g[o / k, :]` with `o = order[p]`, in `g`'s dtype.
pub fn combine_rows_backward_rows(
    g: &Tensor,
    w: &Tensor,
    order: &Tensor,
) -> candle_core::Result<Tensor> {
    let (n, k) = w.dims2()?;
    let (gn, h) = g.dims2()?;
    if gn != n {
        candle_core::bail!("combine: gradient of {gn} tokens for {n}")
    }
    if order.dims1()? != n * k || w.dtype() != DType::F32 || order.dtype() != DType::U32 {
        candle_core::bail!("combine: f32 gate weights and n·k u32 row indices expected")
    }
    if !matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("combine: f32, bf16 or f16 rows, not {:?}", g.dtype())
    }
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        return cuda::launch(cuda::Kind::Rows, g, w, order, (n, k, h));
    }
    let (gv, wv, ord) = (host_f32(g)?, host_f32(w)?, host_u32(order)?);
    checked_rows(&ord, n * k)?;
    let mut out = vec![0f32; n * k * h];
    for (p, o) in ord.iter().enumerate() {
        let o = *o as usize;
        let (wo, gr) = (wv[o], &gv[(o / k) * h..(o / k + 1) * h]);
        for (d, &gc) in out[p * h..(p + 1) * h].iter_mut().zip(gr) {
            *d = wo * gc;
        }
    }
    Tensor::from_vec(out, (n * k, h), g.device())?.to_dtype(g.dtype())
}

/// The gradient of `w`: `dw[t, j] = Σ_c g[t, c]·ys[inverse[t·k + j], c]`, f32 `(n, k)`.
pub fn combine_rows_backward_weights(
    g: &Tensor,
    ys: &Tensor,
    w: &Tensor,
    inverse: &Tensor,
) -> candle_core::Result<Tensor> {
    let (n, k, h) = check(ys, w, inverse)?;
    if g.dims2()? != (n, h) || g.dtype() != ys.dtype() {
        candle_core::bail!(
            "combine: gradient {:?} {:?} for output ({n}, {h}) {:?}",
            g.dims(),
            g.dtype(),
            ys.dtype()
        )
    }
    #[cfg(feature = "cuda")]
    if ys.device().is_cuda() {
        return cuda::weights(g, ys, inverse, (n, k, h));
    }
    let (gv, yv, inv) = (host_f32(g)?, host_f32(ys)?, host_u32(inverse)?);
    checked_rows(&inv, n * k)?;
    let dw: Vec<f32> = (0..n * k)
        .map(|o| {
            let (gr, yr) = (&gv[(o / k) * h..], &yv[inv[o] as usize * h..]);
            // 32 strided partial sums, folded as a warp's xor-shuffle reduction folds them.
            let mut lanes = [0f32; 32];
            for (l, acc) in lanes.iter_mut().enumerate() {
                let mut c = l;
                while c < h {
                    *acc = gr[c].mul_add(yr[c], *acc);
                    c += 32;
                }
            }
            let mut s = 16;
            while s > 0 {
                let prev = lanes;
                for (l, acc) in lanes.iter_mut().enumerate() {
                    *acc = prev[l] + prev[l ^ s];
                }
                s >>= 1;
            }
            lanes[0]
        })
        .collect();
    Tensor::from_vec(dw, (n, k), ys.device())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/combine.ptx"));
    const MODULE: &str = "moe_peft_kernels_combine";

    pub(super) enum Kind {
        Forward,
        Rows,
    }

    fn address(t: &Tensor) -> candle_core::Result<u64> {
        Ok(crate::device::device_address(t)?.addr())
    }

    fn suffix(d: DType) -> &'static str {
        match d {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "f32",
        }
    }

    /// Forward (`x` = ys, `idx` = inverse) or row gradients (`x` = g, `idx` = order). An
    /// index out of range reads as a zero row (the kernels check; the host does not read them).
    pub(super) fn launch(
        kind: Kind,
        x: &Tensor,
        w: &Tensor,
        idx: &Tensor,
        (n, k, h): (usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let candle_core::Device::Cuda(dev) = x.device() else {
            candle_core::bail!("combine: not CUDA")
        };
        let (x, w, idx) = (x.contiguous()?, w.contiguous()?, idx.contiguous()?);
        let (rows, name) = match kind {
            Kind::Forward => (n, "combine_fwd_"),
            Kind::Rows => (n * k, "combine_bwd_rows_"),
        };
        let out = crate::device::uninit_cuda((rows, h), x.dtype(), &x)?;
        if rows == 0 || h == 0 {
            return Ok(out);
        }
        let f =
            dev.get_or_load_custom_func(&format!("{name}{}", suffix(x.dtype())), MODULE, PTX)?;
        let (xa, wa, ia, oa) = (address(&x)?, address(&w)?, address(&idx)?, address(&out)?);
        let (rows64, k32, h32) = (rows as u64, k as u32, h as u32);
        let cfg = LaunchConfig {
            grid_dim: (rows.min(65535) as u32, 1, 1),
            block_dim: (h.next_power_of_two().clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = f.builder();
        b.arg(&xa)
            .arg(&wa)
            .arg(&ia)
            .arg(&oa)
            .arg(&rows64)
            .arg(&k32)
            .arg(&h32);
        // SAFETY: x holds (n·k or n, h) contiguous values, w n·k f32, idx n·k u32 (the kernels
        // skip those >= n·k), out (rows, h) of x's dtype; the signatures are in combine.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }

    pub(super) fn weights(
        g: &Tensor,
        ys: &Tensor,
        inverse: &Tensor,
        (n, k, h): (usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let candle_core::Device::Cuda(dev) = ys.device() else {
            candle_core::bail!("combine: not CUDA")
        };
        let (g, ys, inv) = (g.contiguous()?, ys.contiguous()?, inverse.contiguous()?);
        let out = crate::device::uninit_cuda((n, k), DType::F32, &ys)?;
        if n * k == 0 {
            return Ok(out);
        }
        let f = dev.get_or_load_custom_func(
            &format!("combine_bwd_weights_{}", suffix(ys.dtype())),
            MODULE,
            PTX,
        )?;
        let (ga, ya, ia, oa) = (address(&g)?, address(&ys)?, address(&inv)?, address(&out)?);
        let (nk, k32, h32) = ((n * k) as u64, k as u32, h as u32);
        let cfg = LaunchConfig {
            grid_dim: ((n * k).div_ceil(8).min(65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = f.builder();
        b.arg(&ga)
            .arg(&ya)
            .arg(&ia)
            .arg(&oa)
            .arg(&nk)
            .arg(&k32)
            .arg(&h32);
        // SAFETY: g (n, h) and ys (n·k, h) contiguous of one dtype, inverse n·k u32 (the kernel
        // skips those >= n·k), out n·k f32; the kernel signature is in combine.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The kernels' sums against the batched-product formula they replace.
    #[test]
    fn combine_and_gradients_match_the_batched_products() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, k, h) = (5, 3, 70);
        let ys = Tensor::randn(0f32, 1., (n * k, h), &dev)?;
        let w = candle_core::Tensor::rand(0f32, 1., (n, k), &dev)?;
        // A permutation: token t's slot j wrote row inverse[t·k + j].
        let inverse: Vec<u32> = (0..(n * k) as u32)
            .map(|i| (i * 7) % (n * k) as u32)
            .collect();
        let mut order = vec![0u32; n * k];
        for (o, &p) in inverse.iter().enumerate() {
            order[p as usize] = o as u32;
        }
        let (inv, ord) = (
            Tensor::new(inverse.as_slice(), &dev)?,
            Tensor::new(order.as_slice(), &dev)?,
        );
        let by_token = ys.index_select(&inv, 0)?.reshape((n, k, h))?;
        let want = w.unsqueeze(1)?.matmul(&by_token)?.squeeze(1)?;
        let got = combine_rows_forward(&ys, &w, &inv)?;
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward {diff}");
        let g = Tensor::randn(0f32, 1., (n, h), &dev)?;
        let dtok = w
            .unsqueeze(2)?
            .matmul(&g.unsqueeze(1)?)?
            .reshape((n * k, h))?;
        let want_rows = dtok.index_select(&ord, 0)?;
        let rows = combine_rows_backward_rows(&g, &w, &ord)?;
        assert_eq!(
            rows.flatten_all()?.to_vec1::<f32>()?,
            want_rows.flatten_all()?.to_vec1::<f32>()?,
            "row gradients are single products"
        );
        let want_w = g.unsqueeze(1)?.matmul(&by_token.t()?)?.squeeze(1)?;
        let dw = combine_rows_backward_weights(&g, &ys, &w, &inv)?;
        let diff = (dw - want_w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "weights {diff}");
        // bf16 rows: f32 sums rounded once.
        let yb = ys.to_dtype(DType::BF16)?;
        let got = combine_rows_forward(&yb, &w, &inv)?;
        let want = w
            .unsqueeze(1)?
            .matmul(
                &yb.to_dtype(DType::F32)?
                    .index_select(&inv, 0)?
                    .reshape((n, k, h))?,
            )?
            .squeeze(1)?;
        let diff = (got.to_dtype(DType::F32)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 2e-2, "bf16 forward {diff}");
        // Bad input is refused by name.
        let bad = Tensor::new(&[99u32; 15], &dev)?;
        assert!(combine_rows_forward(&ys, &w, &bad).is_err());
        assert!(combine_rows_forward(&ys, &w.to_dtype(DType::BF16)?, &inv).is_err());
        Ok(())
    }
}
