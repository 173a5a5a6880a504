//! One flat buffer for the gradients of every trainable variable.
//!
//! A step of DeepSeekMoE-16B LoRA has 10,760 adapter tensors. Summing, norming and applying
//! their gradients tensor by tensor costs several kernel launches each; here every gradient
//! lands (is added) at its fixed offset in one buffer as soon as backward produces it, the
//! global norm is one reduction over the buffer, and [`crate::adamw::adamw_update_flat`] updates
//! every variable from it in one launch on CUDA. The buffer is f32, or bf16 to halve its memory
//! (each micro-batch's gradient is then rounded to bf16 once, as in a bf16 PyTorch run).

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, TensorId, Var};

use crate::error::{Error, Result};

/// Gradients of a fixed, ordered list of variables in one flat buffer.
#[derive(Debug)]
pub struct FlatGrads {
    buf: Tensor,
    index: HashMap<TensorId, usize>,
    shapes: Vec<Vec<usize>>,
    offsets: Vec<usize>,
    lens: Vec<usize>,
    touched: Mutex<Vec<bool>>,
}

impl FlatGrads {
    /// Zero gradients for `vars` (in this order) in a buffer of `dtype` (f32 or bf16).
    pub fn new(vars: &[(String, Var)], dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidInput(format!(
                "gradients are kept in f32 or bf16, not {dtype:?}"
            )));
        }
        let device = vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        let mut index = HashMap::with_capacity(vars.len());
        let mut shapes = Vec::with_capacity(vars.len());
        let mut offsets = Vec::with_capacity(vars.len());
        let mut lens = Vec::with_capacity(vars.len());
        let mut offset = 0;
        for (i, (_, v)) in vars.iter().enumerate() {
            let n = v.elem_count();
            index.insert(v.as_tensor().id(), i);
            shapes.push(v.dims().to_vec());
            offsets.push(offset);
            lens.push(n);
            offset += n;
        }
        Ok(Self {
            buf: Tensor::zeros(offset.max(1), dtype, &device)?,
            index,
            shapes,
            offsets,
            lens,
            touched: Mutex::new(vec![false; vars.len()]),
        })
    }

    /// The buffer's dtype.
    pub fn dtype(&self) -> DType {
        self.buf.dtype()
    }

    /// Offsets of the variables' gradients in the buffer, in variable order.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Element counts of the variables, in order.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// The whole buffer (1-D).
    pub fn buffer(&self) -> &Tensor {
        &self.buf
    }

    /// Whether `id` is one of the variables.
    pub fn contains(&self, id: TensorId) -> bool {
        self.index.contains_key(&id)
    }

    /// Sets every gradient to zero.
    pub fn zero(&self) -> Result<()> {
        // Not `zero_set`: candle's fill kernel indexes with 32 bits and never ends on a buffer
        // of 2³² elements or more (a 16B model's gradients); a memset has no such limit.
        self.buf.inplace_op1(&Zero)?;
        self.touched_mut()?.iter_mut().for_each(|t| *t = false);
        Ok(())
    }

    fn touched_mut(&self) -> Result<std::sync::MutexGuard<'_, Vec<bool>>> {
        self.touched
            .lock()
            .map_err(|_| Error::InvalidInput("gradient buffer lock poisoned".into()))
    }

    /// Adds `g` (f32 or bf16, the variable's shape) to the gradient of variable `id`.
    pub fn add(&self, id: TensorId, g: &Tensor) -> candle_core::Result<()> {
        let Some(&i) = self.index.get(&id) else {
            candle_core::bail!("flat gradients: not a trainable variable")
        };
        if g.dims() != self.shapes[i].as_slice() {
            candle_core::bail!(
                "flat gradients: gradient {:?} for a variable of shape {:?}",
                g.dims(),
                self.shapes[i]
            )
        }
        let g = match g.dtype() {
            DType::F32 | DType::BF16 => g.contiguous()?,
            _ => g.to_dtype(DType::F32)?.contiguous()?,
        };
        self.buf.inplace_op2(
            &g,
            &AddAt {
                offset: self.offsets[i],
                n: g.elem_count(),
            },
        )?;
        if let Ok(mut t) = self.touched.lock() {
            t[i] = true;
        }
        Ok(())
    }

    /// Which variables got a gradient since the last [`Self::zero`].
    pub fn touched(&self) -> Result<Vec<bool>> {
        Ok(self.touched_mut()?.clone())
    }

    /// Sets which variables count as having a gradient (after a sum over data-parallel ranks,
    /// a variable one rank touched has one on every rank).
    pub fn set_touched(&self, touched: Vec<bool>) -> Result<()> {
        let mut t = self.touched_mut()?;
        if touched.len() != t.len() {
            return Err(Error::InvalidInput(format!(
                "{} touched flags for {} variables",
                touched.len(),
                t.len()
            )));
        }
        *t = touched;
        Ok(())
    }

    /// The gradient of variable `index` as a view of the buffer (its variable's shape).
    pub fn view(&self, index: usize) -> Result<Tensor> {
        let shape = self
            .shapes
            .get(index)
            .ok_or_else(|| Error::InvalidInput(format!("no variable {index}")))?;
        Ok(self
            .buf
            .narrow(0, self.offsets[index], self.lens[index])?
            .reshape(shape.clone())?)
    }

    /// Copies of the gradients in variable order, `None` for variables nothing was added to
    /// since the last [`Self::zero`].
    pub fn to_vec(&self) -> Result<Vec<Option<Tensor>>> {
        let touched = self.touched_mut()?.clone();
        let mut out = Vec::with_capacity(self.lens.len());
        for (i, t) in touched.iter().enumerate() {
            out.push(if *t {
                Some(
                    self.buf
                        .narrow(0, self.offsets[i], self.lens[i])?
                        .to_dtype(DType::F32)?
                        .copy()?
                        .reshape(self.shapes[i].clone())?,
                )
            } else {
                None
            });
        }
        Ok(out)
    }

    /// L2 norm of every gradient together (squares summed in f64).
    pub fn norm(&self) -> Result<f64> {
        let (s, l) = self.buf.storage_and_layout();
        let total = match &*s {
            candle_core::Storage::Cpu(c) => {
                let (a, b) = l
                    .contiguous_offsets()
                    .ok_or_else(|| Error::InvalidInput("gradient buffer strided".into()))?;
                match c {
                    candle_core::CpuStorage::F32(v) => {
                        v[a..b].iter().map(|&x| (x as f64) * (x as f64)).sum()
                    }
                    candle_core::CpuStorage::BF16(v) => v[a..b]
                        .iter()
                        .map(|x| {
                            let x = x.to_f64();
                            x * x
                        })
                        .sum(),
                    _ => 0.0,
                }
            }
            #[cfg(feature = "cuda")]
            candle_core::Storage::Cuda(c) => cuda::sum_squares(c, self.buf.elem_count())?,
            #[allow(unreachable_patterns)]
            _ => {
                return Err(Error::InvalidInput(
                    "gradient buffer on an unsupported device".into(),
                ))
            }
        };
        Ok(total.sqrt())
    }
}

/// `buf ← 0` over the tensor's own elements, in place (a memset on CUDA).
struct Zero;

impl candle_core::InplaceOp1 for Zero {
    fn name(&self) -> &'static str {
        "flat-grad-zero"
    }

    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("flat-grad-zero: buffer must be contiguous")
        };
        match s {
            C::F32(v) => v[a..b].fill(0.0),
            C::BF16(v) => v[a..b].fill(half::bf16::ZERO),
            _ => candle_core::bail!("flat-grad-zero: f32 or bf16 only"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        cuda::zero(s, l)
    }
}

/// `buf[offset..offset + n] += g`, in place (f32 or bf16 on either side, summed in f32).
struct AddAt {
    offset: usize,
    n: usize,
}

impl candle_core::InplaceOp2 for AddAt {
    fn name(&self) -> &'static str {
        "flat-grad-add"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        ld: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        ls: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        let Some((da, _)) = ld.contiguous_offsets() else {
            candle_core::bail!("flat-grad-add: buffer must be contiguous")
        };
        let Some((sa, sb)) = ls.contiguous_offsets() else {
            candle_core::bail!("flat-grad-add: gradient must be contiguous")
        };
        let (a, b) = (da + self.offset, da + self.offset + self.n);
        if sb - sa != self.n {
            candle_core::bail!("flat-grad-add: {} elements for {}", sb - sa, self.n)
        }
        match (dst, src) {
            (C::F32(d), C::F32(s)) => {
                for (d, s) in d[a..b].iter_mut().zip(&s[sa..sb]) {
                    *d += *s;
                }
            }
            (C::F32(d), C::BF16(s)) => {
                for (d, s) in d[a..b].iter_mut().zip(&s[sa..sb]) {
                    *d += s.to_f32();
                }
            }
            (C::BF16(d), C::F32(s)) => {
                for (d, s) in d[a..b].iter_mut().zip(&s[sa..sb]) {
                    *d = half::bf16::from_f32(d.to_f32() + *s);
                }
            }
            (C::BF16(d), C::BF16(s)) => {
                for (d, s) in d[a..b].iter_mut().zip(&s[sa..sb]) {
                    *d = half::bf16::from_f32(d.to_f32() + s.to_f32());
                }
            }
            _ => candle_core::bail!("flat-grad-add: f32 or bf16 only"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        ld: &candle_core::Layout,
        src: &candle_core::CudaStorage,
        ls: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        cuda::add_at(dst, ld, src, ls, self.offset, self.n)
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout};

    use crate::adamw::cuda::{MODULE, PTX};

    pub(super) fn add_at(
        dst: &mut CudaStorage,
        ld: &Layout,
        src: &CudaStorage,
        ls: &Layout,
        offset: usize,
        n: usize,
    ) -> candle_core::Result<()> {
        let Some((da, _)) = ld.contiguous_offsets() else {
            candle_core::bail!("flat-grad-add: buffer must be contiguous")
        };
        let Some((sa, sb)) = ls.contiguous_offsets() else {
            candle_core::bail!("flat-grad-add: gradient must be contiguous")
        };
        if sb - sa != n {
            candle_core::bail!("flat-grad-add: {} elements for {n}", sb - sa)
        }
        if n == 0 {
            return Ok(());
        }
        let dev = dst.device().clone();
        let name = match (dst.dtype(), src.dtype()) {
            (DType::F32, DType::F32) => "flat_add_f32_f32",
            (DType::F32, DType::BF16) => "flat_add_f32_bf16",
            (DType::BF16, DType::F32) => "flat_add_bf16_f32",
            (DType::BF16, DType::BF16) => "flat_add_bf16_bf16",
            _ => candle_core::bail!("flat-grad-add: f32 or bf16 only"),
        };
        let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let n64 = n as u64;
        let cfg = crate::adamw::cuda::launch_config(n64);
        let a = da + offset;
        macro_rules! go {
            ($d:ty, $s:ty) => {{
                let mut dv = dst.as_cuda_slice_mut::<$d>()?.slice_mut(a..a + n);
                let sv = src.as_cuda_slice::<$s>()?.slice(sa..sb);
                let mut b = f.builder();
                b.arg(&mut dv).arg(&sv).arg(&n64);
                // SAFETY: the arguments match the `flat_add_*` kernels in adamw.cu.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match (dst.dtype(), src.dtype()) {
            (DType::F32, DType::F32) => go!(f32, f32),
            (DType::F32, DType::BF16) => go!(f32, half::bf16),
            (DType::BF16, DType::F32) => go!(half::bf16, f32),
            _ => go!(half::bf16, half::bf16),
        }
        Ok(())
    }

    /// Zeroes a contiguous f32/bf16 buffer's elements with a memset (64-bit sizes).
    pub(super) fn zero(s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("flat-grad-zero: buffer must be contiguous")
        };
        let stream = s.device().cuda_stream();
        match s.dtype() {
            DType::F32 => {
                let mut v = s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
                stream.memset_zeros(&mut v).w()?;
            }
            DType::BF16 => {
                let mut v = s.as_cuda_slice_mut::<half::bf16>()?.slice_mut(a..b);
                stream.memset_zeros(&mut v).w()?;
            }
            d => candle_core::bail!("flat-grad-zero: f32 or bf16 only, not {d:?}"),
        }
        Ok(())
    }

    /// Σ x² over the first `n` elements of a contiguous f32/bf16 buffer, in f64.
    pub(super) fn sum_squares(c: &CudaStorage, n: usize) -> candle_core::Result<f64> {
        const BLOCKS: u32 = 1024;
        let dev = c.device().clone();
        let stream = dev.cuda_stream();
        let mut out = stream.alloc_zeros::<f64>(BLOCKS as usize).w()?;
        let cfg = LaunchConfig {
            grid_dim: (BLOCKS, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n64 = n as u64;
        macro_rules! go {
            ($t:ty, $name:literal) => {{
                let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let x = c.as_cuda_slice::<$t>()?;
                let mut b = f.builder();
                b.arg(x).arg(&n64).arg(&mut out);
                // SAFETY: the arguments match the kernel of the same name in adamw.cu.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match c.dtype() {
            DType::F32 => go!(f32, "sum_squares_f32"),
            DType::BF16 => go!(half::bf16, "sum_squares_bf16"),
            d => candle_core::bail!("sum of squares: f32 or bf16 only, not {d:?}"),
        }
        let parts = stream.clone_dtoh(&out).w()?;
        Ok(parts.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_at_offsets_norms_and_zeroes() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros(4, DType::F32, &dev)?)?;
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        for dtype in [DType::F32, DType::BF16] {
            let f = FlatGrads::new(&vars, dtype)?;
            let gb = Tensor::new(&[1f32, -2., 3., 0.5], &dev)?;
            f.add(b.as_tensor().id(), &gb)?;
            f.add(b.as_tensor().id(), &gb.to_dtype(DType::BF16)?)?;
            let v = f.to_vec()?;
            assert!(v[0].is_none());
            let got = v[1].as_ref().unwrap().to_vec1::<f32>()?;
            assert_eq!(got, vec![2., -4., 6., 1.]);
            let want = (4f64 + 16. + 36. + 1.).sqrt();
            assert!((f.norm()? - want).abs() < 1e-12);
            assert_eq!(f.view(1)?.dims(), &[4]);
            assert!(f.add(a.as_tensor().id(), &gb).is_err(), "shape is checked");
            f.zero()?;
            assert_eq!(f.norm()?, 0.0);
            assert!(f.to_vec()?.iter().all(|g| g.is_none()));
        }
        Ok(())
    }
}
