//! `LoraModel`: a DeepSeekMoE with adapters injected at the sites `LoraConfig` targets, plus
//! the fully trained `modules_to_save`.
//!
//! Injection walks the model's site visitor (no macros, no type-name matching) and picks each
//! adapter's shape from its base, so one config fits attention, dense MLP, routed and shared
//! experts alike.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use moe_peft_model::{Embedding, MoeModel, MoeOrMlp};
use moe_peft_quant::DenseLinear;
use rand::{Rng, SeedableRng};

use crate::config::{InitLoraWeights, LoraConfig};
use crate::error::{Error, Result};
use crate::fused::{FusedLoraExperts, GradSink};
use crate::layer::{site_hash, DropoutState, LoraLinear, TrainableLinear};

/// Key prefix of every tensor in a PEFT causal-LM adapter file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The `modules_to_save` this model supports, by module path.
pub const SAVEABLE_MODULES: [&str; 2] = ["model.embed_tokens", "lm_head"];

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainMode {
    /// LoRA adapters (plus `modules_to_save`); saved in PEFT's format.
    Lora,
    /// Every weight (the reference's `--use_lora False`); saved as a HF checkpoint.
    Full,
}

/// A model with LoRA adapters (or, in [`TrainMode::Full`], with every weight trainable).
#[derive(Debug)]
pub struct LoraModel {
    mode: TrainMode,
    model: MoeModel,
    config: LoraConfig,
    adapters: BTreeMap<String, Arc<LoraLinear>>,
    saved_modules: BTreeMap<String, Var>,
    dropout: Arc<DropoutState>,
    sink: Arc<GradSink>,
}

fn uniform(rng: &mut rand::rngs::StdRng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

impl LoraModel {
    /// Injects freshly initialized adapters (PEFT init: A kaiming-uniform(a=√5), B zeros).
    /// `seed` fixes the initialization and the dropout masks.
    pub fn new(model: MoeModel, config: LoraConfig, seed: u64) -> Result<Self> {
        Self::with_adapter_dtype(model, config, seed, DType::F32)
    }

    /// [`Self::new`] with the adapter weights (A and B, the optimizer's master copies) kept in
    /// `dtype`: f32, or bf16 to halve their memory (their initial values are the f32 ones
    /// rounded to nearest; train them with an 8-bit optimizer, which updates bf16 weights by
    /// stochastic rounding). `modules_to_save` stay f32.
    pub fn with_adapter_dtype(
        mut model: MoeModel,
        config: LoraConfig,
        seed: u64,
        dtype: DType,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidTrainConfig(format!(
                "adapter weights are kept in f32 or bf16, not {dtype:?}"
            )));
        }
        config.validate()?;
        let sites = model.site_names();
        if config.bias != "none" {
            // PEFT would train the biases of the targeted projections; they stay frozen here.
            let a = model.arch();
            let biased: Vec<&String> = sites
                .iter()
                .filter(|n| config.targets(n))
                .filter(|n| {
                    moe_peft_model::ATTENTION_PROJECTIONS
                        .iter()
                        .zip(a.attention_bias)
                        .any(|(p, b)| b && n.ends_with(&format!("self_attn.{p}")))
                })
                .collect();
            if let Some(first) = biased.first() {
                return Err(Error::InvalidTrainConfig(format!(
                    "`bias` is {:?}, but {} targeted projections have a bias ({first}, …) that PEFT would train; biases are not trained here: use bias \"none\"",
                    config.bias,
                    biased.len()
                )));
            }
        }
        let missing = config.unmatched_targets(&sites);
        if !missing.is_empty() {
            return Err(Error::UnknownTargetModule {
                missing,
                valid: valid_target_names(&sites),
            });
        }
        let dropout = Arc::new(DropoutState::new(seed));
        let mut adapters = BTreeMap::new();
        let dev = model.device().clone();
        model.visit_sites_mut(&mut |name, slot| {
            if !config.targets(name) {
                return Ok(());
            }
            let (r, alpha) = config.rank_alpha(name);
            let (inp, out) = (slot.in_features(), slot.out_features());
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ site_hash(name));
            let a = match &config.init_lora_weights {
                InitLoraWeights::Named(_) => {
                    let d = rand_distr::Normal::new(0f32, 1.0 / r as f32)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    (0..r * inp).map(|_| rng.sample(d)).collect()
                }
                InitLoraWeights::Bool(_) => uniform(&mut rng, r * inp, 1.0 / (inp as f32).sqrt()),
            };
            let b = match &config.init_lora_weights {
                InitLoraWeights::Bool(false) => uniform(&mut rng, out * r, 1.0 / (r as f32).sqrt()),
                _ => vec![0f32; out * r],
            };
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), &dev)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&Tensor::from_vec(b, (out, r), &dev)?.to_dtype(dtype)?)?;
            let l = Arc::new(LoraLinear::new(
                slot.clone(),
                a,
                b,
                config.scaling_for(r, alpha),
                config.lora_dropout,
                name,
                dropout.clone(),
            ));
            *slot = l.clone();
            adapters.insert(name.to_string(), l);
            Ok(())
        })?;
        if adapters.is_empty() {
            return Err(Error::UnknownTargetModule {
                missing: vec![format!("{:?}", config.target_modules)],
                valid: valid_target_names(&sites),
            });
        }
        let mut saved_modules = BTreeMap::new();
        for m in config.modules_to_save.iter().flatten() {
            let path = SAVEABLE_MODULES
                .iter()
                .find(|p| *p == m || p.ends_with(&format!(".{m}")))
                .ok_or_else(|| Error::UnknownTargetModule {
                    missing: vec![m.clone()],
                    valid: vec!["embed_tokens".into(), "lm_head".into()],
                })?;
            if saved_modules.contains_key(*path) {
                continue;
            }
            let var = match *path {
                "model.embed_tokens" => {
                    let v = Var::from_tensor(&model.embed_tokens.weight().to_dtype(DType::F32)?)?;
                    model.embed_tokens = Embedding::new(v.as_tensor().clone());
                    v
                }
                _ => {
                    let v = Var::from_tensor(&model.lm_head.dense_weight(DType::F32)?)?;
                    model.lm_head = Arc::new(TrainableLinear::new(v.clone()));
                    v
                }
            };
            saved_modules.insert(path.to_string(), var);
        }
        let mut lm = Self {
            mode: TrainMode::Lora,
            model,
            config,
            adapters,
            saved_modules,
            dropout,
            sink: Arc::new(GradSink::default()),
        };
        lm.set_fused_experts(true);
        Ok(lm)
    }

    /// Runs the routed experts of each MoE layer through the fused path ([`FusedLoraExperts`],
    /// on by default) or through autograd, expert by expert (same results).
    pub fn set_fused_experts(&mut self, on: bool) {
        let sink = self.sink.clone();
        for l in &mut self.model.layers {
            if let MoeOrMlp::Moe(m) = &mut l.mlp {
                m.experts_forward = on.then(|| {
                    Arc::new(FusedLoraExperts::new(sink.clone()))
                        as Arc<dyn moe_peft_model::ExpertsForward>
                });
            }
        }
    }

    /// Gradients the fused expert path produced outside candle's graph.
    pub(crate) fn grad_sink(&self) -> &Arc<GradSink> {
        &self.sink
    }

    /// Every trainable gradient of the scalar `loss`: candle's backward pass plus the routed
    /// experts' adapter gradients, which the fused expert path computes by hand outside
    /// candle's graph. A custom training loop calls this instead of `loss.backward()` (which
    /// fails with an error naming this method when routed-expert adapters are in the graph).
    /// Like candle's, the store also holds the gradients of intermediate tensors. It works
    /// with candle's optimizers (`candle_nn::Optimizer::step`) and with
    /// [`crate::AdamW::step_store`]; [`Self::gradients`] lists it per trainable variable.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let _collecting = self.sink.collect();
        let gs = loss.backward();
        let kept = self.sink.drain();
        let mut gs = gs?;
        if !kept.is_empty() {
            let by_id: HashMap<TensorId, Var> = self
                .trainable_vars()
                .into_iter()
                .map(|(_, v)| (v.as_tensor().id(), v))
                .collect();
            for (id, g) in kept {
                let Some(v) = by_id.get(&id) else { continue };
                let g = g.to_dtype(v.dtype())?;
                let g = match gs.remove(v.as_tensor()) {
                    Some(old) => (old + g)?,
                    None => g,
                };
                gs.insert(v.as_tensor(), g);
            }
        }
        Ok(gs)
    }

    /// The gradient of each trainable variable in `grads`, in [`Self::trainable_vars`] order
    /// (`None`: the variable got none).
    pub fn gradients(&self, grads: &GradStore) -> Vec<(String, Option<Tensor>)> {
        self.trainable_vars()
            .into_iter()
            .map(|(k, v)| {
                let g = grads.get(v.as_tensor()).cloned();
                (k, g)
            })
            .collect()
    }

    /// Full fine-tuning: every weight of `model` becomes an f32 `Var` (projections, norms,
    /// routers, embeddings, `lm_head`). Sized for small models: it needs four f32 copies of
    /// the model (weights, gradients, two AdamW moments). See [`Self::full_finetune_in`].
    pub fn full_finetune(model: MoeModel, seed: u64) -> Result<Self> {
        Self::full_finetune_in(model, seed, DType::F32)
    }

    /// Full fine-tuning with the large weights (projections, embeddings, `lm_head`) kept in
    /// `dtype`: f32, or bf16 to halve them and their gradients (train those with an 8-bit
    /// optimizer: it updates bf16 weights by stochastic rounding, so updates far below a bf16
    /// step still move them on average). Norms, routers, biases and the other small weights
    /// stay f32. The routed experts' weight gradients come from grouped GEMMs across the
    /// experts of each layer.
    pub fn full_finetune_in(mut model: MoeModel, seed: u64, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidTrainConfig(format!(
                "fully trained weights are kept in f32 or bf16, not {dtype:?}"
            )));
        }
        let mut vars = BTreeMap::new();
        model.visit_sites_mut(&mut |name, slot| {
            let v = Var::from_tensor(&slot.dense_weight(dtype)?)?;
            *slot = Arc::new(TrainableLinear::new(v.clone()));
            vars.insert(format!("{name}.weight"), v);
            Ok(())
        })?;
        model.visit_tensors_mut(&mut |name, t| {
            let dt = if name == "model.embed_tokens.weight" {
                dtype
            } else {
                DType::F32
            };
            let v = Var::from_tensor(&t.to_dtype(dt)?)?;
            *t = v.as_tensor().clone();
            vars.insert(name.to_string(), v);
            Ok(())
        })?;
        let embed = vars["model.embed_tokens.weight"].clone();
        if model.arch().tie_word_embeddings {
            model.lm_head = Arc::new(TrainableLinear::new(embed));
        } else {
            let v = Var::from_tensor(&model.lm_head.dense_weight(dtype)?)?;
            model.lm_head = Arc::new(TrainableLinear::new(v.clone()));
            vars.insert("lm_head.weight".into(), v);
        }
        let mut lm = Self {
            mode: TrainMode::Full,
            model,
            config: LoraConfig::default(),
            adapters: BTreeMap::new(),
            saved_modules: vars,
            dropout: Arc::new(DropoutState::new(seed)),
            sink: Arc::new(GradSink::default()),
        };
        lm.set_fused_experts(true);
        Ok(lm)
    }

    /// What is trained.
    pub fn mode(&self) -> TrainMode {
        self.mode
    }

    /// The wrapped model (adapters live inside its sites).
    pub fn model(&self) -> &MoeModel {
        &self.model
    }

    /// The LoRA configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Mutable configuration (e.g. to set `base_model_name_or_path` before saving).
    pub fn config_mut(&mut self) -> &mut LoraConfig {
        &mut self.config
    }

    /// Adapters by site path, sorted.
    pub fn adapters(&self) -> &BTreeMap<String, Arc<LoraLinear>> {
        &self.adapters
    }

    /// Fully trained modules by path (`model.embed_tokens`, `lm_head`).
    pub fn saved_modules(&self) -> &BTreeMap<String, Var> {
        &self.saved_modules
    }

    /// The dropout stream shared by all adapters.
    pub fn dropout_state(&self) -> &Arc<DropoutState> {
        &self.dropout
    }

    /// Every trainable variable under its file key, sorted by key: PEFT keys
    /// (`base_model.model.….lora_A.weight`) for LoRA, HF parameter names for full fine-tuning.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        if self.mode == TrainMode::Full {
            return self
                .saved_modules
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        let mut v = Vec::with_capacity(self.adapters.len() * 2 + self.saved_modules.len());
        for (site, l) in &self.adapters {
            v.push((
                format!("{PEFT_PREFIX}{site}.lora_A.weight"),
                l.lora_a().clone(),
            ));
            v.push((
                format!("{PEFT_PREFIX}{site}.lora_B.weight"),
                l.lora_b().clone(),
            ));
        }
        for (path, var) in &self.saved_modules {
            v.push((format!("{PEFT_PREFIX}{path}.weight"), var.clone()));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of trainable parameters.
    pub fn num_trainable_parameters(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Folds every adapter into a dense copy of its base (the model dtype); the forward then
    /// uses the merged weights. Refuses to merge twice.
    pub fn merge(&self) -> Result<()> {
        if self.adapters.values().any(|a| a.is_merged()) {
            return Err(Error::AlreadyMerged);
        }
        let dtype = self.model.dtype();
        for a in self.adapters.values() {
            a.merge(dtype)?;
        }
        Ok(())
    }

    /// Undoes [`Self::merge`].
    pub fn unmerge(&self) -> Result<()> {
        let mut any = false;
        for a in self.adapters.values() {
            any |= a.unmerge()?;
        }
        if any {
            Ok(())
        } else {
            Err(Error::NotMerged)
        }
    }

    /// Returns the base model with every adapter merged into a dense weight (`W + s·B·A`,
    /// dequantizing quantized bases) and the trained `modules_to_save` in place: a plain
    /// model that can be exported.
    pub fn merge_and_unload(mut self) -> Result<MoeModel> {
        if self.mode == TrainMode::Full {
            return Ok(self.model);
        }
        if self.adapters.values().any(|a| a.is_merged()) {
            return Err(Error::AlreadyMerged);
        }
        let dtype = self.model.dtype();
        let adapters = std::mem::take(&mut self.adapters);
        self.set_fused_experts(false);
        self.model.visit_sites_mut(&mut |name, slot| {
            if let Some(a) = adapters.get(name) {
                *slot = Arc::new(DenseLinear::new(a.merged_weight(dtype)?));
            }
            Ok(())
        })?;
        if let Some(v) = self.saved_modules.get("model.embed_tokens") {
            self.model.embed_tokens = Embedding::new(v.as_tensor().to_dtype(dtype)?);
        }
        if let Some(v) = self.saved_modules.get("lm_head") {
            self.model.lm_head = Arc::new(DenseLinear::new(v.as_tensor().to_dtype(dtype)?));
        }
        Ok(self.model)
    }
}

/// The names a user can target: each distinct last path component, plus `all-linear`.
pub fn valid_target_names(sites: &[String]) -> Vec<String> {
    let mut v: Vec<String> = sites
        .iter()
        .filter_map(|s| s.rsplit('.').next().map(String::from))
        .collect();
    v.sort();
    v.dedup();
    v.push("all-linear".into());
    v
}
