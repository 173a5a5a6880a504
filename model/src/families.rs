//! The `config.json` of every supported family and [`ModelConfig`], which picks the family from
//! `model_type`.
//!
//! Field names and defaults are those of transformers 4.56's `configuration_*.py`, so a missing
//! key means what it means there. Keys the model does not read are kept (`extra`) and written
//! back unchanged, so an exported `config.json` still loads in transformers.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::arch::{Arch, AuxLoss, Family, Naming, QkNorm, MLP_NAMES};
use crate::config::{DeepSeekMoeConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::layers::Activation;

/// A token id field that transformers allows to be one id or a list (`eos_token_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids (the first is used where one is needed).
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id.
    pub fn first(&self) -> Option<u32> {
        match self {
            Self::One(i) => Some(*i),
            Self::Many(v) => v.first().copied(),
        }
    }
}

fn first(t: &Option<TokenIds>) -> Option<u32> {
    t.as_ref().and_then(TokenIds::first)
}

fn bad<T>(field: &'static str, reason: impl Into<String>) -> Result<T> {
    Err(Error::InvalidConfig {
        field,
        reason: reason.into(),
    })
}

/// The checks every family shares, on the architecture the config describes.
pub(crate) fn check_arch(a: &Arch, rope_kinds: &[&str]) -> Result<()> {
    for (field, v) in [
        ("vocab_size", a.vocab_size),
        ("hidden_size", a.hidden_size),
        ("num_hidden_layers", a.num_hidden_layers),
        ("num_attention_heads", a.num_attention_heads),
        ("max_position_embeddings", a.max_position_embeddings),
    ] {
        if v == 0 {
            return bad(field, "must be at least 1");
        }
    }
    if a.head_dim == 0 || a.head_dim % 2 != 0 {
        return bad(
            "head_dim",
            format!(
                "is {} (hidden_size / num_attention_heads unless the family's config sets head_dim); RoPE needs a positive even head width",
                a.head_dim
            ),
        );
    }
    let kv = a.num_key_value_heads;
    if kv == 0 || a.num_attention_heads % kv != 0 {
        return bad(
            "num_key_value_heads",
            format!(
                "({kv}) must be at least 1 and divide num_attention_heads ({})",
                a.num_attention_heads
            ),
        );
    }
    if a.moe_layers.iter().any(|&m| m) {
        if a.num_experts == 0 {
            return bad(
                "num_experts",
                "must be at least 1 in a model with MoE layers",
            );
        }
        if a.top_k == 0 || a.top_k > a.num_experts {
            return bad(
                "num_experts_per_tok",
                format!(
                    "({}) must be between 1 and the number of experts ({})",
                    a.top_k, a.num_experts
                ),
            );
        }
        if a.moe_intermediate_size == 0 {
            return bad("moe_intermediate_size", "must be at least 1");
        }
    }
    if a.moe_layers.iter().any(|&m| !m) && a.intermediate_size == 0 {
        return bad(
            "intermediate_size",
            "must be at least 1 (dense layers use it)",
        );
    }
    if a.rms_norm_eps.is_nan() || a.rms_norm_eps <= 0.0 {
        return bad("rms_norm_eps", "must be positive");
    }
    if a.rope_theta.is_nan() || a.rope_theta <= 0.0 {
        return bad("rope_theta", "must be positive");
    }
    if let Some(c) = a.clip_qkv {
        if c.is_nan() || c <= 0.0 {
            return bad("clip_qkv", format!("({c}) must be positive or null"));
        }
    }
    if let Some(rs) = &a.rope_scaling {
        if !rope_kinds.contains(&rs.kind.as_str()) {
            return bad(
                "rope_scaling",
                format!(
                    "type {:?} is not supported (supported: {rope_kinds:?})",
                    rs.kind
                ),
            );
        }
        if rs.factor.is_nan() || rs.factor < 1.0 {
            return bad("rope_scaling", format!("factor {} must be ≥ 1", rs.factor));
        }
    }
    match a.aux {
        AuxLoss::DeepSeek { alpha, .. } if !(0.0..=1.0).contains(&alpha) => {
            bad("aux_loss_alpha", format!("({alpha}) must be in [0, 1]"))
        }
        AuxLoss::Switch { coef } if !(0.0..=1.0).contains(&coef) => bad(
            "router_aux_loss_coef",
            format!("({coef}) must be in [0, 1]"),
        ),
        _ => Ok(()),
    }
}

/// The activation of a `hidden_act` value; the error names the field.
pub(crate) fn activation(field: &str) -> Result<Activation> {
    Activation::from_name(field).ok_or_else(|| Error::InvalidConfig {
        field: "hidden_act",
        reason: format!("is {field:?}; supported: silu, gelu, relu"),
    })
}

fn no_dropout(p: f64) -> Result<()> {
    if p != 0.0 {
        return bad(
            "attention_dropout",
            "must be 0.0 (LoRA dropout is set separately)",
        );
    }
    Ok(())
}

fn switch_aux(output_router_logits: bool, coef: f64) -> AuxLoss {
    if output_router_logits && coef > 0.0 {
        AuxLoss::Switch { coef }
    } else {
        AuxLoss::None
    }
}

const HF_MOE: Naming = Naming {
    moe: "mlp",
    expert: MLP_NAMES,
    shared: "shared_expert",
};

/// The layers Qwen's `decoder_sparse_step` / `mlp_only_layers` make MoE layers.
fn qwen_moe_layers(layers: usize, experts: usize, step: usize, mlp_only: &[usize]) -> Vec<bool> {
    (0..layers)
        .map(|i| !mlp_only.contains(&i) && experts > 0 && step > 0 && (i + 1) % step == 0)
        .collect()
}

fn check_qwen_layers(step: usize, mlp_only: &[usize], layers: usize) -> Result<()> {
    if step == 0 {
        return bad("decoder_sparse_step", "must be at least 1");
    }
    if let Some(i) = mlp_only.iter().find(|&&i| i >= layers) {
        return bad(
            "mlp_only_layers",
            format!("names layer {i}, but there are {layers} layers"),
        );
    }
    Ok(())
}

fn check_sliding(use_sliding_window: bool) -> Result<()> {
    if use_sliding_window {
        return bad(
            "use_sliding_window",
            "true is not supported: attention here is full causal",
        );
    }
    Ok(())
}

/// The HF configuration of a Qwen1.5-MoE / Qwen2-MoE causal LM (`model_type: qwen2_moe`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Qwen2MoeConfig {
    /// `["Qwen2MoeForCausalLM"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `"qwen2_moe"`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// MLP activation.
    pub hidden_act: String,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// Std of the normal init.
    pub initializer_range: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Generation uses a KV cache.
    pub use_cache: bool,
    /// `lm_head` shares the embedding.
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling (`linear` only).
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding-window attention (must be false).
    pub use_sliding_window: bool,
    /// The window, used only when `use_sliding_window`.
    pub sliding_window: Option<usize>,
    /// Must be 0.
    pub attention_dropout: f64,
    /// Every `decoder_sparse_step`-th layer is a MoE layer.
    pub decoder_sparse_step: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Width of the shared expert.
    pub shared_expert_intermediate_size: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Renormalize the top-k weights.
    pub norm_topk_prob: bool,
    /// Add the load-balancing loss to the loss.
    pub output_router_logits: bool,
    /// Its weight.
    pub router_aux_loss_coef: f64,
    /// Layers that keep a dense MLP.
    #[serde(deserialize_with = "null_as_empty")]
    pub mlp_only_layers: Vec<usize>,
    /// Bias on q, k and v.
    pub qkv_bias: bool,
    /// Beginning-of-sequence id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// dtype the checkpoint was saved in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// A bitsandbytes `quantization_config`, if pre-quantized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<Value>,
    /// Keys the model does not read, kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<usize>, D::Error> {
    Ok(Option::<Vec<usize>>::deserialize(d)?.unwrap_or_default())
}

impl Default for Qwen2MoeConfig {
    /// `Qwen2MoeConfig.__init__`'s defaults (Qwen1.5-MoE-A2.7B).
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: "qwen2_moe".into(),
            vocab_size: 151936,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_key_value_heads: 16,
            hidden_act: "silu".into(),
            max_position_embeddings: 32768,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            use_cache: true,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            rope_scaling: None,
            use_sliding_window: false,
            sliding_window: Some(4096),
            attention_dropout: 0.0,
            decoder_sparse_step: 1,
            moe_intermediate_size: 1408,
            shared_expert_intermediate_size: 5632,
            num_experts_per_tok: 4,
            num_experts: 60,
            norm_topk_prob: false,
            output_router_logits: false,
            router_aux_loss_coef: 0.001,
            mlp_only_layers: Vec::new(),
            qkv_bias: true,
            bos_token_id: None,
            eos_token_id: None,
            torch_dtype: None,
            quantization_config: None,
            extra: Map::new(),
        }
    }
}

impl Qwen2MoeConfig {
    /// The shapes of `Qwen/Qwen1.5-MoE-A2.7B` (14.3B parameters, 60 experts top-4 plus a
    /// gated shared expert).
    pub fn qwen1_5_moe_a2_7b() -> Self {
        Self {
            architectures: Some(vec!["Qwen2MoeForCausalLM".into()]),
            max_position_embeddings: 8192,
            rope_theta: 1e6,
            bos_token_id: Some(TokenIds::One(151643)),
            eos_token_id: Some(TokenIds::One(151643)),
            torch_dtype: Some("bfloat16".into()),
            ..Self::default()
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Result<Arch> {
        let head_dim = head_dim_of(&self.extra, self.hidden_size, self.num_attention_heads);
        Ok(Arch {
            family: Family::Qwen2Moe,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim,
            attention_bias: [self.qkv_bias, self.qkv_bias, self.qkv_bias, false],
            qk_norm: QkNorm::None,
            clip_qkv: None,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: None,
            rms_norm_eps: self.rms_norm_eps,
            hidden_act: activation(&self.hidden_act)?,
            initializer_range: self.initializer_range,
            tie_word_embeddings: self.tie_word_embeddings,
            intermediate_size: self.intermediate_size,
            moe_layers: qwen_moe_layers(
                self.num_hidden_layers,
                self.num_experts,
                self.decoder_sparse_step,
                &self.mlp_only_layers,
            ),
            num_experts: self.num_experts,
            top_k: self.num_experts_per_tok,
            moe_intermediate_size: self.moe_intermediate_size,
            shared_intermediate: Some(self.shared_expert_intermediate_size).filter(|&w| w > 0),
            shared_gate: self.shared_expert_intermediate_size > 0,
            norm_topk: self.norm_topk_prob.then_some(0.0),
            aux: switch_aux(self.output_router_logits, self.router_aux_loss_coef),
            naming: HF_MOE,
            bos_token_id: first(&self.bos_token_id),
            eos_token_id: first(&self.eos_token_id),
        })
    }

    /// Checks every value the model relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.model_type != "qwen2_moe" {
            return bad(
                "model_type",
                format!("is {:?}, not \"qwen2_moe\"", self.model_type),
            );
        }
        check_sliding(self.use_sliding_window)?;
        no_dropout(self.attention_dropout)?;
        check_qwen_layers(
            self.decoder_sparse_step,
            &self.mlp_only_layers,
            self.num_hidden_layers,
        )?;
        let a = self.arch()?;
        if a.head_dim * a.num_attention_heads != a.hidden_size {
            return bad(
                "num_attention_heads",
                format!(
                    "({}) must divide hidden_size ({}): Qwen2-MoE's head width is hidden_size / heads",
                    a.num_attention_heads, a.hidden_size
                ),
            );
        }
        check_arch(&a, &["linear"])
    }
}

/// `head_dim` from a config's extra keys (transformers' `getattr(config, "head_dim", …)`), else
/// `hidden / heads`.
fn head_dim_of(extra: &Map<String, Value>, hidden: usize, heads: usize) -> usize {
    extra
        .get("head_dim")
        .and_then(Value::as_u64)
        .map(|d| d as usize)
        .unwrap_or(hidden / heads.max(1))
}

/// The HF configuration of a Qwen3-MoE causal LM (`model_type: qwen3_moe`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Qwen3MoeConfig {
    /// `["Qwen3MoeForCausalLM"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `"qwen3_moe"`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head (`null`: hidden / heads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// MLP activation.
    pub hidden_act: String,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// Std of the normal init.
    pub initializer_range: f64,
    /// RMSNorm epsilon (also of `q_norm` / `k_norm`).
    pub rms_norm_eps: f64,
    /// Generation uses a KV cache.
    pub use_cache: bool,
    /// `lm_head` shares the embedding.
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling (`linear` only).
    pub rope_scaling: Option<RopeScaling>,
    /// Bias on q, k, v and o.
    pub attention_bias: bool,
    /// Sliding-window attention (must be false).
    pub use_sliding_window: bool,
    /// The window, used only when `use_sliding_window`.
    pub sliding_window: Option<usize>,
    /// Must be 0.
    pub attention_dropout: f64,
    /// Every `decoder_sparse_step`-th layer is a MoE layer.
    pub decoder_sparse_step: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Renormalize the top-k weights.
    pub norm_topk_prob: bool,
    /// Add the load-balancing loss to the loss.
    pub output_router_logits: bool,
    /// Its weight.
    pub router_aux_loss_coef: f64,
    /// Layers that keep a dense MLP.
    #[serde(deserialize_with = "null_as_empty")]
    pub mlp_only_layers: Vec<usize>,
    /// Beginning-of-sequence id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// dtype the checkpoint was saved in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// A bitsandbytes `quantization_config`, if pre-quantized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<Value>,
    /// Keys the model does not read, kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for Qwen3MoeConfig {
    /// `Qwen3MoeConfig.__init__`'s defaults.
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: "qwen3_moe".into(),
            vocab_size: 151936,
            hidden_size: 2048,
            intermediate_size: 6144,
            num_hidden_layers: 24,
            num_attention_heads: 32,
            num_key_value_heads: 4,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 32768,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            use_cache: true,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            rope_scaling: None,
            attention_bias: false,
            use_sliding_window: false,
            sliding_window: Some(4096),
            attention_dropout: 0.0,
            decoder_sparse_step: 1,
            moe_intermediate_size: 768,
            num_experts_per_tok: 8,
            num_experts: 128,
            norm_topk_prob: false,
            output_router_logits: false,
            router_aux_loss_coef: 0.001,
            mlp_only_layers: Vec::new(),
            bos_token_id: None,
            eos_token_id: None,
            torch_dtype: None,
            quantization_config: None,
            extra: Map::new(),
        }
    }
}

impl Qwen3MoeConfig {
    /// The shapes of `Qwen/Qwen3-30B-A3B` (30.5B parameters, 48 layers, 128 experts top-8,
    /// GQA 32/4 with head_dim 128).
    pub fn qwen3_30b_a3b() -> Self {
        Self {
            architectures: Some(vec!["Qwen3MoeForCausalLM".into()]),
            num_hidden_layers: 48,
            num_attention_heads: 32,
            num_key_value_heads: 4,
            head_dim: Some(128),
            max_position_embeddings: 40960,
            rope_theta: 1e6,
            norm_topk_prob: true,
            bos_token_id: Some(TokenIds::One(151643)),
            eos_token_id: Some(TokenIds::One(151645)),
            torch_dtype: Some("bfloat16".into()),
            ..Self::default()
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Result<Arch> {
        let b = self.attention_bias;
        Ok(Arch {
            family: Family::Qwen3Moe,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            attention_bias: [b; 4],
            qk_norm: QkNorm::PerHead,
            clip_qkv: None,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: None,
            rms_norm_eps: self.rms_norm_eps,
            hidden_act: activation(&self.hidden_act)?,
            initializer_range: self.initializer_range,
            tie_word_embeddings: self.tie_word_embeddings,
            intermediate_size: self.intermediate_size,
            moe_layers: qwen_moe_layers(
                self.num_hidden_layers,
                self.num_experts,
                self.decoder_sparse_step,
                &self.mlp_only_layers,
            ),
            num_experts: self.num_experts,
            top_k: self.num_experts_per_tok,
            moe_intermediate_size: self.moe_intermediate_size,
            shared_intermediate: None,
            shared_gate: false,
            norm_topk: self.norm_topk_prob.then_some(0.0),
            aux: switch_aux(self.output_router_logits, self.router_aux_loss_coef),
            naming: HF_MOE,
            bos_token_id: first(&self.bos_token_id),
            eos_token_id: first(&self.eos_token_id),
        })
    }

    /// Checks every value the model relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.model_type != "qwen3_moe" {
            return bad(
                "model_type",
                format!("is {:?}, not \"qwen3_moe\"", self.model_type),
            );
        }
        check_sliding(self.use_sliding_window)?;
        no_dropout(self.attention_dropout)?;
        check_qwen_layers(
            self.decoder_sparse_step,
            &self.mlp_only_layers,
            self.num_hidden_layers,
        )?;
        check_arch(&self.arch()?, &["linear"])
    }
}

/// The HF configuration of a Mixtral causal LM (`model_type: mixtral`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MixtralConfig {
    /// `["MixtralForCausalLM"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `"mixtral"`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Width of one expert.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (`null`: as many as query heads).
    pub num_key_value_heads: Option<usize>,
    /// Width of one head (`null`: hidden / heads).
    pub head_dim: Option<usize>,
    /// MLP activation.
    pub hidden_act: String,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// Std of the normal init.
    pub initializer_range: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Generation uses a KV cache.
    pub use_cache: bool,
    /// Padding id.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// `lm_head` shares the embedding.
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling (`linear` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding attention window (`null`: off); passes longer than it are refused.
    pub sliding_window: Option<usize>,
    /// Must be 0.
    pub attention_dropout: f64,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Experts per layer.
    pub num_local_experts: usize,
    /// Add the load-balancing loss to the loss.
    pub output_router_logits: bool,
    /// Its weight.
    pub router_aux_loss_coef: f64,
    /// Multiplicative router noise in training (must be 0).
    pub router_jitter_noise: f64,
    /// dtype the checkpoint was saved in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// A bitsandbytes `quantization_config`, if pre-quantized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<Value>,
    /// Keys the model does not read, kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for MixtralConfig {
    /// `MixtralConfig.__init__`'s defaults (Mixtral-8x7B).
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: "mixtral".into(),
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 4096 * 32,
            initializer_range: 0.02,
            rms_norm_eps: 1e-5,
            use_cache: true,
            pad_token_id: None,
            bos_token_id: Some(TokenIds::One(1)),
            eos_token_id: Some(TokenIds::One(2)),
            tie_word_embeddings: false,
            rope_theta: 1e6,
            rope_scaling: None,
            sliding_window: None,
            attention_dropout: 0.0,
            num_experts_per_tok: 2,
            num_local_experts: 8,
            output_router_logits: false,
            router_aux_loss_coef: 0.001,
            router_jitter_noise: 0.0,
            torch_dtype: None,
            quantization_config: None,
            extra: Map::new(),
        }
    }
}

impl MixtralConfig {
    /// The shapes of `mistralai/Mixtral-8x7B-v0.1` (46.7B parameters, 8 experts top-2).
    pub fn mixtral_8x7b() -> Self {
        Self {
            architectures: Some(vec!["MixtralForCausalLM".into()]),
            max_position_embeddings: 32768,
            torch_dtype: Some("bfloat16".into()),
            ..Self::default()
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Result<Arch> {
        let heads = self.num_attention_heads;
        Ok(Arch {
            family: Family::Mixtral,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self
                .head_dim
                .filter(|&d| d > 0)
                .unwrap_or(self.hidden_size / heads.max(1)),
            attention_bias: [false; 4],
            qk_norm: QkNorm::None,
            clip_qkv: None,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: self.sliding_window,
            rms_norm_eps: self.rms_norm_eps,
            hidden_act: activation(&self.hidden_act)?,
            initializer_range: self.initializer_range,
            tie_word_embeddings: self.tie_word_embeddings,
            intermediate_size: self.intermediate_size,
            moe_layers: vec![true; self.num_hidden_layers],
            num_experts: self.num_local_experts,
            top_k: self.num_experts_per_tok,
            moe_intermediate_size: self.intermediate_size,
            shared_intermediate: None,
            shared_gate: false,
            norm_topk: Some(0.0),
            aux: switch_aux(self.output_router_logits, self.router_aux_loss_coef),
            naming: Naming {
                moe: "block_sparse_moe",
                expert: ["w1", "w3", "w2"],
                shared: "shared_expert",
            },
            bos_token_id: first(&self.bos_token_id),
            eos_token_id: first(&self.eos_token_id),
        })
    }

    /// Checks every value the model relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.model_type != "mixtral" {
            return bad(
                "model_type",
                format!("is {:?}, not \"mixtral\"", self.model_type),
            );
        }
        no_dropout(self.attention_dropout)?;
        if self.router_jitter_noise != 0.0 {
            return bad(
                "router_jitter_noise",
                "must be 0.0 (routing here is deterministic)",
            );
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window", "must be null or at least 1");
        }
        check_arch(&self.arch()?, &["linear"])
    }
}

/// The HF configuration of an OLMoE causal LM (`model_type: olmoe`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OlmoeConfig {
    /// `["OlmoeForCausalLM"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `"olmoe"`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Width of one expert.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (`null`: as many as query heads).
    pub num_key_value_heads: Option<usize>,
    /// MLP activation.
    pub hidden_act: String,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// Std of the normal init.
    pub initializer_range: f64,
    /// RMSNorm epsilon (also of `q_norm` / `k_norm`).
    pub rms_norm_eps: f64,
    /// Generation uses a KV cache.
    pub use_cache: bool,
    /// Padding id.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// `lm_head` shares the embedding.
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling (`linear` only).
    pub rope_scaling: Option<RopeScaling>,
    /// Bias on q, k, v and o.
    pub attention_bias: bool,
    /// Must be 0.
    pub attention_dropout: f64,
    /// Clamp of q, k and v (after the q/k norms) to `[-c, c]`.
    pub clip_qkv: Option<f64>,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Experts per layer.
    pub num_experts: usize,
    /// Add the load-balancing loss to the loss.
    pub output_router_logits: bool,
    /// Its weight.
    pub router_aux_loss_coef: f64,
    /// Renormalize the top-k weights.
    pub norm_topk_prob: bool,
    /// dtype the checkpoint was saved in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// A bitsandbytes `quantization_config`, if pre-quantized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<Value>,
    /// Keys the model does not read, kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for OlmoeConfig {
    /// `OlmoeConfig.__init__`'s defaults (OLMoE-1B-7B).
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: "olmoe".into(),
            vocab_size: 50304,
            hidden_size: 2048,
            intermediate_size: 2048,
            num_hidden_layers: 16,
            num_attention_heads: 16,
            num_key_value_heads: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 4096,
            initializer_range: 0.02,
            rms_norm_eps: 1e-5,
            use_cache: true,
            pad_token_id: Some(1),
            bos_token_id: None,
            eos_token_id: Some(TokenIds::One(50279)),
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            rope_scaling: None,
            attention_bias: false,
            attention_dropout: 0.0,
            clip_qkv: None,
            num_experts_per_tok: 8,
            num_experts: 64,
            output_router_logits: false,
            router_aux_loss_coef: 0.01,
            norm_topk_prob: false,
            torch_dtype: None,
            quantization_config: None,
            extra: Map::new(),
        }
    }
}

impl OlmoeConfig {
    /// The shapes of `allenai/OLMoE-1B-7B-0924` (6.9B parameters, 64 experts top-8).
    pub fn olmoe_1b_7b() -> Self {
        Self {
            architectures: Some(vec!["OlmoeForCausalLM".into()]),
            intermediate_size: 1024,
            torch_dtype: Some("bfloat16".into()),
            ..Self::default()
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Result<Arch> {
        let heads = self.num_attention_heads;
        Ok(Arch {
            family: Family::Olmoe,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.hidden_size / heads.max(1),
            attention_bias: [self.attention_bias; 4],
            qk_norm: QkNorm::Whole,
            clip_qkv: self.clip_qkv,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: None,
            rms_norm_eps: self.rms_norm_eps,
            hidden_act: activation(&self.hidden_act)?,
            initializer_range: self.initializer_range,
            tie_word_embeddings: self.tie_word_embeddings,
            intermediate_size: self.intermediate_size,
            moe_layers: vec![true; self.num_hidden_layers],
            num_experts: self.num_experts,
            top_k: self.num_experts_per_tok,
            moe_intermediate_size: self.intermediate_size,
            shared_intermediate: None,
            shared_gate: false,
            norm_topk: self.norm_topk_prob.then_some(0.0),
            aux: switch_aux(self.output_router_logits, self.router_aux_loss_coef),
            naming: HF_MOE,
            bos_token_id: first(&self.bos_token_id),
            eos_token_id: first(&self.eos_token_id),
        })
    }

    /// Checks every value the model relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.model_type != "olmoe" {
            return bad(
                "model_type",
                format!("is {:?}, not \"olmoe\"", self.model_type),
            );
        }
        no_dropout(self.attention_dropout)?;
        let a = self.arch()?;
        if a.head_dim * a.num_attention_heads != a.hidden_size {
            return bad(
                "num_attention_heads",
                format!(
                    "({}) must divide hidden_size ({})",
                    a.num_attention_heads, a.hidden_size
                ),
            );
        }
        check_arch(&a, &["linear"])
    }
}

/// The `config.json` of a model of any supported family.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// DeepSeekMoE v1.
    DeepSeek(DeepSeekMoeConfig),
    /// Qwen1.5-MoE / Qwen2-MoE.
    Qwen2Moe(Qwen2MoeConfig),
    /// Qwen3-MoE.
    Qwen3Moe(Qwen3MoeConfig),
    /// Mixtral.
    Mixtral(MixtralConfig),
    /// OLMoE.
    Olmoe(OlmoeConfig),
}

impl From<DeepSeekMoeConfig> for ModelConfig {
    fn from(c: DeepSeekMoeConfig) -> Self {
        Self::DeepSeek(c)
    }
}
impl From<Qwen2MoeConfig> for ModelConfig {
    fn from(c: Qwen2MoeConfig) -> Self {
        Self::Qwen2Moe(c)
    }
}
impl From<Qwen3MoeConfig> for ModelConfig {
    fn from(c: Qwen3MoeConfig) -> Self {
        Self::Qwen3Moe(c)
    }
}
impl From<MixtralConfig> for ModelConfig {
    fn from(c: MixtralConfig) -> Self {
        Self::Mixtral(c)
    }
}
impl From<OlmoeConfig> for ModelConfig {
    fn from(c: OlmoeConfig) -> Self {
        Self::Olmoe(c)
    }
}

impl ModelConfig {
    /// Parses a `config.json` text, picking the family from `model_type`; `source` names the
    /// file in errors. Validates it.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let json_err = |e: serde_json::Error| Error::Json {
            path: source.to_string(),
            source: e,
        };
        let v: Value = serde_json::from_str(text).map_err(json_err)?;
        let t = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("deepseek");
        let family = Family::from_model_type(t).ok_or_else(|| Error::InvalidConfig {
            field: "model_type",
            reason: format!(
                "is {t:?} in {source}; supported: {}",
                Family::ALL.map(Family::model_type).join(", ")
            ),
        })?;
        let cfg = match family {
            Family::DeepSeek => Self::DeepSeek(serde_json::from_value(v).map_err(json_err)?),
            Family::Qwen2Moe => Self::Qwen2Moe(serde_json::from_value(v).map_err(json_err)?),
            Family::Qwen3Moe => Self::Qwen3Moe(serde_json::from_value(v).map_err(json_err)?),
            Family::Mixtral => Self::Mixtral(serde_json::from_value(v).map_err(json_err)?),
            Family::Olmoe => Self::Olmoe(serde_json::from_value(v).map_err(json_err)?),
        };
        cfg.validate().map_err(|e| match e {
            Error::InvalidConfig { field, reason } => Error::InvalidConfig {
                field,
                reason: format!("{reason} (in {source})"),
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// The JSON of the family's config (serializing a config cannot fail in practice; the
    /// error names the family).
    pub fn to_json(&self) -> Result<Value> {
        let r = match self {
            Self::DeepSeek(c) => serde_json::to_value(c),
            Self::Qwen2Moe(c) => serde_json::to_value(c),
            Self::Qwen3Moe(c) => serde_json::to_value(c),
            Self::Mixtral(c) => serde_json::to_value(c),
            Self::Olmoe(c) => serde_json::to_value(c),
        };
        r.map_err(|source| Error::Json {
            path: format!("the {} config", self.family().model_type()),
            source,
        })
    }

    /// Writes `config.json` (pretty JSON).
    pub fn to_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text =
            serde_json::to_string_pretty(&self.to_json()?).map_err(|source| Error::Json {
                path: path.display().to_string(),
                source,
            })?;
        std::fs::write(path, text + "\n").map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// The family.
    pub fn family(&self) -> Family {
        match self {
            Self::DeepSeek(_) => Family::DeepSeek,
            Self::Qwen2Moe(_) => Family::Qwen2Moe,
            Self::Qwen3Moe(_) => Family::Qwen3Moe,
            Self::Mixtral(_) => Family::Mixtral,
            Self::Olmoe(_) => Family::Olmoe,
        }
    }

    /// Checks every value the model relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::DeepSeek(c) => c.validate(),
            Self::Qwen2Moe(c) => c.validate(),
            Self::Qwen3Moe(c) => c.validate(),
            Self::Mixtral(c) => c.validate(),
            Self::Olmoe(c) => c.validate(),
        }
    }

    /// The architecture the config describes.
    pub fn arch(&self) -> Result<Arch> {
        match self {
            Self::DeepSeek(c) => c.arch(),
            Self::Qwen2Moe(c) => c.arch(),
            Self::Qwen3Moe(c) => c.arch(),
            Self::Mixtral(c) => c.arch(),
            Self::Olmoe(c) => c.arch(),
        }
    }

    /// Sets (or clears) the bitsandbytes `quantization_config` and the saved dtype (both
    /// `torch_dtype` and, where the file has it, transformers 4.56's `dtype`, which wins there).
    pub fn set_saved_format(&mut self, quantization_config: Option<Value>, torch_dtype: &str) {
        let (q, d, extra) = match self {
            Self::DeepSeek(c) => (&mut c.quantization_config, &mut c.torch_dtype, None),
            Self::Qwen2Moe(c) => (
                &mut c.quantization_config,
                &mut c.torch_dtype,
                Some(&mut c.extra),
            ),
            Self::Qwen3Moe(c) => (
                &mut c.quantization_config,
                &mut c.torch_dtype,
                Some(&mut c.extra),
            ),
            Self::Mixtral(c) => (
                &mut c.quantization_config,
                &mut c.torch_dtype,
                Some(&mut c.extra),
            ),
            Self::Olmoe(c) => (
                &mut c.quantization_config,
                &mut c.torch_dtype,
                Some(&mut c.extra),
            ),
        };
        *q = quantization_config;
        *d = Some(torch_dtype.to_string());
        if let Some(e) = extra {
            if e.contains_key("dtype") {
                e.insert("dtype".into(), Value::from(torch_dtype));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_parameter_counts() -> Result<()> {
        // Mixtral-8x7B's exact count; the others to the precision their model cards give.
        let m = ModelConfig::from(MixtralConfig::mixtral_8x7b());
        m.validate()?;
        assert_eq!(m.arch()?.num_parameters(), 46_702_792_704);
        for (cfg, billions) in [
            (ModelConfig::from(Qwen2MoeConfig::qwen1_5_moe_a2_7b()), 14.3),
            (ModelConfig::from(Qwen3MoeConfig::qwen3_30b_a3b()), 30.5),
            (ModelConfig::from(OlmoeConfig::olmoe_1b_7b()), 6.9),
        ] {
            cfg.validate()?;
            let n = cfg.arch()?.num_parameters() as f64 / 1e9;
            assert!((n - billions).abs() < 0.05, "{:?}: {n}", cfg.family());
        }
        Ok(())
    }
}
