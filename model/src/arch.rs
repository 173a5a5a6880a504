//! [`Arch`]: what the model code needs to know of a checkpoint, whatever its family. Each
//! family's `config.json` ([`crate::families`]) is turned into one of these; the layers read
//! only this.

use crate::config::RopeScaling;
use crate::layers::Activation;

/// The model families, by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// DeepSeekMoE v1 (`deepseek`).
    DeepSeek,
    /// Qwen1.5-MoE / Qwen2-MoE (`qwen2_moe`).
    Qwen2Moe,
    /// Qwen3-MoE (`qwen3_moe`).
    Qwen3Moe,
    /// Mixtral (`mixtral`).
    Mixtral,
    /// OLMoE (`olmoe`).
    Olmoe,
}

impl Family {
    /// Every family, in the order the project added them.
    pub const ALL: [Family; 5] = [
        Family::DeepSeek,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::Mixtral,
        Family::Olmoe,
    ];

    /// The `model_type` of its `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::DeepSeek => "deepseek",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Mixtral => "mixtral",
            Self::Olmoe => "olmoe",
        }
    }

    /// The family of a `model_type`, if supported.
    pub fn from_model_type(t: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == t)
    }

    /// The projection names PEFT users target for LoRA on every linear layer of the family
    /// (attention and every MLP, routed experts included; routers and `lm_head` excluded).
    pub fn default_targets(self) -> &'static [&'static str] {
        match self {
            Self::Mixtral => &["q_proj", "v_proj", "k_proj", "o_proj", "w1", "w2", "w3"],
            _ => &PROJECTION_TARGETS,
        }
    }
}

/// RMSNorm on queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// None (DeepSeekMoE, Qwen2-MoE, Mixtral).
    None,
    /// One norm of width `head_dim` applied to every head (Qwen3-MoE).
    PerHead,
    /// One norm over the whole projection output (OLMoE: `q_norm` of width
    /// `heads·head_dim`, `k_norm` of width `kv_heads·head_dim`).
    Whole,
}

/// The load-balancing loss of a family.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AuxLoss {
    /// None (weight 0, or a family's `output_router_logits: false`).
    None,
    /// DeepSeekMoE's per-layer loss `α·Σ_e f_e·P_e` (per sequence when `seq`, else per batch),
    /// entering the gradient with weight 1 per layer.
    DeepSeek {
        /// `aux_loss_alpha`.
        alpha: f64,
        /// `seq_aux`.
        seq: bool,
    },
    /// transformers' `load_balancing_loss_func` (Switch Transformer), over the router outputs of
    /// every MoE layer at once, padding excluded, times `router_aux_loss_coef`.
    Switch {
        /// `router_aux_loss_coef`.
        coef: f64,
    },
}

/// The module and projection names of a family's feed-forward blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Naming {
    /// The MoE block's module under a layer: `mlp`, or Mixtral's `block_sparse_moe`.
    pub moe: &'static str,
    /// The routed experts' gate, up and down projections: `gate_proj/up_proj/down_proj`, or
    /// Mixtral's `w1/w3/w2`.
    pub expert: [&'static str; 3],
    /// The shared experts' module: `shared_experts` (DeepSeekMoE) or `shared_expert` (Qwen2-MoE).
    pub shared: &'static str,
}

/// Every projection of a layer with gate/up/down MLPs, in the order of the DeepSeekMoE
/// recipe's `--trainable` (`lora_target_modules`).
pub const PROJECTION_TARGETS: [&str; 7] = [
    "q_proj",
    "v_proj",
    "k_proj",
    "o_proj",
    "gate_proj",
    "down_proj",
    "up_proj",
];

/// The gated MLP projections of dense layers and shared experts.
pub const MLP_NAMES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// The architecture of a model, whatever its family.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    /// The family.
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head (not always `hidden / heads`: Qwen3-MoE sets it).
    pub head_dim: usize,
    /// Bias on the q, k, v and o projections.
    pub attention_bias: [bool; 4],
    /// RMSNorm on queries and keys.
    pub qk_norm: QkNorm,
    /// Clamp of q, k and v to `[-c, c]` (OLMoE's `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest position the RoPE scaling refers to.
    pub max_position_embeddings: usize,
    /// Sliding attention window, if any: longer passes are refused.
    pub sliding_window: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Std of the normal init (random models).
    pub initializer_range: f64,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    /// Whether each layer is a MoE layer.
    pub moe_layers: Vec<bool>,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Width of the shared expert(s) MLP, if any.
    pub shared_intermediate: Option<usize>,
    /// The shared expert's output is scaled by `sigmoid(x·g)` (Qwen2-MoE's `shared_expert_gate`).
    pub shared_gate: bool,
    /// Renormalize the top-k gate weights to sum to one, with this epsilon in the denominator
    /// (DeepSeekMoE adds 1e-20, the others nothing).
    pub norm_topk: Option<f64>,
    /// The load-balancing loss.
    pub aux: AuxLoss,
    /// Module names.
    pub naming: Naming,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_token_id: Option<u32>,
}

impl Arch {
    /// Whether decoder layer `i` is a MoE layer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe_layers.get(i).copied().unwrap_or(false)
    }

    /// Width of the query projection's output.
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projections' outputs.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Total parameter count (embeddings, `lm_head`, routers, norms and biases included).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let (q, kv) = (self.q_width(), self.kv_width());
        let bias = [q, kv, kv, h];
        let mut attn = 2 * h * q + 2 * h * kv;
        attn += (0..4)
            .filter(|&i| self.attention_bias[i])
            .map(|i| bias[i])
            .sum::<usize>();
        attn += match self.qk_norm {
            QkNorm::None => 0,
            QkNorm::PerHead => 2 * self.head_dim,
            QkNorm::Whole => q + kv,
        };
        let embeddings = if self.tie_word_embeddings { 1 } else { 2 };
        let mut total = self.vocab_size * h * embeddings + h;
        for i in 0..self.num_hidden_layers {
            total += attn + 2 * h;
            if self.is_moe_layer(i) {
                let e = self.num_experts;
                total += e * h + e * 3 * h * self.moe_intermediate_size;
                total += self.shared_intermediate.map_or(0, |w| 3 * h * w);
                total += if self.shared_gate { h } else { 0 };
            } else {
                total += 3 * h * self.intermediate_size;
            }
        }
        total
    }
}
