//! The gated MLP `down(act(gate x) ⊙ up x)` (dense layers, experts, shared experts) and its activation.

use candle_core::Tensor;

use crate::error::Result;

use super::Linear;

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (DeepSeekMoE).
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// ReLU.
    Relu,
}

impl Activation {
    /// The activation of a `hidden_act` name (`silu`, `gelu`, `relu`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    /// `grad · act'(x)`, the backward of [`Self::apply`].
    pub fn backward(self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let d = match self {
            Self::Silu => {
                let s = (x.neg()?.exp()? + 1.0)?.recip()?;
                let one_minus = (1.0 - &s)?;
                (&s * ((x * one_minus)? + 1.0)?)?
            }
            Self::Relu => x.gt(0.0)?.to_dtype(x.dtype())?,
            Self::Gelu => {
                let cdf = (((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?;
                let pdf =
                    ((x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt()))?;
                (cdf + (x * pdf)?)?
            }
        };
        Ok((grad * d)?)
    }

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => x.silu()?,
            Self::Gelu => x.gelu_erf()?,
            Self::Relu => x.relu()?,
        })
    }
}

/// `down(act(gate(x)) · up(x))`: the dense MLP, one routed expert, or the fused shared experts.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
    act: Activation,
    names: [&'static str; 3],
}

impl Mlp {
    /// From its three projections, named `names` (gate, up, down: `gate_proj/up_proj/down_proj`,
    /// or Mixtral's `w1/w3/w2`) under the module's path.
    pub fn new(
        act: Activation,
        names: [&'static str; 3],
        gate: Linear,
        up: Linear,
        down: Linear,
    ) -> Self {
        Self {
            gate_proj: gate,
            up_proj: up,
            down_proj: down,
            act,
            names,
        }
    }

    /// The projections' names (gate, up, down).
    pub fn names(&self) -> [&'static str; 3] {
        self.names
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.act
    }

    /// Applies the MLP to `x` of any rank.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let g = self.gate_proj.forward_t(x, train)?;
        let u = self.up_proj.forward_t(x, train)?;
        let a = match self.act {
            // One fused pass each way; the graph keeps the output, not silu(g).
            Activation::Silu => {
                let (gd, ud) = (g.detach(), u.detach());
                let a = moe_peft_kernels::swiglu::swiglu(&gd, &ud)?;
                moe_peft_kernels::attach_backward2(&g, &u, a, move |da| {
                    let (dg, du) = moe_peft_kernels::swiglu::swiglu_backward(&gd, &ud, da)?;
                    Ok((Some(dg), Some(du)))
                })?
            }
            act => (act.apply(&g)? * u)?,
        };
        Ok(self.down_proj.forward_t(&a, train)?)
    }

    pub(crate) fn sites_mut(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        let [g, u, d] = self.names;
        f(&format!("{prefix}.{g}"), &mut self.gate_proj)?;
        f(&format!("{prefix}.{u}"), &mut self.up_proj)?;
        f(&format!("{prefix}.{d}"), &mut self.down_proj)
    }

    pub(crate) fn sites(
        &self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &Linear) -> Result<()>,
    ) -> Result<()> {
        let [g, u, d] = self.names;
        f(&format!("{prefix}.{g}"), &self.gate_proj)?;
        f(&format!("{prefix}.{u}"), &self.up_proj)?;
        f(&format!("{prefix}.{d}"), &self.down_proj)
    }
}
