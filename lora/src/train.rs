//! The trainer: one optimizer step over `gradient_accumulation_steps` micro-batches, with
//! gradient checkpointing, clipping, schedules, non-finite detection and checkpoints that
//! resume exactly.
//!
//! Loss scaling follows the reference (HF Trainer + `modeling_deepseek.py`): each micro-batch's
//! mean cross-entropy is divided by the accumulation count, while every MoE layer's balancing
//! loss enters the gradient with weight 1 (its `AddAuxiliaryLoss` ignores the scaling). The
//! Switch balancing loss of Qwen-MoE, Mixtral and OLMoE (`coef · aux`, with
//! `output_router_logits`) likewise enters once per micro-batch, unscaled, as in transformers'
//! Trainer for these models (their forward takes `num_items_in_batch`, so the Trainer does not
//! divide their loss); the logged aux is the mean over the micro-batches.
//!
//! Gradient checkpointing: candle has none, so the forward runs layer by layer keeping only
//! each layer's (detached) input; the backward recomputes one layer at a time from a fresh
//! `Var` of its input, back-propagates `Σ out ⊙ g_out + aux`, and hands the input gradient to
//! the layer below. Memory holds one layer's graph at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adamw::{AdamW, AdamWConfig, Optim};
use crate::error::{Error, Result};
use crate::export::write_atomic;
use crate::inject::LoraModel;
use crate::schedule::Schedule;
use moe_peft_kernels::{Communicator, FlatGrads, SingleProcess};

/// `t · w`, or `t` itself when `w` is 1 (no extra op in the graph of a single process).
fn weighted(t: Tensor, w: f64) -> candle_core::Result<Tensor> {
    if w == 1.0 {
        Ok(t)
    } else {
        t * w
    }
}

/// Elements per gradient all-reduce of a data-parallel step (64 Mi: 256 MB in f32).
const BUCKET_ELEMS: usize = 64 << 20;
use moe_peft_model::RouterStats;

/// One micro-batch on the model's device.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// `(b, seq)` u32.
    pub input_ids: Tensor,
    /// `(b, seq)` u32, 1 for real tokens.
    pub attention_mask: Tensor,
    /// `(b, seq)` i64, -100 where ignored.
    pub labels: Tensor,
    /// Rows hold several examples: `attention_mask` numbers them 1, 2, … (0 on padding) and
    /// attention stays inside each (see `moe_peft_data::collate_packed`).
    pub packed: bool,
}

impl TrainBatch {
    /// From row-major host buffers.
    pub fn from_host(
        input_ids: &[u32],
        attention_mask: &[u32],
        labels: &[i64],
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> Result<Self> {
        let n = batch * seq;
        if input_ids.len() != n || attention_mask.len() != n || labels.len() != n {
            return Err(Error::InvalidTrainConfig(format!(
                "batch buffers must hold {batch}×{seq} values"
            )));
        }
        Ok(Self {
            input_ids: Tensor::from_slice(input_ids, (batch, seq), device)?,
            attention_mask: Tensor::from_slice(attention_mask, (batch, seq), device)?,
            labels: Tensor::from_slice(labels, (batch, seq), device)?,
            packed: false,
        })
    }

    /// Marks the rows as packed (several examples each, numbered in `attention_mask`).
    #[must_use]
    pub fn with_packing(mut self, packed: bool) -> Self {
        self.packed = packed;
        self
    }

    /// Real (unpadded) tokens.
    pub fn tokens(&self) -> Result<usize> {
        Ok(self
            .attention_mask
            .to_dtype(DType::U32)?
            .ne(0u32)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as usize)
    }

    /// Positions in the batch, padding included.
    pub fn padded_tokens(&self) -> usize {
        self.input_ids.elem_count()
    }
}

/// What the checkpointed forward keeps of one decoder layer for backward.
enum Saved {
    /// The layer's input: the layer is run again in backward.
    Input(Tensor),
    /// The input as a variable and the layer's output with its graph.
    Graph(Var, moe_peft_model::layers::LayerOutput),
}

/// Training hyper-parameters (transformers `TrainingArguments` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub max_grad_norm: f64,
    /// Schedule shape.
    pub lr_scheduler_type: Schedule,
    /// Warm-up steps (wins over `warmup_ratio` when > 0).
    pub warmup_steps: usize,
    /// Warm-up as a fraction of `max_steps`.
    pub warmup_ratio: f64,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`, the last this many decoder layers keep their activations
    /// instead of recomputing them in backward (selective recomputation: faster, more memory;
    /// 0 recomputes every layer). The gradients are the same bits either way.
    pub keep_activations_layers: usize,
    /// Total optimizer steps (the schedule's horizon).
    pub max_steps: usize,
    /// Seed of adapter initialization, dropout and data order.
    pub seed: u64,
    /// AdamW moments in bf16 (half the optimizer memory).
    pub bf16_moments: bool,
    /// Accumulate the gradients in bf16 instead of f32 (half their memory; each micro-batch's
    /// gradient is rounded to bf16 once).
    pub bf16_grads: bool,
    /// The optimizer (transformers' `optim`): `adamw_torch`, `adamw_8bit` or
    /// `paged_adamw_8bit`.
    pub optim: Optim,
    /// 8-bit optimizers: variables with fewer elements keep f32 moments (bitsandbytes'
    /// `min_8bit_size`).
    pub min_8bit_size: usize,
    /// Time the phases of each step (synchronizing the device between them).
    #[serde(skip)]
    pub profile: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 0.3,
            lr_scheduler_type: Schedule::Cosine,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: true,
            keep_activations_layers: 0,
            max_steps: 1,
            seed: 42,
            bf16_moments: false,
            bf16_grads: false,
            optim: Optim::AdamwTorch,
            min_8bit_size: moe_peft_kernels::adam8bit::MIN_8BIT_SIZE,
            profile: false,
        }
    }
}

impl TrainConfig {
    /// Checks the values; an error names the field
    /// ([`Error::InvalidTrainSetting`]).
    pub fn validate(&self) -> Result<()> {
        fn check(ok: bool, field: &'static str, value: f64, rule: &'static str) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidTrainSetting {
                    field,
                    value: format!("{value}"),
                    rule,
                })
            }
        }
        let lr = self.learning_rate;
        check(
            lr >= 0.0 && lr.is_finite(),
            "learning_rate",
            lr,
            "must be a finite number ≥ 0",
        )?;
        let wd = self.weight_decay;
        check(
            wd.is_finite(),
            "weight_decay",
            wd,
            "must be a finite number",
        )?;
        for (field, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            check((0.0..1.0).contains(&b), field, b, "must be in [0, 1)")?;
        }
        let eps = self.adam_epsilon;
        check(
            eps > 0.0 && eps.is_finite(),
            "adam_epsilon",
            eps,
            "must be > 0",
        )?;
        let mgn = self.max_grad_norm;
        check(
            mgn >= 0.0 && mgn.is_finite(),
            "max_grad_norm",
            mgn,
            "must be ≥ 0 (0: no clipping)",
        )?;
        let gas = self.gradient_accumulation_steps as f64;
        check(
            gas >= 1.0,
            "gradient_accumulation_steps",
            gas,
            "must be at least 1",
        )?;
        check(
            self.max_steps >= 1,
            "max_steps",
            self.max_steps as f64,
            "must be at least 1",
        )?;
        if self.optim.is_8bit() && self.bf16_moments {
            return Err(Error::InvalidTrainSetting {
                field: "optim",
                value: self.optim.name().into(),
                rule: "keeps 8-bit moments; bf16 moments are for adamw_torch",
            });
        }
        let wr = self.warmup_ratio;
        check(
            (0.0..=1.0).contains(&wr),
            "warmup_ratio",
            wr,
            "must be in [0, 1]",
        )?;
        Ok(())
    }

    /// Warm-up steps in effect.
    pub fn warmup(&self) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * self.max_steps as f64).ceil() as usize
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.learning_rate
            * self
                .lr_scheduler_type
                .factor(step, self.warmup(), self.max_steps)
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps done after this one (1 for the first).
    pub step: usize,
    /// Mean cross-entropy over the micro-batches (as HF logs `loss`).
    pub loss: f64,
    /// Sum over MoE layers of the balancing loss, mean over micro-batches.
    pub aux_loss: f64,
    /// Learning rate used for this update.
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (unpadded) input tokens processed.
    pub tokens: usize,
    /// Positions processed, padding included (`1 - tokens / padded_tokens` is the padding
    /// fraction).
    #[serde(default)]
    pub padded_tokens: usize,
    /// Target tokens (labels ≠ -100) counted in the loss.
    pub target_tokens: usize,
    /// Wall time of the step.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_second: f64,
    /// Seconds per phase, when [`TrainConfig::profile`] is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<PhaseTimes>,
}

/// Where a step's time went (device synchronized at each boundary).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Embedding and the layer-by-layer forward (no graph kept with checkpointing).
    pub forward: f64,
    /// Final norm, LM head and loss, forward and backward.
    pub head: f64,
    /// Recompute + backward of the decoder layers (the whole backward without checkpointing).
    pub backward: f64,
    /// Clipping and the AdamW update.
    pub optimizer: f64,
    /// Highest bytes allocated from the device's memory pool during each phase (forward, head,
    /// backward, optimizer), in MiB; zeros on the CPU.
    pub peak_mib: [f64; 4],
}

/// Gradients of one micro-batch.
#[derive(Debug)]
pub struct MicroGrads {
    /// Mean cross-entropy of the micro-batch.
    pub loss: f64,
    /// Sum of the layers' balancing losses.
    pub aux_loss: f64,
    /// Target tokens counted.
    pub target_tokens: usize,
    /// Gradient per trainable variable (order of [`Trainer::vars`]).
    pub grads: Vec<Option<Tensor>>,
}

/// On-disk state of a checkpoint besides adapter and optimizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    /// Micro-batches done (the dropout stream position).
    pub micro_step: u64,
    /// The training configuration.
    pub config: TrainConfig,
    /// Caller state (data position, epoch, …).
    pub extra: serde_json::Value,
}

/// File of [`TrainerState`] in a checkpoint.
pub const TRAINER_STATE: &str = "trainer_state.json";
/// File of the optimizer moments in a checkpoint.
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";

/// File of rank `rank`'s share of a sharded optimizer state in a checkpoint of a group of
/// `world`: `optimizer-00001-of-00002.safetensors`, numbered from 1 like model shards.
pub fn optimizer_shard_name(rank: usize, world: usize) -> String {
    format!("optimizer-{:05}-of-{world:05}.safetensors", rank + 1)
}

/// The optimizer state files of checkpoint `dir`: [`OPTIMIZER_STATE`], or else every rank's
/// shard.
pub fn optimizer_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let whole = dir.join(OPTIMIZER_STATE);
    if whole.exists() {
        return Ok(vec![whole]);
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("optimizer-") && n.ends_with(".safetensors"))
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(Error::Checkpoint {
            path: dir.display().to_string(),
            reason: format!("holds no {OPTIMIZER_STATE} and no optimizer shards"),
        });
    }
    // Exactly the shards of one group: optimizer-00001-of-0000N … optimizer-0000N-of-0000N.
    let world = shards
        .first()
        .and_then(|p| {
            p.file_name()?
                .to_str()?
                .split("-of-")
                .nth(1)?
                .split('.')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0usize);
    // (The count first: a stray name must not make a list of its claimed size.)
    let want: Vec<PathBuf> = if world == shards.len() {
        (0..world)
            .map(|r| dir.join(optimizer_shard_name(r, world)))
            .collect()
    } else {
        Vec::new()
    };
    if world == 0 || shards != want {
        let missing: Vec<String> = if world > 0 && world <= 1 << 16 {
            (0..world)
                .map(|r| dir.join(optimizer_shard_name(r, world)))
                .filter(|p| !shards.contains(p))
                .map(|p| p.display().to_string())
                .collect()
        } else {
            Vec::new()
        };
        return Err(Error::Checkpoint {
            path: dir.display().to_string(),
            reason: if missing.is_empty() {
                format!(
                    "its optimizer shards are not one group's set of {}",
                    optimizer_shard_name(0, world.max(1))
                )
            } else {
                format!("optimizer shard(s) missing: {}", missing.join(", "))
            },
        });
    }
    Ok(shards)
}

/// Trains a [`LoraModel`].
#[derive(Debug)]
pub struct Trainer {
    phases: std::cell::RefCell<PhaseTimes>,
    lora: LoraModel,
    cfg: TrainConfig,
    opt: AdamW,
    vars: Vec<(String, Var)>,
    grads: Arc<FlatGrads>,
    global_step: usize,
    micro_step: u64,
    comm: Arc<dyn Communicator>,
    /// The rank owning each variable's optimizer state, when it is sharded over the group.
    owners: Option<Vec<usize>>,
}

impl Trainer {
    /// A trainer with fresh optimizer state.
    pub fn new(lora: LoraModel, cfg: TrainConfig) -> Result<Self> {
        Self::new_in_group(lora, cfg, Arc::new(SingleProcess), false)
    }

    /// A trainer that is one rank of `comm`'s group from the start (see
    /// [`Self::set_communicator`]). With `shard_state` in a group of several, each rank holds
    /// the optimizer state of its share of the variables only
    /// ([`moe_peft_kernels::comm::owners`]: runs of consecutive variables, equal shares of
    /// elements; ZeRO stage 1): a step sums the gradients as before, each rank updates the
    /// variables it owns, and each variable is then broadcast from its owner, so that every
    /// rank holds the same weights, the ones a single process would compute. 8-bit optimizers
    /// only.
    pub fn new_in_group(
        lora: LoraModel,
        cfg: TrainConfig,
        comm: Arc<dyn Communicator>,
        shard_state: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let world = comm.world_size();
        if shard_state && world > 1 {
            // On every rank alike (a rank owning all variables would not notice).
            crate::adamw::require_8bit_for_sharding(cfg.optim)?;
        }
        let vars = lora.trainable_vars();
        let owners = (shard_state && world > 1).then(|| {
            let lens: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
            moe_peft_kernels::comm::owners(&lens, world)
        });
        let owned = match &owners {
            Some(o) => o.iter().map(|&r| r == comm.rank()).collect(),
            None => vec![true; vars.len()],
        };
        let opt = AdamW::new_sharded(
            vars.clone(),
            AdamWConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
                bf16_moments: cfg.bf16_moments,
                optim: cfg.optim,
                seed: cfg.seed,
                min_8bit_size: cfg.min_8bit_size,
            },
            owned,
        )?;
        let grads = Arc::new(FlatGrads::new(
            &vars,
            if cfg.bf16_grads {
                DType::BF16
            } else {
                DType::F32
            },
        )?);
        lora.grad_sink().set_flat(Some(grads.clone()));
        Ok(Self {
            phases: Default::default(),
            lora,
            cfg,
            opt,
            grads,
            vars,
            global_step: 0,
            micro_step: 0,
            comm,
            owners,
        })
    }

    /// Whether the optimizer state is sharded over the group (each rank holds its share).
    pub fn shards_optimizer_state(&self) -> bool {
        self.owners.is_some()
    }

    /// The model being trained.
    pub fn lora(&self) -> &LoraModel {
        &self.lora
    }

    /// Ends training, returning the model.
    pub fn into_lora(self) -> LoraModel {
        self.lora.grad_sink().set_flat(None);
        self.lora
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// About the bytes a checkpoint of this trainer takes (every rank's share together): the
    /// trained weights as [`LoraModel::save_trainable`] writes them (adapters in f32, fully
    /// trained weights in their own dtype) and the optimizer state, without the files'
    /// headers and small JSON files.
    pub fn checkpoint_bytes(&self) -> u64 {
        let weights: u64 = self
            .vars
            .iter()
            .map(|(_, v)| {
                let size = match self.lora.mode() {
                    crate::inject::TrainMode::Lora => 4,
                    crate::inject::TrainMode::Full => v.dtype().size_in_bytes(),
                };
                (v.elem_count() * size) as u64
            })
            .sum();
        weights + self.opt.state_file_bytes()
    }

    /// The optimizer (its state, and which variables it owns when sharded).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Trainable variables with their PEFT keys, in optimizer order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Optimizer steps done.
    pub fn global_step(&self) -> usize {
        self.global_step
    }

    /// Adds the time since `*t` to a phase (synchronizing first) when profiling.
    fn lap(&self, t: &mut Instant, phase: usize) -> Result<()> {
        if self.cfg.profile {
            let dev = self.lora.model().device();
            dev.synchronize()?;
            let mut p = self.phases.borrow_mut();
            let secs = t.elapsed().as_secs_f64();
            match phase {
                0 => p.forward += secs,
                1 => p.head += secs,
                2 => p.backward += secs,
                _ => p.optimizer += secs,
            }
            if let Some(m) = moe_peft_kernels::pool_memory(dev)? {
                let mib = m.used_high as f64 / (1024.0 * 1024.0);
                p.peak_mib[phase] = p.peak_mib[phase].max(mib);
                moe_peft_kernels::reset_pool_peaks(dev)?;
            }
            *t = Instant::now();
        }
        Ok(())
    }

    /// Adds the variables' gradients in `gs` (and any the sink kept) to the flat buffer.
    fn collect(&self, gs: &GradStore) -> Result<()> {
        for (_, v) in self.vars.iter() {
            if let Some(g) = gs.get(v.as_tensor()) {
                self.grads.add(v.as_tensor().id(), g)?;
            }
        }
        for (id, g) in self.lora.grad_sink().drain() {
            if self.grads.contains(id) {
                self.grads.add(id, &g)?;
            }
        }
        Ok(())
    }

    /// Gradients of `ce · scale + Σ aux` for one micro-batch (no update), `None` for
    /// variables that received none.
    pub fn micro_gradients(&self, batch: &TrainBatch, scale: f64) -> Result<MicroGrads> {
        self.grads.zero()?;
        let mut mg = self.accumulate(batch, scale)?;
        mg.grads = self.grads.to_vec()?;
        self.grads.zero()?;
        Ok(mg)
    }

    /// Adds the gradients of `ce · scale + Σ aux` for one micro-batch to the flat buffer
    /// (the returned `grads` is empty).
    fn accumulate(&self, batch: &TrainBatch, scale: f64) -> Result<MicroGrads> {
        let model = self.lora.model();
        // In a data-parallel group the ranks' gradients are summed: the balancing losses are
        // weighted 1/world so that they enter as under DDP / DeepSpeed, which average them.
        let aux_w = 1.0 / self.comm.world_size() as f64;
        self.lora.dropout_state().set_step(self.micro_step);
        let (b, s) = batch.input_ids.dims2()?;
        let mut t = Instant::now();
        let ctx = if batch.packed {
            model.context_packed(&batch.attention_mask, true)?
        } else {
            model.context(b, s, 0, Some(&batch.attention_mask), true)?
        };
        let h0 = model.embed(&batch.input_ids)?;
        if !self.cfg.gradient_checkpointing {
            let mut h = h0;
            let (mut losses, mut routers) = (Vec::new(), Vec::new());
            for layer in &model.layers {
                let out = layer.forward(&h, &ctx, None)?;
                h = out.hidden;
                losses.extend(out.aux_loss);
                routers.extend(out.router);
            }
            let aux_terms = model.aux_losses(losses, &routers)?;
            let loss = model.lm_loss(&h, &batch.labels)?;
            let mut obj = (&loss.loss * scale)?;
            let mut aux = 0.0;
            for a in aux_terms {
                aux += a.to_scalar::<f32>()? as f64;
                obj = (obj + weighted(a, aux_w)?)?;
            }
            self.lap(&mut t, 0)?;
            let gs = obj.backward()?;
            self.collect(&gs)?;
            self.lap(&mut t, 2)?;
            return Ok(MicroGrads {
                loss: loss.loss.to_scalar::<f32>()? as f64,
                aux_loss: aux,
                target_tokens: loss.n_tokens,
                grads: Vec::new(),
            });
        }
        // Forward, keeping each layer's input only, except the last
        // `keep_activations_layers` layers, which keep their whole graph for backward.
        // The Switch balancing loss (Qwen-MoE, Mixtral, OLMoE) pools every layer's routing:
        // each layer's statistics are kept (detached) to weigh its term in backward.
        let n_layers = model.layers.len();
        let keep_from = n_layers.saturating_sub(self.cfg.keep_activations_layers);
        let mut saved: Vec<Saved> = Vec::with_capacity(n_layers);
        let mut routers: Vec<RouterStats> = Vec::new();
        let mut h = h0.detach();
        let mut aux = 0.0;
        for (i, layer) in model.layers.iter().enumerate() {
            let out = if i >= keep_from {
                let xv = Var::from_tensor(&h)?;
                let out = layer.forward(xv.as_tensor(), &ctx, None)?;
                h = out.hidden.detach();
                saved.push(Saved::Graph(xv, out.clone()));
                out
            } else {
                saved.push(Saved::Input(h.clone()));
                let out = layer.forward(&h, &ctx, None)?;
                h = out.hidden.detach();
                out
            };
            if let Some(a) = &out.aux_loss {
                aux += a.to_scalar::<f32>()? as f64;
            }
            if let Some(r) = &out.router {
                let mut r = r.clone();
                r.prob_sum = r.prob_sum.detach();
                routers.push(r);
            }
        }
        let switch = model.switch_aux(&routers)?;
        drop(routers);
        if let Some(sw) = &switch {
            aux += sw.value();
        }
        self.lap(&mut t, 0)?;
        let hv = Var::from_tensor(&h)?;
        let loss = model.lm_loss(hv.as_tensor(), &batch.labels)?;
        let gs = (&loss.loss * scale)?.backward()?;
        self.collect(&gs)?;
        self.lap(&mut t, 1)?;
        let mut g = gs
            .get(hv.as_tensor())
            .cloned()
            .unwrap_or(hv.as_tensor().zeros_like()?);
        drop(gs);
        while let Some(s) = saved.pop() {
            let layer = &model.layers[saved.len()];
            let (xv, out) = match s {
                Saved::Graph(xv, out) => (xv, out),
                Saved::Input(x) => {
                    let xv = Var::from_tensor(&x)?;
                    let out = layer.forward(xv.as_tensor(), &ctx, None)?;
                    (xv, out)
                }
            };
            let mut obj = moe_peft_model::ops::seed_gradient(&out.hidden, &g)?;
            if let Some(a) = out.aux_loss {
                obj = (obj + weighted(a, aux_w)?)?;
            }
            if let (Some(sw), Some(r)) = (&switch, &out.router) {
                obj = (obj + weighted(sw.layer_term(r)?, aux_w)?)?;
            }
            let gs = obj.backward()?;
            self.collect(&gs)?;
            g = gs
                .get(xv.as_tensor())
                .cloned()
                .unwrap_or(xv.as_tensor().zeros_like()?);
        }
        let h0 = model.embed(&batch.input_ids)?;
        if h0.track_op() {
            let gs = moe_peft_model::ops::seed_gradient(&h0, &g)?.backward()?;
            self.collect(&gs)?;
        }
        self.lap(&mut t, 2)?;
        Ok(MicroGrads {
            loss: loss.loss.to_scalar::<f32>()? as f64,
            aux_loss: aux,
            target_tokens: loss.n_tokens,
            grads: Vec::new(),
        })
    }

    /// Trains as one rank of a data-parallel group: each [`Self::step`] then sums the
    /// gradients of every rank's micro-batches (the whole buffer, in buckets of whole
    /// variables) before clipping and the update, which every rank then does alike, so the
    /// ranks keep identical weights. Rank `r`'s `i`-th micro-batch of a step stands for the
    /// `(i·world + r)`-th of one process accumulating `world` times as many (the same dropout
    /// masks; the same result up to the order of the sums), except that the balancing losses
    /// enter with weight `1/world`, as when DDP or DeepSpeed average the ranks' gradients.
    ///
    /// A trainer whose optimizer state is sharded keeps the group it was made with
    /// ([`Self::new_in_group`]); giving it another is an error.
    pub fn set_communicator(&mut self, comm: Arc<dyn Communicator>) -> Result<()> {
        if self.owners.is_some() {
            return Err(Error::InvalidTrainConfig(
                "the optimizer state is sharded over the group this trainer was made with; \
                 it cannot join another"
                    .into(),
            ));
        }
        self.comm = comm;
        Ok(())
    }

    /// The group this trainer is a rank of ([`SingleProcess`] unless set).
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// One optimizer step over `micro` (normally `gradient_accumulation_steps` batches; in a
    /// data-parallel group, this rank's share of the step).
    /// A non-finite loss or gradient norm stops with [`Error::NonFinite`] before any update
    /// (on every rank of a group alike).
    pub fn step(&mut self, micro: &[TrainBatch]) -> Result<StepMetrics> {
        if micro.is_empty() {
            return Err(Error::InvalidTrainConfig(
                "a step needs at least one micro-batch".into(),
            ));
        }
        let start = Instant::now();
        *self.phases.borrow_mut() = PhaseTimes::default();
        if self.cfg.profile {
            moe_peft_kernels::reset_pool_peaks(self.lora.model().device())?;
        }
        let (world, rank) = (self.comm.world_size(), self.comm.rank());
        let scale = 1.0 / (micro.len() * world) as f64;
        self.grads.zero()?;
        let base = self.micro_step;
        let (mut loss, mut aux, mut tokens, mut targets, mut padded) = (0.0, 0.0, 0, 0, 0);
        let mut finite = true;
        let mut failed: Option<Error> = None;
        for (i, batch) in micro.iter().enumerate() {
            self.micro_step = base + (i * world + rank) as u64;
            let mg = match self.accumulate(batch, scale) {
                Ok(mg) => mg,
                Err(e) if world > 1 => {
                    // The other ranks are told before anyone enters the gradient sums.
                    failed = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            };
            if !mg.loss.is_finite() {
                finite = false;
                if world == 1 {
                    break;
                }
            }
            loss += mg.loss * scale;
            aux += mg.aux_loss * scale;
            targets += mg.target_tokens;
            tokens += batch.tokens()?;
            padded += batch.padded_tokens();
        }
        self.micro_step = base + (micro.len() * world) as u64;
        if world > 1 {
            let mut bad = [if failed.is_some() { 1.0 } else { 0.0 }];
            self.comm.all_reduce_host(&mut bad)?;
            if let Some(e) = failed {
                return Err(e);
            }
            if bad[0] > 0.0 {
                return Err(Error::InvalidTrainConfig(format!(
                    "step {}: {} other rank(s) of the group failed",
                    self.global_step + 1,
                    bad[0] as usize
                )));
            }
            // Every rank's sums: the gradients, which variables got one, and the metrics.
            for r in moe_peft_kernels::comm::buckets(self.grads.lens(), BUCKET_ELEMS) {
                let b = self.grads.buffer().narrow(0, r.start, r.len())?;
                self.comm.all_reduce_sum(&b)?;
            }
            let mut touched: Vec<f64> = self
                .grads
                .touched()?
                .iter()
                .map(|&t| if t { 1.0 } else { 0.0 })
                .collect();
            self.comm.all_reduce_host(&mut touched)?;
            self.grads
                .set_touched(touched.iter().map(|&t| t > 0.0).collect())?;
            let mut m = [
                loss,
                aux,
                tokens as f64,
                targets as f64,
                padded as f64,
                if finite { 0.0 } else { 1.0 },
            ];
            self.comm.all_reduce_host(&mut m)?;
            (loss, aux) = (m[0], m[1]);
            (tokens, targets, padded) = (m[2] as usize, m[3] as usize, m[4] as usize);
            finite = m[5] == 0.0;
        }
        if !finite {
            return Err(Error::NonFinite {
                what: "loss",
                step: self.global_step + 1,
            });
        }
        let mut t = Instant::now();
        let grad_norm = self.grads.norm()?;
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite {
                what: "gradient norm",
                step: self.global_step + 1,
            });
        }
        let lr = self.cfg.lr_at(self.global_step);
        let clip = crate::clip::clip_coefficient(grad_norm, self.cfg.max_grad_norm);
        self.opt.step_flat(&self.grads, lr, clip)?;
        if let Some(owners) = &self.owners {
            // Each rank updated its own variables: every rank takes each from its owner.
            for ((_, v), &r) in self.vars.iter().zip(owners) {
                self.comm.broadcast(v.as_tensor(), r)?;
            }
        }
        self.lap(&mut t, 3)?;
        self.global_step += 1;
        let seconds = start.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.global_step,
            loss,
            aux_loss: aux,
            learning_rate: lr,
            grad_norm,
            tokens,
            padded_tokens: padded,
            target_tokens: targets,
            seconds,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            phases: self.cfg.profile.then(|| self.phases.borrow().clone()),
        })
    }

    /// Mean loss of a batch without gradients or dropout: `(sum of token NLLs, tokens)`.
    pub fn evaluate(&self, batch: &TrainBatch) -> Result<(f64, usize)> {
        let _no_graph = moe_peft_model::grad::no_grad();
        let (l, _) = self.lora.model().loss(
            &batch.input_ids,
            Some(&batch.attention_mask),
            &batch.labels,
            false,
        )?;
        Ok((
            l.loss.to_scalar::<f32>()? as f64 * l.n_tokens as f64,
            l.n_tokens,
        ))
    }

    /// Saves `output_dir/checkpoint-<step>/` (PEFT adapter, optimizer moments, trainer state
    /// with `extra`), atomically, then keeps only the newest `limit` checkpoints.
    pub fn save_checkpoint(
        &self,
        output_dir: &Path,
        extra: serde_json::Value,
        limit: Option<usize>,
    ) -> Result<PathBuf> {
        self.save_checkpoint_with(output_dir, extra, limit, &|_| Ok(()))
    }

    /// [`Self::save_checkpoint`] with a hook run after everything is written and before the
    /// checkpoint is put in place (an error there leaves earlier checkpoints untouched).
    pub fn save_checkpoint_with(
        &self,
        output_dir: &Path,
        extra: serde_json::Value,
        limit: Option<usize>,
        before_commit: &dyn Fn(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let name = format!("checkpoint-{}", self.global_step);
        let fin = output_dir.join(&name);
        let tmp = output_dir.join(format!(".{name}.tmp"));
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let sharded = self.owners.is_some();
        // With sharded state every rank of the group calls this: rank 0 makes the directory
        // and commits it, each rank writes its share of the optimizer state into it, and the
        // ranks agree on each phase (a failure anywhere leaves earlier checkpoints untouched).
        let agree = |failed: bool, what: &str| -> Result<()> {
            if !sharded {
                return Ok(());
            }
            let mut v = [if failed { 1.0 } else { 0.0 }];
            self.comm.all_reduce_host(&mut v)?;
            if v[0] > 0.0 && !failed {
                return Err(Error::Checkpoint {
                    path: tmp.display().to_string(),
                    reason: format!("{} rank(s) of the group failed {what}", v[0] as usize),
                });
            }
            Ok(())
        };
        // Without sharding the caller (a group's rank 0) writes everything.
        let lead = !sharded || rank == 0;
        let made = if lead {
            (|| {
                std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
                if tmp.exists() {
                    std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
                }
                std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))
            })()
        } else {
            Ok(())
        };
        agree(made.is_err(), "to make the checkpoint directory")?;
        made?;
        let state_file = if sharded {
            tmp.join(optimizer_shard_name(rank, world))
        } else {
            tmp.join(OPTIMIZER_STATE)
        };
        if !lead {
            let o = self.opt.save(&state_file);
            agree(o.is_err(), "to write their optimizer state")?;
            o?;
            agree(false, "to commit the checkpoint")?;
            return Ok(fin);
        }
        // A failed checkpoint leaves nothing behind (its space is needed for the next try).
        let discard = |e: Error| -> Error {
            let _ = std::fs::remove_dir_all(&tmp);
            e
        };
        // The adapter and the optimizer state are written side by side: each file's device
        // transfers overlap the other's disk writes.
        let (lora, opt) = (&self.lora, &self.opt);
        let (a, o) = std::thread::scope(|s| {
            let adapter = s.spawn(|| lora.save_trainable(&tmp));
            let moments = opt.save(&state_file);
            (adapter.join(), moments)
        });
        let wrote = a
            .map_err(|_| Error::Checkpoint {
                path: tmp.display().to_string(),
                reason: "the adapter writer panicked".into(),
            })
            .and_then(|r| r)
            .and(o);
        agree(wrote.is_err(), "to write their optimizer state").map_err(discard)?;
        wrote.map_err(discard)?;
        let committed = (|| -> Result<()> {
            let state = TrainerState {
                global_step: self.global_step,
                micro_step: self.micro_step,
                config: self.cfg.clone(),
                extra,
            };
            let p = tmp.join(TRAINER_STATE);
            let text = serde_json::to_string_pretty(&state).map_err(|e| Error::json(&p, e))?;
            write_atomic(&p, text.as_bytes())?;
            before_commit(&tmp)?;
            if fin.exists() {
                let old = output_dir.join(format!(".{name}.old"));
                if old.exists() {
                    std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
                }
                std::fs::rename(&fin, &old).map_err(|e| Error::io(&fin, e))?;
                if let Err(e) = std::fs::rename(&tmp, &fin) {
                    // The earlier checkpoint of this step goes back where resume finds it.
                    let _ = std::fs::rename(&old, &fin);
                    return Err(Error::io(&fin, e));
                }
                // Best effort from here: the checkpoint is in place.
                let _ = std::fs::remove_dir_all(&old);
            } else {
                std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
            }
            if let Ok(d) = std::fs::File::open(output_dir) {
                let _ = d.sync_all();
            }
            // Older checkpoints left by a failed rotation are only disk space; the new one
            // stands.
            if let Some(limit) = limit {
                let _ = rotate_checkpoints(output_dir, limit.max(1), &fin);
            }
            Ok(())
        })();
        agree(committed.is_err(), "to commit the checkpoint").map_err(discard)?;
        committed.map_err(discard)?;
        Ok(fin)
    }

    /// Continues from a checkpoint written by [`Self::save_checkpoint`]: adapter weights,
    /// optimizer moments and step counters. Returns the trainer and the saved `extra`.
    pub fn resume(
        lora: LoraModel,
        cfg: TrainConfig,
        dir: &Path,
    ) -> Result<(Self, serde_json::Value)> {
        Self::resume_in_group(lora, cfg, dir, Arc::new(SingleProcess), false)
    }

    /// [`Self::resume`] as one rank of `comm`'s group, as [`Self::new_in_group`] makes it:
    /// the checkpoint's optimizer state may be whole or sharded by a group of any size.
    pub fn resume_in_group(
        lora: LoraModel,
        cfg: TrainConfig,
        dir: &Path,
        comm: Arc<dyn Communicator>,
        shard_state: bool,
    ) -> Result<(Self, serde_json::Value)> {
        let p = dir.join(TRAINER_STATE);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::json(&p, e))?;
        let mut lora = lora;
        lora.load_trainable(dir)?;
        let mut t = Self::new_in_group(lora, cfg, comm, shard_state)?;
        let loaded = optimizer_files(dir).and_then(|f| t.opt.load_files(&f));
        if t.owners.is_some() {
            // A rank that cannot load must not leave the others waiting at the first step
            // (with sharded state every rank resumes from the same checkpoint).
            let mut v = [if loaded.is_err() { 1.0 } else { 0.0 }];
            t.comm.all_reduce_host(&mut v)?;
            if v[0] > 0.0 && loaded.is_ok() {
                return Err(Error::Checkpoint {
                    path: dir.display().to_string(),
                    reason: format!("{} rank(s) of the group could not load it", v[0] as usize),
                });
            }
        }
        loaded?;
        if t.opt.step_count() != state.global_step {
            return Err(Error::Checkpoint {
                path: dir.display().to_string(),
                reason: format!(
                    "optimizer has {} steps but trainer_state.json says {}",
                    t.opt.step_count(),
                    state.global_step
                ),
            });
        }
        t.global_step = state.global_step;
        t.micro_step = state.micro_step;
        Ok((t, state.extra))
    }
}

/// Complete checkpoints (`checkpoint-N` with a trainer state) in `output_dir`, by step.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let p = e.path();
            p.join(TRAINER_STATE).exists().then_some((n, p))
        })
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint in `output_dir`.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    list_checkpoints(output_dir).pop().map(|(_, p)| p)
}

/// Keeps the newest `keep` checkpoints (by step), and always `just_written`: a run resumed
/// from an older checkpoint may write one below others already there.
fn rotate_checkpoints(output_dir: &Path, keep: usize, just_written: &Path) -> Result<()> {
    let all = list_checkpoints(output_dir);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            if p != just_written {
                std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
            }
        }
    }
    Ok(())
}
