//! Differentiable building blocks that candle lacks or implements with a slow backward.

use candle_core::{DType, Tensor, D};

use moe_peft_kernels::autograd::{attach_backward, attach_backward2, attach_backward3};
use moe_peft_kernels::rows::gather_rows;

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
        // Per-row log Σ exp − picked logit in one kernel, in f32 from the logits' dtype.
        let logits = xc.matmul(&wt)?;
        total = (total + moe_peft_kernels::xent::cross_entropy_rows(&logits, &tc)?.sum_all()?)?;
        start += c;
    }
    let loss = (total / n as f64)?;
    let targets = targets.clone();
    let train_w = w.track_op();
    attach_backward2(x, w, loss, move |g| {
        let scale = (g.to_dtype(DType::F32)? / n as f64)?;
        let mut gx = Vec::new();
        let mut gw: Option<Tensor> = None;
        let mut start = 0;
        while start < n {
            let c = chunk.min(n - start);
            let xc = xd.narrow(0, start, c)?;
            let tc = targets.narrow(0, start, c)?;
            // Softmax (f32 inside, stored in the activation dtype); the scale is applied to
            // the (rows, hidden) products instead of the (rows, vocab) probabilities.
            let p = moe_peft_kernels::xent::softmax_rows(&xc.matmul(&wt)?)?.to_dtype(xd.dtype())?;
            let s = scale.to_dtype(xd.dtype())?;
            let rows = wd.index_select(&tc, 0)?;
            gx.push((p.matmul(&wd)? - rows)?.broadcast_mul(&s)?);
            if train_w {
                let part = p.t()?.matmul(&xc)?;
                let part = part.index_add(&tc, &xc.neg()?, 0)?.broadcast_mul(&s)?;
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
/// Backward: `grad_x[n] = Σ_j grad[inv_rows[n·k + j]]`: one gather and the sum over `j` as a
/// batched `(1×k)·(k×H)` product with ones (f32 accumulation), no scatter-add (candle's
/// index_add is ~40× slower than a gather on CUDA, and its reduction over a middle dimension
/// runs one tiny block per output element).
pub fn dispatch_rows(
    x: &Tensor,
    idx: &Tensor,
    inv_rows: &Tensor,
    k: usize,
) -> candle_core::Result<Tensor> {
    let y = gather_rows(&x.detach(), idx)?;
    let inv = inv_rows.clone();
    let (n, h) = x.dims2()?;
    attach_backward(x, y, move |g| {
        let gt = gather_rows(&g.contiguous()?, &inv)?.reshape((n, k, h))?;
        Tensor::ones((n, 1, k), g.dtype(), g.device())?
            .matmul(&gt)?
            .reshape((n, h))
    })
}

/// A scalar (f32 zero) whose backward gives `x` the gradient `g` (times the scalar's own
/// gradient): the seed of a backward through `x` when `g` comes from elsewhere, as in
/// gradient checkpointing. It stands for `Σ x ⊙ g` without computing it (a reduction of all
/// of `x` to one value runs as a single CUDA block in candle).
pub fn seed_gradient(x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    if x.dims() != g.dims() {
        candle_core::bail!("seed_gradient: gradient {:?} for {:?}", g.dims(), x.dims())
    }
    let g = g.to_dtype(x.dtype())?;
    let zero = Tensor::zeros((), DType::F32, x.device())?;
    attach_backward(x, zero, move |ds| g.broadcast_mul(&ds.to_dtype(g.dtype())?))
}

/// Row permutation `x[perm]` whose backward is the inverse permutation `grad[inv]`.
pub fn permute_rows(x: &Tensor, perm: &Tensor, inv: &Tensor) -> candle_core::Result<Tensor> {
    let y = gather_rows(&x.detach(), perm)?;
    let inv = inv.clone();
    attach_backward(x, y, move |g| gather_rows(&g.contiguous()?, &inv))
}

/// `softmax(qs·kᵀ + mask)` over the last dimension, f32-accumulated: [`attention_core`]'s and
/// [`causal_attention_core`]'s probabilities (forward and recomputed in backward).
fn attention_probs(qs: &Tensor, k: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let scores = qs.matmul(&k.t()?)?;
    // One pass reading the mask in place when it has the usual (1 or b, 1, sq, c) layout.
    let fits = |m: &Tensor| {
        let (sd, md) = (scores.dims(), m.dims());
        md.len() == 4
            && sd.len() == 4
            && md[1] == 1
            && md[2..] == sd[2..]
            && (md[0] == 1 || md[0] == sd[0])
    };
    match mask {
        Some(m) if fits(m) => moe_peft_kernels::softmax::masked_softmax(&scores, Some(m)),
        Some(m) => candle_nn::ops::softmax_last_dim(&scores.broadcast_add(m)?),
        None => candle_nn::ops::softmax_last_dim(&scores),
    }
}

/// `softmax(q·scale·kᵀ + mask)·v` over the last two dimensions (`q`, `k`, `v` of shape
/// `(…, seq, head_dim)`, `mask` broadcast to the scores and never differentiated), with the
/// probabilities recomputed in backward: the graph keeps the output only, not the two
/// `seq × seq` score tensors per head. `q·scale` is rounded to the activation dtype and the
/// softmax accumulates in f32 ([`moe_peft_kernels::softmax::masked_softmax`], reading the mask in
/// place; candle's fused softmax for other mask layouts).
pub fn attention_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach().contiguous()?);
    let y = attention_probs(&(&qd * scale)?, &kd, mask)?.matmul(&vd)?;
    let mask = mask.cloned();
    attach_backward3(q, k, v, y, move |gy| {
        let gy = gy.contiguous()?;
        let qs = (&qd * scale)?;
        let p = attention_probs(&qs, &kd, mask.as_ref())?;
        let dv = p.t()?.matmul(&gy)?;
        // Softmax backward dS = P ⊙ (dP − Σ dP ⊙ P) in one pass.
        let ds = moe_peft_kernels::softmax::softmax_backward(&p, &gy.matmul(&vd.t()?)?)?;
        drop(p);
        let dq = (ds.matmul(&kd)? * scale)?;
        let dk = ds.t()?.matmul(&qs)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// Whether [`causal_attention_core`] splits long sequences into query chunks (the default).
static CAUSAL_CHUNKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Let [`causal_attention_core`] split long sequences into query chunks (the default) or not (to
/// measure what the split saves).
pub fn set_causal_attention_chunks(on: bool) {
    CAUSAL_CHUNKS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The query chunk [`causal_attention_core`] uses for `seq` queries: a quarter of the sequence,
/// or the whole sequence below 2048 queries (no split). Measured on an H200 (BENCHMARKS.md):
/// four chunks make 4×4096 tokens 5 % faster and 6 GiB smaller, but 16×1024 5 % slower (the
/// smaller products and extra launches cost more than the skipped scores save).
pub fn causal_chunk(seq: usize) -> usize {
    if seq < 2048 || !CAUSAL_CHUNKS.load(std::sync::atomic::Ordering::Relaxed) {
        seq.max(1)
    } else {
        seq.div_ceil(4)
    }
}

/// [`attention_core`] for a causal `mask` (query `i` of `seq` never sees a key after position
/// `past + i`, `past = keys − seq`; true of the causal, padding and packed-segment masks this
/// crate builds): the queries are taken in chunks of [`causal_chunk`] and each chunk's scores
/// are computed against the keys it can see only. With four chunks that is 10/16 of the score
/// work and memory of the full square; the keys left out have probability exactly 0 (their
/// additive mask is the dtype's lowest value), so the output and the query gradient equal the
/// full computation up to summation order. Each chunk's key and value gradients are rounded to
/// the activation dtype, then summed over the chunks in f32 and rounded once more: in bf16 that
/// is up to one more rounding than the single product of the full square.
pub fn causal_attention_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let sq = q.dim(D::Minus2)?;
    causal_attention_core_chunked(q, k, v, mask, scale, causal_chunk(sq))
}

/// [`causal_attention_core`] with an explicit query chunk (the whole sequence: one chunk).
pub fn causal_attention_core_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    chunk: usize,
) -> candle_core::Result<Tensor> {
    let rank = q.rank();
    if rank != 4 || mask.rank() != 4 {
        candle_core::bail!("causal_attention_core: q and mask must be 4-D (b, heads, seq, d)")
    }
    let sq = q.dim(2)?;
    let skv = k.dim(2)?;
    if skv < sq || chunk == 0 {
        candle_core::bail!("causal_attention_core: {sq} queries, {skv} keys, chunk {chunk}")
    }
    if chunk >= sq {
        return attention_core(q, k, v, Some(mask), scale);
    }
    let past = skv - sq;
    let spans: Vec<(usize, usize, usize)> = (0..sq)
        .step_by(chunk)
        .map(|a| {
            let len = chunk.min(sq - a);
            (a, len, past + a + len)
        })
        .collect();
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach().contiguous()?);
    let mask = mask.detach();
    let parts = move |qd: &Tensor,
                      kd: &Tensor,
                      vd: &Tensor,
                      mask: &Tensor,
                      (a, len, kend): (usize, usize, usize)|
          -> candle_core::Result<(Tensor, Tensor, Tensor, Tensor)> {
        let qs = (qd.narrow(2, a, len)? * scale)?;
        let kc = kd.narrow(2, 0, kend)?;
        let vc = vd.narrow(2, 0, kend)?;
        let mc = mask.narrow(2, a, len)?.narrow(3, 0, kend)?.contiguous()?;
        Ok((qs, kc, vc, mc))
    };
    let mut ys = Vec::with_capacity(spans.len());
    for &span in &spans {
        let (qs, kc, vc, mc) = parts(&qd, &kd, &vd, &mask, span)?;
        ys.push(attention_probs(&qs, &kc, Some(&mc))?.matmul(&vc)?);
    }
    let y = Tensor::cat(&ys, 2)?;
    drop(ys);
    attach_backward3(q, k, v, y, move |gy| {
        let gy = gy.contiguous()?;
        let mut dqs = Vec::with_capacity(spans.len());
        let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
        // Last chunk first: it sees every key, so it starts the f32 sums at full length.
        for &span in spans.iter().rev() {
            let (a, len, kend) = span;
            let (qs, kc, vc, mc) = parts(&qd, &kd, &vd, &mask, span)?;
            let p = attention_probs(&qs, &kc, Some(&mc))?;
            let g = gy.narrow(2, a, len)?;
            let dvc = p.t()?.matmul(&g)?.to_dtype(DType::F32)?;
            let ds = moe_peft_kernels::softmax::softmax_backward(&p, &g.matmul(&vc.t()?)?)?;
            drop(p);
            dqs.push((ds.matmul(&kc)? * scale)?);
            let dkc = ds.t()?.matmul(&qs)?.to_dtype(DType::F32)?;
            let add = |acc: Option<Tensor>, c: Tensor| -> candle_core::Result<Tensor> {
                match acc {
                    None => Ok(c),
                    Some(acc) => {
                        let n = acc.dim(2)?;
                        acc + c.pad_with_zeros(2, 0, n - kend)?
                    }
                }
            };
            dk = Some(add(dk, dkc)?);
            dv = Some(add(dv, dvc)?);
        }
        dqs.reverse();
        let dq = Tensor::cat(&dqs, 2)?;
        let dt = qd.dtype();
        let dk = dk.map(|t| t.to_dtype(dt)).transpose()?;
        let dv = dv.map(|t| t.to_dtype(dt)).transpose()?;
        Ok((Some(dq), dk, dv))
    })
}

/// The MoE combine: `y[t] = Σ_j w[t, j]·ys[inverse[t·k + j]]` in f32, rounded to `ys`' dtype
/// (`ys`: expert outputs grouped by expert, `(n·k, H)`; `w`: f32 gate weights `(n, k)`;
/// `order` is the inverse permutation of `inverse`), as the reference multiplies the outputs
/// by the f32 weights and sums. Computed outside the graph by
/// [`moe_peft_kernels::combine`] (the rows read in place: no token-ordered or f32 copy of
/// `ys`) with the backward written out, so the graph keeps only the output.
pub fn combine_rows(
    ys: &Tensor,
    w: &Tensor,
    inverse: &Tensor,
    order: &Tensor,
) -> candle_core::Result<Tensor> {
    use moe_peft_kernels::combine::{
        combine_rows_backward_rows, combine_rows_backward_weights, combine_rows_forward,
    };
    let (ysd, wd) = (ys.detach(), w.detach());
    let y = combine_rows_forward(&ysd, &wd, inverse)?;
    let (inv, order) = (inverse.clone(), order.clone());
    attach_backward2(ys, w, y, move |gy| {
        let gy = gy.to_dtype(ysd.dtype())?;
        let dys = combine_rows_backward_rows(&gy, &wd, &order)?;
        let dw = combine_rows_backward_weights(&gy, &ysd, &wd, &inv)?;
        Ok((Some(dys), Some(dw)))
    })
}

static ROUTED_NODE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Let a MoE layer in training make dispatch, experts and combine one graph node
/// ([`routed_node`], the default, where the experts' implementation supports it) or three (to
/// measure the difference).
pub fn set_routed_node(on: bool) {
    ROUTED_NODE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_routed_node`] is on.
pub fn routed_node_enabled() -> bool {
    ROUTED_NODE.load(std::sync::atomic::Ordering::Relaxed)
}

/// The routed experts of a MoE layer as one graph node from the layer input `x` `(n, H)` and
/// the gate weights `w` `(n, k)` to the combined output `(n, H)`: `ys` are the expert outputs
/// of `x`'s dispatched rows, computed outside the graph, and `experts_backward` maps their
/// gradient to the rows' gradient. Backward: the combine's two gradients, the experts', then
/// the dispatch's (`dx[t] = Σ_j dxs[inverse[t·k + j]]`, the combine's sum with unit weights).
pub fn routed_node(
    x: &Tensor,
    w: &Tensor,
    ys: Tensor,
    experts_backward: crate::layers::ExpertsBackward,
    inverse: &Tensor,
    order: &Tensor,
) -> candle_core::Result<Tensor> {
    use moe_peft_kernels::combine::{
        combine_rows_backward_rows, combine_rows_backward_weights, combine_rows_forward,
    };
    let wd = w.detach();
    let y = combine_rows_forward(&ys, &wd, inverse)?;
    let (inv, order) = (inverse.clone(), order.clone());
    let dt = x.dtype();
    attach_backward2(x, w, y, move |gy| {
        let gy = gy.to_dtype(ys.dtype())?;
        let dw = combine_rows_backward_weights(&gy, &ys, &wd, &inv)?;
        let dys = combine_rows_backward_rows(&gy, &wd, &order)?;
        drop(gy);
        let dxs = experts_backward(&dys)?.to_dtype(dt)?;
        drop(dys);
        let ones = Tensor::ones(wd.dims(), DType::F32, wd.device())?;
        let dx = combine_rows_forward(&dxs, &ones, &inv)?;
        Ok((Some(dx), Some(dw)))
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
    fn combine_rows_equals_autograd_through_permute_and_matmul() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, k, h) = (3usize, 2usize, 4usize);
        let ys = Var::from_tensor(&Tensor::randn(0f32, 1., (n * k, h), &dev)?)?;
        let w = Var::from_tensor(&Tensor::rand(0f32, 1., (n, k), &dev)?)?;
        // Token-major slot p = t·k + j sits at row inverse[p] of the expert-grouped outputs.
        let inverse: Vec<u32> = vec![4, 0, 2, 5, 1, 3];
        let mut order = vec![0u32; n * k];
        for (p, &r) in inverse.iter().enumerate() {
            order[r as usize] = p as u32;
        }
        let inverse = Tensor::new(inverse.as_slice(), &dev)?;
        let order = Tensor::new(order.as_slice(), &dev)?;
        let probe = Tensor::randn(0f32, 1., (n, h), &dev)?;
        let y = combine_rows(ys.as_tensor(), w.as_tensor(), &inverse, &order)?;
        let g = (&y * &probe)?.sum_all()?.backward()?;
        let tok = permute_rows(ys.as_tensor(), &inverse, &order)?.reshape((n, k, h))?;
        let want = w.as_tensor().unsqueeze(1)?.matmul(&tok)?.squeeze(1)?;
        let max = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max(&y, &want)? < 1e-6);
        let r = (&want * &probe)?.sum_all()?.backward()?;
        for t in [ys.as_tensor(), w.as_tensor()] {
            assert!(max(g.get(t).unwrap(), r.get(t).unwrap())? < 1e-6);
        }
        Ok(())
    }

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
