//! What a forward pass shares across layers: RoPE tables and the additive attention mask (causal + padding, or per-segment for packed rows).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// What one forward pass shares across layers.
#[derive(Debug, Clone)]
pub struct ForwardContext {
    /// RoPE cosines `(seq, head_dim / 2)` in the activation dtype.
    pub cos: Tensor,
    /// RoPE sines `(seq, head_dim / 2)` in the activation dtype.
    pub sin: Tensor,
    /// Additive attention mask `(b, 1, seq, past+seq)` in the activation dtype (0 or that
    /// dtype's lowest finite value), or `None` when every query may see every key (one new
    /// token, no padding).
    pub mask: Option<Tensor>,
    /// Training mode (aux loss, adapter dropout).
    pub train: bool,
    /// Attention may take long sequences in causal query chunks
    /// ([`crate::ops::causal_attention_core`]): true unless some query sees no key at all (a
    /// row that starts with padding), where skipping keys would change that row's uniform
    /// softmax.
    pub causal_chunks: bool,
    /// Per-token weights of the Switch balancing loss `(b·seq)`: 1 for a real token, 0 for
    /// padding, on the host and as an f32 tensor (`None`: every token counts).
    pub token_weights: Option<(std::sync::Arc<Vec<f32>>, Tensor)>,
}

/// Whether no query of `attention_mask` `(b, past + seq)` is left without a visible key under
/// the causal + key-padding mask: true when every row's first position is a real token (right
/// padding, or none). Reads the first column to the host.
pub fn every_query_sees_a_key(attention_mask: &Tensor) -> Result<bool> {
    let first = attention_mask
        .narrow(1, 0, 1)?
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    Ok(first.iter().all(|&x| x != 0))
}

/// The additive mask of packed rows: `segments` `(b, seq)` numbers the examples of each row
/// (0 on padding), and a query sees a key when the key is not later and belongs to the same
/// example (padding sees earlier padding only). RoPE depends on positions only through their
/// differences, so an example keeps exactly the scores it would have at the start of its own
/// row.
pub fn segment_attention_mask(segments: &Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    let (b, seq) = segments.dims2()?;
    let q = Tensor::arange(0u32, seq as u32, device)?.reshape((seq, 1))?;
    let k = Tensor::arange(0u32, seq as u32, device)?.reshape((1, seq))?;
    let causal = k
        .broadcast_le(&q)?
        .unsqueeze(0)?
        .broadcast_as((b, seq, seq))?
        .to_dtype(DType::U8)?;
    let seg = segments.to_dtype(DType::U32)?;
    let same = seg
        .unsqueeze(2)?
        .broadcast_as((b, seq, seq))?
        .eq(&seg.unsqueeze(1)?.broadcast_as((b, seq, seq))?)?
        .to_dtype(DType::U8)?;
    let allowed = (causal * same)?;
    let lowest = match dtype {
        DType::F16 => -65504.0f32,
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN,
    };
    let zero = Tensor::zeros((b, seq, seq), DType::F32, device)?;
    let min = Tensor::full(lowest, (b, seq, seq), device)?;
    let mask = allowed
        .contiguous()?
        .where_cond(&zero, &min)?
        .unsqueeze(1)?;
    Ok(mask.to_dtype(dtype)?)
}

/// Builds the additive causal + key-padding mask in `dtype`: `0` or the dtype's lowest finite
/// value, as HF's eager path (`finfo.min`).
pub fn attention_mask(
    attention_mask: Option<&Tensor>,
    b: usize,
    seq: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let total = past + seq;
    if seq == 1 && attention_mask.is_none() {
        return Ok(None);
    }
    let q = Tensor::arange(past as u32, total as u32, device)?.reshape((seq, 1))?;
    let k = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
    let mut allowed = k
        .broadcast_le(&q)?
        .unsqueeze(0)?
        .broadcast_as((b, seq, total))?;
    if let Some(am) = attention_mask {
        let dims = am.dims();
        if dims != [b, total] {
            return Err(Error::InvalidInput(format!(
                "attention_mask has shape {dims:?}, expected [{b}, {total}]"
            )));
        }
        let keys = am
            .to_dtype(DType::U32)?
            .ne(0u32)?
            .unsqueeze(1)?
            .broadcast_as((b, seq, total))?;
        allowed = (allowed.to_dtype(DType::U8)? * keys.to_dtype(DType::U8)?)?;
    }
    let lowest = match dtype {
        DType::F16 => -65504.0f32,
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN,
    };
    let zero = Tensor::zeros((b, seq, total), DType::F32, device)?;
    let min = Tensor::full(lowest, (b, seq, total), device)?;
    let mask = allowed
        .contiguous()?
        .where_cond(&zero, &min)?
        .unsqueeze(1)?;
    Ok(Some(mask.to_dtype(dtype)?))
}
