//! One pre-norm decoder layer: attention then the dense MLP or the MoE block.

use candle_core::Tensor;

use crate::error::Result;

use super::{Attention, ForwardContext, LayerCache, Linear, Mlp, Moe, RmsNorm};

/// The feed-forward block of a decoder layer.
#[derive(Debug, Clone)]
pub enum MoeOrMlp {
    /// Dense MLP (layers before `first_k_dense_replace`, or off `moe_layer_freq`).
    Mlp(Mlp),
    /// Mixture of experts.
    Moe(Moe),
}

/// One pre-norm decoder layer: `h + attn(ln1 h)`, then `h + mlp(ln2 h)`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Index of the layer.
    pub index: usize,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
    /// Feed-forward block.
    pub mlp: MoeOrMlp,
}

/// What a decoder layer returns.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// Hidden states `(b, seq, hidden)`.
    pub hidden: Tensor,
    /// The MoE balancing loss (training, MoE layers, `aux_loss_alpha > 0`).
    pub aux_loss: Option<Tensor>,
}

impl DecoderLayer {
    /// Runs the layer.
    pub fn forward(
        &self,
        h: &Tensor,
        ctx: &ForwardContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<LayerOutput> {
        let x = self.input_layernorm.forward(h)?;
        let x = self.self_attn.forward(&x, ctx, cache)?;
        let h = (h + x)?;
        let x = self.post_attention_layernorm.forward(&h)?;
        let (x, aux_loss) = match &self.mlp {
            MoeOrMlp::Mlp(m) => (m.forward(&x, ctx.train)?, None),
            MoeOrMlp::Moe(m) => m.forward(&x, ctx.train)?,
        };
        Ok(LayerOutput {
            hidden: (h + x)?,
            aux_loss,
        })
    }

    /// Visits every projection of the layer with its HF module path.
    pub fn visit_sites_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        let p = format!("model.layers.{}", self.index);
        let a = &mut self.self_attn;
        f(&format!("{p}.self_attn.q_proj"), &mut a.q_proj)?;
        f(&format!("{p}.self_attn.k_proj"), &mut a.k_proj)?;
        f(&format!("{p}.self_attn.v_proj"), &mut a.v_proj)?;
        f(&format!("{p}.self_attn.o_proj"), &mut a.o_proj)?;
        match &mut self.mlp {
            MoeOrMlp::Mlp(m) => m.sites_mut(&format!("{p}.mlp"), f),
            MoeOrMlp::Moe(m) => {
                for (e, x) in m.experts.iter_mut().enumerate() {
                    x.sites_mut(&format!("{p}.mlp.experts.{e}"), f)?;
                }
                if let Some(sh) = &mut m.shared_experts {
                    sh.sites_mut(&format!("{p}.mlp.shared_experts"), f)?;
                }
                Ok(())
            }
        }
    }

    /// Visits every projection of the layer (read-only).
    pub fn visit_sites(&self, f: &mut dyn FnMut(&str, &Linear) -> Result<()>) -> Result<()> {
        let p = format!("model.layers.{}", self.index);
        let a = &self.self_attn;
        f(&format!("{p}.self_attn.q_proj"), &a.q_proj)?;
        f(&format!("{p}.self_attn.k_proj"), &a.k_proj)?;
        f(&format!("{p}.self_attn.v_proj"), &a.v_proj)?;
        f(&format!("{p}.self_attn.o_proj"), &a.o_proj)?;
        match &self.mlp {
            MoeOrMlp::Mlp(m) => m.sites(&format!("{p}.mlp"), f),
            MoeOrMlp::Moe(m) => {
                for (e, x) in m.experts.iter().enumerate() {
                    x.sites(&format!("{p}.mlp.experts.{e}"), f)?;
                }
                if let Some(sh) = &m.shared_experts {
                    sh.sites(&format!("{p}.mlp.shared_experts"), f)?;
                }
                Ok(())
            }
        }
    }
}
