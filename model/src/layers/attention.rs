//! Causal multi-head attention with RoPE: heads split and merged as one op each, the attention core in `crate::ops`.

use candle_core::Tensor;

use crate::arch::{Arch, QkNorm};
use crate::error::Result;
use crate::ops::{attention_core, causal_attention_core};
use moe_peft_kernels::rows::swap_dims12;

use super::{ForwardContext, LayerCache, Linear, RmsNorm};

/// Causal multi-head attention with grouped key/value heads, and the variants of the families:
/// projection biases, RMSNorm on queries and keys (per head or over the whole projection), and
/// a clamp of q, k and v.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Biases of the q, k, v and o projections (`….bias`), where the family has them.
    pub biases: [Option<Tensor>; 4],
    /// `q_norm` (Qwen3-MoE: per head; OLMoE: over the whole projection).
    pub q_norm: Option<RmsNorm>,
    /// `k_norm`.
    pub k_norm: Option<RmsNorm>,
    qk_norm: QkNorm,
    clip_qkv: Option<f64>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// The names of the q, k, v and o projections under `self_attn`.
pub const ATTENTION_PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

impl Attention {
    /// From its four projections; biases and q/k norms are set on the fields.
    pub fn new(arch: &Arch, q: Linear, k: Linear, v: Linear, o: Linear) -> Self {
        Self {
            q_proj: q,
            k_proj: k,
            v_proj: v,
            o_proj: o,
            biases: [None, None, None, None],
            q_norm: None,
            k_norm: None,
            qk_norm: arch.qk_norm,
            clip_qkv: arch.clip_qkv,
            heads: arch.num_attention_heads,
            kv_heads: arch.num_key_value_heads,
            head_dim: arch.head_dim,
        }
    }

    /// `proj(x) + bias`.
    fn project(&self, i: usize, x: &Tensor, train: bool) -> Result<Tensor> {
        let l = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj][i];
        let y = l.forward_t(x, train)?;
        Ok(match &self.biases[i] {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    /// The q/k norm of a projection output `(b, s, n·d)` (`n` heads).
    fn norm(&self, norm: &Option<RmsNorm>, y: Tensor, n: usize) -> Result<Tensor> {
        let Some(norm) = norm else {
            return Ok(y);
        };
        Ok(match self.qk_norm {
            QkNorm::None => y,
            QkNorm::Whole => norm.forward(&y)?,
            QkNorm::PerHead => {
                let (b, s, _) = y.dims3()?;
                norm.forward(&y.reshape((b, s, n, self.head_dim))?)?
                    .reshape((b, s, n * self.head_dim))?
            }
        })
    }

    fn clip(&self, y: Tensor) -> Result<Tensor> {
        Ok(match self.clip_qkv {
            Some(c) => y.clamp(-c, c)?,
            None => y,
        })
    }

    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let rep = self.heads / self.kv_heads;
        if rep == 1 {
            return Ok(x);
        }
        let (b, kv, t, d) = x.dims4()?;
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, kv, rep, t, d))?
            .reshape((b, kv * rep, t, d))?)
    }

    /// `x` of shape `(b, seq, hidden)`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &ForwardContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        x.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.norm(&self.q_norm, self.project(0, x, ctx.train)?, h)?;
        let k = self.norm(&self.k_norm, self.project(1, x, ctx.train)?, kvh)?;
        let v = self.project(2, x, ctx.train)?;
        let (q, k, v) = (self.clip(q)?, self.clip(k)?, self.clip(v)?);
        // (b, s, heads·d) → (b, heads, s, d), RoPE on q and k: one graph op each.
        let rope = Some((&ctx.cos, &ctx.sin));
        let q = split_heads(&q, h, d, rope)?;
        let k = split_heads(&k, kvh, d, rope)?;
        let v = split_heads(&v, kvh, d, None)?;
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        // Scores in the activation dtype, softmax with f32 accumulation in one fused kernel
        // (the reference upcasts to f32 and casts back; same result up to the scale's rounding).
        // The probabilities are recomputed in backward (see `attention_core`).
        // The masks of a forward context are causal: long sequences take query chunks that
        // skip the keys no query of the chunk may see (`causal_attention_core`), unless a row
        // starts with padding (see `ForwardContext::causal_chunks`).
        let scale = 1.0 / (d as f64).sqrt();
        let y = match ctx.mask.as_ref() {
            Some(m) if ctx.causal_chunks => causal_attention_core(&q, &k, &v, m, scale)?,
            Some(m) => attention_core(&q, &k, &v, Some(m), scale)?,
            None => attention_core(&q, &k, &v, None, scale)?,
        };
        self.project(3, &merge_heads(&y)?, ctx.train)
    }
}

/// `(b, s, heads·d)` → contiguous `(b, heads, s, d)`, rotated by `rope = (cos, sin)` if given,
/// as one op with a written-out backward (inverse rotation, then the transpose back): candle's
/// backward would add a zero-initialised gradient buffer per reshape, transpose and copy.
fn split_heads(
    x: &Tensor,
    heads: usize,
    d: usize,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    let split = |t: &Tensor| swap_dims12(&t.reshape((b, s, heads, d))?);
    let y = split(&x.detach())?;
    let y = match rope {
        Some((cos, sin)) => candle_nn::rotary_emb::rope(&y, cos, sin)?,
        None => y,
    };
    let inverse = match rope {
        Some((cos, sin)) => Some((cos.clone(), sin.neg()?)),
        None => None,
    };
    Ok(moe_peft_kernels::attach_backward(x, y, move |g| {
        let g = match &inverse {
            Some((cos, neg_sin)) => candle_nn::rotary_emb::rope(&g.contiguous()?, cos, neg_sin)?,
            None => g.clone(),
        };
        swap_dims12(&g)?.reshape((b, s, heads * d))
    })?)
}

/// `(b, heads, s, d)` → `(b, s, heads·d)` as one op (the inverse of [`split_heads`] without RoPE).
fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, heads, s, d) = y.dims4()?;
    let out = swap_dims12(&y.detach())?.reshape((b, s, heads * d))?;
    Ok(moe_peft_kernels::attach_backward(y, out, move |g| {
        swap_dims12(&g.reshape((b, s, heads, d))?)
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    use crate::layers::attention_mask;
    use crate::ops::softmax_f32;

    fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The head split (with RoPE) and merge ops against autograd through reshape, transpose,
    /// copy and `rotate_half` written as plain ops.

    #[test]
    fn head_split_and_merge_gradients_equal_autograd() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let (b, s, h, d) = (2, 5, 3, 4);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, s, h * d), &dev)?)?;
        let cos = Tensor::randn(0f32, 1., (s, d / 2), &dev)?;
        let sin = Tensor::randn(0f32, 1., (s, d / 2), &dev)?;
        let probe = Tensor::randn(0f32, 1., (b, s, h * d), &dev)?;
        // HF's `x·cos + rotate_half(x)·sin` with full-width tables, as plain ops.
        let (cf, sf) = (
            Tensor::cat(&[&cos, &cos], 1)?,
            Tensor::cat(&[&sin, &sin], 1)?,
        );
        let composed = |x: &Tensor| -> Result<Tensor> {
            let y = x.reshape((b, s, h, d))?.transpose(1, 2)?.contiguous()?;
            let (x1, x2) = (y.narrow(3, 0, d / 2)?, y.narrow(3, d / 2, d / 2)?);
            let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
            let y = (y.broadcast_mul(&cf)? + rot.broadcast_mul(&sf)?)?;
            Ok(y.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
        };
        let y = merge_heads(&split_heads(x.as_tensor(), h, d, Some((&cos, &sin)))?)?;
        let want = composed(x.as_tensor())?;
        assert!(max_diff(&y, &want)? < 1e-6);
        let g = (&y * &probe)?.sum_all()?.backward()?;
        let r = (&want * &probe)?.sum_all()?.backward()?;
        let d = max_diff(
            g.get(x.as_tensor()).expect("ops"),
            r.get(x.as_tensor()).expect("autograd"),
        )?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }

    /// Attention with recomputed probabilities against autograd through the composed ops.
    #[test]
    fn attention_core_gradients_equal_autograd() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let var =
            |s: (usize, usize, usize, usize)| Var::from_tensor(&Tensor::randn(0f32, 1., s, &dev)?);
        let (q, k, v) = (var((2, 3, 5, 4))?, var((2, 3, 5, 4))?, var((2, 3, 5, 4))?);
        let pad = Tensor::new(&[[1u32, 1, 1, 1, 0], [0, 1, 1, 1, 1]], &dev)?;
        let mask = attention_mask(Some(&pad), 2, 5, 0, DType::F32, &dev)?;
        let probe = Tensor::randn(0f32, 1., (2, 3, 5, 4), &dev)?;
        let y = attention_core(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            mask.as_ref(),
            0.5,
        )?;
        let g = (&y * &probe)?.sum_all()?.backward()?;
        let mut scores = (q.as_tensor() * 0.5)?.matmul(&k.as_tensor().t()?)?;
        if let Some(m) = &mask {
            scores = scores.broadcast_add(m)?;
        }
        let want = softmax_f32(&scores)?.matmul(v.as_tensor())?;
        assert!(max_diff(&y, &want)? < 1e-5);
        let r = (&want * &probe)?.sum_all()?.backward()?;
        for (what, t) in [
            ("q", q.as_tensor()),
            ("k", k.as_tensor()),
            ("v", v.as_tensor()),
        ] {
            let d = max_diff(g.get(t).expect("hand"), r.get(t).expect("autograd"))?;
            assert!(d < 1e-5, "{what}: {d}");
        }
        Ok(())
    }

    /// Query chunks that skip invisible keys equal the full square (values and the three
    /// gradients, f32), with right padding, packed segments and cached past positions; a row
    /// that starts with padding is flagged so that attention keeps the full square for it.
    #[test]
    fn causal_chunks_equal_the_full_square() -> Result<()> {
        use crate::ops::causal_attention_core_chunked;
        use candle_core::Var;
        let dev = Device::Cpu;
        let (b, h, sq, d) = (2, 3, 11, 4);
        let right = Tensor::new(
            &[
                [1u32, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            ],
            &dev,
        )?;
        let segments = Tensor::new(
            &[
                [1u32, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0],
                [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
            ],
            &dev,
        )?;
        let cases = [
            (
                "right padding, 3 cached positions",
                3,
                attention_mask(Some(&right), b, sq, 3, DType::F32, &dev)?.expect("mask"),
            ),
            (
                "packed segments",
                0,
                crate::layers::segment_attention_mask(&segments, DType::F32, &dev)?,
            ),
        ];
        for (what, past, mask) in cases {
            let var = |s: usize| Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, s, d), &dev)?);
            let (q, k, v) = (var(sq)?, var(past + sq)?, var(past + sq)?);
            let probe = Tensor::randn(0f32, 1., (b, h, sq, d), &dev)?;
            let full = attention_core(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                Some(&mask),
                0.5,
            )?;
            let gf = (&full * &probe)?.sum_all()?.backward()?;
            for chunk in [1, 3, 4, 10] {
                let y = causal_attention_core_chunked(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    &mask,
                    0.5,
                    chunk,
                )?;
                assert!(max_diff(&y, &full)? < 1e-6, "{what}, chunk {chunk}");
                let g = (&y * &probe)?.sum_all()?.backward()?;
                for (n, t) in [
                    ("q", q.as_tensor()),
                    ("k", k.as_tensor()),
                    ("v", v.as_tensor()),
                ] {
                    let e = max_diff(g.get(t).expect("chunked"), gf.get(t).expect("full"))?;
                    assert!(e < 1e-5, "{what}, chunk {chunk}, d{n}: {e}");
                }
            }
        }
        // A row starting with padding has a query that sees no key: flagged.
        assert!(crate::layers::every_query_sees_a_key(&right)?);
        let left = Tensor::new(&[[1u32, 1, 1], [0, 1, 1]], &dev)?;
        assert!(!crate::layers::every_query_sees_a_key(&left)?);
        Ok(())
    }
}
