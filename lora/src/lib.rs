//! LoRA and QLoRA for DeepSeekMoE: adapters on attention and every expert projection, the
//! training loop (AdamW, schedules, clipping, accumulation, gradient checkpointing), PEFT
//! save/load, merge and Hugging Face export.
//!
//! References: LoRA (Hu et al., arXiv 2106.09685), QLoRA (Dettmers et al., arXiv 2305.14314),
//! rsLoRA (Kalajdzievski, arXiv 2312.03732), and huggingface/peft `tuners/lora` for the
//! forward, initialization, matching rules and file format.
//!
//! Where things live: [`config`] ([`LoraConfig`], PEFT field names), [`layer`] ([`LoraLinear`]
//! and the dropout stream), [`fused`] (the routed experts of a layer with their adapters, forward
//! and backward by hand), [`inject`] ([`LoraModel`], including [`LoraModel::backward`], the one
//! way to get every trainable gradient), [`adamw`], [`schedule`] and [`clip`] (the optimizer,
//! learning-rate schedules, gradient clipping), [`train`] ([`Trainer`], checkpoints, resume),
//! [`export`] and [`merge`] (PEFT files, HF export, merging into a checkpoint on disk).
#![warn(missing_docs)]

pub mod adamw;
pub mod clip;
pub mod config;
pub mod error;
pub mod export;
pub mod fused;
pub mod inject;
pub mod layer;
pub mod merge;
pub mod schedule;
pub mod train;

pub use adamw::{AdamW, AdamWConfig, Optim};
pub use clip::{clip_coefficient, clip_grad_norm, global_norm};
pub use config::{InitLoraWeights, LayerSelection, LoraConfig, TargetModules, DEEPSEEK_TARGETS};
pub use error::{Error, Result};
pub use export::{
    export_hf, peft_key, save_safetensors, ExportOptions, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
pub use fused::{set_batched_dequantization, FusedLoraExperts};
pub use inject::{valid_target_names, LoraModel, TrainMode, PEFT_PREFIX};
pub use layer::{DropoutState, LoraLinear, TrainableLinear};
pub use merge::{merge_checkpoint, MergeOptions, MergeReport};
pub use schedule::Schedule;
pub use train::{
    latest_checkpoint, list_checkpoints, optimizer_files, optimizer_shard_name, MicroGrads,
    PhaseTimes, StepMetrics, TrainBatch, TrainConfig, Trainer, TrainerState, OPTIMIZER_STATE,
    TRAINER_STATE,
};
