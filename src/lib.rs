//! moe-peft: LoRA and QLoRA fine-tuning of Mixture-of-Experts models on candle.
pub use moe_peft_data as data;
pub use moe_peft_lora as lora;
pub use moe_peft_model as model;
pub use moe_peft_quant as quant;
