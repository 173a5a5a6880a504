//! Rotary position embeddings: the cos/sin tables (with the configured scaling).

use candle_core::{DType, Device, Tensor};

use crate::arch::Arch;
use crate::config::RopeScaling;
use crate::error::Result;

/// Rotary position embedding (non-interleaved `rotate_half` layout).
#[derive(Debug, Clone)]
pub struct Rotary {
    head_dim: usize,
    base: f64,
    max_positions: usize,
    scaling: Option<RopeScaling>,
}

impl Rotary {
    /// From the architecture.
    pub fn new(arch: &Arch) -> Self {
        Self {
            head_dim: arch.head_dim,
            base: arch.rope_theta,
            max_positions: arch.max_position_embeddings,
            scaling: arch.rope_scaling.clone(),
        }
    }

    fn inv_freq(&self, total_len: usize) -> Vec<f32> {
        let d = self.head_dim;
        let mut base = self.base;
        if let Some(s) = &self.scaling {
            if s.kind == "dynamic" && total_len > self.max_positions {
                let f = s.factor;
                base *= ((f * total_len as f64 / self.max_positions as f64) - (f - 1.0))
                    .powf(d as f64 / (d as f64 - 2.0));
            }
        }
        let base = base as f32;
        (0..d)
            .step_by(2)
            .map(|i| 1.0f32 / base.powf(i as f32 / d as f32))
            .collect()
    }

    /// `cos`, `sin` of shape `(len, head_dim / 2)` for positions `offset..offset+len` (HF's
    /// tables repeat this half twice).
    pub fn cos_sin(
        &self,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let inv = self.inv_freq(offset + len);
        let half = inv.len();
        let scale = match &self.scaling {
            Some(s) if s.kind == "linear" => 1.0 / s.factor as f32,
            _ => 1.0,
        };
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            let t = p as f32 * scale;
            for f in &inv {
                let a = t * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}
