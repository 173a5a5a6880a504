#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod hub;

/// Instruction data: readers, templates, tokenization, masking, batching.
pub use moe_peft_data as data;
/// Compute kernels: softmax, RMSNorm, cross-entropy, SwiGLU, row gather, grouped GEMM,
/// dropout, AdamW, flat gradients, casts, attached backwards, the device pool.
pub use moe_peft_kernels as kernels;
/// Adapters, training, PEFT files, merge and export.
pub use moe_peft_lora as lora;
/// DeepSeekMoE in candle.
pub use moe_peft_model as model;
/// bitsandbytes-compatible NF4/FP4/int8 frozen weights and linear layers.
pub use moe_peft_quant as quant;
