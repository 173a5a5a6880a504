//! AdamW exactly as `torch.optim.AdamW` (the reference's `adamw_torch`), learning-rate
//! schedules as transformers' `get_*_schedule_with_warmup`, and clipping as
//! `torch.nn.utils.clip_grad_norm_`.
//!
//! candle-optimisers' `Adam` keeps its moments private (no checkpoint, so no exact resume) and
//! folds the bias corrections differently from torch; this optimizer exposes its state so a
//! resumed run continues bit for bit, and keeps the moments in a chosen dtype.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use moe_peft_model::io::{HostChunks, SafetensorsWriter, TensorSpec};
use moe_peft_model::Checkpoint;

use crate::error::{Error, Result};
use crate::flat::FlatGrads;

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
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let m_op = MomentOp {
            beta: c.beta1 as f32,
            one_minus: (1.0 - c.beta1) as f32,
            clip: clip as f32,
            square: false,
        };
        let v_op = MomentOp {
            beta: c.beta2 as f32,
            one_minus: (1.0 - c.beta2) as f32,
            clip: clip as f32,
            square: true,
        };
        let p_op = ParamOp {
            decay: (1.0 - lr * c.weight_decay) as f32,
            use_decay: c.weight_decay != 0.0,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: c.eps as f32,
            step_size: (lr / bc1) as f32,
        };
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let var = &self.vars[i];
            if var.dtype() != DType::F32 {
                return Err(Error::InvalidTrainConfig(format!(
                    "AdamW keeps f32 variables; `{}` is {:?}",
                    self.names[i],
                    var.dtype()
                )));
            }
            let g = g.to_dtype(DType::F32)?.contiguous()?;
            self.m[i].inplace_op2(&g, &m_op)?;
            self.v[i].inplace_op2(&g, &v_op)?;
            var.as_tensor().inplace_op3(&self.m[i], &self.v[i], &p_op)?;
        }
        Ok(())
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
        #[cfg(feature = "cuda")]
        if let Device::Cuda(_) = grads.buffer().device() {
            if let Some(bad) = self.vars.iter().position(|v| v.dtype() != DType::F32) {
                return Err(Error::InvalidTrainConfig(format!(
                    "AdamW keeps f32 variables; `{}` is {:?}",
                    self.names[bad],
                    self.vars[bad].dtype()
                )));
            }
            self.step += 1;
            let c = &self.cfg;
            let bc1 = 1.0 - c.beta1.powi(self.step as i32);
            let bc2 = 1.0 - c.beta2.powi(self.step as i32);
            let h = cuda::MultiHyper {
                b1: c.beta1 as f32,
                omb1: (1.0 - c.beta1) as f32,
                b2: c.beta2 as f32,
                omb2: (1.0 - c.beta2) as f32,
                clip: clip as f32,
                decay: (1.0 - lr * c.weight_decay) as f32,
                use_decay: i32::from(c.weight_decay != 0.0),
                bc2_sqrt: bc2.sqrt() as f32,
                eps: c.eps as f32,
                step_size: (lr / bc1) as f32,
            };
            cuda::adam_multi(
                &self.vars,
                &self.offsets,
                grads.lens(),
                &self.m_flat,
                &self.v_flat,
                grads.buffer(),
                &h,
            )?;
            return Ok(());
        }
        let views = (0..self.vars.len())
            .map(|i| grads.view(i).map(Some))
            .collect::<Result<Vec<_>>>()?;
        self.step_scaled(&views, lr, clip)
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

/// `m ← β·m + (1−β)·(g·clip)` (or `(g·clip)²` for the second moment), in place.
#[derive(Debug, Clone, Copy)]
struct MomentOp {
    beta: f32,
    one_minus: f32,
    clip: f32,
    square: bool,
}

impl MomentOp {
    fn apply(&self, m: f32, g: f32) -> f32 {
        let mut gi = g * self.clip;
        if self.square {
            gi *= gi;
        }
        m * self.beta + gi * self.one_minus
    }
}

/// `p ← p·decay − (m / (√v / √bc₂ + ε))·step_size`, in place.
#[derive(Debug, Clone, Copy)]
struct ParamOp {
    decay: f32,
    use_decay: bool,
    bc2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

impl ParamOp {
    fn apply(&self, p: f32, m: f32, v: f32) -> f32 {
        let p = if self.use_decay { p * self.decay } else { p };
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        p - (m / denom) * self.step_size
    }
}

fn contiguous_range(l: &candle_core::Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => candle_core::bail!("adamw: {what} must be contiguous"),
    }
}

impl candle_core::InplaceOp2 for MomentOp {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        m: &mut candle_core::CpuStorage,
        lm: &candle_core::Layout,
        g: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        let (ma, mb) = contiguous_range(lm, "moment")?;
        let (ga, gb) = contiguous_range(lg, "gradient")?;
        let C::F32(g) = g else {
            candle_core::bail!("adamw: gradient must be f32")
        };
        let g = &g[ga..gb];
        match m {
            C::F32(m) => m[ma..mb]
                .iter_mut()
                .zip(g)
                .for_each(|(m, &g)| *m = self.apply(*m, g)),
            C::BF16(m) => m[ma..mb]
                .iter_mut()
                .zip(g)
                .for_each(|(m, &g)| *m = half::bf16::from_f32(self.apply(m.to_f32(), g))),
            _ => candle_core::bail!("adamw: moments must be f32 or bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        m: &mut candle_core::CudaStorage,
        lm: &candle_core::Layout,
        g: &candle_core::CudaStorage,
        lg: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let (ma, mb) = contiguous_range(lm, "moment")?;
        let (ga, gb) = contiguous_range(lg, "gradient")?;
        let n = (mb - ma) as u64;
        if n == 0 {
            return Ok(());
        }
        let dev = m.device().clone();
        let gv = g.as_cuda_slice::<f32>()?.slice(ga..gb);
        let square = i32::from(self.square);
        let cfg = cuda::launch_config(n);
        match m.dtype() {
            DType::F32 => {
                let f = dev.get_or_load_custom_func("adam_moment_f32", cuda::MODULE, cuda::PTX)?;
                let mut mv = m.as_cuda_slice_mut::<f32>()?.slice_mut(ma..mb);
                let mut b = f.builder();
                b.arg(&mut mv)
                    .arg(&gv)
                    .arg(&n)
                    .arg(&self.beta)
                    .arg(&self.one_minus)
                    .arg(&self.clip)
                    .arg(&square);
                // SAFETY: the arguments match `adam_moment_f32` in adamw.cu.
                unsafe { b.launch(cfg) }.w()?;
            }
            DType::BF16 => {
                let f = dev.get_or_load_custom_func("adam_moment_bf16", cuda::MODULE, cuda::PTX)?;
                let mut mv = m.as_cuda_slice_mut::<half::bf16>()?.slice_mut(ma..mb);
                let mut b = f.builder();
                b.arg(&mut mv)
                    .arg(&gv)
                    .arg(&n)
                    .arg(&self.beta)
                    .arg(&self.one_minus)
                    .arg(&self.clip)
                    .arg(&square);
                // SAFETY: the arguments match `adam_moment_bf16` in adamw.cu.
                unsafe { b.launch(cfg) }.w()?;
            }
            other => candle_core::bail!("adamw: moments must be f32 or bf16, not {other:?}"),
        }
        Ok(())
    }
}

impl candle_core::InplaceOp3 for ParamOp {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        p: &mut candle_core::CpuStorage,
        lp: &candle_core::Layout,
        m: &candle_core::CpuStorage,
        lm: &candle_core::Layout,
        v: &candle_core::CpuStorage,
        lv: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        let (pa, pb) = contiguous_range(lp, "parameter")?;
        let (ma, mb) = contiguous_range(lm, "moment")?;
        let (va, vb) = contiguous_range(lv, "moment")?;
        let C::F32(p) = p else {
            candle_core::bail!("adamw: parameters must be f32")
        };
        let p = &mut p[pa..pb];
        match (m, v) {
            (C::F32(m), C::F32(v)) => {
                for ((p, &m), &v) in p.iter_mut().zip(&m[ma..mb]).zip(&v[va..vb]) {
                    *p = self.apply(*p, m, v);
                }
            }
            (C::BF16(m), C::BF16(v)) => {
                for ((p, m), v) in p.iter_mut().zip(&m[ma..mb]).zip(&v[va..vb]) {
                    *p = self.apply(*p, m.to_f32(), v.to_f32());
                }
            }
            _ => candle_core::bail!("adamw: moments must both be f32 or both bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut candle_core::CudaStorage,
        lp: &candle_core::Layout,
        m: &candle_core::CudaStorage,
        lm: &candle_core::Layout,
        v: &candle_core::CudaStorage,
        lv: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let (pa, pb) = contiguous_range(lp, "parameter")?;
        let (ma, mb) = contiguous_range(lm, "moment")?;
        let (va, vb) = contiguous_range(lv, "moment")?;
        let n = (pb - pa) as u64;
        if n == 0 {
            return Ok(());
        }
        let dev = p.device().clone();
        let use_decay = i32::from(self.use_decay);
        let cfg = cuda::launch_config(n);
        let mut pv = p.as_cuda_slice_mut::<f32>()?.slice_mut(pa..pb);
        macro_rules! go {
            ($t:ty, $name:literal) => {{
                let f = dev.get_or_load_custom_func($name, cuda::MODULE, cuda::PTX)?;
                let mv = m.as_cuda_slice::<$t>()?.slice(ma..mb);
                let vv = v.as_cuda_slice::<$t>()?.slice(va..vb);
                let mut b = f.builder();
                b.arg(&mut pv)
                    .arg(&mv)
                    .arg(&vv)
                    .arg(&n)
                    .arg(&self.decay)
                    .arg(&use_decay)
                    .arg(&self.bc2_sqrt)
                    .arg(&self.eps)
                    .arg(&self.step_size);
                // SAFETY: the arguments match the kernel of the same name in adamw.cu.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match m.dtype() {
            DType::F32 => go!(f32, "adam_param_f32"),
            DType::BF16 => go!(half::bf16, "adam_param_bf16"),
            other => candle_core::bail!("adamw: moments must be f32 or bf16, not {other:?}"),
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Storage, Tensor, Var};

    pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
    pub(crate) const MODULE: &str = "moe_peft_lora_adamw";

    /// Scalars of one `adam_multi_*` launch.
    pub(super) struct MultiHyper {
        pub b1: f32,
        pub omb1: f32,
        pub b2: f32,
        pub omb2: f32,
        pub clip: f32,
        pub decay: f32,
        pub use_decay: i32,
        pub bc2_sqrt: f32,
        pub eps: f32,
        pub step_size: f32,
    }

    /// The AdamW update of every variable in one launch (see `adam_multi` in adamw.cu).
    pub(super) fn adam_multi(
        vars: &[Var],
        offsets: &[usize],
        lens: &[usize],
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        h: &MultiHyper,
    ) -> candle_core::Result<()> {
        if vars.is_empty() {
            return Ok(());
        }
        let candle_core::Device::Cuda(dev) = g.device() else {
            candle_core::bail!("adam_multi: not a CUDA tensor")
        };
        let stream = dev.cuda_stream();
        let mut ptrs = Vec::with_capacity(vars.len());
        for var in vars {
            if !var.is_contiguous() {
                candle_core::bail!("adam_multi: variables must be contiguous")
            }
            ptrs.push(moe_peft_quant::device_address(var.as_tensor())?.0);
        }
        let offs: Vec<u64> = offsets.iter().map(|&o| o as u64).collect();
        let ns: Vec<u64> = lens.iter().map(|&n| n as u64).collect();
        let d_ptrs = stream.clone_htod(&ptrs).w()?;
        let d_offs = stream.clone_htod(&offs).w()?;
        let d_ns = stream.clone_htod(&ns).w()?;
        let (ms, _) = m.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        let (gs, _) = g.storage_and_layout();
        let (Storage::Cuda(ms), Storage::Cuda(vs), Storage::Cuda(gs)) = (&*ms, &*vs, &*gs) else {
            candle_core::bail!("adam_multi: moments and gradients must be on the GPU")
        };
        let name = match (ms.dtype(), gs.dtype()) {
            (DType::F32, DType::F32) => "adam_multi_f32_f32",
            (DType::F32, DType::BF16) => "adam_multi_f32_bf16",
            (DType::BF16, DType::F32) => "adam_multi_bf16_f32",
            (DType::BF16, DType::BF16) => "adam_multi_bf16_bf16",
            other => candle_core::bail!("adam_multi: unsupported dtypes {other:?}"),
        };
        let f = ms.device().get_or_load_custom_func(name, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (vars.len() as u32, 4, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($m:ty, $g:ty) => {{
                let mv = ms.as_cuda_slice::<$m>()?;
                let vv = vs.as_cuda_slice::<$m>()?;
                let gv = gs.as_cuda_slice::<$g>()?;
                let mut b = f.builder();
                b.arg(&d_ptrs)
                    .arg(&d_offs)
                    .arg(&d_ns)
                    .arg(mv)
                    .arg(vv)
                    .arg(gv)
                    .arg(&h.b1)
                    .arg(&h.omb1)
                    .arg(&h.b2)
                    .arg(&h.omb2)
                    .arg(&h.clip)
                    .arg(&h.decay)
                    .arg(&h.use_decay)
                    .arg(&h.bc2_sqrt)
                    .arg(&h.eps)
                    .arg(&h.step_size);
                // SAFETY: the arguments match `adam_multi_*` in adamw.cu; every pointer in the
                // table is a live f32 variable of lens[t] elements, the flat buffers hold
                // offsets[t] + lens[t] elements.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match (ms.dtype(), gs.dtype()) {
            (DType::F32, DType::F32) => go!(f32, f32),
            (DType::F32, DType::BF16) => go!(f32, half::bf16),
            (DType::BF16, DType::F32) => go!(half::bf16, f32),
            _ => go!(half::bf16, half::bf16),
        }
        Ok(())
    }

    pub(crate) fn launch_config(n: u64) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Learning-rate schedule, as transformers' `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warm-up then linear decay to 0 (transformers' default).
    #[default]
    Linear,
    /// Linear warm-up then half a cosine to 0 (the reference recipe).
    Cosine,
    /// Constant.
    Constant,
    /// Linear warm-up then constant.
    ConstantWithWarmup,
}

impl Schedule {
    /// Parses `linear`, `cosine`, `constant`, `constant_with_warmup`.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            _ => return None,
        })
    }

    /// The multiplier of the base rate at optimizer step `step` (0-based: the first update
    /// uses `step = 0`, so with warm-up it has rate 0, exactly as transformers).
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let s = step as f64;
        let w = warmup as f64;
        if !matches!(self, Self::Constant) && step < warmup {
            return s / w.max(1.0);
        }
        match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::Linear => ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0),
            Self::Cosine => {
                let progress = (s - w) / (total as f64 - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// Global L2 norm of the gradients (per-tensor sums of squares on the device, in f64, so the
/// CPU's and CUDA's different summation orders differ only at f64 rounding). The trainer uses
/// the one-pass [`FlatGrads::norm`] instead.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut parts = Vec::new();
    for g in grads.iter().flatten() {
        parts.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
    }
    if parts.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&parts, 0)?.to_dtype(DType::F64)?.sum_all()?;
    Ok(total.to_scalar::<f64>()?.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)`, applied only if below 1).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        // get_cosine_schedule_with_warmup(opt, 10, 100): lambda(0)=0, lambda(5)=0.5,
        // lambda(10)=1, lambda(55)=0.5, lambda(100)=0.
        let c = Schedule::Cosine;
        assert_eq!(c.factor(0, 10, 100), 0.0);
        assert_eq!(c.factor(5, 10, 100), 0.5);
        assert_eq!(c.factor(10, 10, 100), 1.0);
        assert!((c.factor(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(c.factor(100, 10, 100).abs() < 1e-12);
        let l = Schedule::Linear;
        assert_eq!(l.factor(55, 10, 100), 0.5);
        assert_eq!(Schedule::Constant.factor(0, 10, 100), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(2, 10, 100), 0.2);
    }

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

    #[test]
    fn clipping_matches_torch() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![
            Some(Tensor::new(&[3.0f32, 0.0], &dev)?),
            None,
            Some(Tensor::new(&[4.0f32], &dev)?),
        ];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].as_ref().unwrap().to_vec1::<f32>()?;
        assert!((a[0] - 3.0 / (5.0 + 1e-6) as f32).abs() < 1e-7);
        Ok(())
    }
}
