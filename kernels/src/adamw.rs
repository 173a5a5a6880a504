//! The AdamW update exactly as `torch.optim.AdamW` computes it (`foreach=False`), on f32
//! variables with f32 or bf16 moments:
//!
//! `m ← β₁·m + (1−β₁)·g`, `v ← β₂·v + (1−β₂)·g²`, `p ← p·(1 − lr·λ) − (lr / bc₁)·m / (√v / √bc₂ + ε)`
//! with `bc₁ = 1 − β₁ᵗ`, `bc₂ = 1 − β₂ᵗ` and `g` the gradient times a clipping coefficient.
//!
//! [`adamw_update`] runs three in-place ops per variable (first moment, second moment,
//! parameter), each a CPU twin and a CUDA kernel (`cuda/adamw.cu`) that round identically;
//! [`adamw_update_flat`] updates every variable of a [`FlatGrads`] buffer, on CUDA in one launch,
//! bit-identical to the per-variable kernels. No backward: the update is not differentiated.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::flat::FlatGrads;

/// The scalars of one AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// The step number, counting from 1 (bias corrections `1 − βᵗ`).
    pub step: usize,
    /// Every gradient is multiplied by this first (a clipping coefficient; 1.0: none).
    pub clip: f64,
}

impl AdamWStep {
    fn moment_ops(&self) -> (MomentOp, MomentOp) {
        (
            MomentOp {
                beta: self.beta1 as f32,
                one_minus: (1.0 - self.beta1) as f32,
                clip: self.clip as f32,
                square: false,
            },
            MomentOp {
                beta: self.beta2 as f32,
                one_minus: (1.0 - self.beta2) as f32,
                clip: self.clip as f32,
                square: true,
            },
        )
    }

    fn param_op(&self) -> ParamOp {
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        ParamOp {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            use_decay: self.weight_decay != 0.0,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps as f32,
            step_size: (self.lr / bc1) as f32,
        }
    }
}

/// One AdamW update of the f32 variable `param` from `grad` (any float dtype, same shape),
/// with its moments `m` and `v` (f32 or bf16, contiguous), all updated in place.
pub fn adamw_update(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    s: &AdamWStep,
) -> Result<()> {
    if param.dtype() != DType::F32 {
        return Err(Error::InvalidInput(format!(
            "AdamW keeps f32 variables, not {:?}",
            param.dtype()
        )));
    }
    let (m_op, v_op) = s.moment_ops();
    let g = grad.to_dtype(DType::F32)?.contiguous()?;
    m.inplace_op2(&g, &m_op)?;
    v.inplace_op2(&g, &v_op)?;
    param.inplace_op3(m, v, &s.param_op())?;
    Ok(())
}

/// One AdamW update of every variable from a [`FlatGrads`] laid out for them (`offsets[i]`
/// into the flat moments `m_flat` and `v_flat`): a variable nothing was added to takes a zero
/// gradient. On CUDA this is one launch for all variables; elsewhere [`adamw_update`] per
/// variable on views of the buffers. Both give the same bits.
pub fn adamw_update_flat(
    vars: &[Var],
    offsets: &[usize],
    m_flat: &Tensor,
    v_flat: &Tensor,
    grads: &FlatGrads,
    s: &AdamWStep,
) -> Result<()> {
    if grads.lens().len() != vars.len() || grads.offsets() != offsets {
        return Err(Error::InvalidInput(format!(
            "a gradient buffer of {} variables for an optimizer of {}",
            grads.lens().len(),
            vars.len()
        )));
    }
    if let Some(bad) = vars.iter().position(|v| v.dtype() != DType::F32) {
        return Err(Error::InvalidInput(format!(
            "AdamW keeps f32 variables; variable {bad} is {:?}",
            vars[bad].dtype()
        )));
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(_) = grads.buffer().device() {
        let (mo, vo) = s.moment_ops();
        let p = s.param_op();
        let h = cuda::MultiHyper {
            b1: mo.beta,
            omb1: mo.one_minus,
            b2: vo.beta,
            omb2: vo.one_minus,
            clip: mo.clip,
            decay: p.decay,
            use_decay: i32::from(p.use_decay),
            bc2_sqrt: p.bc2_sqrt,
            eps: p.eps,
            step_size: p.step_size,
        };
        cuda::adam_multi(
            vars,
            offsets,
            grads.lens(),
            m_flat,
            v_flat,
            grads.buffer(),
            &h,
        )?;
        return Ok(());
    }
    for (i, var) in vars.iter().enumerate() {
        let n = var.elem_count();
        let m = m_flat.narrow(0, offsets[i], n)?;
        let v = v_flat.narrow(0, offsets[i], n)?;
        let g = grads.view(i)?.flatten_all()?;
        let p = var.as_tensor().flatten_all()?;
        adamw_update(&p, &m, &v, &g, s)?;
    }
    Ok(())
}

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
    pub(crate) const MODULE: &str = "moe_peft_kernels_adamw";

    /// Scalars of one `adam_multi_*` launch.
    pub(crate) struct MultiHyper {
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
    pub(crate) fn adam_multi(
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
            ptrs.push(crate::device::device_address(var.as_tensor())?.addr());
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
