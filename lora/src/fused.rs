//! The routed experts of a MoE layer with their LoRA adapters (or, in full fine-tuning, their
//! trained weights), forward and backward written by hand across the experts of a layer.
//!
//! Through autograd, each expert's slice of the grouped input is a `narrow` of one tracked
//! tensor, and candle's backward of `narrow` allocates a zero tensor the size of the whole
//! input per expert (64 experts: 64 full-size buffers per layer). Here the experts run on
//! detached slices and one op attaches the hand-written input gradient to the grouped input
//! (in training, [`ExpertsForward::forward_detached`] hands that backward to the MoE layer instead,
//! which attaches one backward for dispatch, experts and combine together);
//! the LoRA gradients go to a gradient sink (straight into the trainer's flat gradient buffer,
//! or to [`crate::LoraModel::backward`], which returns them with candle's). Per projection `y = W x + s·B A drop(x)`:
//! `dx = Wᵀ dy + s·drop(Aᵀ (Bᵀ dy))`, `dB = s·dy (A drop(x))ᵀ`, `dA = s·(Bᵀ dy) drop(x)ᵀ`
//! (rows are tokens), and the gated MLP `down(act(gate x) ⊙ up x)` chains them. A trained
//! weight (full fine-tuning) gets `dW = dyᵀ x`, one grouped GEMM per projection type. The forward
//! keeps the two pre-activations and each adapter's `A drop(x)` for the backward (the dense
//! weights are dequantized again there, not kept).
//!
//! When every expert of the layer has an adapter of the same shape, scaling and dropout (the
//! usual case), each projection type runs across all experts as grouped GEMMs
//! ([`moe_peft_kernels::grouped_matmul`]: one cuBLAS call on CUDA) with one dropout launch
//! ([`moe_peft_kernels::segmented_dropout`]); otherwise expert by expert.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Tensor, TensorId};
use moe_peft_kernels::{grouped_matmul, grouped_matmul_add, grouped_matmul_tn};
use moe_peft_model::{Activation, ExpertsBackward, ExpertsForward, ExpertsOutput, Linear, Mlp};
use moe_peft_quant::matmul_t;

use moe_peft_kernels::cast_many;
use moe_peft_kernels::dropout::{
    hash_dropout as dropout, segmented_dropout, segmented_dropout_add,
};
use moe_peft_kernels::FlatGrads;

use crate::layer::{LoraLinear, TrainableLinear};

/// Gradients produced outside candle's graph, keyed by the variable's tensor id.
///
/// While a [`crate::LoraModel::backward`] call collects, every gradient is kept here (as f32)
/// for that call to hand out. Otherwise, with a [`FlatGrads`] attached (the trainer does), the
/// gradients of its variables are added there as they arrive. A gradient with neither is an
/// error: a plain `loss.backward()` cannot carry the routed experts' adapter gradients, and
/// must not lose them silently.
#[derive(Debug, Default)]
pub(crate) struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
    flat: RwLock<Option<Arc<FlatGrads>>>,
    collecting: AtomicUsize,
}

/// Keeps a [`GradSink`] collecting until dropped.
pub(crate) struct Collecting<'a>(&'a GradSink);

impl Drop for Collecting<'_> {
    fn drop(&mut self) {
        self.0.collecting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GradSink {
    /// Adds `g` to the gradient of `id`.
    pub(crate) fn add(&self, id: TensorId, g: Tensor) -> candle_core::Result<()> {
        if self.collecting.load(Ordering::SeqCst) == 0 {
            if let Ok(f) = self.flat.read() {
                if let Some(f) = f.as_ref().filter(|f| f.contains(id)) {
                    return f.add(id, &g);
                }
            }
            candle_core::bail!(
                "a routed expert's LoRA gradient has nowhere to go: the fused expert path \
                 computes these outside candle's graph, so call `LoraModel::backward(&loss)` \
                 (or train with `Trainer`) instead of `loss.backward()`"
            );
        }
        let g = g.to_dtype(DType::F32)?;
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

    /// Adds `g[i]` to the gradient of `ids[i]` for every `i` (`g` stacked along its first
    /// dimension): with a flat buffer holding them all, in one launch.
    pub(crate) fn add_stacked(&self, ids: &[TensorId], g: &Tensor) -> candle_core::Result<()> {
        if self.collecting.load(Ordering::SeqCst) == 0 {
            if let Ok(f) = self.flat.read() {
                if let Some(f) = f.as_ref().filter(|f| ids.iter().all(|&id| f.contains(id))) {
                    return f.add_stacked(ids, g);
                }
            }
        }
        for (i, &id) in ids.iter().enumerate() {
            self.add(id, g.get(i)?)?;
        }
        Ok(())
    }

    /// Keeps every gradient here until the guard drops (then [`Self::drain`] them).
    pub(crate) fn collect(&self) -> Collecting<'_> {
        self.collecting.fetch_add(1, Ordering::SeqCst);
        Collecting(self)
    }

    /// Sends the gradients of `flat`'s variables there from now on (`None`: nowhere).
    pub(crate) fn set_flat(&self, flat: Option<Arc<FlatGrads>>) {
        if let Ok(mut f) = self.flat.write() {
            *f = flat;
        }
    }

    /// Takes every gradient kept here out.
    pub(crate) fn drain(&self) -> HashMap<TensorId, Tensor> {
        self.grads
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }
}

/// One projection as the fused path sees it: a frozen base and maybe an adapter, or a trained
/// weight (full fine-tuning), whose gradient `dyᵀ x` goes to the sink.
#[derive(Clone)]
struct Proj {
    base: Linear,
    lora: Option<LoraParts>,
    trained: Option<candle_core::Var>,
}

#[derive(Clone)]
struct LoraParts {
    a: candle_core::Var,
    b: candle_core::Var,
    /// A and B in the activation dtype, cast once per layer call.
    a_c: Tensor,
    b_c: Tensor,
    scaling: f64,
    dropout: f32,
    key: u64,
}

impl Proj {
    /// The adapter of `slot` that this path would use (not merged), if any.
    fn adapter(slot: &Linear) -> Option<&LoraLinear> {
        slot.as_any()
            .downcast_ref::<LoraLinear>()
            .filter(|l| !l.is_merged())
    }

    /// `None` when the slot holds something this path does not know (a merged adapter, …).
    /// `casts` yields the adapter's A and B in the activation dtype, in the order of
    /// [`Self::adapter`] over the slots.
    fn of(
        slot: &Linear,
        train: bool,
        casts: &mut impl Iterator<Item = Tensor>,
    ) -> candle_core::Result<Option<Self>> {
        if let Some(l) = slot.as_any().downcast_ref::<LoraLinear>() {
            if l.is_merged() {
                return Ok(None);
            }
            let (Some(a_c), Some(b_c)) = (casts.next(), casts.next()) else {
                candle_core::bail!("fused experts: adapter casts out of step")
            };
            return Ok(Some(Self {
                base: l.base().clone(),
                trained: None,
                lora: Some(LoraParts {
                    a: l.lora_a().clone(),
                    b: l.lora_b().clone(),
                    a_c,
                    b_c,
                    scaling: l.scaling(),
                    dropout: if train { l.dropout_p() } else { 0.0 },
                    key: l.dropout_key(),
                }),
            }));
        }
        // A trained weight (full fine-tuning): its gradient is written out like an adapter's.
        if let Some(t) = slot.as_any().downcast_ref::<TrainableLinear>() {
            return Ok(Some(Self {
                base: slot.clone(),
                lora: None,
                trained: Some(t.var().clone()),
            }));
        }
        // A frozen base without adapter (dense, NF4 or int8): forward and dense_weight suffice.
        Ok(Some(Self {
            base: slot.clone(),
            lora: None,
            trained: None,
        }))
    }

    /// The base weight in `dtype`, outside the graph.
    fn weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match &self.trained {
            Some(v) => v.as_tensor().detach().to_dtype(dtype),
            None => self.base.dense_weight(dtype),
        }
    }

    fn drop_x(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.lora {
            Some(l) if l.dropout > 0.0 => dropout(x, l.dropout, l.key),
            _ => Ok(x.clone()),
        }
    }

    /// `W x + s·B A drop(x)` on a detached `x`; also returns `A drop(x)` for the backward.
    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let y = match &self.trained {
            Some(_) => matmul_t(x, &self.weight(x.dtype())?)?,
            None => self.base.forward_t(x, false)?,
        };
        let Some(l) = &self.lora else {
            return Ok((y, None));
        };
        let xa = matmul_t(&self.drop_x(x)?, &l.a_c)?;
        let t = (matmul_t(&xa, &l.b_c)? * l.scaling)?;
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
        let w = self.weight(dt)?;
        let mut dx = dy.matmul(&w)?;
        if let Some(v) = &self.trained {
            sink.add(v.as_tensor().id(), dy.t()?.matmul(x)?)?;
        }
        if let (Some(l), Some(xa)) = (&self.lora, xa) {
            let dyb = (dy.matmul(&l.b_c)? * l.scaling)?; // (rows, r) = s·dy B
            let db = (dy.t()?.matmul(xa)? * l.scaling)?; // (out, r)
            let da = dyb.t()?.matmul(&self.drop_x(x)?)?; // (r, in)
            sink.add(l.b.as_tensor().id(), db)?;
            sink.add(l.a.as_tensor().id(), da)?;
            let dxl = dyb.matmul(&l.a_c)?;
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

/// What the backward of one expert needs from its forward: the two pre-activations and the
/// adapters' `A drop(x)` (the GEMMs are not recomputed).
struct Saved {
    g: Tensor,
    u: Tensor,
    xa_g: Option<Tensor>,
    xa_u: Option<Tensor>,
    xa_d: Option<Tensor>,
}

/// The fused experts of one MoE layer (installed by [`crate::LoraModel`]).
#[derive(Debug)]
pub struct FusedLoraExperts {
    sink: Arc<GradSink>,
}

impl FusedLoraExperts {
    /// Sends adapter gradients to `sink`.
    pub(crate) fn new(sink: Arc<GradSink>) -> Self {
        Self { sink }
    }
}

fn expert_forward(e: &ExpertParts, x: &Tensor) -> candle_core::Result<(Tensor, Saved)> {
    let (g, xa_g) = e.gate.forward(x)?;
    let (u, xa_u) = e.up.forward(x)?;
    let a = (e.act.apply(&g).map_err(to_candle)? * &u)?;
    let (y, xa_d) = e.down.forward(&a)?;
    Ok((
        y,
        Saved {
            g,
            u,
            xa_g,
            xa_u,
            xa_d,
        },
    ))
}

fn expert_backward(
    e: &ExpertParts,
    x: &Tensor,
    s: &Saved,
    dy: &Tensor,
    sink: &GradSink,
) -> candle_core::Result<Tensor> {
    let h = e.act.apply(&s.g).map_err(to_candle)?;
    let a = (&h * &s.u)?;
    let da = e.down.backward(&a, s.xa_d.as_ref(), dy, sink)?;
    let du = (&da * &h)?;
    let dg = e.act.backward(&s.g, &(&da * &s.u)?).map_err(to_candle)?;
    let dx = e.gate.backward(x, s.xa_g.as_ref(), &dg, sink)?;
    dx + e.up.backward(x, s.xa_u.as_ref(), &du, sink)?
}

/// `act(g) ⊙ u` (one fused pass for SiLU).
fn gated(act: Activation, g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::Silu => moe_peft_kernels::swiglu::swiglu(g, u),
        act => act.apply(g).map_err(to_candle)? * u,
    }
}

/// `(dg, du)` of [`gated`] for the upstream gradient `da`.
fn gated_backward(
    act: Activation,
    g: &Tensor,
    u: &Tensor,
    da: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    match act {
        Activation::Silu => moe_peft_kernels::swiglu::swiglu_backward(g, u, da),
        act => {
            let h = act.apply(g).map_err(to_candle)?;
            let du = (da * &h)?;
            let dg = act.backward(g, &(da * u)?).map_err(to_candle)?;
            Ok((dg, du))
        }
    }
}

fn to_candle(e: moe_peft_model::Error) -> candle_core::Error {
    match e {
        moe_peft_model::Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// Whether the experts' 4-bit base weights are dequantized together (the default).
static BATCHED_DEQUANT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Dequantize the routed experts' 4-bit weights of a projection type together (one launch on
/// CUDA; the default) or one expert at a time (to measure what batching saves). The results
/// are the same bits either way.
pub fn set_batched_dequantization(on: bool) {
    BATCHED_DEQUANT.store(on, Ordering::Relaxed);
}

/// One projection type (gate, up or down) across the experts that received tokens, when
/// every one of them has an adapter of the same rank, scaling and dropout (or none has one):
/// the whole layer then runs as grouped GEMMs.
struct GroupProj {
    bases: Vec<Linear>,
    lora: Option<GroupLora>,
    /// Every expert's trained weight (full fine-tuning), or none.
    trained: Option<Vec<candle_core::Var>>,
}

struct GroupLora {
    a: Vec<candle_core::Var>,
    b: Vec<candle_core::Var>,
    a_c: Vec<Tensor>,
    b_c: Vec<Tensor>,
    scaling: f64,
    dropout: f32,
    keys: Vec<u64>,
}

impl GroupProj {
    fn of(projs: Vec<&Proj>) -> Option<Self> {
        let bases = projs.iter().map(|p| p.base.clone()).collect();
        let first = projs.first()?;
        let trained = match &first.trained {
            Some(_) => Some(
                projs
                    .iter()
                    .map(|p| p.trained.clone())
                    .collect::<Option<Vec<_>>>()?,
            ),
            None if projs.iter().any(|p| p.trained.is_some()) => return None,
            None => None,
        };
        let lora = match &first.lora {
            None => {
                if projs.iter().any(|p| p.lora.is_some()) {
                    return None;
                }
                None
            }
            Some(l0) => {
                let mut g = GroupLora {
                    a: vec![],
                    b: vec![],
                    a_c: vec![],
                    b_c: vec![],
                    scaling: l0.scaling,
                    dropout: l0.dropout,
                    keys: vec![],
                };
                for p in &projs {
                    let l = p.lora.as_ref()?;
                    if l.scaling != l0.scaling
                        || l.dropout != l0.dropout
                        || l.a.dims() != l0.a.dims()
                    {
                        return None;
                    }
                    g.a.push(l.a.clone());
                    g.b.push(l.b.clone());
                    g.a_c.push(l.a_c.clone());
                    g.b_c.push(l.b_c.clone());
                    g.keys.push(l.key);
                }
                Some(g)
            }
        };
        Some(Self {
            bases,
            lora,
            trained,
        })
    }

    /// Every expert's dense base weight in `dtype`. 4-bit bases of one format are dequantized
    /// together (one launch on CUDA) into one stacked tensor, returned as views of it.
    fn weights(&self, dtype: DType) -> candle_core::Result<Vec<Tensor>> {
        if let Some(vars) = &self.trained {
            return vars
                .iter()
                .map(|v| v.as_tensor().detach().to_dtype(dtype))
                .collect();
        }
        let four: Option<Vec<&moe_peft_quant::FourBitTensor>> = self
            .bases
            .iter()
            .map(|b| {
                b.as_any()
                    .downcast_ref::<moe_peft_quant::FourBitLinear>()
                    .map(|l| l.weight().as_ref())
            })
            .collect();
        match four {
            Some(ts) if ts.len() > 1 && BATCHED_DEQUANT.load(Ordering::Relaxed) => {
                let stacked = moe_peft_quant::FourBitTensor::dequantize_many(&ts, dtype)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                (0..ts.len()).map(|e| stacked.get(e)).collect()
            }
            _ => self.bases.iter().map(|b| b.dense_weight(dtype)).collect(),
        }
    }

    /// Per-expert dropout of consecutive row groups (the mask of each expert's own site).
    fn drop_x(&self, x: &Tensor, counts: &[usize]) -> candle_core::Result<Tensor> {
        match &self.lora {
            Some(l) if l.dropout > 0.0 => segmented_dropout(x, l.dropout, counts, &l.keys),
            _ => Ok(x.clone()),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        counts: &[usize],
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let w = self.weights(x.dtype())?;
        let y = grouped_matmul(x, &w.iter().collect::<Vec<_>>(), counts, true)?;
        drop(w);
        let Some(l) = &self.lora else {
            return Ok((y, None));
        };
        let xd = self.drop_x(x, counts)?;
        let xa = grouped_matmul(&xd, &l.a_c.iter().collect::<Vec<_>>(), counts, true)?;
        drop(xd);
        // y += s·(A drop(x))·Bᵀ inside the GEMM (no separate scale and add passes).
        let b: Vec<&Tensor> = l.b_c.iter().collect();
        let y = grouped_matmul_add(y, &xa, &b, counts, true, l.scaling)?;
        Ok((y, Some(xa)))
    }

    fn backward(
        &self,
        x: &Tensor,
        xa: Option<&Tensor>,
        dy: &Tensor,
        counts: &[usize],
        sink: &GradSink,
        acc: Option<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let w = self.weights(dy.dtype())?;
        let wr: Vec<&Tensor> = w.iter().collect();
        // The input gradient, added to `acc` (another projection's, of the same input) if given.
        let mut dx = match acc {
            Some(a) => grouped_matmul_add(a, dy, &wr, counts, false, 1.0)?,
            None => grouped_matmul(dy, &wr, counts, false)?,
        };
        drop(wr);
        drop(w);
        if let Some(vars) = &self.trained {
            // Every expert's weight gradient `dyᵀ x` in one grouped GEMM.
            let dw = grouped_matmul_tn(dy, x, counts)?;
            sink.add_stacked(&ids(vars), &dw)?;
        }
        if let (Some(l), Some(xa)) = (&self.lora, xa) {
            let dyb = (grouped_matmul(dy, &l.b_c.iter().collect::<Vec<_>>(), counts, false)?
                * l.scaling)?;
            // Each expert's gradient is a contiguous view of the stacked ones (the sink converts
            // them to the gradient buffer's dtype as it adds them).
            let db = (grouped_matmul_tn(dy, xa, counts)? * l.scaling)?;
            let da = grouped_matmul_tn(&dyb, &self.drop_x(x, counts)?, counts)?;
            sink.add_stacked(&ids(&l.b), &db)?;
            sink.add_stacked(&ids(&l.a), &da)?;
            let a: Vec<&Tensor> = l.a_c.iter().collect();
            if l.dropout > 0.0 {
                let dxl = grouped_matmul(&dyb, &a, counts, false)?;
                segmented_dropout_add(&dx, &dxl, l.dropout, counts, &l.keys)?;
            } else {
                dx = grouped_matmul_add(dx, &dyb, &a, counts, false, 1.0)?;
            }
        }
        Ok(dx)
    }
}

/// The tensor ids of `vars`, in order.
fn ids(vars: &[candle_core::Var]) -> Vec<TensorId> {
    vars.iter().map(|v| v.as_tensor().id()).collect()
}

/// Every routed expert of a layer as grouped GEMMs (see [`GroupProj`]).
struct Grouped {
    gate: GroupProj,
    up: GroupProj,
    down: GroupProj,
    act: Activation,
    /// Rows per expert, experts without tokens left out.
    counts: Vec<usize>,
}

impl Grouped {
    fn of(parts: &[Option<ExpertParts>], counts: &[usize]) -> Option<Self> {
        let active: Vec<&ExpertParts> = parts.iter().flatten().collect();
        let act = active.first()?.act;
        Some(Self {
            gate: GroupProj::of(active.iter().map(|e| &e.gate).collect())?,
            up: GroupProj::of(active.iter().map(|e| &e.up).collect())?,
            down: GroupProj::of(active.iter().map(|e| &e.down).collect())?,
            act,
            counts: counts.iter().copied().filter(|&c| c > 0).collect(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Saved)> {
        let (g, xa_g) = self.gate.forward(x, &self.counts)?;
        let (u, xa_u) = self.up.forward(x, &self.counts)?;
        let a = gated(self.act, &g, &u)?;
        let (y, xa_d) = self.down.forward(&a, &self.counts)?;
        Ok((
            y,
            Saved {
                g,
                u,
                xa_g,
                xa_u,
                xa_d,
            },
        ))
    }

    fn backward(
        &self,
        x: &Tensor,
        s: &Saved,
        dy: &Tensor,
        sink: &GradSink,
    ) -> candle_core::Result<Tensor> {
        let c = &self.counts;
        let a = gated(self.act, &s.g, &s.u)?;
        let da = self.down.backward(&a, s.xa_d.as_ref(), dy, c, sink, None)?;
        drop(a);
        let (dg, du) = gated_backward(self.act, &s.g, &s.u, &da)?;
        drop(da);
        let dx = self.gate.backward(x, s.xa_g.as_ref(), &dg, c, sink, None)?;
        self.up.backward(x, s.xa_u.as_ref(), &du, c, sink, Some(dx))
    }
}

impl FusedLoraExperts {
    /// The experts' outputs of `xs` (taken outside the graph) and, with `keep`, their backward
    /// from the outputs' gradient to the rows' gradient; `None` when this path declines the
    /// layer.
    fn run(
        &self,
        experts: &[Mlp],
        xs: &Tensor,
        counts: &[usize],
        train: bool,
        keep: bool,
    ) -> moe_peft_model::Result<Option<(Tensor, Option<ExpertsBackward>)>> {
        let dtype = xs.dtype();
        // Every adapter's A and B in the activation dtype, cast in one go.
        let mut mats = Vec::new();
        for (e, m) in experts.iter().enumerate() {
            if counts[e] == 0 {
                continue;
            }
            for slot in [&m.gate_proj, &m.up_proj, &m.down_proj] {
                if let Some(l) = Proj::adapter(slot) {
                    mats.push(moe_peft_model::grad::tracked(l.lora_a().as_tensor()));
                    mats.push(moe_peft_model::grad::tracked(l.lora_b().as_tensor()));
                }
            }
        }
        let mut casts = cast_many(&mats.iter().collect::<Vec<_>>(), dtype)?.into_iter();
        drop(mats);
        let mut parts = Vec::with_capacity(experts.len());
        for (e, m) in experts.iter().enumerate() {
            if counts[e] == 0 {
                parts.push(None);
                continue;
            }
            let (Some(gate), Some(up), Some(down)) = (
                Proj::of(&m.gate_proj, train, &mut casts)?,
                Proj::of(&m.up_proj, train, &mut casts)?,
                Proj::of(&m.down_proj, train, &mut casts)?,
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
        if let Some(grouped) = Grouped::of(&parts, counts) {
            let (ys, saved) = grouped.forward(&x)?;
            if !keep {
                return Ok(Some((ys, None)));
            }
            let sink = self.sink.clone();
            let backward: ExpertsBackward = Box::new(move |dy| {
                let dy = dy.to_dtype(x.dtype())?;
                grouped.backward(&x, &saved, &dy, &sink)
            });
            return Ok(Some((ys, Some(backward))));
        }
        let mut outs = Vec::with_capacity(experts.len());
        let mut saved = Vec::with_capacity(experts.len());
        let mut off = 0;
        for (e, p) in parts.iter().enumerate() {
            if let Some(p) = p {
                let (y, s) = expert_forward(p, &x.narrow(0, off, counts[e])?)?;
                outs.push(y);
                saved.push(keep.then_some(s));
                off += counts[e];
            } else {
                saved.push(None);
            }
        }
        let ys = Tensor::cat(&outs, 0)?;
        if !keep {
            return Ok(Some((ys, None)));
        }
        let counts = counts.to_vec();
        let sink = self.sink.clone();
        let backward: ExpertsBackward = Box::new(move |dy| {
            let dy = dy.to_dtype(x.dtype())?;
            let mut dxs = Vec::with_capacity(parts.len());
            let mut off = 0;
            for (e, p) in parts.iter().enumerate() {
                if let (Some(p), Some(s)) = (p, &saved[e]) {
                    let c = counts[e];
                    dxs.push(expert_backward(
                        p,
                        &x.narrow(0, off, c)?,
                        s,
                        &dy.narrow(0, off, c)?,
                        &sink,
                    )?);
                    off += c;
                }
            }
            Tensor::cat(&dxs, 0)
        });
        Ok(Some((ys, Some(backward))))
    }
}

impl ExpertsForward for FusedLoraExperts {
    fn forward(
        &self,
        experts: &[Mlp],
        xs: &Tensor,
        counts: &[usize],
        train: bool,
    ) -> moe_peft_model::Result<ExpertsOutput> {
        let keep = train && xs.track_op();
        Ok(match self.run(experts, xs, counts, train, keep)? {
            None => ExpertsOutput::Declined,
            Some((ys, None)) => ExpertsOutput::Computed(ys),
            Some((ys, Some(backward))) => {
                ExpertsOutput::Computed(moe_peft_kernels::attach_backward(xs, ys, backward)?)
            }
        })
    }

    fn forward_detached(
        &self,
        experts: &[Mlp],
        xs: &Tensor,
        counts: &[usize],
    ) -> moe_peft_model::Result<Option<(Tensor, ExpertsBackward)>> {
        Ok(match self.run(experts, xs, counts, true, true)? {
            Some((ys, Some(backward))) => Some((ys, backward)),
            _ => None,
        })
    }
}
