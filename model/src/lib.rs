//! MoE causal LMs in candle: DeepSeekMoE (v1), Qwen1.5/Qwen2-MoE, Qwen3-MoE, Mixtral and
//! OLMoE. Configuration (the family picked from `config.json`'s `model_type`), checkpoint
//! loading (single or sharded safetensors, optionally quantized on load), a differentiable
//! training forward with each family's balancing loss, KV-cached generation, and visitors over
//! every projection site and every other weight.
//!
//! A family is a config and a few choices ([`Arch`]): attention biases, q/k norms, the shared
//! expert and its gate, top-k renormalization, the balancing loss and the module names. The
//! blocks are written once. The math follows `modeling_deepseek.py`
//! (`deepseek-ai/deepseek-moe-16b-base`) and transformers 4.56's `modeling_qwen2_moe.py`,
//! `modeling_qwen3_moe.py`, `modeling_mixtral.py` and `modeling_olmoe.py`. Routing runs on the
//! device (softmax, top-k by `arg_sort`); tokens are grouped by expert with one host copy of
//! the chosen ids per layer.
//!
//! Where things live: [`families`] ([`ModelConfig`] and each family's `config.json`),
//! [`config`] (DeepSeekMoE's), [`arch`] (what the blocks read), [`weights`] (reading
//! checkpoints by positioned reads), [`io`] (streaming safetensors writers, shards and index),
//! [`model`] ([`MoeModel`]: load, forward, loss), [`layers`] (one file per concept: norm, rope,
//! mask, cache, attention, mlp, router, moe, decoder), [`aux`] (transformers' Switch loss split
//! per layer), [`ops`] (compositions with hand-written backwards: attention core, chunked
//! LM-head loss, MoE dispatch and combine), [`grad`] (`no_grad`), [`generate`], [`quantized`]
//! (saving a 4-bit base) and [`random`] (random checkpoints). The kernels these call are in
//! `moe-peft-kernels`, the weight formats in `moe-peft-quant`.
#![warn(missing_docs)]

pub mod arch;
pub mod aux;
pub mod config;
pub mod error;
pub mod families;
pub mod generate;
pub mod grad;
pub mod io;
pub mod layers;
pub mod model;
pub mod ops;
pub mod quantized;
pub mod random;
pub mod weights;

pub use arch::{Arch, AuxLoss, Family, Naming, QkNorm};
pub use aux::SwitchAux;
pub use config::{DeepSeekMoeConfig, RopeScaling};
pub use error::{Error, Result};
pub use families::{
    MixtralConfig, ModelConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig, TokenIds,
};
pub use generate::GenerateOptions;
pub use layers::{
    Activation, Attention, DecoderLayer, Dispatch, ExpertsBackward, ExpertsForward, ExpertsOutput,
    ForwardContext, LayerCache, LayerOutput, Linear, Mlp, Moe, MoeAux, MoeGate, MoeOrMlp, RmsNorm,
    RouterStats, Routing, ATTENTION_PROJECTIONS,
};
pub use model::{
    causal_lm_loss, Embedding, KvCache, LoadOptions, LossOutput, ModelOutput, MoeModel, WeightRef,
};
pub use moe_peft_quant::{LinearLike, QuantPolicy};
pub use weights::Checkpoint;
