//! Packed rows (several examples per row, attention kept inside each example) give every token
//! the logits it has when its example runs alone.

use anyhow::Result;
use candle_core::{Device, Tensor};
use moe_peft_model::{DeepSeekMoeConfig, LoadOptions, MoeModel};

fn packed_logits(m: &MoeModel, ids: &Tensor, segments: &Tensor) -> Result<Tensor> {
    let ctx = m.context_packed(segments, false)?;
    let mut h = m.embed(ids)?;
    for layer in &m.layers {
        h = layer.forward(&h, &ctx, None)?.hidden;
    }
    Ok(m.head(&h)?)
}

#[test]
fn packed_rows_equal_separate_sequences() -> Result<()> {
    let m = MoeModel::random(DeepSeekMoeConfig::tiny(96), &LoadOptions::default(), 4)?;
    let dev = Device::Cpu;
    let a: Vec<u32> = vec![1, 17, 33, 5, 60];
    let b: Vec<u32> = vec![2, 8, 90, 41, 7, 7, 12];
    let c: Vec<u32> = vec![3, 44, 45];
    // Row 0: a then b then two pads; row 1: c then pads.
    let pad = 0u32;
    let mut ids = Vec::new();
    let mut seg = Vec::new();
    ids.extend(&a);
    seg.extend(vec![1u32; a.len()]);
    ids.extend(&b);
    seg.extend(vec![2u32; b.len()]);
    ids.extend([pad, pad]);
    seg.extend([0, 0]);
    let width = ids.len();
    ids.extend(&c);
    seg.extend(vec![1u32; c.len()]);
    ids.extend(vec![pad; width - c.len()]);
    seg.extend(vec![0u32; width - c.len()]);
    let ids_t = Tensor::from_vec(ids, (2, width), &dev)?;
    let seg_t = Tensor::from_vec(seg, (2, width), &dev)?;
    let packed = packed_logits(&m, &ids_t, &seg_t)?;
    let alone = |x: &[u32]| -> Result<Tensor> {
        let t = Tensor::new(x, &dev)?.unsqueeze(0)?;
        Ok(m.forward_t(&t, None, false)?.logits.squeeze(0)?)
    };
    let mut worst = 0f32;
    for (row, start, x) in [(0, 0, &a), (0, a.len(), &b), (1, 0, &c)] {
        let got = packed.get(row)?.narrow(0, start, x.len())?;
        let want = alone(x)?;
        let d = (got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        worst = worst.max(d / scale);
    }
    // Only RoPE angles at other absolute positions differ (the same relative rotations).
    assert!(worst < 1e-5, "packed vs alone: relative max diff {worst}");
    // Without the segments (one causal mask over the whole row) b would see a: different.
    let ctx = m.context(2, width, 0, None, false)?;
    let mut h = m.embed(&ids_t)?;
    for layer in &m.layers {
        h = layer.forward(&h, &ctx, None)?.hidden;
    }
    let mixed = m.head(&h)?.get(0)?.narrow(0, a.len(), b.len())?;
    let d = (mixed - alone(&b)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(
        d > 1e-3,
        "the check above would notice cross-example attention ({d})"
    );
    Ok(())
}
