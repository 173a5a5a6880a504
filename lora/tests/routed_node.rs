//! The MoE layer's routed block as one graph node (dispatch, fused experts and combine with
//! one written-out backward, the default in training) against the same fused experts as
//! three nodes and against plain autograd through the per-expert loop: the same loss and
//! gradients, with dropout and with and without gradient checkpointing. In a test binary of
//! its own: the switch is global to the process.

mod common;

use anyhow::Result;
use candle_core::Device;
use moe_peft_lora::{LoraConfig, LoraModel, TrainConfig, Trainer};

fn gradients(
    routed_node: bool,
    fused: bool,
    ckpt: bool,
) -> Result<(f64, Vec<Option<candle_core::Tensor>>, Vec<String>)> {
    moe_peft_model::ops::set_routed_node(routed_node);
    let cfg = TrainConfig {
        gradient_checkpointing: ckpt,
        max_steps: 1,
        ..Default::default()
    };
    let lcfg = LoraConfig {
        modules_to_save: Some(vec!["lm_head".into()]),
        ..common::deepseek_lora(8, 16.0, 0.3)
    };
    let mut lm = LoraModel::new(common::tiny_base()?, lcfg, 11)?;
    // Non-zero B so that every path of the adapters' backward matters.
    for (k, (_, l)) in lm.adapters().iter().enumerate() {
        let b = l.lora_b();
        let v: Vec<f32> = (0..b.elem_count())
            .map(|i| (((i * 7919 + k * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        b.set(&candle_core::Tensor::from_vec(v, b.shape(), &Device::Cpu)?)?;
    }
    lm.set_fused_experts(fused);
    let t = Trainer::new(lm, cfg)?;
    let b = common::counting_rows(3, 12, 3, &|row, t| row == 1 && t >= 10)?;
    let mg = t.micro_gradients(&b, 0.5)?;
    let names = t.vars().iter().map(|(n, _)| n.clone()).collect();
    moe_peft_model::ops::set_routed_node(true);
    Ok((mg.loss, mg.grads, names))
}

#[test]
fn one_routed_node_equals_three_nodes_and_autograd() -> Result<()> {
    for ckpt in [true, false] {
        let one = gradients(true, true, ckpt)?;
        for (what, other) in [
            ("three nodes", gradients(false, true, ckpt)?),
            ("autograd per expert", gradients(true, false, ckpt)?),
        ] {
            assert!(
                (one.0 - other.0).abs() <= 1e-6 * other.0.abs(),
                "{what}: loss {} against {}",
                one.0,
                other.0
            );
            let mut compared = 0;
            for (i, name) in one.2.iter().enumerate() {
                match (one.1[i].as_ref(), other.1[i].as_ref()) {
                    (Some(a), Some(b)) => {
                        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                        let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
                        assert!(
                            d <= 1e-6 + 1e-5 * m,
                            "{what}, checkpointing {ckpt}: {name} differs by {d} (max {m})"
                        );
                        compared += 1;
                    }
                    (None, None) => {}
                    _ => panic!("{what}: {name} has a gradient in one path only"),
                }
            }
            assert!(compared > 100, "{what}: only {compared} gradients compared");
        }
    }
    Ok(())
}
