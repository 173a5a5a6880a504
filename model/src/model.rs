//! [`MoeModel`]: the whole causal LM of any supported family, its loading, forward passes and
//! loss.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_peft_quant::{DenseLinear, FourBitLinear, FourBitTensor, QuantPolicy};
use rand::{Rng, SeedableRng};

use crate::arch::{Arch, AuxLoss, Family, QkNorm, MLP_NAMES};
use crate::aux::SwitchAux;
use crate::error::{Error, Result};
use crate::families::ModelConfig;
use crate::layers::{
    attention_mask, Attention, DecoderLayer, ForwardContext, LayerCache, Linear, Mlp, Moe, MoeGate,
    MoeOrMlp, RmsNorm, Rotary, RouterStats, ATTENTION_PROJECTIONS,
};
use crate::ops::log_softmax_f32;
use crate::weights::Checkpoint;

/// How to materialize a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Activation and dense-weight dtype (f32, bf16 or f16). Norms and the router stay f32.
    pub dtype: DType,
    /// Device the model lives on.
    pub device: Device,
    /// How projection weights are stored: dense, or quantized as they are loaded.
    /// A checkpoint saved by bitsandbytes in 4-bit stays 4-bit whatever this says.
    pub quant: QuantPolicy,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            quant: QuantPolicy::None,
        }
    }
}

/// The token embedding.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// `weight` of shape `(vocab, hidden)`.
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    /// The matrix `(vocab, hidden)` (a `Var`'s tensor when it is trained).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The matrix, to replace.
    pub fn weight_mut(&mut self) -> &mut Tensor {
        &mut self.weight
    }

    /// Rows for `ids` of shape `(b, seq)` (u32).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let h = self.weight.dim(1)?;
        Ok(crate::grad::tracked(&self.weight)
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, h))?)
    }
}

/// Outputs of a full forward pass.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// Logits `(b, seq, vocab)` in the model dtype.
    pub logits: Tensor,
    /// The balancing losses (training only): one per MoE layer for DeepSeekMoE, one for the
    /// whole pass for the families with transformers' Switch loss (already times its coef).
    pub aux_losses: Vec<Tensor>,
    /// Embedding output, each layer's output, and the final normed states (if asked for).
    pub hidden_states: Vec<Tensor>,
}

/// The causal-LM loss of a batch.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Mean negative log-likelihood over the counted targets (f32 scalar; 0 when none).
    pub loss: Tensor,
    /// Number of targets counted (labels ≠ -100 after the shift).
    pub n_tokens: usize,
}

/// A KV cache for generation, one entry per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per-layer caches.
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for `n` layers.
    pub fn new(n: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); n],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A MoE causal LM (DeepSeekMoE, Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE): the family's blocks,
/// chosen from its config.
#[derive(Debug, Clone)]
pub struct MoeModel {
    cfg: ModelConfig,
    arch: Arch,
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding,
    /// `model.layers.*`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head` (not a LoRA site; replaced by a trainable copy for `modules_to_save`).
    pub lm_head: Linear,
    rotary: Rotary,
    dtype: DType,
    device: Device,
    /// Checkpoint tensors the model did not read (see [`Self::unused_checkpoint_tensors`]).
    unused: Vec<String>,
}

/// Where weights come from while building a model.
trait WeightSource {
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear>;
    /// A plain tensor; `init` says how a random model fills it.
    fn tensor(&mut self, name: &str, shape: &[usize], dtype: DType, init: Init) -> Result<Tensor>;
}

#[derive(Debug, Clone, Copy)]
enum Init {
    Normal(f64),
    Ones,
    Zeros,
    /// kaiming_uniform(a=√5): U(−1/√fan_in, 1/√fan_in).
    KaimingUniform,
}

struct FromCheckpoint<'a> {
    ck: &'a Checkpoint,
    opts: &'a LoadOptions,
    /// Per dense tensor read, `Σ (x − x)`: 0, or NaN when the tensor holds a NaN or ±Inf.
    /// Checked once at the end (one device sync for the whole model).
    finite: Vec<(String, Tensor)>,
    /// Names read (a 4-bit weight by its `….weight`, which covers its `….weight.*` parts).
    used: std::collections::HashSet<String>,
}

impl FromCheckpoint<'_> {
    /// The checkpoint's tensors that were not read, sorted.
    fn unused(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ck
            .names()
            .into_iter()
            .filter(|k| !self.used.contains(k) && !k.ends_with("rotary_emb.inv_freq"))
            .filter(|k| {
                // The parts of a 4-bit weight: `<name>.weight.absmax`, `….quant_state.…`.
                k.match_indices(".weight.")
                    .all(|(i, _)| !self.used.contains(&k[..i + ".weight".len()]))
            })
            .collect();
        v.sort();
        v
    }

    /// Queues the finiteness check of `t`, read as `name`.
    fn watch(&mut self, name: &str, t: &Tensor) -> Result<()> {
        self.used.insert(name.to_string());
        // Rows first, then the row sums: candle's CUDA `sum_all` of a large tensor runs in one
        // thread block (about 12 s for the 16B model); per-row sums spread over the GPU.
        // `x − x` is 0 for every finite x and NaN for NaN and ±Inf.
        #[allow(clippy::eq_op)]
        let zeros = (t - t)?;
        let rows = if zeros.rank() >= 2 {
            zeros.sum(candle_core::D::Minus1)?
        } else {
            zeros
        };
        let probe = rows.sum_all()?.to_dtype(DType::F32)?;
        self.finite.push((name.to_string(), probe));
        Ok(())
    }

    /// Refuses the first tensor with a NaN or ±Inf, by name and file. (Quantized, such a block
    /// gets a finite absmax and trains with a finite loss; bitsandbytes would dequantize it to
    /// NaN. A non-finite base weight is a broken checkpoint either way.)
    fn check_finite(&mut self) -> Result<()> {
        if self.finite.is_empty() {
            return Ok(());
        }
        let probes: Vec<Tensor> = self.finite.iter().map(|(_, t)| t.clone()).collect();
        let v = Tensor::stack(&probes, 0)?.to_vec1::<f32>()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            let name = &self.finite[i].0;
            return Err(Error::InvalidInput(format!(
                "{name} in {}: holds NaN or infinite values; refusing to load a broken weight",
                self.ck.file_of(name)
            )));
        }
        self.finite.clear();
        Ok(())
    }
}

impl WeightSource for FromCheckpoint<'_> {
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let dev = &self.opts.device;
        for kind in ["nf4", "fp4"] {
            if self
                .ck
                .contains(&format!("{name}.weight.quant_state.bitsandbytes__{kind}"))
            {
                let file = self.ck.file_of(&format!("{name}.weight"));
                let get = |key: &str| self.ck.get_raw(key, dev).ok();
                let t = FourBitTensor::from_bnb_tensors(name, &get, Some(&file))?;
                if t.dims() != [out, inp] {
                    return Err(Error::ShapeMismatch {
                        name: format!("{name}.weight"),
                        file,
                        expected: vec![out, inp],
                        got: t.dims().to_vec(),
                    });
                }
                self.used.insert(format!("{name}.weight"));
                return Ok(Arc::new(FourBitLinear::from_arc(Arc::new(t))?));
            }
        }
        let key = format!("{name}.weight");
        let w = self.ck.get(&key, &[out, inp], self.opts.dtype, dev)?;
        self.watch(&key, &w)?;
        Ok(self.opts.quant.make_linear(w)?)
    }

    fn tensor(&mut self, name: &str, shape: &[usize], dtype: DType, _: Init) -> Result<Tensor> {
        // transformers quantizes every `nn.Linear` but `lm_head` unless told otherwise, routers
        // included: such a weight is dequantized here.
        if let Some(prefix) = name.strip_suffix(".weight") {
            for kind in ["nf4", "fp4"] {
                if self
                    .ck
                    .contains(&format!("{name}.quant_state.bitsandbytes__{kind}"))
                {
                    let file = self.ck.file_of(name);
                    let dev = &self.opts.device;
                    let get = |key: &str| self.ck.get_raw(key, dev).ok();
                    let q = FourBitTensor::from_bnb_tensors(prefix, &get, Some(&file))?;
                    if q.dims() != shape {
                        return Err(Error::ShapeMismatch {
                            name: name.to_string(),
                            file,
                            expected: shape.to_vec(),
                            got: q.dims().to_vec(),
                        });
                    }
                    self.used.insert(name.to_string());
                    return Ok(q.dequantize(dtype)?);
                }
            }
        }
        let t = self.ck.get(name, shape, dtype, &self.opts.device)?;
        self.watch(name, &t)?;
        Ok(t)
    }
}

struct Random<'a> {
    rng: rand::rngs::StdRng,
    opts: &'a LoadOptions,
    std: f64,
}

impl Random<'_> {
    fn fill(&mut self, shape: &[usize], dtype: DType, init: Init) -> Result<Tensor> {
        let dev = &self.opts.device;
        let n: usize = shape.iter().product();
        let t = match init {
            Init::Ones => Tensor::ones(shape, DType::F32, dev)?,
            Init::Zeros => Tensor::zeros(shape, DType::F32, dev)?,
            Init::Normal(std) if !dev.is_cpu() => Tensor::randn(0f32, std as f32, shape, dev)?,
            Init::Normal(std) => {
                let d = rand_distr::Normal::new(0f32, std as f32)
                    .map_err(|e| Error::InvalidInput(format!("init std {std}: {e}")))?;
                let v: Vec<f32> = (0..n).map(|_| self.rng.sample(d)).collect();
                Tensor::from_vec(v, shape, dev)?
            }
            Init::KaimingUniform => {
                let bound = 1.0 / (shape[shape.len() - 1] as f32).sqrt();
                if dev.is_cpu() {
                    let v: Vec<f32> = (0..n)
                        .map(|_| self.rng.random_range(-bound..bound))
                        .collect();
                    Tensor::from_vec(v, shape, dev)?
                } else {
                    Tensor::rand(-bound, bound, shape, dev)?
                }
            }
        };
        Ok(t.to_dtype(dtype)?)
    }
}

impl WeightSource for Random<'_> {
    fn linear(&mut self, _name: &str, out: usize, inp: usize) -> Result<Linear> {
        let w = self.fill(&[out, inp], self.opts.dtype, Init::Normal(self.std))?;
        Ok(self.opts.quant.make_linear(w)?)
    }

    fn tensor(&mut self, _name: &str, shape: &[usize], dtype: DType, init: Init) -> Result<Tensor> {
        self.fill(shape, dtype, init)
    }
}

impl MoeModel {
    /// Loads a model directory: `config.json` plus `model.safetensors` or sharded safetensors.
    pub fn from_pretrained(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ModelConfig::from_file(dir.join("config.json"))?;
        let ck = Checkpoint::open_dir(dir)?;
        Self::load(cfg, &ck, opts)
    }

    /// Builds the model from an opened checkpoint, converting (and, per `opts.quant`,
    /// quantizing) one tensor at a time.
    pub fn load(cfg: impl Into<ModelConfig>, ck: &Checkpoint, opts: &LoadOptions) -> Result<Self> {
        let cfg = cfg.into();
        cfg.validate()?;
        let mut src = FromCheckpoint {
            ck,
            opts,
            finite: Vec::new(),
            used: Default::default(),
        };
        let mut model = Self::build(cfg, &mut src, opts)?;
        src.check_finite()?;
        model.unused = src.unused();
        Ok(model)
    }

    /// A model with random weights (HF's init: normal(0, `initializer_range`), router
    /// kaiming-uniform, norms 1), seeded; on a GPU the device's generator is used.
    pub fn random(cfg: impl Into<ModelConfig>, opts: &LoadOptions, seed: u64) -> Result<Self> {
        let cfg = cfg.into();
        cfg.validate()?;
        if !opts.device.is_cpu() {
            opts.device.set_seed(seed)?;
        }
        let mut src = Random {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            opts,
            std: cfg.arch()?.initializer_range,
        };
        Self::build(cfg, &mut src, opts)
    }

    fn build(cfg: ModelConfig, src: &mut dyn WeightSource, opts: &LoadOptions) -> Result<Self> {
        if opts.device.is_cpu() && opts.dtype == DType::BF16 {
            return Err(Error::InvalidInput(
                "bf16 compute needs a CUDA device: candle's CPU matmul has no bf16 kernel; use f32 on the CPU"
                    .into(),
            ));
        }
        if !matches!(
            opts.dtype,
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        ) {
            return Err(Error::InvalidInput(format!(
                "compute dtype {:?} (f32, bf16, f16)",
                opts.dtype
            )));
        }
        let a = cfg.arch()?;
        let h = a.hidden_size;
        let v = a.vocab_size;
        let (qw, kv) = (a.q_width(), a.kv_width());
        let std = a.initializer_range;
        let embed = src.tensor(
            "model.embed_tokens.weight",
            &[v, h],
            opts.dtype,
            Init::Normal(std),
        )?;
        let norm = |src: &mut dyn WeightSource, name: &str, width: usize| -> Result<RmsNorm> {
            RmsNorm::new(
                src.tensor(name, &[width], DType::F32, Init::Ones)?,
                a.rms_norm_eps,
            )
        };
        let mut layers = Vec::with_capacity(a.num_hidden_layers);
        for i in 0..a.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_layernorm = norm(src, &format!("{p}.input_layernorm.weight"), h)?;
            let post_attention_layernorm =
                norm(src, &format!("{p}.post_attention_layernorm.weight"), h)?;
            let [qn, kn, vn, on] = ATTENTION_PROJECTIONS;
            let q = src.linear(&format!("{p}.self_attn.{qn}"), qw, h)?;
            let k = src.linear(&format!("{p}.self_attn.{kn}"), kv, h)?;
            let vv = src.linear(&format!("{p}.self_attn.{vn}"), kv, h)?;
            let o = src.linear(&format!("{p}.self_attn.{on}"), h, qw)?;
            let mut self_attn = Attention::new(&a, q, k, vv, o);
            for (j, width) in [qw, kv, kv, h].into_iter().enumerate() {
                if a.attention_bias[j] {
                    let name = format!("{p}.self_attn.{}.bias", ATTENTION_PROJECTIONS[j]);
                    self_attn.biases[j] =
                        Some(src.tensor(&name, &[width], opts.dtype, Init::Zeros)?);
                }
            }
            let qk = match a.qk_norm {
                QkNorm::None => None,
                QkNorm::PerHead => Some((a.head_dim, a.head_dim)),
                QkNorm::Whole => Some((qw, kv)),
            };
            if let Some((wq, wk)) = qk {
                self_attn.q_norm = Some(norm(src, &format!("{p}.self_attn.q_norm.weight"), wq)?);
                self_attn.k_norm = Some(norm(src, &format!("{p}.self_attn.k_norm.weight"), wk)?);
            }
            let mlp = |src: &mut dyn WeightSource,
                       prefix: &str,
                       names: [&'static str; 3],
                       width: usize|
             -> Result<Mlp> {
                let [gn, un, dn] = names;
                let g = src.linear(&format!("{prefix}.{gn}"), width, h)?;
                let u = src.linear(&format!("{prefix}.{un}"), width, h)?;
                let d = src.linear(&format!("{prefix}.{dn}"), h, width)?;
                Ok(Mlp::new(a.hidden_act, names, g, u, d))
            };
            let ffn = if a.is_moe_layer(i) {
                let m = format!("{p}.{}", a.naming.moe);
                let e = a.num_experts;
                // DeepSeekMoE's MoEGate is kaiming-uniform; the others' routers are `nn.Linear`,
                // which transformers' `_init_weights` draws from normal(0, initializer_range).
                let init = if a.family == Family::DeepSeek {
                    Init::KaimingUniform
                } else {
                    Init::Normal(std)
                };
                let gw = src.tensor(&format!("{m}.gate.weight"), &[e, h], DType::F32, init)?;
                let gate = MoeGate::new(&a, gw)?;
                let mut experts = Vec::with_capacity(e);
                for j in 0..e {
                    experts.push(mlp(
                        src,
                        &format!("{m}.experts.{j}"),
                        a.naming.expert,
                        a.moe_intermediate_size,
                    )?);
                }
                let shared = format!("{m}.{}", a.naming.shared);
                let shared_experts = match a.shared_intermediate {
                    Some(w) => Some(mlp(src, &shared, MLP_NAMES, w)?),
                    None => None,
                };
                let shared_expert_gate = if a.shared_gate && shared_experts.is_some() {
                    Some(src.tensor(
                        &format!("{shared}_gate.weight"),
                        &[1, h],
                        opts.dtype,
                        Init::Normal(std),
                    )?)
                } else {
                    None
                };
                MoeOrMlp::Moe(Moe {
                    gate,
                    experts,
                    shared_experts,
                    shared_expert_gate,
                    experts_forward: None,
                })
            } else {
                MoeOrMlp::Mlp(mlp(
                    src,
                    &format!("{p}.mlp"),
                    MLP_NAMES,
                    a.intermediate_size,
                )?)
            };
            layers.push(DecoderLayer {
                index: i,
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                mlp: ffn,
                naming: a.naming,
            });
        }
        let norm = norm(src, "model.norm.weight", h)?;
        let lm_head: Linear = if a.tie_word_embeddings {
            Arc::new(DenseLinear::new(embed.clone()))
        } else {
            let w = src.tensor("lm_head.weight", &[v, h], opts.dtype, Init::Normal(std))?;
            Arc::new(DenseLinear::new(w))
        };
        Ok(Self {
            rotary: Rotary::new(&a),
            cfg,
            arch: a,
            embed_tokens: Embedding::new(embed),
            layers,
            norm,
            lm_head,
            dtype: opts.dtype,
            device: opts.device.clone(),
            unused: Vec::new(),
        })
    }

    /// The tensors of the checkpoint this model was loaded from that it did not use (rotary
    /// `inv_freq` buffers aside), sorted: a warning sign of a checkpoint for another
    /// architecture or a renamed layer, as transformers reports them. Empty for random models.
    pub fn unused_checkpoint_tensors(&self) -> &[String] {
        &self.unused
    }

    /// The configuration (`config.json`).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The architecture the configuration describes.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// Turns transformers' Switch balancing loss on or off and sets its weight, as setting
    /// `output_router_logits` / `router_aux_loss_coef` on the config before training (each
    /// `None` keeps the config's value). Refused for DeepSeekMoE, whose loss is its own
    /// (`aux_loss_alpha` in `config.json`).
    pub fn set_switch_aux(&mut self, on: Option<bool>, coef: Option<f64>) -> Result<()> {
        let (cfg_on, cfg_coef) = match &self.cfg {
            ModelConfig::DeepSeek(_) => {
                return Err(Error::InvalidInput(
                    "DeepSeekMoE's balancing loss is set by aux_loss_alpha in its config.json, not by output_router_logits / router_aux_loss_coef".into(),
                ))
            }
            ModelConfig::Qwen2Moe(c) => (c.output_router_logits, c.router_aux_loss_coef),
            ModelConfig::Qwen3Moe(c) => (c.output_router_logits, c.router_aux_loss_coef),
            ModelConfig::Mixtral(c) => (c.output_router_logits, c.router_aux_loss_coef),
            ModelConfig::Olmoe(c) => (c.output_router_logits, c.router_aux_loss_coef),
        };
        let coef = coef.unwrap_or(cfg_coef);
        if !(0.0..=1.0).contains(&coef) {
            return Err(Error::InvalidInput(format!(
                "router_aux_loss_coef {coef} must be in [0, 1]"
            )));
        }
        let aux = if on.unwrap_or(cfg_on) && coef > 0.0 {
            AuxLoss::Switch { coef }
        } else {
            AuxLoss::None
        };
        self.arch.aux = aux;
        for l in &mut self.layers {
            if let MoeOrMlp::Moe(m) = &mut l.mlp {
                m.gate.set_aux_kind(aux);
            }
        }
        Ok(())
    }

    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds `ids` `(b, seq)` (u32) in the model dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens
            .forward(ids)?
            .to_dtype(self.dtype)
            .map_err(Into::into)
    }

    /// RoPE tables and attention mask for a pass over `seq` new positions after `past`.
    pub fn context(
        &self,
        b: usize,
        seq: usize,
        past: usize,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<ForwardContext> {
        if let Some(w) = self.arch.sliding_window {
            if past + seq > w {
                return Err(Error::InvalidInput(format!(
                    "{} positions exceed the model's sliding_window ({w}); sliding-window attention is not implemented, so passes are limited to the window",
                    past + seq
                )));
            }
        }
        let (cos, sin) = self.rotary.cos_sin(past, seq, self.dtype, &self.device)?;
        let mask = self::attention_mask(attention_mask, b, seq, past, self.dtype, &self.device)?;
        let token_weights = match attention_mask {
            Some(am) if train && matches!(self.arch.aux, AuxLoss::Switch { .. }) => {
                Some(self.token_weights(&am.narrow(1, past, seq)?)?)
            }
            _ => None,
        };
        // Query chunks only matter for long sequences; the check reads the mask's first column.
        let causal_chunks = match attention_mask {
            Some(am) if crate::ops::causal_chunk(seq) < seq => {
                crate::layers::every_query_sees_a_key(am)?
            }
            _ => true,
        };
        Ok(ForwardContext {
            cos,
            sin,
            mask,
            train,
            causal_chunks,
            token_weights,
        })
    }

    /// The Switch loss's token weights of a `(b, seq)` mask: 1 where it is nonzero.
    fn token_weights(&self, mask: &Tensor) -> Result<(Arc<Vec<f32>>, Tensor)> {
        let host: Vec<f32> = mask
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|x| if x != 0 { 1.0 } else { 0.0 })
            .collect();
        let t = Tensor::from_slice(&host, host.len(), &self.device)?;
        Ok((Arc::new(host), t))
    }

    /// The balancing losses of a pass from what its layers returned (`losses`: DeepSeekMoE's
    /// per-layer ones; `routers`: the MoE layers' shares of a Switch loss): the former as they
    /// are, or one Switch loss over all MoE layers (see [`SwitchAux`]).
    pub fn aux_losses(
        &self,
        mut losses: Vec<Tensor>,
        routers: &[RouterStats],
    ) -> Result<Vec<Tensor>> {
        if let Some(sw) = self.switch_aux(routers)? {
            let mut total: Option<Tensor> = None;
            for s in routers {
                let t = sw.layer_term(s)?;
                total = Some(match total {
                    Some(a) => (a + t)?,
                    None => t,
                });
            }
            losses.extend(total);
        }
        Ok(losses)
    }

    /// The Switch loss of a pass whose MoE layers gave `stats` (`None` for DeepSeekMoE,
    /// without `output_router_logits`, or when no layer reported).
    pub fn switch_aux(&self, stats: &[RouterStats]) -> Result<Option<SwitchAux>> {
        let AuxLoss::Switch { coef } = self.arch.aux else {
            return Ok(None);
        };
        SwitchAux::new(coef, stats)
    }

    /// [`Self::context`] for packed rows: `segments` `(b, seq)` numbers the examples of each
    /// row (0 on padding); attention stays inside each example (see
    /// [`crate::layers::segment_attention_mask`]).
    pub fn context_packed(&self, segments: &Tensor, train: bool) -> Result<ForwardContext> {
        let (_, seq) = segments.dims2()?;
        if let Some(w) = self.arch.sliding_window {
            if seq > w {
                return Err(Error::InvalidInput(format!(
                    "packed rows of {seq} positions exceed the model's sliding_window ({w}); sliding-window attention is not implemented, so rows are limited to the window"
                )));
            }
        }
        let (cos, sin) = self.rotary.cos_sin(0, seq, self.dtype, &self.device)?;
        let mask = crate::layers::segment_attention_mask(segments, self.dtype, &self.device)?;
        // A packed row's padding sees itself (segment 0), so every query sees a key.
        let token_weights = if train && matches!(self.arch.aux, AuxLoss::Switch { .. }) {
            Some(self.token_weights(segments)?)
        } else {
            None
        };
        Ok(ForwardContext {
            cos,
            sin,
            mask: Some(mask),
            train,
            causal_chunks: true,
            token_weights,
        })
    }

    /// Final norm then `lm_head`: logits in the model dtype.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(h)?;
        Ok(self.lm_head.forward_t(&x, false)?)
    }

    /// The causal-LM loss straight from the last hidden states `h` `(b, seq, hidden)`: final
    /// norm, then `lm_head` and cross-entropy fused and computed a chunk of rows at a time
    /// (only rows with a target), so the `(tokens, vocab)` logits are never held whole. Same
    /// value and gradients as [`causal_lm_loss`] on [`Self::head`].
    pub fn lm_loss(&self, h: &Tensor, labels: &Tensor) -> Result<LossOutput> {
        let (b, s, hd) = h.dims3()?;
        let v = self.arch.vocab_size;
        if labels.dims() != [b, s] {
            return Err(Error::InvalidInput(format!(
                "labels have shape {:?}, hidden states {:?}",
                labels.dims(),
                h.dims()
            )));
        }
        let dev = h.device();
        let lab: Vec<i64> = if s < 2 {
            vec![]
        } else {
            labels
                .to_dtype(DType::I64)?
                .narrow(1, 1, s - 1)?
                .flatten_all()?
                .to_vec1()?
        };
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (i, &l) in lab.iter().enumerate() {
            if l == -100 {
                continue;
            }
            if l < 0 || l as usize >= v {
                return Err(Error::InvalidInput(format!(
                    "label {l} is outside the vocabulary ({v}) and is not -100"
                )));
            }
            rows.push(((i / (s - 1)) * s + i % (s - 1)) as u32);
            targets.push(l as u32);
        }
        if rows.is_empty() {
            return Ok(LossOutput {
                loss: Tensor::zeros((), DType::F32, dev)?,
                n_tokens: 0,
            });
        }
        let x = self.norm.forward(h)?.reshape((b * s, hd))?;
        let n = rows.len();
        let x = x.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
        let w = self.lm_head.dense_weight(x.dtype())?;
        let budget: usize = if dev.is_cpu() { 1 << 24 } else { 1 << 26 };
        let chunk = (budget / v).max(16);
        let t = Tensor::from_vec(targets, n, dev)?;
        let loss = crate::ops::chunked_cross_entropy(&x, &w, &t, chunk)?;
        Ok(LossOutput { loss, n_tokens: n })
    }

    /// Forward pass and causal-LM loss of a batch (fused chunked head, see [`Self::lm_loss`]).
    /// Returns the loss and, in training mode, the MoE balancing losses.
    pub fn loss(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        train: bool,
    ) -> Result<(LossOutput, Vec<Tensor>)> {
        let (b, s) = self.check_ids(ids)?;
        let ctx = self.context(b, s, 0, attention_mask, train)?;
        let mut h = self.embed(ids)?;
        let (mut losses, mut routers) = (Vec::new(), Vec::new());
        for layer in &self.layers {
            let out = layer.forward(&h, &ctx, None)?;
            h = out.hidden;
            losses.extend(out.aux_loss);
            routers.extend(out.router);
        }
        let aux = self.aux_losses(losses, &routers)?;
        Ok((self.lm_loss(&h, labels)?, aux))
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, s) = ids.dims2().map_err(|_| {
            Error::InvalidInput(format!(
                "input_ids must be (batch, seq), got {:?}",
                ids.dims()
            ))
        })?;
        if s == 0 || b == 0 {
            return Err(Error::InvalidInput("empty input_ids".into()));
        }
        if ids.dtype() != DType::U32 {
            return Err(Error::InvalidInput(format!(
                "input_ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        let max = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.arch.vocab_size {
            return Err(Error::InvalidInput(format!(
                "token id {max} is outside the vocabulary ({})",
                self.arch.vocab_size
            )));
        }
        Ok((b, s))
    }

    /// Full forward pass. `attention_mask` `(b, seq)` marks real (1) and padded (0) positions.
    /// In training mode each MoE layer also returns its balancing loss.
    pub fn forward_t(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<ModelOutput> {
        self.forward_inner(ids, attention_mask, train, false)
    }

    /// [`Self::forward_t`] that also returns every hidden state.
    pub fn forward_with_hidden(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<ModelOutput> {
        self.forward_inner(ids, attention_mask, train, true)
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        keep: bool,
    ) -> Result<ModelOutput> {
        let (b, s) = self.check_ids(ids)?;
        let ctx = self.context(b, s, 0, attention_mask, train)?;
        let mut h = self.embed(ids)?;
        let mut hidden_states = Vec::new();
        let (mut losses, mut routers) = (Vec::new(), Vec::new());
        for layer in &self.layers {
            if keep {
                hidden_states.push(h.clone());
            }
            let out = layer.forward(&h, &ctx, None)?;
            h = out.hidden;
            losses.extend(out.aux_loss);
            routers.extend(out.router);
        }
        let aux_losses = self.aux_losses(losses, &routers)?;
        let x = self.norm.forward(&h)?;
        if keep {
            hidden_states.push(x.clone());
        }
        let logits = self.lm_head.forward_t(&x, false)?;
        Ok(ModelOutput {
            logits,
            aux_losses,
            hidden_states,
        })
    }

    /// Incremental forward for generation: appends `ids` to `cache` and returns the logits of
    /// the new positions. `attention_mask`, if given, covers cached and new positions.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, s) = self.check_ids(ids)?;
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let past = cache.len();
        let ctx = self.context(b, s, past, attention_mask, false)?;
        let mut h = self.embed(ids)?;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(&h, &ctx, Some(c))?.hidden;
        }
        self.head(&h)
    }

    /// Visits every projection site (attention, dense MLP, each routed expert, shared
    /// experts) with its HF module path, e.g. `model.layers.3.mlp.experts.17.down_proj`.
    /// The router and `lm_head` are not sites.
    pub fn visit_sites_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        for l in &mut self.layers {
            l.visit_sites_mut(f)?;
        }
        Ok(())
    }

    /// Read-only [`Self::visit_sites_mut`].
    pub fn visit_sites(&self, f: &mut dyn FnMut(&str, &Linear) -> Result<()>) -> Result<()> {
        for l in &self.layers {
            l.visit_sites(f)?;
        }
        Ok(())
    }

    /// Every site path, in model order.
    pub fn site_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        let _ = self.visit_sites(&mut |n, _| {
            v.push(n.to_string());
            Ok(())
        });
        v
    }
}

/// The HF causal-LM loss: logits at `t` predict `labels[t+1]`; targets equal to -100 are
/// ignored; the mean is over all counted targets of the batch. Computed in f32.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<LossOutput> {
    let (b, s, v) = logits.dims3()?;
    if labels.dims() != [b, s] {
        return Err(Error::InvalidInput(format!(
            "labels have shape {:?}, logits {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    let dev = logits.device();
    if s < 2 {
        return Ok(LossOutput {
            loss: Tensor::zeros((), DType::F32, dev)?,
            n_tokens: 0,
        });
    }
    let lab: Vec<i64> = labels
        .to_dtype(DType::I64)?
        .narrow(1, 1, s - 1)?
        .flatten_all()?
        .to_vec1()?;
    let mut targets = Vec::with_capacity(lab.len());
    let mut keep = Vec::with_capacity(lab.len());
    for &l in &lab {
        if l == -100 {
            targets.push(0u32);
            keep.push(0f32);
        } else if l < 0 || l as usize >= v {
            return Err(Error::InvalidInput(format!(
                "label {l} is outside the vocabulary ({v}) and is not -100"
            )));
        } else {
            targets.push(l as u32);
            keep.push(1f32);
        }
    }
    let n_tokens = keep.iter().filter(|&&k| k > 0.0).count();
    if n_tokens == 0 {
        return Ok(LossOutput {
            loss: Tensor::zeros((), DType::F32, dev)?,
            n_tokens,
        });
    }
    let rows = b * (s - 1);
    let x = logits.narrow(1, 0, s - 1)?.reshape((rows, v))?;
    let logp = log_softmax_f32(&x)?;
    let t = Tensor::from_vec(targets, (rows, 1), dev)?;
    let keep = Tensor::from_vec(keep, rows, dev)?;
    let picked = logp.gather(&t, 1)?.squeeze(1)?;
    let loss = ((picked * keep)?.sum_all()?.neg()? / n_tokens as f64)?;
    Ok(LossOutput { loss, n_tokens })
}

/// A parameter of the model as [`MoeModel::visit_weights`] hands it out: a plain tensor, or
/// a projection whose dense weight is materialized only when asked for (dequantizing or
/// merging one matrix at a time).
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    /// A stored tensor (embeddings, norms, router).
    Tensor(&'a Tensor),
    /// A projection (`(out, in)`).
    Linear(&'a Linear),
}

impl WeightRef<'_> {
    /// Shape of the dense weight.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Tensor(t) => t.dims().to_vec(),
            Self::Linear(l) => vec![l.out_features(), l.in_features()],
        }
    }

    /// The dense weight in `dtype`.
    pub fn materialize(&self, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Self::Tensor(t) => t.to_dtype(dtype)?,
            Self::Linear(l) => l.dense_weight(dtype)?,
        })
    }
}

impl MoeModel {
    /// Visits every parameter under its HF `state_dict` name, in model order.
    pub fn visit_weights(
        &self,
        f: &mut dyn FnMut(&str, WeightRef<'_>) -> Result<()>,
    ) -> Result<()> {
        f(
            "model.embed_tokens.weight",
            WeightRef::Tensor(self.embed_tokens.weight()),
        )?;
        for l in &self.layers {
            l.visit_tensors(&mut |name, t| f(name, WeightRef::Tensor(t)))?;
            l.visit_sites(&mut |name, lin| f(&format!("{name}.weight"), WeightRef::Linear(lin)))?;
        }
        f("model.norm.weight", WeightRef::Tensor(self.norm.weight()))?;
        if !self.arch.tie_word_embeddings {
            f("lm_head.weight", WeightRef::Linear(&self.lm_head))?;
        }
        Ok(())
    }

    /// Visits every weight that is not a projection site or `lm_head` (embeddings, norms,
    /// attention biases, q/k norms, routers, shared-expert gates) under its HF `state_dict`
    /// name, to replace it (full fine-tuning makes each a `Var`).
    pub fn visit_tensors_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        f("model.embed_tokens.weight", self.embed_tokens.weight_mut())?;
        for l in &mut self.layers {
            l.visit_tensors_mut(f)?;
        }
        f("model.norm.weight", self.norm.weight_mut())
    }
}
