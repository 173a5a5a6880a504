//! The routed experts of a MoE layer with their LoRA adapters, forward and backward written by
//! hand across the experts of a layer.
//!
//! Through autograd, each expert's slice of the grouped input is a `narrow` of one tracked
//! tensor, and candle's backward of `narrow` allocates a zero tensor the size of the whole
//! input per expert (64 experts: 64 full-size buffers per layer). Here the experts run on
//! detached slices and one op attaches the hand-written input gradient to the grouped input;
//! the LoRA gradients go to a [`GradSink`] the trainer drains after each backward. Per
//! projection `y = W x + s·B A drop(x)`:
//! `dx = Wᵀ dy + s·drop(Aᵀ (Bᵀ dy))`, `dB = s·dy (A drop(x))ᵀ`, `dA = s·(Bᵀ dy) drop(x)ᵀ`
//! (rows are tokens), and the gated MLP `down(act(gate x) ⊙ up x)` chains them. Expert
//! activations are recomputed in backward rather than stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, TensorId};
use moe_peft_model::{Activation, ExpertsForward, Linear, Mlp};
use moe_peft_quant::matmul_t;

use crate::layer::{dropout, LoraLinear};

/// Gradients produced outside candle's graph, keyed by the variable's tensor id.
#[derive(Debug, Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl GradSink {
    /// Adds `g` to the gradient of `id`.
    pub fn add(&self, id: TensorId, g: Tensor) -> candle_core::Result<()> {
        let mut m = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient sink poisoned".into()))?;
        let v = match m.remove(&id) {
            Some(a) => (a + g)?,
            None => g,
        };
        m.insert(id, v);
        Ok(())
    }

    /// Takes every gradient out.
    pub fn drain(&self) -> HashMap<TensorId, Tensor> {
        self.grads
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }
}

/// One projection as the fused path sees it: a frozen base and maybe an adapter.
#[derive(Clone)]
struct Proj {
    base: Linear,
    lora: Option<LoraParts>,
}

#[derive(Clone)]
struct LoraParts {
    a: candle_core::Var,
    b: candle_core::Var,
    scaling: f64,
    dropout: f32,
    key: u64,
}

impl Proj {
    /// `None` when the slot holds something this path does not know (a merged adapter, …).
    fn of(slot: &Linear, train: bool) -> Option<Self> {
        if let Some(l) = slot.as_any().downcast_ref::<LoraLinear>() {
            if l.is_merged() {
                return None;
            }
            return Some(Self {
                base: l.base().clone(),
                lora: Some(LoraParts {
                    a: l.lora_a().clone(),
                    b: l.lora_b().clone(),
                    scaling: l.scaling(),
                    dropout: if train { l.dropout_p() } else { 0.0 },
                    key: l.dropout_key(),
                }),
            });
        }
        if slot.as_any().is::<LoraLinear>() {
            return None;
        }
        // A frozen base without adapter (dense, NF4 or int8): forward and dense_weight suffice.
        Some(Self {
            base: slot.clone(),
            lora: None,
        })
    }

    fn drop_x(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.lora {
            Some(l) if l.dropout > 0.0 => dropout(x, l.dropout, l.key),
            _ => Ok(x.clone()),
        }
    }

    /// `W x + s·B A drop(x)` on a detached `x`; also returns `A drop(x)` for the backward.
    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let y = self.base.forward_t(x, false)?;
        let Some(l) = &self.lora else {
            return Ok((y, None));
        };
        let dt = x.dtype();
        let a = l.a.as_tensor().detach().to_dtype(dt)?;
        let b = l.b.as_tensor().detach().to_dtype(dt)?;
        let xa = matmul_t(&self.drop_x(x)?, &a)?;
        let t = (matmul_t(&xa, &b)? * l.scaling)?;
        Ok(((y + t)?, Some(xa)))
    }

    /// Input gradient of `dy`; adds the adapter gradients to `sink`.
    fn backward(
        &self,
        x: &Tensor,
        xa: Option<&Tensor>,
        dy: &Tensor,
        sink: &GradSink,
    ) -> candle_core::Result<Tensor> {
        let dt = dy.dtype();
        let w = self.base.dense_weight(dt)?;
        let mut dx = dy.matmul(&w)?;
        if let (Some(l), Some(xa)) = (&self.lora, xa) {
            let a = l.a.as_tensor().detach().to_dtype(dt)?;
            let b = l.b.as_tensor().detach().to_dtype(dt)?;
            let dyb = (dy.matmul(&b)? * l.scaling)?; // (rows, r) = s·dy B
            let db = (dy.t()?.matmul(xa)? * l.scaling)?; // (out, r)
            let da = dyb.t()?.matmul(&self.drop_x(x)?)?; // (r, in)
            sink.add(l.b.as_tensor().id(), db.to_dtype(l.b.dtype())?)?;
            sink.add(l.a.as_tensor().id(), da.to_dtype(l.a.dtype())?)?;
            let dxl = dyb.matmul(&a)?;
            let dxl = match l.dropout > 0.0 {
                true => dropout(&dxl, l.dropout, l.key)?,
                false => dxl,
            };
            dx = (dx + dxl)?;
        }
        Ok(dx)
    }
}

/// An expert's three projections.
#[derive(Clone)]
struct ExpertParts {
    gate: Proj,
    up: Proj,
    down: Proj,
    act: Activation,
}

/// The fused experts of one MoE layer (installed by [`crate::LoraModel`]).
#[derive(Debug)]
pub struct FusedLoraExperts {
    sink: Arc<GradSink>,
}

impl FusedLoraExperts {
    /// Sends adapter gradients to `sink`.
    pub fn new(sink: Arc<GradSink>) -> Self {
        Self { sink }
    }
}

fn expert_forward(e: &ExpertParts, x: &Tensor) -> candle_core::Result<Tensor> {
    let (g, _) = e.gate.forward(x)?;
    let (u, _) = e.up.forward(x)?;
    let a = (e.act.apply(&g).map_err(to_candle)? * u)?;
    Ok(e.down.forward(&a)?.0)
}

fn expert_backward(
    e: &ExpertParts,
    x: &Tensor,
    dy: &Tensor,
    sink: &GradSink,
) -> candle_core::Result<Tensor> {
    let (g, ga) = e.gate.forward(x)?;
    let (u, ua) = e.up.forward(x)?;
    let h = e.act.apply(&g).map_err(to_candle)?;
    let a = (&h * &u)?;
    let (_, da_xa) = e.down.forward(&a)?;
    let da = e.down.backward(&a, da_xa.as_ref(), dy, sink)?;
    let du = (&da * &h)?;
    let dg = e.act.backward(&g, &(&da * &u)?).map_err(to_candle)?;
    let dx = e.gate.backward(x, ga.as_ref(), &dg, sink)?;
    dx + e.up.backward(x, ua.as_ref(), &du, sink)?
}

fn to_candle(e: moe_peft_model::Error) -> candle_core::Error {
    match e {
        moe_peft_model::Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

impl ExpertsForward for FusedLoraExperts {
    fn forward(
        &self,
        experts: &[Mlp],
        xs: &Tensor,
        counts: &[usize],
        train: bool,
    ) -> moe_peft_model::Result<Option<Tensor>> {
        let mut parts = Vec::with_capacity(experts.len());
        for (e, m) in experts.iter().enumerate() {
            if counts[e] == 0 {
                parts.push(None);
                continue;
            }
            let (Some(gate), Some(up), Some(down)) = (
                Proj::of(&m.gate_proj, train),
                Proj::of(&m.up_proj, train),
                Proj::of(&m.down_proj, train),
            ) else {
                return Ok(None);
            };
            parts.push(Some(ExpertParts {
                gate,
                up,
                down,
                act: m.activation(),
            }));
        }
        let x = xs.detach();
        let mut outs = Vec::with_capacity(experts.len());
        let mut off = 0;
        for (e, p) in parts.iter().enumerate() {
            if let Some(p) = p {
                outs.push(expert_forward(p, &x.narrow(0, off, counts[e])?)?);
                off += counts[e];
            }
        }
        let ys = Tensor::cat(&outs, 0)?;
        if !(train && xs.track_op()) {
            return Ok(Some(ys));
        }
        let counts = counts.to_vec();
        let sink = self.sink.clone();
        let y = moe_peft_model::ops::with_grad(xs, ys, move |dy| {
            let dy = dy.to_dtype(x.dtype())?;
            let mut dxs = Vec::with_capacity(parts.len());
            let mut off = 0;
            for (e, p) in parts.iter().enumerate() {
                if let Some(p) = p {
                    let c = counts[e];
                    dxs.push(expert_backward(
                        p,
                        &x.narrow(0, off, c)?,
                        &dy.narrow(0, off, c)?,
                        &sink,
                    )?);
                    off += c;
                }
            }
            Tensor::cat(&dxs, 0)
        })?;
        let _ = DType::F32;
        Ok(Some(y))
    }
}
