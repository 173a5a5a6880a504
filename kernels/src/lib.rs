//! General compute for fine-tuning MoE models on candle. Each op is a CPU twin, a CUDA kernel
//! (`cuda/*.cu`, compiled to PTX by `build.rs` with the `cuda` feature) and, where it is
//! differentiated, a written-out backward. The CPU twin is the reference its CUDA kernel is
//! tested against (same expressions, same roundings).
//!
//! | module | what |
//! |---|---|
//! | [`softmax`] | masked softmax of attention scores and its backward |
//! | [`norm`] | RMSNorm forward and input gradient |
//! | [`xent`] | cross-entropy rows (loss and softmax) for the LM head |
//! | [`swiglu`] | `silu(gate) ⊙ up` and its backward |
//! | [`rows`] | row gather for MoE dispatch, and the attention heads' transposes |
//! | [`combine`] | the MoE combine (gate-weighted sum of expert rows) and its gradients |
//! | [`grouped`] | grouped GEMMs, one product per expert in one call (a segmented kernel for the experts' weight gradients) |
//! | [`dropout`] | counter-based inverted dropout, plain and per row group |
//! | [`adam8bit`] | 8-bit blockwise AdamW (bitsandbytes' `AdamW8bit`) and bf16 stochastic rounding |
//! | [`adamw`] | the AdamW update, per variable or all at once from a [`FlatGrads`] |
//! | [`flat`] | [`FlatGrads`], every trainable gradient in one buffer |
//! | [`cast`] | many tensors cast in one launch |
//! | [`comm`] | collectives between data-parallel ranks (one process, threads, NCCL) and how work is split |
//! | [`rendezvous`] | the start of a multi-process group: torchrun's environment, the NCCL id over TCP |
//! | [`autograd`] | attaching a hand-written backward to a value computed outside the graph |
//! | [`device`] | the device memory pool, profiler control, raw device addresses |
//!
//! The weight formats (NF4/FP4, int8) live in `moe-peft-quant`; their kernels sit with the
//! others in `cuda/` and are exported as PTX by [`ptx`].
#![warn(missing_docs)]

pub mod adam8bit;
pub mod adamw;
pub mod autograd;
pub mod cast;
pub mod combine;
pub mod comm;
pub mod device;
pub mod dropout;
pub mod error;
pub mod flat;
pub mod grouped;
pub mod norm;
pub mod rendezvous;
pub mod rows;
pub mod softmax;
pub mod swiglu;
mod twin;
pub mod xent;

/// PTX of the weight-format kernels, launched by `moe-peft-quant`.
#[cfg(feature = "cuda")]
pub mod ptx {
    /// `cuda/nf4.cu`: 4-bit (NF4/FP4) quantize, double quantize and dequantize.
    pub const NF4: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
    /// `cuda/int8.cu`: row-wise int8 quantize and dequantize.
    pub const INT8: &str = include_str!(concat!(env!("OUT_DIR"), "/int8.ptx"));
}

#[cfg(feature = "cuda")]
pub use adam8bit::{adam8bit_update_cuda, StatePointers};
pub use adam8bit::{
    adam8bit_update_host, stochastic_bf16, Adam8bitStep, BlockwiseLayout, HostState, Maps,
};
pub use adamw::{adamw_update, adamw_update_flat, AdamWStep};
pub use autograd::{attach_backward, attach_backward2, attach_backward3};
pub use cast::{bit_patterns, cast_many};
pub use combine::{
    combine_rows_backward_rows, combine_rows_backward_weights, combine_rows_forward,
};
pub use comm::{Communicator, SingleProcess, ThreadGroup};
pub use device::{
    cuda_device_or_skip, cuda_profiler, pool_memory, reset_pool_peaks, retain_freed_device_memory,
    PoolMemory,
};
#[cfg(feature = "cuda")]
pub use device::{device_address, DeviceAddress, MappedHost};
pub use dropout::{hash_dropout, segmented_dropout, segmented_dropout_add};
pub use error::{Error, Result};
pub use flat::FlatGrads;
pub use grouped::{grouped_matmul, grouped_matmul_add, grouped_matmul_tn};
pub use rendezvous::LaunchEnv;
pub use rows::gather_rows;
