//! LoRA dropout has PEFT's semantics: `y = W x + s · B A drop(x)` with inverted dropout on the
//! input of A only (kept elements scaled by `1 / (1 - p)`, the base sees `x` untouched), none
//! in evaluation. Checked against a computation by hand in f64 with the mask rebuilt from its
//! documented formula: element `i` (row-major) is kept iff `u(key, i) >= p`, `u` the top 24
//! bits of `splitmix64(key ^ i · 0xD6E8FEB86659FD93)` over 2^24.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{Device, ModuleT, Tensor, Var};
use moe_peft_lora::{DropoutState, LoraLinear};
use moe_peft_quant::DenseLinear;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn kept(key: u64, i: usize, p: f32) -> bool {
    let u = (splitmix64(key ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 40) as f32
        / (1u64 << 24) as f32;
    u >= p
}

fn mat(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_vec2::<f32>()?
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect())
}

/// `a (n×k) · bᵀ (m×k)` → n×m.
fn mul_t(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    a.iter()
        .map(|r| {
            b.iter()
                .map(|c| r.iter().zip(c).map(|(x, y)| x * y).sum())
                .collect()
        })
        .collect()
}

fn transpose(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    (0..a[0].len())
        .map(|j| a.iter().map(|r| r[j]).collect())
        .collect()
}

fn assert_close(got: &Tensor, want: &[Vec<f64>], what: &str) -> Result<()> {
    let got = mat(got)?;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        for (j, (g, w)) in g.iter().zip(w).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}[{i},{j}]: {g} vs {w} by hand"
            );
        }
    }
    Ok(())
}

#[test]
fn lora_dropout_is_peft_dropout_on_the_input_of_a() -> Result<()> {
    let dev = Device::Cpu;
    let (rows, inf, outf, r) = (16usize, 64usize, 12usize, 4usize);
    let (p, s) = (0.25f32, 16.0 / 4.0);
    let w = Tensor::randn(0f32, 0.2, (outf, inf), &dev)?;
    let a = Var::from_tensor(&Tensor::randn(0f32, 0.2, (r, inf), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, (outf, r), &dev)?)?;
    let state = Arc::new(DropoutState::new(1234));
    let lora = LoraLinear::new(
        Arc::new(DenseLinear::new(w.clone())),
        a.clone(),
        b.clone(),
        s,
        p as f64,
        "model.layers.0.self_attn.q_proj",
        state.clone(),
    );
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, inf), &dev)?)?;
    let g = Tensor::randn(0f32, 1.0, (rows, outf), &dev)?;
    let (wm, am, bm, xm, gm) = (
        mat(&w)?,
        mat(a.as_tensor())?,
        mat(b.as_tensor())?,
        mat(x.as_tensor())?,
        mat(&g)?,
    );
    let s64 = s;
    let base = mul_t(&xm, &wm);

    for step in [0u64, 5] {
        state.set_step(step);
        let key = lora.dropout_key();
        // The mask and the dropped input, by hand.
        let scale = 1.0 / (1.0 - p as f64);
        let mask: Vec<Vec<f64>> = (0..rows)
            .map(|t| {
                (0..inf)
                    .map(|j| {
                        if kept(key, t * inf + j, p) {
                            scale
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let dropped_frac =
            mask.iter().flatten().filter(|&&m| m == 0.0).count() as f64 / (rows * inf) as f64;
        assert!(
            (dropped_frac - p as f64).abs() < 0.05,
            "dropped {dropped_frac}"
        );
        let xd: Vec<Vec<f64>> = xm
            .iter()
            .zip(&mask)
            .map(|(r, m)| r.iter().zip(m).map(|(x, m)| x * m).collect())
            .collect();
        let xa = mul_t(&xd, &am); // rows × r
        let delta = mul_t(&xa, &bm); // rows × out
        let want: Vec<Vec<f64>> = base
            .iter()
            .zip(&delta)
            .map(|(y, d)| y.iter().zip(d).map(|(y, d)| y + s64 * d).collect())
            .collect();
        let y = lora.forward_t(x.as_tensor(), true)?;
        assert_close(&y, &want, &format!("train output, step {step}"))?;

        // Gradients by hand: dB = s·gᵀ (A xd), dA = s·(g B)ᵀ xd, dx = g W + s·mask ⊙ ((g B) A).
        let grads = (&y * &g)?.sum_all()?.backward()?;
        let gb = mul_t(&gm, &transpose(&bm)); // rows × r  (g · B)
        let db: Vec<Vec<f64>> = mul_t(&transpose(&gm), &transpose(&xa))
            .into_iter()
            .map(|r| r.into_iter().map(|v| s64 * v).collect())
            .collect();
        let da: Vec<Vec<f64>> = mul_t(&transpose(&gb), &transpose(&xd))
            .into_iter()
            .map(|r| r.into_iter().map(|v| s64 * v).collect())
            .collect();
        let gba = mul_t(&gb, &transpose(&am)); // rows × in
        let gw = mul_t(&gm, &transpose(&wm));
        let dx: Vec<Vec<f64>> = (0..rows)
            .map(|t| {
                (0..inf)
                    .map(|j| gw[t][j] + s64 * mask[t][j] * gba[t][j])
                    .collect()
            })
            .collect();
        assert_close(grads.get(b.as_tensor()).expect("dB"), &db, "dB")?;
        assert_close(grads.get(a.as_tensor()).expect("dA"), &da, "dA")?;
        assert_close(grads.get(x.as_tensor()).expect("dx"), &dx, "dx")?;
    }
    // Evaluation: no dropout at all.
    let plain = mul_t(&mul_t(&xm, &am), &bm);
    let want: Vec<Vec<f64>> = base
        .iter()
        .zip(&plain)
        .map(|(y, d)| y.iter().zip(d).map(|(y, d)| y + s64 * d).collect())
        .collect();
    assert_close(&lora.forward_t(x.as_tensor(), false)?, &want, "eval output")?;
    Ok(())
}
