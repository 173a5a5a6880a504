//! The SwiGLU of the MLP as element-wise kernels: `a = T(T(silu(g))·u)` and its backward
//! `du = T(da·T(silu(g)))`, `dg = T(T(da·u)·silu'(g))` with `silu'(x) = σ(x)(1 + x(1 − σ(x)))`,
//! in f32 with the roundings of the composed ops at the points the model's backward had them
//! (one pass each instead of two forward and about ten backward). CPU and CUDA compute the
//! same expressions. Not differentiable: callers attach the backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::twin::{from_f32s, round_to as rnd, to_f32s};

struct Forward;

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dt = g.dtype();
        let (gv, uv) = (
            to_f32s(g, lg, "swiglu", "operand")?,
            to_f32s(u, lu, "swiglu", "operand")?,
        );
        let out = gv
            .iter()
            .zip(&uv)
            .map(|(&x, &u)| rnd(dt, x / (1.0 + (-x).exp())) * u)
            .collect();
        Ok((from_f32s(dt, out, "swiglu")?, lg.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::run(&[(g, lg), (u, lu)], 1, lg.shape())
    }
}

struct Backward;

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        da: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dt = g.dtype();
        let (gv, uv, dv) = (
            to_f32s(g, lg, "swiglu", "operand")?,
            to_f32s(u, lu, "swiglu", "operand")?,
            to_f32s(da, ld, "swiglu", "operand")?,
        );
        let n = gv.len();
        let mut out = vec![0f32; 2 * n];
        for i in 0..n {
            let (x, d) = (gv[i], dv[i]);
            let s = 1.0 / (1.0 + (-x).exp());
            out[n + i] = d * rnd(dt, x * s);
            out[i] = rnd(dt, d * uv[i]) * (s * (1.0 + x * (1.0 - s)));
        }
        let mut dims = vec![2];
        dims.extend_from_slice(lg.dims());
        Ok((from_f32s(dt, out, "swiglu")?, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
        da: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let mut dims = vec![2];
        dims.extend_from_slice(lg.dims());
        cuda::run(&[(g, lg), (u, lu), (da, ld)], 2, &Shape::from(dims))
    }
}

fn same(a: &Tensor, b: &Tensor) -> candle_core::Result<bool> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "swiglu: {:?} {:?} and {:?} {:?}",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        )
    }
    Ok(matches!(a.dtype(), DType::F32 | DType::BF16))
}

/// `T(T(silu(g))·u)`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    if !same(g, u)? {
        return g.silu()? * u;
    }
    g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &Forward)
}

/// `(dg, du)` of [`swiglu`] for the upstream gradient `da`.
pub fn swiglu_backward(
    g: &Tensor,
    u: &Tensor,
    da: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    if !same(g, u)? || !same(g, da)? {
        let s = sigmoid(g)?;
        let du = (da * g.silu()?)?;
        let d = (&s * ((g * (1.0 - &s)?)? + 1.0)?)?;
        return Ok(((da * u)?.mul(&d)?, du));
    }
    let out = g
        .contiguous()?
        .apply_op3_no_bwd(&u.contiguous()?, &da.contiguous()?, &Backward)?;
    Ok((out.get(0)?, out.get(1)?))
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    const MODULE: &str = "moe_peft_kernels_swiglu";

    /// Runs `swiglu_*` (2 inputs, 1 output block) or `swiglu_bwd_*` (3 inputs, 2 blocks).
    pub(super) fn run(
        ins: &[(&CudaStorage, &Layout)],
        blocks: usize,
        shape: &Shape,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let mut ranges = Vec::new();
        for (_, l) in ins {
            let Some(r) = l.contiguous_offsets() else {
                candle_core::bail!("swiglu: operands must be contiguous")
            };
            ranges.push(r);
        }
        let n = ranges[0].1 - ranges[0].0;
        if ranges.iter().any(|(a, b)| b - a != n) {
            candle_core::bail!("swiglu: operands differ in size")
        }
        let dev = ins[0].0.device().clone();
        let n64 = n as u64;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($t:ty, $fwd:literal, $bwd:literal) => {{
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<$t>((blocks * n).max(1)) }?;
                if n > 0 {
                    let g = ins[0]
                        .0
                        .as_cuda_slice::<$t>()?
                        .slice(ranges[0].0..ranges[0].1);
                    let u = ins[1]
                        .0
                        .as_cuda_slice::<$t>()?
                        .slice(ranges[1].0..ranges[1].1);
                    if blocks == 1 {
                        let f = dev.get_or_load_custom_func($fwd, MODULE, PTX)?;
                        let mut b = f.builder();
                        b.arg(&g).arg(&u).arg(&out).arg(&n64);
                        // SAFETY: the arguments match `swiglu_*` in swiglu.cu.
                        unsafe { b.launch(cfg) }.w()?;
                    } else {
                        let da = ins[2]
                            .0
                            .as_cuda_slice::<$t>()?
                            .slice(ranges[2].0..ranges[2].1);
                        let f = dev.get_or_load_custom_func($bwd, MODULE, PTX)?;
                        let mut b = f.builder();
                        b.arg(&g).arg(&u).arg(&da).arg(&out).arg(&n64);
                        // SAFETY: the arguments match `swiglu_bwd_*` in swiglu.cu.
                        unsafe { b.launch(cfg) }.w()?;
                    }
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match ins[0].0.dtype() {
            DType::F32 => go!(f32, "swiglu_f32", "swiglu_bwd_f32"),
            DType::BF16 => go!(half::bf16, "swiglu_bf16", "swiglu_bwd_bf16"),
            d => candle_core::bail!("swiglu: f32 or bf16 only, not {d:?}"),
        };
        Ok((out, shape.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn swiglu_and_backward_match_autograd() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 2., (5, 9), &dev)?)?;
        let u = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 9), &dev)?)?;
        let da = Tensor::randn(0f32, 1., (5, 9), &dev)?;
        let want = (g.as_tensor().silu()? * u.as_tensor())?;
        let max = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max(&swiglu(g.as_tensor(), u.as_tensor())?, &want)? < 1e-6);
        let grads = (&want * &da)?.sum_all()?.backward()?;
        let (dg, du) = swiglu_backward(g.as_tensor(), u.as_tensor(), &da)?;
        assert!(max(&dg, grads.get(g.as_tensor()).unwrap())? < 1e-5);
        assert!(max(&du, grads.get(u.as_tensor()).unwrap())? < 1e-5);
        assert!(swiglu(g.as_tensor(), &Tensor::zeros((5, 8), DType::F32, &dev)?).is_err());
        Ok(())
    }
}
