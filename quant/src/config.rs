//! Configuration of 4-bit quantization.

use serde::{Deserialize, Serialize};

use crate::dynamic::NESTED_BLOCK_SIZE;
use crate::error::{Error, Result};
use crate::nf4::{check_block_size, QuantType, VALID_BLOCK_SIZES};

/// How to quantize a weight to 4 bits (bitsandbytes `quantize_4bit` settings).
///
/// The default is QLoRA's: NF4, blocks of 64, double quantization with nested blocks of 256
/// (transformers' `bnb_4bit_quant_type="nf4"`, `bnb_4bit_use_double_quant=True`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FourBitConfig {
    /// The 4-bit data type.
    pub quant_type: QuantType,
    /// Elements per absmax block (32, 64, ..., 4096).
    pub block_size: usize,
    /// Quantize the absmax values to 8 bits as well (`compress_statistics`).
    pub double_quant: bool,
    /// Absmax values per nested block when `double_quant` (bitsandbytes always uses 256).
    pub dq_block_size: usize,
}

impl Default for FourBitConfig {
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            block_size: 64,
            double_quant: true,
            dq_block_size: NESTED_BLOCK_SIZE,
        }
    }
}

impl FourBitConfig {
    /// NF4 without double quantization (fp32 absmax, 4.5 bits per parameter at block 64).
    pub fn nf4_no_double_quant() -> Self {
        Self {
            double_quant: false,
            ..Self::default()
        }
    }

    /// FP4 with the other settings at their defaults.
    pub fn fp4() -> Self {
        Self {
            quant_type: QuantType::Fp4,
            ..Self::default()
        }
    }

    /// Checks the block sizes.
    pub fn validate(&self) -> Result<()> {
        check_block_size(self.block_size)?;
        if self.double_quant && !VALID_BLOCK_SIZES.contains(&self.dq_block_size) {
            return Err(Error::InvalidConfig(format!(
                "dq_block_size {} is not one of {VALID_BLOCK_SIZES:?} (bitsandbytes uses 256)",
                self.dq_block_size
            )));
        }
        Ok(())
    }

    /// Storage cost per parameter at the formula level (large tensors, whole blocks): 4 bits of
    /// code plus the absmax, i.e. `4 + 32 / block_size` without double quantization and
    /// `4 + 8 / block_size + 32 / (block_size * dq_block_size)` with it (4.5 and 4.127 at the
    /// defaults). The per-tensor constants (the 256-entry map, the offset, the 16-entry code book)
    /// are not counted; see [`crate::FourBitTensor::storage_bytes`] for the exact figure.
    pub fn bits_per_param(&self) -> f64 {
        let bs = self.block_size as f64;
        if self.double_quant {
            4.0 + 8.0 / bs + 32.0 / (bs * self.dq_block_size as f64)
        } else {
            4.0 + 32.0 / bs
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c = FourBitConfig::default();
        assert_eq!(c.quant_type, QuantType::Nf4);
        assert_eq!(c.block_size, 64);
        assert!(c.double_quant);
        assert_eq!(c.dq_block_size, 256);
        assert!(c.validate().is_ok());
        let bad = FourBitConfig {
            block_size: 100,
            ..c.clone()
        };
        assert!(matches!(bad.validate(), Err(Error::InvalidBlockSize(100))));
        let bad = FourBitConfig {
            dq_block_size: 3,
            ..c
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn bits_per_param_formula() {
        assert_eq!(FourBitConfig::default().bits_per_param(), 4.126953125);
        assert!((FourBitConfig::default().bits_per_param() - 4.127).abs() < 5e-4);
        assert_eq!(FourBitConfig::nf4_no_double_quant().bits_per_param(), 4.5);
    }

    #[test]
    fn serde_names() {
        let c: FourBitConfig = serde_json::from_str(r#"{"quant_type":"fp4"}"#).unwrap();
        assert_eq!(c, FourBitConfig::fp4());
        let s = serde_json::to_string(&FourBitConfig::default()).unwrap();
        assert_eq!(
            s,
            r#"{"quant_type":"nf4","block_size":64,"double_quant":true,"dq_block_size":256}"#
        );
        assert!(serde_json::from_str::<FourBitConfig>(r#"{"quant_type":"int3"}"#).is_err());
    }
}
