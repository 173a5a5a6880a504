//! `DeepSeekMoeConfig`: the Hugging Face `config.json` of DeepSeekMoE (v1, `model_type: deepseek`).
//!
//! Field names and defaults follow `configuration_deepseek.py` of
//! `deepseek-ai/deepseek-moe-16b-base`, so a missing key means what it means to transformers.
//! Unknown keys are ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::arch::{Arch, AuxLoss, Family, Naming, QkNorm, MLP_NAMES};
use crate::error::{Error, Result};

/// The HF configuration of a DeepSeekMoE (v1) causal LM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeepSeekMoeConfig {
    /// `["DeepseekForCausalLM"]` for real checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `"deepseek"`.
    pub model_type: String,
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Width of the dense MLP (layers before `first_k_dense_replace` or off `moe_layer_freq`).
    pub intermediate_size: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (`None`: same as `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Shared experts, fused into one MLP of width `n_shared_experts · moe_intermediate_size`.
    pub n_shared_experts: Option<usize>,
    /// Routed experts per MoE layer (`None`: a dense model).
    pub n_routed_experts: Option<usize>,
    /// Experts chosen per token (top-k).
    pub num_experts_per_tok: Option<usize>,
    /// Every `moe_layer_freq`-th layer (from `first_k_dense_replace` on) is a MoE layer.
    pub moe_layer_freq: usize,
    /// The first `first_k_dense_replace` layers use the dense MLP.
    pub first_k_dense_replace: usize,
    /// Renormalize the top-k gate weights to sum to one.
    pub norm_topk_prob: bool,
    /// Router scoring function; only `"softmax"` exists in v1.
    pub scoring_func: String,
    /// Weight of the load-balancing loss.
    pub aux_loss_alpha: f64,
    /// Sequence-level (true) or batch-level (false) balancing loss.
    pub seq_aux: bool,
    /// MLP activation (`"silu"`).
    pub hidden_act: String,
    /// Longest position the RoPE cache covers by default.
    pub max_position_embeddings: usize,
    /// Std of the normal init (used for random models).
    pub initializer_range: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether generation uses a KV cache.
    pub use_cache: bool,
    /// Padding token id, if any.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
    /// Tensor-parallel slicing of pretraining (must be 1 here).
    pub pretraining_tp: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling: `null`, or `{"type": "linear"|"dynamic", "factor": f}`.
    pub rope_scaling: Option<RopeScaling>,
    /// Bias in the attention projections (false in DeepSeekMoE).
    pub attention_bias: bool,
    /// Attention dropout (0 in DeepSeekMoE).
    pub attention_dropout: f64,
    /// dtype the checkpoint was saved in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// A bitsandbytes `quantization_config`, if the checkpoint is pre-quantized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
    /// transformers' `auto_map` (kept so an export stays loadable with `trust_remote_code`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_map: Option<serde_json::Value>,
    /// The transformers version that wrote the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
}

/// RoPE scaling: `{"type": "linear"|"dynamic", "factor": f}` (transformers also writes the kind
/// as `rope_type`; either key is read, both are written).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    /// `"linear"` or `"dynamic"` (NTK).
    pub kind: String,
    /// Scaling factor (> 1).
    pub factor: f64,
}

impl Serialize for RopeScaling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serde_json::json!({"type": self.kind, "rope_type": self.kind, "factor": self.factor})
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for RopeScaling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(rename = "type")]
            kind: Option<String>,
            rope_type: Option<String>,
            factor: Option<f64>,
        }
        let r = Raw::deserialize(d)?;
        let kind = r.kind.or(r.rope_type).ok_or_else(|| {
            serde::de::Error::custom("rope_scaling needs a \"type\" (or \"rope_type\")")
        })?;
        Ok(Self {
            kind,
            factor: r.factor.unwrap_or(1.0),
        })
    }
}

impl Default for DeepSeekMoeConfig {
    /// The defaults of `DeepseekConfig.__init__` (not the 16B values; see
    /// [`DeepSeekMoeConfig::deepseek_moe_16b`]).
    fn default() -> Self {
        Self {
            architectures: None,
            model_type: "deepseek".into(),
            vocab_size: 102400,
            hidden_size: 4096,
            intermediate_size: 11008,
            moe_intermediate_size: 1407,
            num_hidden_layers: 30,
            num_attention_heads: 32,
            num_key_value_heads: None,
            n_shared_experts: None,
            n_routed_experts: None,
            num_experts_per_tok: None,
            moe_layer_freq: 1,
            first_k_dense_replace: 0,
            norm_topk_prob: false,
            scoring_func: "softmax".into(),
            aux_loss_alpha: 0.001,
            seq_aux: true,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            use_cache: true,
            pad_token_id: None,
            bos_token_id: Some(100000),
            eos_token_id: Some(100001),
            pretraining_tp: 1,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            rope_scaling: None,
            attention_bias: false,
            attention_dropout: 0.0,
            torch_dtype: None,
            quantization_config: None,
            auto_map: None,
            transformers_version: None,
        }
    }
}

impl DeepSeekMoeConfig {
    /// The configuration of `deepseek-ai/deepseek-moe-16b-base` (16.4B parameters).
    pub fn deepseek_moe_16b() -> Self {
        Self {
            architectures: Some(vec!["DeepseekForCausalLM".into()]),
            vocab_size: 102400,
            hidden_size: 2048,
            intermediate_size: 10944,
            moe_intermediate_size: 1408,
            num_hidden_layers: 28,
            num_attention_heads: 16,
            num_key_value_heads: Some(16),
            n_shared_experts: Some(2),
            n_routed_experts: Some(64),
            num_experts_per_tok: Some(6),
            moe_layer_freq: 1,
            first_k_dense_replace: 1,
            max_position_embeddings: 4096,
            torch_dtype: Some("bfloat16".into()),
            auto_map: Some(default_auto_map()),
            ..Self::default()
        }
    }

    /// A tiny DeepSeekMoE with the real layout (dense layer 0, routed + shared experts), for demos
    /// and tests: `vocab_size` rows, hidden 64, 3 layers, 8 experts top-3, 2 shared.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            architectures: Some(vec!["DeepseekForCausalLM".into()]),
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            moe_intermediate_size: 32,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: Some(4),
            n_shared_experts: Some(2),
            n_routed_experts: Some(8),
            num_experts_per_tok: Some(3),
            first_k_dense_replace: 1,
            max_position_embeddings: 1024,
            auto_map: Some(default_auto_map()),
            ..Self::default()
        }
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.display().to_string(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes `config.json` (pretty JSON).
    pub fn to_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(self).map_err(|source| Error::Json {
            path: path.display().to_string(),
            source,
        })?;
        std::fs::write(path, text + "\n").map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Whether decoder layer `i` is a MoE layer (else the dense MLP), as `DeepseekDecoderLayer`.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts.is_some()
            && i >= self.first_k_dense_replace
            && i % self.moe_layer_freq == 0
    }

    /// Routed experts per MoE layer (0 for a dense model).
    pub fn routed_experts(&self) -> usize {
        self.n_routed_experts.unwrap_or(0)
    }

    /// Width of the fused shared-experts MLP, if there are shared experts.
    pub fn shared_intermediate(&self) -> Option<usize> {
        self.n_shared_experts
            .filter(|&n| n > 0)
            .map(|n| n * self.moe_intermediate_size)
    }

    /// Total parameter count (embeddings, lm_head and router included).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.kv_heads() * self.head_dim();
        let attn = h * h * 2 + 2 * h * kv;
        let mut total = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 } + h;
        for i in 0..self.num_hidden_layers {
            total += attn + 2 * h;
            if self.is_moe_layer(i) {
                let e = self.routed_experts();
                total += e * h + e * 3 * h * self.moe_intermediate_size;
                total += self.shared_intermediate().map_or(0, |w| 3 * h * w);
            } else {
                total += 3 * h * self.intermediate_size;
            }
        }
        total
    }

    /// The architecture (DeepSeekMoE's blocks and names).
    pub fn arch(&self) -> Result<Arch> {
        let hidden_act = crate::families::activation(&self.hidden_act)?;
        Ok(Arch {
            family: Family::DeepSeek,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            attention_bias: [false; 4],
            qk_norm: QkNorm::None,
            clip_qkv: None,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: None,
            rms_norm_eps: self.rms_norm_eps,
            hidden_act,
            initializer_range: self.initializer_range,
            tie_word_embeddings: self.tie_word_embeddings,
            intermediate_size: self.intermediate_size,
            moe_layers: (0..self.num_hidden_layers)
                .map(|i| self.is_moe_layer(i))
                .collect(),
            num_experts: self.routed_experts(),
            top_k: self.num_experts_per_tok.unwrap_or(0),
            moe_intermediate_size: self.moe_intermediate_size,
            shared_intermediate: self.shared_intermediate(),
            shared_gate: false,
            norm_topk: self.norm_topk_prob.then_some(1e-20),
            aux: if self.aux_loss_alpha > 0.0 {
                AuxLoss::DeepSeek {
                    alpha: self.aux_loss_alpha,
                    seq: self.seq_aux,
                }
            } else {
                AuxLoss::None
            },
            naming: Naming {
                moe: "mlp",
                expert: MLP_NAMES,
                shared: "shared_experts",
            },
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id,
        })
    }

    /// Checks every value the model relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        if self.model_type != "deepseek" {
            return bad(
                "model_type",
                format!(
                    "is {:?}; only DeepSeekMoE v1 (\"deepseek\") is supported",
                    self.model_type
                ),
            );
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("moe_layer_freq", self.moe_layer_freq),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                format!(
                    "({}) must divide hidden_size ({})",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if self.head_dim() % 2 != 0 {
            return bad(
                "hidden_size",
                "gives an odd head_dim; RoPE needs an even one".into(),
            );
        }
        let kv = self.kv_heads();
        if kv == 0 || self.num_attention_heads % kv != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "({kv}) must be at least 1 and divide num_attention_heads ({})",
                    self.num_attention_heads
                ),
            );
        }
        if let Some(e) = self.n_routed_experts {
            if e == 0 {
                return bad("n_routed_experts", "must be at least 1 (or null)".into());
            }
            let k = self.num_experts_per_tok.unwrap_or(0);
            if k == 0 || k > e {
                return bad(
                    "num_experts_per_tok",
                    format!("({k}) must be between 1 and n_routed_experts ({e})"),
                );
            }
            if self.moe_intermediate_size == 0 {
                return bad("moe_intermediate_size", "must be at least 1".into());
            }
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return bad(
                "first_k_dense_replace",
                format!("({}) exceeds num_hidden_layers", self.first_k_dense_replace),
            );
        }
        if self.scoring_func != "softmax" {
            return bad(
                "scoring_func",
                format!(
                    "is {:?}; DeepSeekMoE only defines \"softmax\"",
                    self.scoring_func
                ),
            );
        }
        if !matches!(self.hidden_act.as_str(), "silu" | "gelu" | "relu") {
            return bad(
                "hidden_act",
                format!("is {:?}; supported: silu, gelu, relu", self.hidden_act),
            );
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return bad("rms_norm_eps", "must be positive".into());
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad("rope_theta", "must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.aux_loss_alpha) {
            return bad(
                "aux_loss_alpha",
                format!("({}) must be in [0, 1]", self.aux_loss_alpha),
            );
        }
        if self.pretraining_tp != 1 {
            return bad("pretraining_tp", "must be 1".into());
        }
        if self.attention_bias {
            return bad(
                "attention_bias",
                "true is not supported (DeepSeekMoE has none)".into(),
            );
        }
        if self.attention_dropout != 0.0 {
            return bad(
                "attention_dropout",
                "must be 0.0 (DeepSeekMoE uses none; LoRA dropout is separate)".into(),
            );
        }
        if let Some(rs) = &self.rope_scaling {
            if !matches!(rs.kind.as_str(), "linear" | "dynamic") {
                return bad(
                    "rope_scaling",
                    format!("type {:?} is not linear or dynamic", rs.kind),
                );
            }
            if rs.factor.is_nan() || rs.factor < 1.0 {
                return bad("rope_scaling", format!("factor {} must be ≥ 1", rs.factor));
            }
        }
        Ok(())
    }
}

fn default_auto_map() -> serde_json::Value {
    serde_json::json!({
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_b_parameter_count_matches_the_release() {
        let cfg = DeepSeekMoeConfig::deepseek_moe_16b();
        cfg.validate().unwrap();
        assert_eq!(cfg.num_parameters(), 16_375_728_128);
        assert!(!cfg.is_moe_layer(0));
        assert!((1..28).all(|i| cfg.is_moe_layer(i)));
        assert_eq!(cfg.shared_intermediate(), Some(2816));
    }

    #[test]
    fn unknown_keys_are_ignored_and_missing_keys_take_hf_defaults() {
        let cfg: DeepSeekMoeConfig =
            serde_json::from_str(r#"{"model_type":"deepseek","hidden_size":64,"num_attention_heads":4,"some_new_key":1}"#)
                .unwrap();
        assert_eq!(cfg.vocab_size, 102400);
        assert_eq!(cfg.kv_heads(), 4);
        assert_eq!(cfg.first_k_dense_replace, 0);
        cfg.validate().unwrap();
    }

    #[test]
    fn validate_names_the_field() {
        let mut cfg = DeepSeekMoeConfig::tiny(512);
        cfg.num_experts_per_tok = Some(9);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let mut cfg = DeepSeekMoeConfig::tiny(512);
        cfg.num_attention_heads = 5;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let mut cfg = DeepSeekMoeConfig::tiny(512);
        cfg.scoring_func = "sigmoid".into();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("scoring_func"));
    }
}
