//! Collective communication between the ranks of a data-parallel group, and the arithmetic of
//! splitting work between them.
//!
//! [`Communicator`] is what a trainer needs: an in-place sum over ranks of a gradient buffer,
//! a broadcast of parameters, a sum of host scalars, a barrier. Implementations:
//! [`SingleProcess`] (world size 1: every collective is the identity), [`ThreadGroup`] (ranks
//! as threads of one process, for tests and CPU runs; sums in rank order, so every rank gets
//! the same bits), and `Nccl` (`nccl` feature: one process per GPU over NCCL, the engine
//! DeepSpeed and torchrun use), whose unique id travels over [`crate::rendezvous`].
//!
//! [`buckets`] cuts a flat buffer into collective-sized pieces along variable boundaries.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

use candle_core::{CpuStorage, DType, Layout, Tensor};

use crate::error::{Error, Result};

/// One rank's handle on its group.
pub trait Communicator: Send + Sync + Debug {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Replaces the contiguous f32/bf16 tensor `t` by its element-wise sum over all ranks.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()>;
    /// Replaces `t` by rank `root`'s `t`.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()>;
    /// Replaces each value by its sum over all ranks (metrics, flags).
    fn all_reduce_host(&self, v: &mut [f64]) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// World size 1: every collective leaves its input as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _t: &Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _t: &Tensor, root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn all_reduce_host(&self, _v: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

fn check_root(root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(Error::InvalidInput(format!(
            "broadcast root {root} is not a rank of a group of {world}"
        )));
    }
    Ok(())
}

/// What the ranks of a [`ThreadGroup`] share.
#[derive(Debug)]
struct Shared {
    world: usize,
    slots: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

/// Ranks as threads of one process: each collective copies its operand to the host, every
/// rank reads all ranks' copies and sums them in rank order (so all ranks get the same bits),
/// and writes the result back in place.
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// One handle per rank, `world` of them (hand each to its thread).
    pub fn new(world: usize) -> Result<Vec<Self>> {
        if world == 0 {
            return Err(Error::InvalidInput(
                "a group needs at least one rank".into(),
            ));
        }
        let shared = Arc::new(Shared {
            world,
            slots: Mutex::new(vec![Vec::new(); world]),
            barrier: Barrier::new(world),
        });
        Ok((0..world)
            .map(|rank| Self {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// Deposits `mine`, waits for every rank, and returns every rank's deposit in rank order
    /// (through `f`), then waits again so that no rank overwrites a slot still being read.
    fn exchange<T>(&self, mine: Vec<f64>, f: impl FnOnce(&[Vec<f64>]) -> T) -> Result<T> {
        let lock = || {
            self.shared
                .slots
                .lock()
                .map_err(|_| Error::InvalidInput("a rank of the thread group panicked".into()))
        };
        lock()?[self.rank] = mine;
        self.shared.barrier.wait();
        let out = f(&lock()?);
        self.shared.barrier.wait();
        Ok(out)
    }
}

/// Host copy of a contiguous f32/bf16 tensor, in f64.
fn to_host(t: &Tensor) -> Result<Vec<f64>> {
    match t.dtype() {
        DType::F32 | DType::BF16 | DType::F16 | DType::F64 => {
            Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
        }
        d => Err(Error::InvalidInput(format!(
            "collectives take f32, bf16, f16 or f64 tensors, not {d:?}"
        ))),
    }
}

/// Writes `values` into `t` in place (rounded to `t`'s dtype).
fn write_back(t: &Tensor, values: Vec<f64>) -> Result<()> {
    if !t.is_contiguous() {
        return Err(Error::InvalidInput(
            "collectives work on contiguous tensors".into(),
        ));
    }
    let src = Tensor::from_vec(values, t.elem_count(), t.device())?.to_dtype(t.dtype())?;
    t.inplace_op2(&src, &CopyInto)?;
    Ok(())
}

/// `dst ← src` element for element (same dtype, contiguous).
struct CopyInto;

impl candle_core::InplaceOp2 for CopyInto {
    fn name(&self) -> &'static str {
        "copy-into"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("copy-into: strided operand")
        };
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => d[d0..d1].copy_from_slice(&s[s0..s1]),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => d[d0..d1].copy_from_slice(&s[s0..s1]),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => d[d0..d1].copy_from_slice(&s[s0..s1]),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => d[d0..d1].copy_from_slice(&s[s0..s1]),
            _ => candle_core::bail!("copy-into: dtypes differ"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((d0, d1)), Some((s0, _))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("copy-into: strided operand")
        };
        let n = d1 - d0;
        use candle_core::backend::BackendStorage;
        let dev = dst.device.clone();
        let stream = dev.cuda_stream();
        macro_rules! copy {
            ($t:ty) => {{
                let s = src.as_cuda_slice::<$t>()?.slice(s0..s0 + n);
                let d = dst.as_cuda_slice_mut::<$t>()?;
                let mut d = d.slice_mut(d0..d1);
                stream
                    .memcpy_dtod(&s, &mut d)
                    .map_err(candle_core::Error::wrap)?;
            }};
        }
        match dst.dtype() {
            DType::F32 => copy!(f32),
            DType::BF16 => copy!(half::bf16),
            DType::F16 => copy!(half::f16),
            DType::F64 => copy!(f64),
            d => candle_core::bail!("copy-into: {d:?}"),
        }
        Ok(())
    }
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        let mut v = to_host(t)?;
        self.all_reduce_host(&mut v)?;
        write_back(t, v)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        check_root(root, self.shared.world)?;
        let mine = if self.rank == root {
            to_host(t)?
        } else {
            Vec::new()
        };
        let v = self.exchange(mine, |all| all[root].clone())?;
        if self.rank != root {
            write_back(t, v)?;
        }
        Ok(())
    }
    fn all_reduce_host(&self, v: &mut [f64]) -> Result<()> {
        let n = v.len();
        let sum = self.exchange(v.to_vec(), |all| {
            let mut s = vec![0f64; n];
            for x in all {
                for (a, b) in s.iter_mut().zip(x) {
                    *a += b;
                }
            }
            s
        })?;
        v.copy_from_slice(&sum);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

/// Consecutive element ranges of a flat buffer holding variables of `lens` elements, each of
/// at most `max_elems` elements unless one variable alone is larger, cut only between
/// variables (a variable's gradient is then complete when its bucket is).
pub fn buckets(lens: &[usize], max_elems: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut end) = (0usize, 0usize);
    for &n in lens {
        if end > start && end - start + n > max_elems {
            out.push(start..end);
            start = end;
        }
        end += n;
    }
    if end > start {
        out.push(start..end);
    }
    out
}

/// The rank that owns each variable when `world` ranks split the optimizer state of variables
/// of `lens` elements: consecutive runs of variables, a variable going to the rank whose equal
/// share of all elements holds its midpoint (so each rank's load is its share give or take
/// half of one variable at either end). Non-decreasing in the variable index.
pub fn owners(lens: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let total: u128 = lens.iter().map(|&n| n as u128).sum();
    let mut start = 0u128;
    lens.iter()
        .map(|&n| {
            let mid2 = 2 * start + n as u128;
            start += n as u128;
            if total == 0 {
                return 0;
            }
            ((mid2 * world as u128) / (2 * total)).min(world as u128 - 1) as usize
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_split_elements_evenly_in_runs() {
        // Equal variables split exactly.
        assert_eq!(owners(&[5; 8], 4), vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(owners(&[5; 3], 1), vec![0, 0, 0]);
        // More ranks than variables: some own nothing.
        assert_eq!(owners(&[7, 7], 4), vec![1, 3]);
        assert_eq!(owners(&[], 3), Vec::<usize>::new());
        assert_eq!(owners(&[0, 0], 2), vec![0, 0]);
        // Uneven sizes, as in a model (embeddings, then many small weights): each rank's load
        // is its share within one variable, and the runs are consecutive.
        let mut lens = vec![1000usize];
        lens.extend((0..300).map(|i| 10 + (i * 37) % 90));
        lens.push(1000);
        for world in [2, 3, 4, 8] {
            let o = owners(&lens, world);
            assert!(o.windows(2).all(|w| w[0] <= w[1]), "runs");
            assert!(o.iter().all(|&r| r < world));
            let total: usize = lens.iter().sum();
            let biggest = *lens.iter().max().unwrap();
            for r in 0..world {
                let load: usize = lens
                    .iter()
                    .zip(&o)
                    .filter(|(_, &x)| x == r)
                    .map(|(n, _)| n)
                    .sum();
                assert!(
                    load.abs_diff(total / world) <= biggest,
                    "world {world} rank {r}: {load}"
                );
            }
        }
    }
    use candle_core::Device;

    #[test]
    fn buckets_cut_between_variables() {
        assert_eq!(
            buckets(&[3, 4, 5, 20, 1], 8),
            vec![0..7, 7..12, 12..32, 32..33]
        );
        assert_eq!(buckets(&[], 8), Vec::<Range<usize>>::new());
        assert_eq!(buckets(&[10], 4), vec![0..10]);
        // Every element is in exactly one bucket, in order.
        let lens = [5, 1, 9, 2, 2, 7, 3];
        let b = buckets(&lens, 6);
        assert_eq!(b.first().map(|r| r.start), Some(0));
        assert_eq!(b.last().map(|r| r.end), Some(lens.iter().sum()));
        assert!(b.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    fn thread_group_sums_broadcasts_and_agrees_bit_for_bit() -> Result<()> {
        let world = 3;
        let handles = ThreadGroup::new(world)?;
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<f64>)> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .map(|g| {
                    s.spawn(move || -> Result<(Vec<f32>, Vec<f32>, Vec<f64>)> {
                        let r = g.rank() as f32;
                        let t = Tensor::new(&[r + 0.1, 2.0 * r, -r], &Device::Cpu)?;
                        g.all_reduce_sum(&t)?;
                        let b = Tensor::new(&[r, r], &Device::Cpu)?;
                        g.broadcast(&b, 2)?;
                        let mut h = [1.0, r as f64];
                        g.all_reduce_host(&mut h)?;
                        g.barrier()?;
                        Ok((t.to_vec1()?, b.to_vec1()?, h.to_vec()))
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("rank thread"))
                .collect::<Result<Vec<_>>>()
        })?;
        for (t, b, h) in &results {
            assert_eq!(t, &results[0].0);
            assert!(
                (t[0] - 3.3).abs() < 1e-6 && t[1] == 6.0 && t[2] == -3.0,
                "{t:?}"
            );
            assert_eq!(b, &vec![2.0, 2.0]);
            assert_eq!(h, &vec![3.0, 3.0]);
        }
        Ok(())
    }

    #[test]
    fn single_process_leaves_values_alone() -> Result<()> {
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        SingleProcess.all_reduce_sum(&t)?;
        SingleProcess.broadcast(&t, 0)?;
        assert_eq!(t.to_vec1::<f32>()?, vec![1.0, 2.0]);
        assert!(SingleProcess.broadcast(&t, 1).is_err());
        Ok(())
    }
}

/// NCCL: one process per GPU (`nccl` feature; needs `libnccl.so.2` when the program starts).
#[cfg(feature = "nccl")]
pub mod nccl {
    use std::sync::Mutex;
    use std::time::Duration;

    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Tensor};

    use super::Communicator;
    use crate::error::{Error, Result};
    use crate::rendezvous::{exchange, LaunchEnv};

    /// A communicator is used by one thread at a time (the Mutex); NCCL allows that from any
    /// thread.
    #[derive(Debug)]
    struct Owned(Comm);
    // SAFETY: an NCCL communicator is a handle that may be used from any thread, one call at
    // a time; the Mutex around it serializes the calls.
    unsafe impl Send for Owned {}

    /// One rank of an NCCL group, on the stream of its candle device.
    #[derive(Debug)]
    pub struct Nccl {
        comm: Mutex<Owned>,
        rank: usize,
        world: usize,
        device: Device,
    }

    fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
        Error::InvalidInput(format!("NCCL {what}: {e:?}"))
    }

    impl Nccl {
        /// Joins the group `env` describes on `device` (a CUDA device): rank 0 makes the
        /// unique id and sends it over [`exchange`]; every rank then initializes NCCL.
        pub fn new(device: &Device, env: &LaunchEnv, timeout: Duration) -> Result<Self> {
            let cuda = match device {
                Device::Cuda(c) => c.clone(),
                _ => {
                    return Err(Error::InvalidInput(
                        "NCCL needs a CUDA device for each rank".into(),
                    ))
                }
            };
            let mine = if env.rank == 0 {
                let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
                id.internal().iter().map(|&c| c as u8).collect()
            } else {
                Vec::new()
            };
            let bytes = exchange(env, &mine, timeout)?;
            if bytes.len() != 128 {
                return Err(Error::InvalidInput(format!(
                    "NCCL unique id of {} bytes from rank 0",
                    bytes.len()
                )));
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(&bytes) {
                *d = *s as std::ffi::c_char;
            }
            let comm = Comm::from_rank(
                cuda.cuda_stream(),
                env.rank,
                env.world_size,
                Id::uninit(internal),
            )
            .map_err(|e| nccl_err("init", e))?;
            Ok(Self {
                comm: Mutex::new(Owned(comm)),
                rank: env.rank,
                world: env.world_size,
                device: device.clone(),
            })
        }

        fn with<T>(&self, f: impl FnOnce(&Comm) -> Result<T>) -> Result<T> {
            let g = self
                .comm
                .lock()
                .map_err(|_| Error::InvalidInput("NCCL communicator lock poisoned".into()))?;
            f(&g.0)
        }
    }

    /// An NCCL collective on a tensor's own storage, in place.
    struct InPlace<'a> {
        comm: &'a Comm,
        /// `None`: all-reduce (sum); `Some(root)`: broadcast from `root`.
        root: Option<usize>,
    }

    impl candle_core::InplaceOp1 for InPlace<'_> {
        fn name(&self) -> &'static str {
            "nccl"
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("NCCL collectives need tensors on the GPU")
        }
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
            use candle_core::backend::BackendStorage;
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("NCCL collectives need contiguous tensors")
            };
            macro_rules! run {
                ($t:ty) => {{
                    let slice = s.as_cuda_slice_mut::<$t>()?;
                    let mut view = slice.slice_mut(a..b);
                    match self.root {
                        None => self
                            .comm
                            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                            .map(|_| ()),
                        Some(r) => self
                            .comm
                            .broadcast_in_place(&mut view, r as i32)
                            .map(|_| ()),
                    }
                    .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?
                }};
            }
            match s.dtype() {
                DType::F32 => run!(f32),
                DType::F64 => run!(f64),
                DType::BF16 => run!(half::bf16),
                DType::F16 => run!(half::f16),
                d => candle_core::bail!("NCCL collective on {d:?}"),
            }
            Ok(())
        }
    }

    impl Communicator for Nccl {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
            self.with(|c| {
                Ok(t.inplace_op1(&InPlace {
                    comm: c,
                    root: None,
                })?)
            })
        }
        fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
            super::check_root(root, self.world)?;
            self.with(|c| {
                Ok(t.inplace_op1(&InPlace {
                    comm: c,
                    root: Some(root),
                })?)
            })
        }
        fn all_reduce_host(&self, v: &mut [f64]) -> Result<()> {
            let t = Tensor::from_slice(v, v.len(), &self.device)?;
            self.all_reduce_sum(&t)?;
            v.copy_from_slice(&t.to_vec1::<f64>()?);
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            let mut one = [1.0];
            self.all_reduce_host(&mut one)
        }
    }
}
