//! Gradients reach every kind of site: with all base weights frozen, one trainable matrix
//! injected at attention projections, the dense MLP, a shared expert and a routed expert, and
//! a router made trainable, one backward gives each a finite, non-zero gradient (the guard
//! against ops that silently record no backward), and each gradient matches central finite
//! differences.

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use moe_peft_model::{causal_lm_loss, LinearLike, LoadOptions, MoeModel};

/// `base(x) + x·Vᵀ` with a trainable `V`.
#[derive(Debug)]
struct Probe {
    base: Arc<dyn LinearLike>,
    v: Var,
}

impl ModuleT for Probe {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.base.forward_t(x, train)?;
        y + x.broadcast_matmul(&self.v.as_tensor().t()?)?
    }
}

impl LinearLike for Probe {
    fn in_features(&self) -> usize {
        self.base.in_features()
    }
    fn out_features(&self) -> usize {
        self.base.out_features()
    }
    fn dense_weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.base.dense_weight(dtype)? + self.v.as_tensor().to_dtype(dtype)?
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn objective(model: &MoeModel, ids: &Tensor, mask: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let out = model.forward_t(ids, Some(mask), true)?;
    let mut obj = causal_lm_loss(&out.logits, labels)?.loss;
    for aux in &out.aux_losses {
        obj = (obj + aux)?;
    }
    Ok(obj)
}

#[test]
fn every_layer_gets_a_gradient_that_matches_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let r = candle_core::safetensors::load(fixtures().join("forward.safetensors"), &dev)?;
    let ids = r["input_ids"].to_dtype(DType::U32)?;
    let mask = r["attention_mask"].to_dtype(DType::U32)?;
    let labels = r["labels"].clone();
    let mut model = MoeModel::from_pretrained(
        fixtures().join("tiny_deepseek_moe"),
        &LoadOptions::default(),
    )?;
    // One site per layer, covering attention, the dense MLP, a routed expert, shared experts.
    let targets = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.shared_experts.up_proj",
        "model.layers.2.mlp.experts.3.gate_proj",
        "model.layers.2.self_attn.o_proj",
    ];
    let mut vars: Vec<(String, Var)> = Vec::new();
    model.visit_sites_mut(&mut |name, slot| {
        if targets.contains(&name) {
            // Deterministic small values (a fixed LCG), so the check is the same every run.
            let (o, i) = (slot.out_features(), slot.in_features());
            let mut state = 0x2545_f491u32.wrapping_add(vars.len() as u32);
            let vals: Vec<f32> = (0..o * i)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.02
                })
                .collect();
            let v = Var::from_tensor(&Tensor::from_vec(vals, (o, i), &Device::Cpu)?)?;
            vars.push((name.to_string(), v.clone()));
            *slot = Arc::new(Probe {
                base: slot.clone(),
                v,
            });
        }
        Ok(())
    })?;
    assert_eq!(vars.len(), targets.len());
    // The router of layer 1: its weight becomes trainable too.
    {
        let moe_peft_model::MoeOrMlp::Moe(m) = &mut model.layers[1].mlp else {
            panic!("layer 1 is a MoE layer");
        };
        let v = Var::from_tensor(&m.gate.weight().to_dtype(DType::F32)?)?;
        m.gate.set_weight(v.as_tensor().clone());
        vars.push(("model.layers.1.mlp.gate (router)".into(), v));
    }
    let obj = objective(&model, &ids, &mask, &labels)?;
    let grads = obj.backward()?;
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
    // Central differences on every variable: attention (q, v, o), the dense MLP, a shared
    // expert, a routed expert and the router.
    let eps = 1e-3f32;
    for (name, v) in vars.iter() {
        let g: Vec<Vec<f32>> = grads.get(v.as_tensor()).unwrap().to_vec2()?;
        let base: Vec<Vec<f32>> = v.as_tensor().to_vec2()?;
        // The largest-gradient element, where the finite difference is well above f32 noise.
        let (mut bi, mut bj) = (0, 0);
        for i in 0..g.len() {
            for j in 0..g[0].len() {
                if g[i][j].abs() > g[bi][bj].abs() {
                    (bi, bj) = (i, j);
                }
            }
        }
        let eval = |delta: f32| -> Result<f32> {
            let mut m = base.clone();
            m[bi][bj] += delta;
            let flat: Vec<f32> = m.into_iter().flatten().collect();
            v.set(&Tensor::from_vec(flat, v.shape(), &Device::Cpu)?)?;
            Ok(objective(&model, &ids, &mask, &labels)?.to_scalar::<f32>()?)
        };
        let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
        eval(0.0)?;
        let an = g[bi][bj];
        assert!(
            (fd - an).abs() <= 2e-2 * an.abs() + 1e-4,
            "{name}[{bi},{bj}]: analytic {an} vs finite difference {fd}"
        );
    }
    Ok(())
}

#[test]
fn fused_chunked_loss_equals_logits_loss_in_value_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let r = candle_core::safetensors::load(fixtures().join("forward.safetensors"), &dev)?;
    let ids = r["input_ids"].to_dtype(DType::U32)?;
    let mask = r["attention_mask"].to_dtype(DType::U32)?;
    let labels = r["labels"].clone();
    let model = MoeModel::from_pretrained(
        fixtures().join("tiny_deepseek_moe"),
        &LoadOptions::default(),
    )?;
    let ctx = model.context(2, 16, 0, Some(&mask), false)?;
    let mut h = model.embed(&ids)?;
    for l in &model.layers {
        h = l.forward(&h, &ctx, None)?.hidden;
    }
    let hv = Var::from_tensor(&h)?;
    let a = model.lm_loss(hv.as_tensor(), &labels)?;
    let b = causal_lm_loss(&model.head(hv.as_tensor())?, &labels)?;
    assert_eq!(a.n_tokens, b.n_tokens);
    let (la, lb) = (a.loss.to_scalar::<f32>()?, b.loss.to_scalar::<f32>()?);
    assert!((la - lb).abs() < 1e-6, "{la} vs {lb}");
    let want = r["loss"].flatten_all()?.to_vec1::<f32>()?[0];
    assert!((la - want).abs() < 1e-5);
    let ga = a.loss.backward()?.get(hv.as_tensor()).unwrap().clone();
    let gb = b.loss.backward()?.get(hv.as_tensor()).unwrap().clone();
    let d = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d < 1e-7, "hidden-state gradients differ by {d}");
    // A trainable lm_head gets the same weight gradient too; chunk of 5 rows of 19.
    let w = Var::from_tensor(&model.lm_head.dense_weight(DType::F32)?)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (19, 64), &dev)?)?;
    let t = Tensor::from_vec(
        (0..19u32).map(|i| i * 7 % 512).collect::<Vec<_>>(),
        19,
        &dev,
    )?;
    let fused = moe_peft_model::ops::chunked_cross_entropy(x.as_tensor(), w.as_tensor(), &t, 5)?;
    let logits = x.as_tensor().matmul(&w.as_tensor().t()?)?;
    let logp = moe_peft_model::ops::log_softmax_f32(&logits)?;
    let plain = (logp.gather(&t.unsqueeze(1)?, 1)?.sum_all()?.neg()? / 19.0)?;
    let (gf, gp) = (fused.backward()?, plain.backward()?);
    for v in [&w, &x] {
        let d = (gf.get(v.as_tensor()).unwrap() - gp.get(v.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
    }
    Ok(())
}
