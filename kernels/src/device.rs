//! Device-wide settings and memory statistics.

/// Memory of the device's default pool (the one candle allocates from), in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolMemory {
    /// Bytes held by live allocations now.
    pub used: u64,
    /// Highest `used` since the last [`reset_pool_peaks`].
    pub used_high: u64,
    /// Bytes the pool holds from the driver now (live allocations plus cached free blocks).
    pub reserved: u64,
    /// Highest `reserved` since the last [`reset_pool_peaks`].
    pub reserved_high: u64,
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;

    /// The default memory pool of `d`'s device, with the context bound to this thread.
    pub(super) fn default_pool(
        d: &candle_core::CudaDevice,
    ) -> candle_core::Result<sys::CUmemoryPool> {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))?;
        let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
        // SAFETY: a plain driver call with a valid out-pointer on the bound context's device.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!("cuDeviceGetDefaultMemPool: {r:?}");
        }
        // SAFETY: initialised by the successful call above.
        Ok(unsafe { pool.assume_init() })
    }

    pub(super) fn set(
        pool: sys::CUmemoryPool,
        attr: sys::CUmemPool_attribute,
        mut value: u64,
    ) -> candle_core::Result<()> {
        // SAFETY: every attribute used here takes a u64 (cuuint64_t).
        let r = unsafe {
            sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void)
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!("cuMemPoolSetAttribute({attr:?}): {r:?}");
        }
        Ok(())
    }

    pub(super) fn get(
        pool: sys::CUmemoryPool,
        attr: sys::CUmemPool_attribute,
    ) -> candle_core::Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: every attribute used here is a u64 (cuuint64_t).
        let r = unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void)
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!("cuMemPoolGetAttribute({attr:?}): {r:?}");
        }
        Ok(value)
    }
}

/// Keeps memory that CUDA kernels free in the device's memory pool instead of returning it to
/// the driver at each synchronization (the pool's release threshold is raised to the maximum).
///
/// candle allocates with `cuMemAllocAsync` from the device's default pool, whose default
/// threshold of 0 hands freed memory back whenever the stream synchronizes; every allocation
/// after a synchronization then goes to the driver again, which costs more than the small kernels
/// of a training step. Training synchronizes several times per step (loss values, routing).
/// A no-op on the CPU, and without the `cuda` feature.
pub fn retain_freed_device_memory(device: &candle_core::Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        pool::set(
            pool::default_pool(d)?,
            A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )?;
    }
    let _ = device;
    Ok(())
}

/// The default pool's memory (`None` on the CPU and without the `cuda` feature).
pub fn pool_memory(device: &candle_core::Device) -> candle_core::Result<Option<PoolMemory>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        let p = pool::default_pool(d)?;
        return Ok(Some(PoolMemory {
            used: pool::get(p, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            used_high: pool::get(p, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: pool::get(p, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_high: pool::get(p, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        }));
    }
    let _ = device;
    Ok(None)
}

/// Restarts the high-water marks of [`pool_memory`] from the current values.
pub fn reset_pool_peaks(device: &candle_core::Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        let p = pool::default_pool(d)?;
        pool::set(p, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)?;
        pool::set(p, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0)?;
    }
    let _ = device;
    Ok(())
}

/// Starts (`true`) or stops CUDA's profiler for the current context: with
/// `ncu --profile-from-start off`, only the kernels in between are profiled. A no-op on the CPU.
pub fn cuda_profiler(device: &candle_core::Device, start: bool) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        pool::default_pool(d)?; // binds the context to this thread
                                // SAFETY: argument-less driver calls on the bound context.
        let r = unsafe {
            if start {
                sys::cuProfilerStart()
            } else {
                sys::cuProfilerStop()
            }
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!("cuProfilerStart/Stop: {r:?}");
        }
    }
    let _ = (device, start);
    Ok(())
}

/// The device address of a CUDA tensor's first element, valid while the borrow of the tensor
/// it came from lasts (the tensor, so its storage, cannot be dropped meanwhile).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
pub struct DeviceAddress<'a> {
    addr: u64,
    elem_size: usize,
    _tensor: std::marker::PhantomData<&'a candle_core::Tensor>,
}

#[cfg(feature = "cuda")]
impl DeviceAddress<'_> {
    /// The address, for kernels and cuBLAS calls that take raw pointers. Using it after the
    /// borrow ends, or writing through it while candle reads the tensor, is the caller's bug.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Bytes per element.
    pub fn elem_size(&self) -> usize {
        self.elem_size
    }
}

/// The device address of `t`'s first element (its storage's base plus the layout's start
/// offset) and the element size, tied to the borrow of `t`. `t` must be a CUDA tensor of f32,
/// bf16, f16 or u32; the caller checks its layout.
#[cfg(feature = "cuda")]
pub fn device_address(t: &candle_core::Tensor) -> candle_core::Result<DeviceAddress<'_>> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::{DType, Storage};
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        candle_core::bail!("device_address: not a CUDA tensor")
    };
    let stream = cs.device.cuda_stream();
    let base = match t.dtype() {
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(&stream).0,
        d => candle_core::bail!("device_address: unsupported dtype {d:?}"),
    };
    let size = t.dtype().size_in_bytes();
    Ok(DeviceAddress {
        addr: base + (l.start_offset() * size) as u64,
        elem_size: size,
        _tensor: std::marker::PhantomData,
    })
}

/// A `(rows, cols)` CUDA tensor of `dtype` (bf16, f16, else f32) on `like`'s device whose
/// elements are not initialised: for kernels that write every one.
#[cfg(feature = "cuda")]
pub(crate) fn uninit_cuda(
    (rows, cols): (usize, usize),
    dtype: candle_core::DType,
    like: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{CudaStorage, DType, Storage};
    let candle_core::Device::Cuda(dev) = like.device() else {
        candle_core::bail!("not a CUDA tensor")
    };
    let n = (rows * cols).max(1);
    // SAFETY: the memory is only read after the caller's kernel has written it.
    let storage = match dtype {
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n)? }, dev.clone())
        }
        DType::F16 => {
            CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(n)? }, dev.clone())
        }
        _ => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone()),
    };
    Ok(candle_core::Tensor::from_storage(
        Storage::Cuda(storage),
        (rows, cols),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// The CUDA device a GPU test runs on: `Some(cuda:0)`, or `None` (the test skips, saying so on
/// stderr) when there is none: a CPU-only build or machine. With `MOE_PEFT_REQUIRE_CUDA=1` a
/// missing device panics instead, so a GPU run cannot pass by skipping.
pub fn cuda_device_or_skip() -> Option<candle_core::Device> {
    match candle_core::Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var("MOE_PEFT_REQUIRE_CUDA").as_deref() != Ok("1"),
                "MOE_PEFT_REQUIRE_CUDA=1 but there is no CUDA device: {e}"
            );
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Page-locked host memory mapped into the device's address space: kernels read and write it
/// over the bus, so data that is touched once per step (optimizer state) can live in host RAM
/// instead of device memory (the idea of bitsandbytes' paged optimizers). Zeroed on creation.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct MappedHost {
    ptr: *mut u8,
    dev_ptr: u64,
    bytes: usize,
    device: candle_core::CudaDevice,
}

// SAFETY: the allocation is owned by this value and freed once, in Drop; access goes through
// `&self`/`&mut self` borrows after the device has been synchronized.
#[cfg(feature = "cuda")]
unsafe impl Send for MappedHost {}
#[cfg(feature = "cuda")]
unsafe impl Sync for MappedHost {}

#[cfg(feature = "cuda")]
impl MappedHost {
    /// `bytes` zeroed bytes of mapped, page-locked host memory for `device`'s kernels.
    pub fn zeroed(device: &candle_core::CudaDevice, bytes: usize) -> candle_core::Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let stream = device.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))?;
        let size = bytes.max(1);
        // SAFETY: a plain allocation call; the result is checked and freed in Drop.
        let ptr = unsafe {
            result::malloc_host(
                size,
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            )
        }
        .map_err(|e| {
            candle_core::Error::Msg(format!("pinning {size} bytes of host memory: {e:?}"))
        })? as *mut u8;
        // SAFETY: `ptr` points at `size` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, size) };
        let mut dev_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` was allocated with CU_MEMHOSTALLOC_DEVICEMAP on this context.
        let r = unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut dev_ptr, ptr as *mut std::ffi::c_void, 0)
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: allocated above, not yet shared.
            let _ = unsafe { result::free_host(ptr as *mut std::ffi::c_void) };
            candle_core::bail!("cuMemHostGetDevicePointer: {r:?}");
        }
        Ok(Self {
            ptr,
            dev_ptr,
            bytes,
            device: device.clone(),
        })
    }

    /// The address kernels use; `&mut self`, since a kernel may write the memory while a
    /// [`Self::bytes`] slice of it would be borrowed.
    pub fn device_ptr(&mut self) -> u64 {
        self.dev_ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The bytes, after the device's queued work (which may write them) has finished.
    pub fn bytes(&self) -> candle_core::Result<&[u8]> {
        candle_core::backend::BackendDevice::synchronize(&self.device)?;
        // SAFETY: `bytes` initialized bytes owned by self; no kernel is running after the sync.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) })
    }

    /// The bytes for writing, after the device's queued work has finished.
    pub fn bytes_mut(&mut self) -> candle_core::Result<&mut [u8]> {
        candle_core::backend::BackendDevice::synchronize(&self.device)?;
        // SAFETY: as in `bytes`, and `&mut self` is the only borrow.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) })
    }
}

#[cfg(feature = "cuda")]
impl Drop for MappedHost {
    fn drop(&mut self) {
        let _ = candle_core::backend::BackendDevice::synchronize(&self.device);
        // SAFETY: allocated by malloc_host in `zeroed`, freed only here.
        let _ = unsafe {
            candle_core::cuda_backend::cudarc::driver::result::free_host(
                self.ptr as *mut std::ffi::c_void,
            )
        };
    }
}
