// The same CUDA build step for every crate with kernels: see ../build/cuda_ptx.rs.
include!("../build/cuda_ptx.rs");
