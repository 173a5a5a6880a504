//! Differentiable building blocks that candle lacks or implements with a slow backward.

use candle_core::{DType, Tensor, D};

pub use moe_peft_quant::autograd::{with_grad, with_grad2};

/// Mean cross-entropy of `x · Wᵀ` against `targets`, computed `chunk` rows at a time so the
/// `(rows, vocab)` logits are never held whole, in forward or backward.
///
/// `x` is `(n, hidden)` (only the rows that have a target), `w` is `(vocab, hidden)`; logits are
/// computed in the dtype of `x` and taken to f32, as the reference's `logits.float()`. The
/// backward recomputes each chunk: `∂/∂x = (softmax − onehot)·W = softmax·W − W[t]`, and, when
/// `w` is trained, `∂/∂W = softmaxᵀ·x − Σ onehotᵀ·x`. Returns the mean over the `n` rows.
pub fn chunked_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> candle_core::Result<Tensor> {
    let (n, _) = x.dims2()?;
    let chunk = chunk.max(1);
    let xd = x.detach();
    let wd = w.detach();
    let wt = wd.t()?;
    let mut total = Tensor::zeros((), DType::F32, x.device())?;
    let mut start = 0;
    while start < n {
        let c = chunk.min(n - start);
        let xc = xd.narrow(0, start, c)?;
        let tc = targets.narrow(0, start, c)?;
        let logits = xc.matmul(&wt)?.to_dtype(DType::F32)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let lse = (logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let picked = logits.gather(&tc.unsqueeze(1)?, 1)?;
        total = (total + (lse - picked)?.sum_all()?)?;
        start += c;
    }
    let loss = (total / n as f64)?;
    let targets = targets.clone();
    let train_w = w.track_op();
    with_grad2(x, w, loss, move |g| {
        let scale = (g.to_dtype(DType::F32)? / n as f64)?;
        let mut gx = Vec::new();
        let mut gw: Option<Tensor> = None;
        let mut start = 0;
        while start < n {
            let c = chunk.min(n - start);
            let xc = xd.narrow(0, start, c)?;
            let tc = targets.narrow(0, start, c)?;
            let logits = xc.matmul(&wt)?.to_dtype(DType::F32)?;
            let p = softmax_f32(&logits)?
                .broadcast_mul(&scale)?
                .to_dtype(xd.dtype())?;
            let rows = wd
                .index_select(&tc, 0)?
                .broadcast_mul(&scale.to_dtype(xd.dtype())?)?;
            gx.push((p.matmul(&wd)? - rows)?);
            if train_w {
                let s = scale.to_dtype(xd.dtype())?;
                let part = p.t()?.matmul(&xc)?;
                let part = part.index_add(&tc, &xc.broadcast_mul(&s)?.neg()?, 0)?;
                gw = Some(match gw {
                    Some(a) => (a + part)?,
                    None => part,
                });
            }
            start += c;
        }
        let gx = Tensor::cat(&gx, 0)?;
        Ok((Some(gx), gw))
    })
}

/// Row gather `x[idx]` for a permutation-with-repeats whose backward is also a gather:
/// `idx[p] = p_src`, and `inv_rows[n]` lists, `k` per source row, the positions `p` that read
/// row `n` (so every source row is read exactly `k` times, as in top-k expert dispatch).
/// Backward: `grad_x[n] = Σ_j grad[inv_rows[n·k + j]]`: one gather and a reshape-sum, no
/// scatter-add (candle's index_add is ~40× slower than a gather on CUDA).
pub fn dispatch_rows(
    x: &Tensor,
    idx: &Tensor,
    inv_rows: &Tensor,
    k: usize,
) -> candle_core::Result<Tensor> {
    let y = x.detach().index_select(idx, 0)?;
    let inv = inv_rows.clone();
    let (n, h) = x.dims2()?;
    with_grad(x, y, move |g| {
        g.index_select(&inv, 0)?.reshape((n, k, h))?.sum(1)
    })
}

/// Row permutation `x[perm]` whose backward is the inverse permutation `grad[inv]`.
pub fn permute_rows(x: &Tensor, perm: &Tensor, inv: &Tensor) -> candle_core::Result<Tensor> {
    let y = x.detach().index_select(perm, 0)?;
    let inv = inv.clone();
    with_grad(x, y, move |g| g.index_select(&inv, 0))
}

/// Softmax over the last dimension with candle's fused kernel (f32 accumulation for every
/// dtype) and a hand-written backward `dx = y ⊙ (dy − Σ dy ⊙ y)`: one pass forward and four
/// in backward, instead of the dozen of a softmax composed of elementary ops.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    masked_softmax_last_dim(x, None)
}

/// [`softmax_last_dim`] of `x + mask` (`mask` broadcast to `x`, never differentiated): the
/// mask is added outside the graph, so backward does not reduce a gradient for it.
pub fn masked_softmax_last_dim(x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let xm = match mask {
        Some(m) => x.detach().broadcast_add(m)?,
        None => x.detach().contiguous()?,
    };
    let y = candle_nn::ops::softmax_last_dim(&xm)?;
    drop(xm);
    let yc = y.clone();
    with_grad(x, y, move |g| {
        let gy = (g * &yc)?;
        let s = gy.sum_keepdim(D::Minus1)?;
        gy - yc.broadcast_mul(&s)?
    })
}

/// Differentiable softmax over the last dimension, computed in f32.
pub fn softmax_f32(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Differentiable log-softmax over the last dimension, computed in f32.
pub fn log_softmax_f32(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let d = x.broadcast_sub(&max)?;
    let lse = d.exp()?.sum_keepdim(D::Minus1)?.log()?;
    d.broadcast_sub(&lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn dispatch_rows_backward_is_segment_sum() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4), &dev)?)?;
        // k = 2 copies of every row, in a scrambled order.
        let src: Vec<u32> = vec![2, 0, 1, 0, 2, 1];
        let mut inv = vec![0u32; 6];
        let mut seen = [0usize; 3];
        for (p, &s) in src.iter().enumerate() {
            inv[s as usize * 2 + seen[s as usize]] = p as u32;
            seen[s as usize] += 1;
        }
        let idx = Tensor::new(src.as_slice(), &dev)?;
        let inv = Tensor::new(inv.as_slice(), &dev)?;
        let y = dispatch_rows(x.as_tensor(), &idx, &inv, 2)?;
        let reference = x.as_tensor().index_select(&idx, 0)?;
        assert_eq!(y.to_vec2::<f32>()?, reference.to_vec2::<f32>()?);
        let w = Tensor::randn(0f32, 1., (6, 4), &dev)?;
        let g1 = (&y * &w)?.sum_all()?.backward()?;
        let g2 = (&reference * &w)?.sum_all()?.backward()?;
        let a = g1.get(x.as_tensor()).unwrap();
        let b = g2.get(x.as_tensor()).unwrap();
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
}
