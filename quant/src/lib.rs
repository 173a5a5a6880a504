//! Frozen weights for QLoRA: bitsandbytes-compatible NF4/FP4 with double quantization, int8,
//! and frozen linear layers whose backward passes input gradients only.
//!
//! * [`FourBitTensor`] quantizes any float tensor blockwise to 4 bits exactly as bitsandbytes does
//!   (codes, nibble order, absmax, double quantization with the 8-bit dynamic map) and
//!   dequantizes it with candle custom ops; [`nf4`] and [`dynamic`] hold the code books and the
//!   slice-level CPU kernels.
//! * [`bnb`] reads and writes the `Linear4bit` state-dict layout (`weight`, `weight.absmax`,
//!   `weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`).
//! * [`FourBitLinear`], [`Int8Linear`] and [`DenseLinear`] implement [`LinearLike`]; forward
//!   dequantizes transiently and [`frozen_matmul`] gives the input gradient only.
//! * [`QuantPolicy`] turns each projection weight into one of them as a checkpoint streams in.
//!
//! References: QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer, arXiv 2305.14314);
//! bitsandbytes `bitsandbytes/functional.py` (`quantize_4bit`, `create_dynamic_map`,
//! `QuantState.as_dict`), `csrc/kernels.cu` (`kQuantizeBlockwise`, `dQuantizeNF4`,
//! `dQuantizeFP4`, `dQuantize`, `kDequantizeBlockwise`) and `nn/modules.py`
//! (`Linear4bit._save_to_state_dict`); LLM.int8() (arXiv 2208.07339) for the row-wise int8
//! scheme (without its outlier split).
#![warn(missing_docs)]

pub mod bnb;
pub mod config;
/// CUDA launchers of the weight-format kernels; stubs that return an error without the `cuda`
/// feature.
mod cuda;
pub mod dynamic;
pub mod error;
pub mod four_bit;
pub mod four_bit_linear;
pub mod int8;
pub mod linear;
pub mod nf4;
pub mod policy;

pub use bnb::{is_bnb_4bit, load_bnb_safetensors, save_bnb_safetensors, BnbCheckpoint};
pub use config::FourBitConfig;
pub use dynamic::{create_dynamic_map, dynamic_map};
pub use error::{Error, Result};
pub use four_bit::{DoubleQuantState, FourBitAbsmax, FourBitTensor};
pub use four_bit_linear::FourBitLinear;
pub use int8::{Int8Linear, Int8Tensor};
pub use linear::{frozen_matmul, matmul_t, DenseLinear, FrozenWeight, LinearLike};
pub use nf4::{QuantType, FP4_CODE, NF4_CODE};
pub use policy::QuantPolicy;
