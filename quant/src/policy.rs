//! [`QuantPolicy`]: how the model loader stores each frozen projection.

use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::FourBitConfig;
use crate::error::{Error, Result};
use crate::four_bit_linear::FourBitLinear;
use crate::int8::Int8Linear;
use crate::linear::{DenseLinear, LinearLike};

/// How frozen projection weights are stored.
///
/// Serialized with a `method` tag, e.g. `{"method": "none"}`, `{"method": "int8"}` or
/// `{"method": "nf4", "quant_type": "nf4", "block_size": 64, "double_quant": true,
/// "dq_block_size": 256}` (missing NF4 fields take their defaults).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum QuantPolicy {
    /// Keep the weight dense, in its dtype ([`DenseLinear`]).
    #[default]
    None,
    /// bitsandbytes-compatible 4-bit ([`FourBitLinear`]).
    Nf4(FourBitConfig),
    /// Row-wise absmax int8 ([`crate::Int8Linear`]; not LLM.int8's outlier split).
    Int8,
}

impl QuantPolicy {
    /// QLoRA's default: NF4, blocks of 64, double quantization.
    pub fn qlora() -> Self {
        QuantPolicy::Nf4(FourBitConfig::default())
    }

    /// Checks the NF4 settings.
    pub fn validate(&self) -> Result<()> {
        match self {
            QuantPolicy::Nf4(c) => c.validate(),
            _ => Ok(()),
        }
    }

    /// Builds the frozen layer for one `(out, in)` projection weight, quantizing it now (the
    /// loader calls this per tensor as it streams a checkpoint, so the dense copy can be dropped
    /// right after).
    pub fn make_linear(&self, weight: Tensor) -> Result<Arc<dyn LinearLike>> {
        if weight.rank() != 2 {
            return Err(Error::ShapeMismatch {
                name: "projection weight".into(),
                expected: "a 2-D (out, in) weight".into(),
                got: format!("shape {:?}", weight.dims()),
            });
        }
        Ok(match self {
            QuantPolicy::None => Arc::new(DenseLinear::new(weight)),
            QuantPolicy::Nf4(cfg) => Arc::new(FourBitLinear::quantize(&weight, cfg)?),
            QuantPolicy::Int8 => Arc::new(Int8Linear::quantize(&weight)?),
        })
    }

    /// Bits per weight parameter at the formula level: `None` for dense weights (the
    /// checkpoint dtype decides), [`FourBitConfig::bits_per_param`] for NF4 (4.127 at the
    /// defaults), and 8 for int8 (plus 32 / in_features for the per-row scale, not counted).
    pub fn bits_per_param(&self) -> Option<f64> {
        match self {
            QuantPolicy::None => None,
            QuantPolicy::Nf4(c) => Some(c.bits_per_param()),
            QuantPolicy::Int8 => Some(8.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::QuantType;
    use candle_core::{DType, Device};

    #[test]
    fn serde_round_trip() {
        for p in [
            QuantPolicy::None,
            QuantPolicy::Int8,
            QuantPolicy::qlora(),
            QuantPolicy::Nf4(FourBitConfig::fp4()),
        ] {
            let s = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<QuantPolicy>(&s).unwrap(), p, "{s}");
        }
        assert_eq!(
            serde_json::to_string(&QuantPolicy::None).unwrap(),
            r#"{"method":"none"}"#
        );
        let p: QuantPolicy =
            serde_json::from_str(r#"{"method":"nf4","double_quant":false}"#).unwrap();
        assert_eq!(p, QuantPolicy::Nf4(FourBitConfig::nf4_no_double_quant()));
        let p: QuantPolicy = serde_json::from_str(r#"{"method":"nf4"}"#).unwrap();
        assert_eq!(p, QuantPolicy::qlora());
        assert!(serde_json::from_str::<QuantPolicy>(r#"{"method":"gptq"}"#).is_err());
        assert_eq!(QuantPolicy::default(), QuantPolicy::None);
    }

    #[test]
    fn make_linear_picks_the_layer() -> Result<()> {
        let w = Tensor::randn(0f32, 1., (8, 64), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1., (3, 64), &Device::Cpu)?;
        let dense = QuantPolicy::None.make_linear(w.clone())?;
        assert!(dense.as_any().downcast_ref::<DenseLinear>().is_some());
        let nf4 = QuantPolicy::qlora().make_linear(w.clone())?;
        assert!(nf4.as_any().downcast_ref::<FourBitLinear>().is_some());
        let i8l = QuantPolicy::Int8.make_linear(w.clone())?;
        assert!(i8l.as_any().downcast_ref::<Int8Linear>().is_some());
        for l in [&dense, &nf4, &i8l] {
            assert_eq!((l.out_features(), l.in_features()), (8, 64));
            let y = l.forward_t(&x, false)?;
            let reference = x.matmul(&l.dense_weight(DType::F32)?.t()?)?;
            let diff = (y - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{diff}");
        }
        assert!(QuantPolicy::qlora()
            .make_linear(Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu)?)
            .is_err());
        let bad = QuantPolicy::Nf4(FourBitConfig {
            block_size: 100,
            quant_type: QuantType::Nf4,
            ..FourBitConfig::default()
        });
        assert!(bad.make_linear(w).is_err());
        assert_eq!(QuantPolicy::qlora().bits_per_param(), Some(4.126953125));
        assert_eq!(QuantPolicy::None.bits_per_param(), None);
        Ok(())
    }
}
