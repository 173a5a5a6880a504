//! The DeepSeekMoE decoder: RMSNorm, RoPE, causal multi-head attention, dense MLP, MoE layer
//! with softmax router, routed and shared experts and the load-balancing loss.
//!
//! The math follows `modeling_deepseek.py` (v1) of `deepseek-ai/deepseek-moe-16b-base`. Fused
//! kernels (RMSNorm, RoPE, attention softmax, SwiGLU, from `moe_peft_kernels`) run outside
//! candle's graph with hand-written backwards (see `ops.rs`), each tested against autograd
//! through the composed ops, so gradients reach adapters on every projection.
//!
//! One file per concept: [`norm`] (RMSNorm), [`rope`] (rotary tables), [`mask`] (the forward
//! context and attention masks), [`cache`] (KV cache), [`attention`], [`mlp`] (gated MLP and
//! activation), [`router`] (top-k routing and the aux loss), [`moe`] (dispatch, experts,
//! combine) and [`decoder`] (a decoder layer).

use std::sync::Arc;

use moe_peft_quant::LinearLike;

pub mod attention;
pub mod cache;
pub mod decoder;
pub mod mask;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod router;

pub use attention::{Attention, ATTENTION_PROJECTIONS};
pub use cache::LayerCache;
pub use decoder::{DecoderLayer, LayerOutput, MoeOrMlp};
pub use mask::{attention_mask, every_query_sees_a_key, segment_attention_mask, ForwardContext};
pub use mlp::{Activation, Mlp};
pub use moe::{Dispatch, ExpertsBackward, ExpertsForward, ExpertsOutput, Moe, MoeAux};
pub use norm::RmsNorm;
pub use rope::Rotary;
pub use router::{MoeGate, RouterStats, Routing};

/// A projection slot: a frozen base or an adapter wrapping one.
pub type Linear = Arc<dyn LinearLike>;
