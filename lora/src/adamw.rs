//! AdamW exactly as `torch.optim.AdamW` (the reference's `adamw_torch`): the optimizer state
//! (moments in one flat buffer each, f32 or bf16, and the step count) with its save and load.
//! The update itself is [`moe_peft_kernels::adamw`] (a CPU twin and CUDA kernels).
//!
//! candle-optimisers' `Adam` keeps its moments private (no checkpoint, so no exact resume) and
//! folds the bias corrections differently from torch; this optimizer exposes its state so a
//! resumed run continues bit for bit, and keeps the moments in a chosen dtype.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use moe_peft_kernels::{adamw_update, adamw_update_flat, AdamWStep, FlatGrads};
use serde::{Deserialize, Serialize};

use moe_peft_model::io::{HostChunks, SafetensorsWriter, TensorSpec};
use moe_peft_model::Checkpoint;

use crate::error::{Error, Result};

/// Hyper-parameters of AdamW (torch defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Keep the two moments in bf16 instead of f32 (half their memory; the update itself is
    /// computed in f32).
    pub bf16_moments: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bf16_moments: false,
        }
    }
}

/// AdamW over a fixed, ordered list of named variables.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    names: Vec<String>,
    vars: Vec<Var>,
    /// Both moments of every variable, one flat buffer each (variable order).
    m_flat: Tensor,
    v_flat: Tensor,
    /// Per-variable views of the flat moments.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    offsets: Vec<usize>,
    step: usize,
}

/// Views of `flat` in the shapes of `vars`, at `offsets`.
fn views(flat: &Tensor, vars: &[Var], offsets: &[usize]) -> Result<Vec<Tensor>> {
    vars.iter()
        .zip(offsets)
        .map(|(v, &o)| Ok(flat.narrow(0, o, v.elem_count())?.reshape(v.shape())?))
        .collect()
}

impl AdamW {
    /// Zero moments for `vars` (f32, or bf16 with `cfg.bf16_moments`).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut names = Vec::with_capacity(vars.len());
        let mut vs = Vec::with_capacity(vars.len());
        let mut offsets = Vec::with_capacity(vars.len());
        let md = if cfg.bf16_moments {
            DType::BF16
        } else {
            DType::F32
        };
        let dev = vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        let mut total = 0;
        for (n, var) in vars {
            offsets.push(total);
            total += var.elem_count();
            names.push(n);
            vs.push(var);
        }
        let m_flat = Tensor::zeros(total.max(1), md, &dev)?;
        let v_flat = Tensor::zeros(total.max(1), md, &dev)?;
        Ok(Self {
            m: views(&m_flat, &vs, &offsets)?,
            v: views(&v_flat, &vs, &offsets)?,
            cfg,
            names,
            vars: vs,
            m_flat,
            v_flat,
            offsets,
            step: 0,
        })
    }

    /// Steps taken.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The variables, in order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The variable names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars()[i]` (`None`: no
    /// gradient this step, the variable and its moments are left alone, as torch does).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`Self::step`] with each variable's gradient taken from a candle gradient store (as
    /// [`crate::LoraModel::backward`] returns), scaled by `clip` (1.0: unscaled).
    pub fn step_store(&mut self, grads: &GradStore, lr: f64, clip: f64) -> Result<()> {
        let g: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        self.step_scaled(&g, lr, clip)
    }

    /// [`Self::step`] with every gradient multiplied by `clip` on the fly (the coefficient of
    /// [`clip_grad_norm`], without a separate pass over the gradients).
    ///
    /// Each variable takes three in-place kernels (first moment, second moment, parameter) on
    /// its device; CPU and CUDA round identically.
    pub fn step_scaled(&mut self, grads: &[Option<Tensor>], lr: f64, clip: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::InvalidTrainConfig(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.check_f32()?;
        self.step += 1;
        let s = self.kernel_step(lr, clip);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            adamw_update(self.vars[i].as_tensor(), &self.m[i], &self.v[i], g, &s)?;
        }
        Ok(())
    }

    /// Refuses variables that are not f32 (AdamW keeps f32 master weights).
    fn check_f32(&self) -> Result<()> {
        if let Some(bad) = self.vars.iter().position(|v| v.dtype() != DType::F32) {
            return Err(Error::InvalidTrainConfig(format!(
                "AdamW keeps f32 variables; `{}` is {:?}",
                self.names[bad],
                self.vars[bad].dtype()
            )));
        }
        Ok(())
    }

    /// The scalars of the kernel call for the step now counted.
    fn kernel_step(&self, lr: f64, clip: f64) -> AdamWStep {
        AdamWStep {
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            lr,
            step: self.step,
            clip,
        }
    }

    /// [`Self::step_scaled`] from a [`FlatGrads`] laid out for the same variables: every
    /// variable is updated, a variable nothing was added to with a zero gradient (as PyTorch
    /// does for the reference's experts that receive no tokens: their gradient is zeros).
    ///
    /// On CUDA this is one kernel launch for all variables; the result is bit-identical to
    /// the per-variable kernels and to the CPU.
    pub fn step_flat(&mut self, grads: &FlatGrads, lr: f64, clip: f64) -> Result<()> {
        if grads.lens().len() != self.vars.len() || grads.offsets() != self.offsets.as_slice() {
            return Err(Error::InvalidTrainConfig(format!(
                "a gradient buffer of {} variables for an optimizer of {}",
                grads.lens().len(),
                self.vars.len()
            )));
        }
        self.check_f32()?;
        self.step += 1;
        let s = self.kernel_step(lr, clip);
        adamw_update_flat(
            &self.vars,
            &self.offsets,
            &self.m_flat,
            &self.v_flat,
            grads,
            &s,
        )?;
        Ok(())
    }

    /// The dtype of the moments.
    fn moment_dtype(&self) -> DType {
        if self.cfg.bf16_moments {
            DType::BF16
        } else {
            DType::F32
        }
    }

    /// Writes moments (`<name>.exp_avg`, `<name>.exp_avg_sq`) and the step to a safetensors file.
    ///
    /// The file is streamed: the first moments of every variable in optimizer order, then the
    /// second moments, each flat buffer copied to the host once, a chunk at a time.
    pub fn save(&self, path: &Path) -> Result<()> {
        let md = self.moment_dtype();
        let mut specs = Vec::with_capacity(2 * self.names.len() + 1);
        for suffix in ["exp_avg", "exp_avg_sq"] {
            for (n, v) in self.names.iter().zip(&self.vars) {
                specs.push(TensorSpec::new(format!("{n}.{suffix}"), md, v.dims()));
            }
        }
        specs.push(TensorSpec::new("__step__", DType::U32, &[1]));
        let total: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        let mut w = SafetensorsWriter::create(path, specs, None)?;
        for flat in [&self.m_flat, &self.v_flat] {
            for chunk in HostChunks::new(flat, 0, total, HOST_CHUNK_BYTES / md.size_in_bytes()) {
                w.write_host(chunk?)?;
            }
        }
        w.write_bytes(&(self.step as u32).to_le_bytes())?;
        w.finish()?;
        Ok(())
    }

    /// Restores what [`Self::save`] wrote (or any safetensors file with those keys); every
    /// variable must be present with its shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let md = self.moment_dtype();
        let ck = Checkpoint::open_files(&[path.to_path_buf()])?;
        let file = path.display().to_string();
        let total: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        let mut flats = Vec::with_capacity(2);
        for suffix in ["exp_avg", "exp_avg_sq"] {
            let keys: Vec<String> = self.names.iter().map(|n| format!("{n}.{suffix}")).collect();
            for (k, v) in keys.iter().zip(&self.vars) {
                let e = ck.entry(k).ok_or_else(|| Error::Checkpoint {
                    path: file.clone(),
                    reason: format!("optimizer state lacks `{k}`"),
                })?;
                if e.shape.as_slice() != v.dims() {
                    return Err(Error::ShapeMismatch {
                        name: k.clone(),
                        file: file.clone(),
                        expected: v.dims().to_vec(),
                        got: e.shape.clone(),
                    });
                }
            }
            let flat = Tensor::zeros(total.max(1), md, &dev)?;
            // What `save` writes: one contiguous run in variable order, read in large chunks.
            let first = keys.first().and_then(|k| ck.entry(k));
            let contiguous = first.is_some_and(|f| {
                let mut at = f.start;
                keys.iter().all(|k| {
                    ck.entry(k).is_some_and(|e| {
                        let ok = e.start == at && e.file == f.file;
                        at = e.start + e.len as u64;
                        ok && moe_peft_model::io::dtype_from_st(e.dtype) == Some(md)
                    })
                })
            });
            if contiguous {
                let (fi, start) = first.map(|f| (f.file, f.start)).unwrap_or((0, 0));
                let chunk = HOST_CHUNK_BYTES / md.size_in_bytes();
                let mut done = 0;
                while done < total {
                    let n = chunk.min(total - done);
                    let mut buf = vec![0u8; n * md.size_in_bytes()];
                    ck.read_range(fi, start + (done * md.size_in_bytes()) as u64, &mut buf)?;
                    let t = moe_peft_model::io::tensor_from_bytes(&buf, md, &[n])?;
                    flat.slice_set(&t.to_device(&dev)?, 0, done)?;
                    done += n;
                }
            } else {
                for (k, &o) in keys.iter().zip(&self.offsets) {
                    let t = ck.get_raw(k, &dev)?.to_dtype(md)?.flatten_all()?;
                    flat.slice_set(&t, 0, o)?;
                }
            }
            flats.push(flat);
        }
        let v_flat = flats.pop().expect("two moments");
        let m_flat = flats.pop().expect("two moments");
        self.m = views(&m_flat, &self.vars, &self.offsets)?;
        self.v = views(&v_flat, &self.vars, &self.offsets)?;
        self.m_flat = m_flat;
        self.v_flat = v_flat;
        let step = ck
            .get_raw("__step__", &Device::Cpu)
            .map_err(|_| Error::Checkpoint {
                path: file.clone(),
                reason: "optimizer state lacks its step count".into(),
            })?;
        self.step = step.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}

/// Bytes per device-to-host (or host-to-device) transfer when saving or loading state.
pub const HOST_CHUNK_BYTES: usize = 256 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_torch_reference_values() -> Result<()> {
        // torch.optim.AdamW's single-tensor algorithm (lr=0.1, betas=(0.9, 0.999), eps=1e-8,
        // weight_decay=0.01) evaluated in float64 by this Python transcription of
        // torch/optim/adamw.py `_single_tensor_adamw`:
        //   for t, g in enumerate([g1, g2], 1): p *= 1 - lr*wd; m = b1*m + (1-b1)*g
        //   v = b2*v + (1-b2)*g*g; p -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)
        // p0 = [1.0, -2.0, 3.0], g1 = [0.5, -1.0, 2.0], g2 = [0.1, 0.2, -0.3]:
        // after step 1: [0.899000002, -1.898000001, 2.8970000005]
        // after step 2: [0.8177969063826517, -1.8449993939894944, 2.8388831952054976]
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &dev)?)?;
        let mut opt = AdamW::new(
            vec![("p".into(), p.clone())],
            AdamWConfig {
                weight_decay: 0.01,
                ..Default::default()
            },
        )?;
        opt.step(&[Some(Tensor::new(&[0.5f32, -1.0, 2.0], &dev)?)], 0.1)?;
        let v = p.as_tensor().to_vec1::<f32>()?;
        for (a, b) in v.iter().zip([0.899f32, -1.898, 2.897]) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
        opt.step(&[Some(Tensor::new(&[0.1f32, 0.2, -0.3], &dev)?)], 0.1)?;
        let v = p.as_tensor().to_vec1::<f32>()?;
        for (a, b) in v.iter().zip([0.8177969f32, -1.8449994, 2.8388832]) {
            assert!((a - b).abs() < 2e-6, "{v:?}");
        }
        Ok(())
    }

    #[test]
    fn adamw_agrees_with_candle_optimisers() -> Result<()> {
        use candle_nn::optim::Optimizer;
        use candle_optimisers::adam::{Adam, ParamsAdam};
        use candle_optimisers::Decay;
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., (4, 8), &dev)?;
        let ours = Var::from_tensor(&init)?;
        let theirs = Var::from_tensor(&init)?;
        let mut a = AdamW::new(
            vec![("w".into(), ours.clone())],
            AdamWConfig {
                weight_decay: 0.05,
                ..Default::default()
            },
        )?;
        let mut b = Adam::new(
            vec![theirs.clone()],
            ParamsAdam {
                lr: 1e-2,
                weight_decay: Some(Decay::DecoupledWeightDecay(0.05)),
                ..Default::default()
            },
        )?;
        for _ in 0..5 {
            let g = Tensor::randn(0f32, 1., (4, 8), &dev)?;
            a.step(&[Some(g.clone())], 1e-2)?;
            let loss = (theirs.as_tensor() * &g)?.sum_all()?;
            b.backward_step(&loss)?;
        }
        let d = (ours.as_tensor() - theirs.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
}
