//! DeepSeekMoE (v1) in candle: configuration, checkpoint loading (single or sharded
//! safetensors, optionally quantized on load), a differentiable training forward with the
//! MoE balancing loss, KV-cached generation, and a visitor over every projection site.
//!
//! The math is that of `modeling_deepseek.py` in `deepseek-ai/deepseek-moe-16b-base`
//! (DeepSeekMoE, Dai et al., arXiv 2401.06066). Routing runs on the device (softmax, top-k by
//! `arg_sort`); tokens are grouped by expert with one host copy of the chosen ids per layer.
//!
//! Where things live: [`config`] (the HF `config.json`), [`weights`] (reading checkpoints by
//! positioned reads), [`io`] (streaming safetensors writers, shards and index), [`model`]
//! ([`DeepSeekMoe`]: load, forward, loss), [`layers`] (one file per concept: norm, rope, mask,
//! cache, attention, mlp, router, moe, decoder), [`ops`] (compositions with hand-written
//! backwards: attention core, chunked LM-head loss, MoE dispatch and combine), [`grad`]
//! (`no_grad`), [`generate`], [`quantized`] (saving a 4-bit base) and [`random`] (random
//! checkpoints). The kernels these call are in `moe-peft-kernels`, the weight formats in
//! `moe-peft-quant`.
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod generate;
pub mod grad;
pub mod io;
pub mod layers;
pub mod model;
pub mod ops;
pub mod quantized;
pub mod random;
pub mod weights;

pub use config::{DeepSeekMoeConfig, RopeScaling};
pub use error::{Error, Result};
pub use generate::GenerateOptions;
pub use layers::{
    Activation, Attention, DecoderLayer, Dispatch, ExpertsForward, ExpertsOutput, ForwardContext,
    LayerCache, LayerOutput, Linear, Mlp, Moe, MoeGate, MoeOrMlp, RmsNorm, Routing,
};
pub use model::{
    causal_lm_loss, DeepSeekMoe, Embedding, KvCache, LoadOptions, LossOutput, ModelOutput,
    WeightRef,
};
pub use moe_peft_quant::{LinearLike, QuantPolicy};
pub use weights::Checkpoint;
