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
        self.add_stacked(&[id], &g.unsqueeze(0)?)
    }

    /// Adds `g` of shape `(ids.len(), …)`, the gradients of the distinct variables `ids`
    /// (all of one shape) stacked, as [`Self::add`] of each slice would: the same sums, in
    /// one launch on CUDA (a MoE layer's expert gradients of one kind).
    pub fn add_stacked(&self, ids: &[TensorId], g: &Tensor) -> candle_core::Result<()> {
        let Some((&first, _)) = ids.split_first() else {
            return Ok(());
        };
        let mut vars = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(&i) = self.index.get(id) else {
                candle_core::bail!("flat gradients: not a trainable variable")
            };
            if vars.contains(&i) {
                candle_core::bail!("flat gradients: a variable appears twice in a stacked add")
            }
            vars.push(i);
        }
        let shape = &self.shapes[self.index[&first]];
        if g.dims().first() != Some(&ids.len()) || &g.dims()[1..] != shape.as_slice() {
            candle_core::bail!(
                "flat gradients: stacked gradients {:?} for {} variables of shape {:?}",
                g.dims(),
                ids.len(),
                shape
            )
        }
        if let Some(&i) = vars.iter().find(|&&i| &self.shapes[i] != shape) {
            candle_core::bail!(
                "flat gradients: a stacked add mixes shapes {:?} and {:?}",
                shape,
                self.shapes[i]
            )
        }
        let g = match g.dtype() {
            DType::F32 | DType::BF16 => g.contiguous()?,
            _ => g.to_dtype(DType::F32)?.contiguous()?,
        };
        self.buf.inplace_op2(
            &g,
            &AddMany {
                offsets: vars.iter().map(|&i| self.offsets[i]).collect(),
                n: self.lens[vars[0]],
            },
        )?;
        if let Ok(mut t) = self.touched.lock() {
            vars.iter().for_each(|&i| t[i] = true);
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

/// `dst[a..a + n] += src[sa..sa + n]`, summed in f32 and rounded to `dst`'s type.
fn add_cpu(
    dst: &mut candle_core::CpuStorage,
    a: usize,
    src: &candle_core::CpuStorage,
    sa: usize,
    n: usize,
) -> candle_core::Result<()> {
    use candle_core::CpuStorage as C;
    let (b, sb) = (a + n, sa + n);
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

/// `buf[offsets[i]..offsets[i] + n] += g[i·n..(i + 1)·n]` for every `i`, in place (f32 or bf16
/// on either side, summed in f32).
struct AddMany {
    offsets: Vec<usize>,
    n: usize,
}

impl candle_core::InplaceOp2 for AddMany {
    fn name(&self) -> &'static str {
        "flat-grad-add-many"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        ld: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        ls: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (da, sa) = self.bounds(ld, ls)?;
        for (i, &o) in self.offsets.iter().enumerate() {
            add_cpu(dst, da + o, src, sa + i * self.n, self.n)?;
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
        let (da, sa) = self.bounds(ld, ls)?;
        cuda::add_many(dst, da, src, sa, &self.offsets, self.n)
    }
}

impl AddMany {
    /// The buffer's and the gradients' first elements, both layouts checked.
    fn bounds(
        &self,
        ld: &candle_core::Layout,
        ls: &candle_core::Layout,
    ) -> candle_core::Result<(usize, usize)> {
        let Some((da, _)) = ld.contiguous_offsets() else {
            candle_core::bail!("flat-grad-add: buffer must be contiguous")
        };
        let Some((sa, sb)) = ls.contiguous_offsets() else {
            candle_core::bail!("flat-grad-add: gradient must be contiguous")
        };
        if sb - sa != self.n * self.offsets.len() {
            candle_core::bail!(
                "flat-grad-add: {} elements for {} × {}",
                sb - sa,
                self.offsets.len(),
                self.n
            )
        }
        Ok((da, sa))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout};

    use crate::adamw::cuda::{MODULE, PTX};

    /// `dst[da + offsets[i]..][..n] += src[sa + i·n..][..n]`: one `flat_add_*` launch for one
    /// variable, one `flat_add_many_*` launch (offsets uploaded) for several.
    pub(super) fn add_many(
        dst: &mut CudaStorage,
        da: usize,
        src: &CudaStorage,
        sa: usize,
        offsets: &[usize],
        n: usize,
    ) -> candle_core::Result<()> {
        if n == 0 || offsets.is_empty() {
            return Ok(());
        }
        let dev = dst.device().clone();
        let kind = match (dst.dtype(), src.dtype()) {
            (DType::F32, DType::F32) => "f32_f32",
            (DType::F32, DType::BF16) => "f32_bf16",
            (DType::BF16, DType::F32) => "bf16_f32",
            (DType::BF16, DType::BF16) => "bf16_bf16",
            _ => candle_core::bail!("flat-grad-add: f32 or bf16 only"),
        };
        let many = offsets.len() > 1;
        let name = format!("flat_add_{}{kind}", if many { "many_" } else { "" });
        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let n64 = n as u64;
        let stream = dev.cuda_stream();
        let offs: Vec<u64> = offsets.iter().map(|&o| (da + o) as u64).collect();
        let doffs = if many {
            Some(stream.clone_htod(&offs).w()?)
        } else {
            None
        };
        for first in (0..offsets.len()).step_by(65535) {
            let chunk = first..offsets.len().min(first + 65535);
            let cfg = if many {
                LaunchConfig {
                    grid_dim: (
                        n64.div_ceil(256).clamp(1, 1024) as u32,
                        chunk.len() as u32,
                        1,
                    ),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                }
            } else {
                crate::adamw::cuda::launch_config(n64)
            };
            let span = sa + first * n..sa + (first + chunk.len()) * n;
            macro_rules! go {
                ($d:ty, $s:ty) => {{
                    let sv = src.as_cuda_slice::<$s>()?.slice(span.clone());
                    let mut b = f.builder();
                    // The single-variable kernel takes its slice; the many-variable one the whole
                    // buffer and the offsets.
                    let mut dv = match &doffs {
                        Some(_) => dst.as_cuda_slice_mut::<$d>()?.slice_mut(0..),
                        None => dst
                            .as_cuda_slice_mut::<$d>()?
                            .slice_mut(da + offsets[0]..da + offsets[0] + n),
                    };
                    b.arg(&mut dv).arg(&sv);
                    let ov = doffs.as_ref().map(|d| d.slice(first..first + chunk.len()));
                    if let Some(ov) = &ov {
                        b.arg(ov);
                    }
                    b.arg(&n64);
                    // SAFETY: the arguments match the `flat_add_*` / `flat_add_many_*` kernels
                    // in adamw.cu; every offset + n lies in the buffer (the variables' ranges).
                    unsafe { b.launch(cfg) }.w()?;
                }};
            }
            match (dst.dtype(), src.dtype()) {
                (DType::F32, DType::F32) => go!(f32, f32),
                (DType::F32, DType::BF16) => go!(f32, half::bf16),
                (DType::BF16, DType::F32) => go!(half::bf16, f32),
                _ => go!(half::bf16, half::bf16),
            }
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

    /// A stacked add equals one add per slice, bit for bit, and marks only its variables.
    #[test]
    fn stacked_adds_equal_one_add_per_variable() -> Result<()> {
        let dev = Device::Cpu;
        let shape = (3, 5);
        let vars: Vec<(String, Var)> = (0..6)
            .map(|i| {
                let n = if i == 2 { (5, 3) } else { shape };
                Ok((format!("v{i}"), Var::zeros(n, DType::F32, &dev)?))
            })
            .collect::<Result<_>>()?;
        let pick = [4usize, 0, 3];
        let ids: Vec<TensorId> = pick.iter().map(|&i| vars[i].1.as_tensor().id()).collect();
        for (dtype, gdt) in [
            (DType::F32, DType::F32),
            (DType::F32, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::BF16, DType::BF16),
        ] {
            let g = Tensor::randn(0f32, 1., (3, 3, 5), &dev)?.to_dtype(gdt)?;
            let (one, many) = (FlatGrads::new(&vars, dtype)?, FlatGrads::new(&vars, dtype)?);
            for f in [&one, &many] {
                f.add(vars[0].1.as_tensor().id(), &Tensor::ones(shape, gdt, &dev)?)?;
            }
            for (i, &id) in ids.iter().enumerate() {
                one.add(id, &g.get(i)?)?;
            }
            many.add_stacked(&ids, &g)?;
            let (a, b) = (
                one.buffer().to_dtype(DType::F32)?,
                many.buffer().to_dtype(DType::F32)?,
            );
            assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
            assert_eq!(many.touched()?, vec![true, false, false, true, true, false]);
        }
        let f = FlatGrads::new(&vars, DType::F32)?;
        let g = Tensor::zeros((3, 3, 5), DType::F32, &dev)?;
        let twice = [ids[0], ids[1], ids[0]];
        assert!(f.add_stacked(&twice, &g).is_err(), "a variable twice");
        let mixed = [ids[0], vars[2].1.as_tensor().id(), ids[1]];
        assert!(f.add_stacked(&mixed, &g).is_err(), "mixed shapes");
        assert!(f.add_stacked(&ids[..2], &g).is_err(), "count checked");
        f.add_stacked(&[], &g)?;
        Ok(())
    }
}
