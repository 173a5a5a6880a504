//! One pre-norm decoder layer: attention then the dense MLP or the MoE block.

use candle_core::Tensor;

use crate::arch::Naming;
use crate::error::Result;

use super::attention::ATTENTION_PROJECTIONS;
use super::{Attention, ForwardContext, LayerCache, Linear, Mlp, Moe, RmsNorm, RouterStats};

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
    /// The family's module names.
    pub naming: Naming,
}

/// What a decoder layer returns.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// Hidden states `(b, seq, hidden)`.
    pub hidden: Tensor,
    /// DeepSeekMoE's balancing loss (training, MoE layers, `aux_loss_alpha > 0`).
    pub aux_loss: Option<Tensor>,
    /// The layer's share of the Switch balancing loss (training, MoE layers of the families
    /// with `output_router_logits`; see [`crate::aux::SwitchAux`]).
    pub router: Option<RouterStats>,
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
        let (x, aux) = match &self.mlp {
            MoeOrMlp::Mlp(m) => (m.forward(&x, ctx.train)?, Default::default()),
            MoeOrMlp::Moe(m) => m.forward(&x, ctx)?,
        };
        Ok(LayerOutput {
            hidden: (h + x)?,
            aux_loss: aux.loss,
            router: aux.router,
        })
    }

    /// The module path of the layer's feed-forward block (`model.layers.N.mlp`, or Mixtral's
    /// `…block_sparse_moe`).
    pub fn ffn_path(&self) -> String {
        let p = format!("model.layers.{}", self.index);
        match &self.mlp {
            MoeOrMlp::Mlp(_) => format!("{p}.mlp"),
            MoeOrMlp::Moe(_) => format!("{p}.{}", self.naming.moe),
        }
    }

    /// Visits every weight of the layer that is not a projection site (norms, biases, q/k
    /// norms, router, shared-expert gate) with its HF `state_dict` name.
    pub fn visit_tensors_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        let p = format!("model.layers.{}", self.index);
        let ffn = self.ffn_path();
        f(
            &format!("{p}.input_layernorm.weight"),
            self.input_layernorm.weight_mut(),
        )?;
        f(
            &format!("{p}.post_attention_layernorm.weight"),
            self.post_attention_layernorm.weight_mut(),
        )?;
        let a = &mut self.self_attn;
        for (i, b) in a.biases.iter_mut().enumerate() {
            if let Some(b) = b {
                f(
                    &format!("{p}.self_attn.{}.bias", ATTENTION_PROJECTIONS[i]),
                    b,
                )?;
            }
        }
        if let Some(n) = &mut a.q_norm {
            f(&format!("{p}.self_attn.q_norm.weight"), n.weight_mut())?;
        }
        if let Some(n) = &mut a.k_norm {
            f(&format!("{p}.self_attn.k_norm.weight"), n.weight_mut())?;
        }
        if let MoeOrMlp::Moe(m) = &mut self.mlp {
            f(&format!("{ffn}.gate.weight"), m.gate.weight_mut())?;
            if let Some(g) = &mut m.shared_expert_gate {
                f(&format!("{ffn}.{}_gate.weight", self.naming.shared), g)?;
            }
        }
        Ok(())
    }

    /// Read-only [`Self::visit_tensors_mut`].
    pub fn visit_tensors(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        let mut me = self.clone();
        me.visit_tensors_mut(&mut |name, t| f(name, t))
    }

    /// Visits every projection of the layer with its HF module path.
    pub fn visit_sites_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        let p = format!("model.layers.{}", self.index);
        let ffn = self.ffn_path();
        let a = &mut self.self_attn;
        let [q, k, v, o] = ATTENTION_PROJECTIONS;
        f(&format!("{p}.self_attn.{q}"), &mut a.q_proj)?;
        f(&format!("{p}.self_attn.{k}"), &mut a.k_proj)?;
        f(&format!("{p}.self_attn.{v}"), &mut a.v_proj)?;
        f(&format!("{p}.self_attn.{o}"), &mut a.o_proj)?;
        match &mut self.mlp {
            MoeOrMlp::Mlp(m) => m.sites_mut(&ffn, f),
            MoeOrMlp::Moe(m) => {
                for (e, x) in m.experts.iter_mut().enumerate() {
                    x.sites_mut(&format!("{ffn}.experts.{e}"), f)?;
                }
                if let Some(sh) = &mut m.shared_experts {
                    sh.sites_mut(&format!("{ffn}.{}", self.naming.shared), f)?;
                }
                Ok(())
            }
        }
    }

    /// Visits every projection of the layer (read-only).
    pub fn visit_sites(&self, f: &mut dyn FnMut(&str, &Linear) -> Result<()>) -> Result<()> {
        let p = format!("model.layers.{}", self.index);
        let ffn = self.ffn_path();
        let a = &self.self_attn;
        let [q, k, v, o] = ATTENTION_PROJECTIONS;
        f(&format!("{p}.self_attn.{q}"), &a.q_proj)?;
        f(&format!("{p}.self_attn.{k}"), &a.k_proj)?;
        f(&format!("{p}.self_attn.{v}"), &a.v_proj)?;
        f(&format!("{p}.self_attn.{o}"), &a.o_proj)?;
        match &self.mlp {
            MoeOrMlp::Mlp(m) => m.sites(&ffn, f),
            MoeOrMlp::Moe(m) => {
                for (e, x) in m.experts.iter().enumerate() {
                    x.sites(&format!("{ffn}.experts.{e}"), f)?;
                }
                if let Some(sh) = &m.shared_experts {
                    sh.sites(&format!("{ffn}.{}", self.naming.shared), f)?;
                }
                Ok(())
            }
        }
    }
}
