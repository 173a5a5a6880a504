//! Hand-written gradients on top of candle's autograd.
//!
//! candle records a backward only for its own ops and for custom ops. [`attach_backward`] links a
//! value computed outside the graph (from detached inputs) to its inputs with a backward the
//! caller writes: the frozen projections use it to pass input gradients only, and the MoE layer
//! for gathers whose backward is another gather.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

/// A contiguous copy of the part of `s` that `l` covers (the value an attach op returns).
fn copy_cpu(s: &CpuStorage, l: &Layout, op: &str) -> candle_core::Result<CpuStorage> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: value must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        _ => candle_core::bail!("{op}: unsupported dtype {:?}", s.dtype()),
    })
}

fn copy_cuda(s: &CudaStorage, l: &Layout, op: &str) -> candle_core::Result<CudaStorage> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("{op}: value must be contiguous from offset 0")
    }
    s.try_clone(l)
}

type GradFn = dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// The value an attach op returns, held until the op's forward copies it into its result
/// (then dropped, so the graph keeps one copy, not two).
struct Value(Mutex<Option<Tensor>>);

impl Value {
    fn new(y: Tensor) -> Self {
        Self(Mutex::new(Some(y)))
    }

    fn take(&self, op: &str) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: value lock poisoned")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: forward ran twice")))
    }

    fn cpu(&self, op: &str) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take(op)?;
        let (s, l) = y.storage_and_layout();
        let Storage::Cpu(s) = &*s else {
            candle_core::bail!("{op}: value is not on the CPU")
        };
        Ok((copy_cpu(s, l, op)?, l.shape().clone()))
    }

    fn cuda(&self, op: &str) -> candle_core::Result<(CudaStorage, Shape)> {
        let y = self.take(op)?;
        let (s, l) = y.storage_and_layout();
        let Storage::Cuda(s) = &*s else {
            candle_core::bail!("{op}: value is not on a CUDA device")
        };
        Ok((copy_cuda(s, l, op)?, l.shape().clone()))
    }
}

/// Returns `y` (computed outside the graph) linked to `x` so that backward gives `x` the
/// gradient `grad_fn(grad_y)`.
struct AttachGrad {
    value: Value,
    grad_fn: Arc<GradFn>,
}

impl CustomOp1 for AttachGrad {
    fn name(&self) -> &'static str {
        "attach-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.cpu(self.name())
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.value.cuda(self.name())
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.grad_fn)(grad)?))
    }
}

/// `y` with a hand-written gradient towards `x`: backward passes `grad_fn(grad_y)` to `x`.
/// `y` must not depend on the graph (compute it from `x.detach()`).
pub fn attach_backward(
    x: &Tensor,
    y: Tensor,
    grad_fn: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    let y = y.contiguous()?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(AttachGrad {
        value: Value::new(y),
        grad_fn: Arc::new(grad_fn),
    })
}

type GradFn2 =
    dyn Fn(&Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync;

/// `AttachGrad` with two differentiable inputs.
struct AttachGrad2 {
    value: Value,
    grad_fn: Arc<GradFn2>,
}

impl CustomOp2 for AttachGrad2 {
    fn name(&self) -> &'static str {
        "attach-grad2"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.value.cuda(self.name())
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        (self.grad_fn)(grad)
    }
}

/// [`attach_backward`] for two inputs: backward gives `(a, b)` the pair `grad_fn(grad_y)`.
pub fn attach_backward2(
    a: &Tensor,
    b: &Tensor,
    y: Tensor,
    grad_fn: impl Fn(&Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> candle_core::Result<Tensor> {
    let y = y.contiguous()?;
    if !a.track_op() && !b.track_op() {
        return Ok(y);
    }
    a.apply_op2(
        b,
        AttachGrad2 {
            value: Value::new(y),
            grad_fn: Arc::new(grad_fn),
        },
    )
}

type GradFn3 = dyn Fn(&Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync;

/// `AttachGrad` with three differentiable inputs.
struct AttachGrad3 {
    value: Value,
    grad_fn: Arc<GradFn3>,
}

impl candle_core::CustomOp3 for AttachGrad3 {
    fn name(&self) -> &'static str {
        "attach-grad3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.value.cuda(self.name())
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.grad_fn)(grad)
    }
}

/// [`attach_backward`] for three inputs: backward gives `(a, b, c)` the triple `grad_fn(grad_y)`.
pub fn attach_backward3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    y: Tensor,
    grad_fn: impl Fn(&Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> candle_core::Result<Tensor> {
    let y = y.contiguous()?;
    if !a.track_op() && !b.track_op() && !c.track_op() {
        return Ok(y);
    }
    a.apply_op3(
        b,
        c,
        AttachGrad3 {
            value: Value::new(y),
            grad_fn: Arc::new(grad_fn),
        },
    )
}
