//! [`FourBitLinear`]: a frozen projection whose weight is stored as an [`FourBitTensor`].

use std::any::Any;
use std::sync::Arc;

use candle_core::{DType, ModuleT, Tensor};

use crate::error::{Error, Result};
use crate::four_bit::FourBitTensor;
use crate::linear::{frozen_matmul, FrozenWeight, LinearLike};

/// A frozen linear layer `y = x Wᵀ` over a 4-bit weight `(out, in)` (QLoRA's base layer).
///
/// Forward dequantizes `W` to the input's dtype for the one GEMM and lets it go; backward
/// dequantizes again to compute `grad_x = grad_y · W` (bitsandbytes `MatMul4Bit`), so no dense
/// copy outlives an op. No weight gradient is computed.
#[derive(Debug, Clone)]
pub struct FourBitLinear {
    weight: Arc<FourBitTensor>,
}

impl FourBitLinear {
    /// Wraps a 2-D quantized weight `(out_features, in_features)`.
    pub fn new(weight: FourBitTensor) -> Result<Self> {
        Self::from_arc(Arc::new(weight))
    }

    /// Wraps a shared 2-D quantized weight.
    pub fn from_arc(weight: Arc<FourBitTensor>) -> Result<Self> {
        if weight.dims().len() != 2 {
            return Err(Error::ShapeMismatch {
                name: "FourBitLinear weight".into(),
                expected: "a 2-D (out, in) weight".into(),
                got: format!("shape {:?}", weight.dims()),
            });
        }
        Ok(Self { weight })
    }

    /// Quantizes a dense `(out, in)` weight and wraps it.
    pub fn quantize(weight: &Tensor, cfg: &crate::FourBitConfig) -> Result<Self> {
        Self::new(FourBitTensor::quantize(weight, cfg)?)
    }

    /// The quantized weight.
    pub fn weight(&self) -> &Arc<FourBitTensor> {
        &self.weight
    }
}

impl ModuleT for FourBitLinear {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let w = self
            .weight
            .dequantize(x.dtype())
            .map_err(Error::into_candle)?;
        let source: Arc<dyn FrozenWeight> = self.weight.clone();
        frozen_matmul(x, &w, source)
    }
}

impl LinearLike for FourBitLinear {
    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    fn dense_weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.weight.dequantize(dtype).map_err(Error::into_candle)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
