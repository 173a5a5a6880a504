//! Device-wide settings.

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
        use candle_core::cuda_backend::cudarc::driver::sys;
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))?;
        // SAFETY: plain driver calls on the current context's device with valid pointers.
        unsafe {
            let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
            let r = sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device());
            if r != sys::CUresult::CUDA_SUCCESS {
                candle_core::bail!("cuDeviceGetDefaultMemPool: {r:?}");
            }
            let mut threshold: u64 = u64::MAX;
            let r = sys::cuMemPoolSetAttribute(
                pool.assume_init(),
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
            if r != sys::CUresult::CUDA_SUCCESS {
                candle_core::bail!("cuMemPoolSetAttribute(RELEASE_THRESHOLD): {r:?}");
            }
        }
    }
    let _ = device;
    Ok(())
}
