//! 8-bit blockwise AdamW (bitsandbytes' `AdamW8bit`, the `adamw_8bit` / `paged_adamw_8bit` of
//! transformers) over every variable of a [`FlatGrads`] buffer in one pass, and bf16
//! parameters updated with stochastic rounding.
//!
//! **State.** A variable of at least `min_8bit_size` elements (bitsandbytes: 4096) keeps each
//! moment as one byte per element plus one f32 `absmax` per block of [`BLOCK_SIZE`] elements
//! of that variable (as bitsandbytes 0.50 does: its fixture has 20 blocks for 5,000
//! elements); the first moment is coded with the signed dynamic map, the second with the
//! unsigned one (`create_dynamic_map(signed)`, passed in as [`Maps`]). Smaller variables keep
//! f32 moments, as bitsandbytes does.
//!
//! **Update** (bitsandbytes' `kOptimizerStatic8bit2StateBlockwise`, per element, every product
//! and sum rounded on its own):
//! `g ← g·clip`, `m ← dq₁(m)·β₁ + (1−β₁)·g`, `v ← dq₂(v)·β₂ + (1−β₂)·g²`,
//! `p ← p + s·(m / (√v + c₂·ε))` with `s = −lr·c₂/c₁`, `c₁ = 1−β₁ᵗ`, `c₂ = √(1−β₂ᵗ)`, then
//! `p ← p·(1 − lr·λ)` when `λ > 0`. The new `absmax` of a block is the largest `|m|` (`v`) in
//! it, and each moment is coded as the map entry nearest `m / absmax` (bitsandbytes'
//! `quantize_2D`: a binary search with midpoint rounding), the first moment's code moved one
//! step when it would flip the sign. `dq(q) = map[q]·absmax`. Variables with f32 moments take
//! the same update without the coding.
//!
//! bitsandbytes divides with `__fdividef` (approximate); here every division is correctly
//! rounded, so the CPU twin and the CUDA kernel (`cuda/adam8bit.cu`) give the same bits for
//! finite gradients. Gradients must be finite: bitsandbytes skips an element whose gradient is
//! NaN or infinite, this update does not (the trainer stops before updating when the gradient
//! norm is not finite).
//!
//! **bf16 parameters.** The new value is computed in f32 and stored in bf16 by stochastic
//! rounding: the low 16 bits of the f32 are added to a uniform 16-bit draw and truncated,
//! so the stored value is unbiased; the draw is a hash of (seed, step, variable, element), the
//! same on the CPU and in the kernel. Updates far below a bf16 ulp then still move the weight
//! on average, which round-to-nearest would drop.

use candle_core::{DType, Device, Tensor, Var};

use crate::dropout::splitmix64;
use crate::error::{Error, Result};
use crate::flat::FlatGrads;

/// Elements per quantization block of a moment.
pub const BLOCK_SIZE: usize = 256;

/// bitsandbytes' default `min_8bit_size`: smaller variables keep f32 moments.
pub const MIN_8BIT_SIZE: usize = 4096;

/// The two 256-entry dynamic maps: signed for the first moment, unsigned for the second.
#[derive(Debug, Clone, PartialEq)]
pub struct Maps {
    /// `create_dynamic_map(signed=True)`.
    pub signed: [f32; 256],
    /// `create_dynamic_map(signed=False)`.
    pub unsigned: [f32; 256],
}

/// Where each variable's moments live in the state buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockwiseLayout {
    /// Elements per variable.
    pub lens: Vec<usize>,
    /// Whether the variable's moments are 8-bit (else f32).
    pub eight_bit: Vec<bool>,
    /// Offset of the variable's moments in the 8-bit code buffers or the f32 buffers.
    pub state_offsets: Vec<usize>,
    /// Offset of the variable's first block in the `absmax` buffers (8-bit variables).
    pub block_offsets: Vec<usize>,
    /// Elements of each 8-bit code buffer.
    pub codes_len: usize,
    /// Elements of each f32 moment buffer.
    pub f32_len: usize,
    /// Blocks (entries of each `absmax` buffer).
    pub blocks: usize,
}

impl BlockwiseLayout {
    /// The layout for variables of `lens` elements; those of at least `min_8bit_size` are 8-bit.
    pub fn new(lens: &[usize], min_8bit_size: usize) -> Self {
        let mut l = Self {
            lens: lens.to_vec(),
            eight_bit: Vec::with_capacity(lens.len()),
            state_offsets: Vec::with_capacity(lens.len()),
            block_offsets: Vec::with_capacity(lens.len()),
            codes_len: 0,
            f32_len: 0,
            blocks: 0,
        };
        for &n in lens {
            let q = n >= min_8bit_size;
            l.eight_bit.push(q);
            l.block_offsets.push(l.blocks);
            if q {
                l.state_offsets.push(l.codes_len);
                l.codes_len += n;
                l.blocks += n.div_ceil(BLOCK_SIZE);
            } else {
                l.state_offsets.push(l.f32_len);
                l.f32_len += n;
            }
        }
        l
    }

    /// Bytes of optimizer state this layout needs.
    pub fn state_bytes(&self) -> usize {
        2 * self.codes_len + 8 * self.blocks + 8 * self.f32_len
    }
}

/// The scalars of one 8-bit AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adam8bitStep {
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
    /// Step number, counting from 1.
    pub step: usize,
    /// Every gradient is multiplied by this first (clipping coefficient; 1.0: none).
    pub clip: f64,
    /// Seed of the stochastic rounding of bf16 parameters.
    pub seed: u64,
}

/// The f32 scalars both the CPU twin and the kernel use.
#[derive(Debug, Clone, Copy)]
struct Hyper {
    b1: f32,
    omb1: f32,
    b2: f32,
    omb2: f32,
    clip: f32,
    step_size: f32,
    c2eps: f32,
    decay: f32,
    use_decay: bool,
    key: u64,
}

impl Adam8bitStep {
    /// The scalars as bitsandbytes' kernel forms them: `1 − β`, `c₂·ε`, `−lr·c₂/c₁` and
    /// `1 − lr·λ` in f32 arithmetic (the bias corrections themselves in f64, then rounded).
    fn hyper(&self) -> Hyper {
        let c1 = (1.0 - self.beta1.powi(self.step as i32)) as f32;
        let c2 = (1.0 - self.beta2.powi(self.step as i32)).sqrt() as f32;
        let (b1, b2, lr) = (self.beta1 as f32, self.beta2 as f32, self.lr as f32);
        Hyper {
            b1,
            omb1: 1.0 - b1,
            b2,
            omb2: 1.0 - b2,
            clip: self.clip as f32,
            step_size: -lr * c2 / c1,
            c2eps: c2 * self.eps as f32,
            decay: 1.0 - lr * self.weight_decay as f32,
            use_decay: self.weight_decay > 0.0,
            key: rounding_key(self.seed, self.step),
        }
    }
}

/// The key of step `step`'s stochastic rounding draws.
fn rounding_key(seed: u64, step: usize) -> u64 {
    splitmix64(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The 16-bit draw for element `i` of variable `var` under `key`.
pub fn rounding_bits(key: u64, var: usize, i: usize) -> u32 {
    (splitmix64(key ^ ((var as u64) << 40) ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 48)
        as u32
}

/// `x` rounded to bf16 stochastically with the 16-bit draw `r` (non-finite values round to
/// nearest).
pub fn stochastic_bf16(x: f32, r: u32) -> half::bf16 {
    if !x.is_finite() {
        return half::bf16::from_f32(x);
    }
    half::bf16::from_bits((x.to_bits().wrapping_add(r & 0xFFFF) >> 16) as u16)
}

/// bitsandbytes' `quantize_2D<SIGNED>`: the code of `x` in the sorted 256-entry `map` (binary
/// search from entry 127, then the nearer neighbour by midpoint).
pub fn quantize_2d(map: &[f32; 256], x: f32, signed: bool) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = if signed { -1.0f32 } else { 0.0 };
    let mut upper = 1.0f32;
    let mut val = map[pivot];
    let mut i = 64usize;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = map[pivot];
        i >>= 1;
    }
    let code = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    code as u8
}

/// The state of an 8-bit AdamW as host vectors (the CPU twin's storage, and what checkpoints
/// hold).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostState {
    /// First-moment codes of the 8-bit variables.
    pub codes1: Vec<u8>,
    /// Second-moment codes.
    pub codes2: Vec<u8>,
    /// First-moment block scales.
    pub absmax1: Vec<f32>,
    /// Second-moment block scales.
    pub absmax2: Vec<f32>,
    /// First moments of the f32 variables.
    pub m32: Vec<f32>,
    /// Second moments of the f32 variables.
    pub v32: Vec<f32>,
}

impl HostState {
    /// Zero state for `layout` (all codes 0 with scale 0 dequantize to 0, as bitsandbytes').
    pub fn zeros(layout: &BlockwiseLayout) -> Self {
        Self {
            codes1: vec![0; layout.codes_len],
            codes2: vec![0; layout.codes_len],
            absmax1: vec![0.0; layout.blocks],
            absmax2: vec![0.0; layout.blocks],
            m32: vec![0.0; layout.f32_len],
            v32: vec![0.0; layout.f32_len],
        }
    }

    /// Checks the lengths against `layout`.
    pub fn check(&self, layout: &BlockwiseLayout) -> Result<()> {
        let ok = self.codes1.len() == layout.codes_len
            && self.codes2.len() == layout.codes_len
            && self.absmax1.len() == layout.blocks
            && self.absmax2.len() == layout.blocks
            && self.m32.len() == layout.f32_len
            && self.v32.len() == layout.f32_len;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidInput(
                "8-bit AdamW state does not match its variables".into(),
            ))
        }
    }
}

/// One block (≤ [`BLOCK_SIZE`] elements) of an 8-bit variable: `p`, `g` (already f32) and the
/// block's codes are updated in place; returns the new scales. `store` rounds each new
/// parameter value (index within the block) to the parameter's dtype.
#[allow(clippy::too_many_arguments)]
fn block_8bit(
    h: &Hyper,
    maps: &Maps,
    p: &mut [f32],
    g: &[f32],
    c1: &mut [u8],
    c2: &mut [u8],
    absmax1: &mut f32,
    absmax2: &mut f32,
    store: &dyn Fn(usize, f32) -> f32,
) {
    let n = p.len();
    let mut s1 = [0f32; BLOCK_SIZE];
    let mut s2 = [0f32; BLOCK_SIZE];
    let (mut m1, mut m2) = (0f32, 0f32);
    for j in 0..n {
        let gi = g[j] * h.clip;
        let a = maps.signed[c1[j] as usize] * *absmax1;
        let b = maps.unsigned[c2[j] as usize] * *absmax2;
        s1[j] = a * h.b1 + gi * h.omb1;
        s2[j] = b * h.b2 + (gi * gi) * h.omb2;
        m1 = m1.max(s1[j].abs());
        m2 = m2.max(s2[j].abs());
    }
    for j in 0..n {
        p[j] = store(j, param_update(h, p[j], s1[j], s2[j]));
        let x1 = if m1 > 0.0 { s1[j] / m1 } else { 0.0 };
        let x2 = if m2 > 0.0 { s2[j] / m2 } else { 0.0 };
        let mut q1 = quantize_2d(&maps.signed, x1, true);
        if maps.signed[q1 as usize].is_sign_negative() != s1[j].is_sign_negative() {
            q1 = if s1[j] > 0.0 {
                q1.wrapping_add(1)
            } else {
                q1.wrapping_sub(1)
            };
        }
        c1[j] = q1;
        c2[j] = quantize_2d(&maps.unsigned, x2, false);
    }
    *absmax1 = m1;
    *absmax2 = m2;
}

/// `p + s·(m / (√v + c₂ε))`, then the decay.
fn param_update(h: &Hyper, p: f32, m: f32, v: f32) -> f32 {
    let mut p = p + h.step_size * (m / (v.sqrt() + h.c2eps));
    if h.use_decay {
        p *= h.decay;
    }
    p
}

/// The CPU twin: every variable updated from `grads` with the state in `state` (laid out by
/// `layout`). Variables are f32 or bf16 (stochastic rounding); the gradient buffer f32 or bf16.
pub fn adam8bit_update_host(
    vars: &[Var],
    grads: &FlatGrads,
    layout: &BlockwiseLayout,
    state: &mut HostState,
    maps: &Maps,
    s: &Adam8bitStep,
) -> Result<()> {
    check_vars(vars, grads, layout)?;
    state.check(layout)?;
    let h = s.hyper();
    let gbuf = grads.buffer().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    for (t, var) in vars.iter().enumerate() {
        let n = layout.lens[t];
        if n == 0 {
            continue;
        }
        let goff = grads.offsets()[t];
        let g = &gbuf[goff..goff + n];
        let dtype = var.dtype();
        let mut p = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let so = layout.state_offsets[t];
        let bo = layout.block_offsets[t];
        let store = |base: usize| {
            move |j: usize, x: f32| -> f32 {
                match dtype {
                    DType::BF16 => stochastic_bf16(x, rounding_bits(h.key, t, base + j)).to_f32(),
                    _ => x,
                }
            }
        };
        if layout.eight_bit[t] {
            for (b, start) in (0..n).step_by(BLOCK_SIZE).enumerate() {
                let end = (start + BLOCK_SIZE).min(n);
                let (a1, a2) = (&mut state.absmax1[bo + b], &mut state.absmax2[bo + b]);
                block_8bit(
                    &h,
                    maps,
                    &mut p[start..end],
                    &g[start..end],
                    &mut state.codes1[so + start..so + end],
                    &mut state.codes2[so + start..so + end],
                    a1,
                    a2,
                    &store(start),
                );
            }
        } else {
            let st = store(0);
            for j in 0..n {
                let gi = g[j] * h.clip;
                let m = state.m32[so + j] * h.b1 + gi * h.omb1;
                let v = state.v32[so + j] * h.b2 + (gi * gi) * h.omb2;
                state.m32[so + j] = m;
                state.v32[so + j] = v;
                p[j] = st(j, param_update(&h, p[j], m, v));
            }
        }
        let new = Tensor::from_vec(p, var.shape(), &Device::Cpu)?.to_dtype(dtype)?;
        var.set(&new.to_device(var.device())?)?;
    }
    Ok(())
}

fn check_vars(vars: &[Var], grads: &FlatGrads, layout: &BlockwiseLayout) -> Result<()> {
    // A variable of length 0 in the layout is another rank's (its state is sharded away).
    let fits = grads.lens().len() == layout.lens.len()
        && vars.len() == layout.lens.len()
        && grads
            .lens()
            .iter()
            .zip(&layout.lens)
            .all(|(&g, &l)| l == g || l == 0);
    if !fits {
        return Err(Error::InvalidInput(format!(
            "a gradient buffer of {} variables for an 8-bit optimizer of {}",
            grads.lens().len(),
            layout.lens.len()
        )));
    }
    if let Some(bad) = vars
        .iter()
        .position(|v| !matches!(v.dtype(), DType::F32 | DType::BF16))
    {
        return Err(Error::InvalidInput(format!(
            "8-bit AdamW updates f32 or bf16 variables; variable {bad} is {:?}",
            vars[bad].dtype()
        )));
    }
    Ok(())
}

/// Raw device addresses of the six state buffers (codes 1/2, absmax 1/2, f32 moments 1/2).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
pub struct StatePointers {
    /// First-moment codes (u8).
    pub codes1: u64,
    /// Second-moment codes (u8).
    pub codes2: u64,
    /// First-moment scales (f32).
    pub absmax1: u64,
    /// Second-moment scales (f32).
    pub absmax2: u64,
    /// f32 first moments.
    pub m32: u64,
    /// f32 second moments.
    pub v32: u64,
}

/// The CUDA kernel: every variable updated in one launch from `grads` with the state at `ptrs`
/// (device memory, or host memory mapped into the device's address space), bit-identical to
/// [`adam8bit_update_host`].
#[cfg(feature = "cuda")]
pub fn adam8bit_update_cuda(
    vars: &[Var],
    grads: &FlatGrads,
    layout: &BlockwiseLayout,
    ptrs: &StatePointers,
    maps: &Maps,
    s: &Adam8bitStep,
) -> Result<()> {
    check_vars(vars, grads, layout)?;
    cuda::launch(vars, grads, layout, ptrs, maps, &s.hyper())?;
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Storage, Var};

    use super::{BlockwiseLayout, Hyper, Maps, StatePointers};
    use crate::flat::FlatGrads;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adam8bit.ptx"));
    const MODULE: &str = "moe_peft_kernels_adam8bit";

    pub(super) fn launch(
        vars: &[Var],
        grads: &FlatGrads,
        layout: &BlockwiseLayout,
        ptrs: &StatePointers,
        maps: &Maps,
        h: &Hyper,
    ) -> candle_core::Result<()> {
        if vars.is_empty() {
            return Ok(());
        }
        let g = grads.buffer();
        let candle_core::Device::Cuda(dev) = g.device() else {
            candle_core::bail!("adam8bit: not a CUDA buffer")
        };
        let stream = dev.cuda_stream();
        if vars.iter().any(|v| !v.is_contiguous()) {
            candle_core::bail!("adam8bit: variables must be contiguous")
        }
        // Per variable: parameter address, gradient offset, length, state offset, block offset,
        // 8-bit flag, bf16 flag.
        let mut table = Vec::with_capacity(7 * vars.len());
        for (t, v) in vars.iter().enumerate() {
            table.push(crate::device::device_address(v.as_tensor())?.addr());
            table.push(grads.offsets()[t] as u64);
            table.push(layout.lens[t] as u64);
            table.push(layout.state_offsets[t] as u64);
            table.push(layout.block_offsets[t] as u64);
            table.push(u64::from(layout.eight_bit[t]));
            table.push(u64::from(v.dtype() == DType::BF16));
        }
        let d_table = stream.clone_htod(&table).w()?;
        let mut map = Vec::with_capacity(512);
        map.extend_from_slice(&maps.signed);
        map.extend_from_slice(&maps.unsigned);
        let d_map = stream.clone_htod(&map).w()?;
        let (gs, _) = g.storage_and_layout();
        let Storage::Cuda(gs) = &*gs else {
            candle_core::bail!("adam8bit: gradients must be on the GPU")
        };
        let name = match gs.dtype() {
            DType::F32 => "adam8bit_f32",
            DType::BF16 => "adam8bit_bf16",
            other => candle_core::bail!("adam8bit: gradients in {other:?}"),
        };
        let f = gs.device().get_or_load_custom_func(name, MODULE, PTX)?;
        let max_blocks = layout
            .lens
            .iter()
            .map(|n| n.div_ceil(super::BLOCK_SIZE))
            .max()
            .unwrap_or(1);
        let cfg = LaunchConfig {
            grid_dim: (vars.len() as u32, max_blocks.clamp(1, 16) as u32, 1),
            block_dim: (super::BLOCK_SIZE as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let use_decay = i32::from(h.use_decay);
        macro_rules! go {
            ($g:ty) => {{
                let gv = gs.as_cuda_slice::<$g>()?;
                let mut b = f.builder();
                b.arg(&d_table)
                    .arg(&d_map)
                    .arg(gv)
                    .arg(&ptrs.codes1)
                    .arg(&ptrs.codes2)
                    .arg(&ptrs.absmax1)
                    .arg(&ptrs.absmax2)
                    .arg(&ptrs.m32)
                    .arg(&ptrs.v32)
                    .arg(&h.b1)
                    .arg(&h.omb1)
                    .arg(&h.b2)
                    .arg(&h.omb2)
                    .arg(&h.clip)
                    .arg(&h.step_size)
                    .arg(&h.c2eps)
                    .arg(&h.decay)
                    .arg(&use_decay)
                    .arg(&h.key);
                // SAFETY: the arguments match `adam8bit_*` in adam8bit.cu; every table entry is a
                // live contiguous variable of its length, and the state pointers address buffers
                // of the layout's sizes.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match gs.dtype() {
            DType::F32 => go!(f32),
            _ => go!(half::bf16),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps() -> Maps {
        // Any sorted maps exercise the code paths; the real ones live in moe-peft-quant.
        let mut signed = [0f32; 256];
        let mut unsigned = [0f32; 256];
        for i in 0..256 {
            signed[i] = -1.0 + 2.0 * i as f32 / 255.0;
            unsigned[i] = i as f32 / 255.0;
        }
        signed[127] = 0.0;
        Maps { signed, unsigned }
    }

    #[test]
    fn quantize_2d_is_the_nearest_entry() {
        let m = maps();
        for k in 0..2000 {
            let x = -1.0 + 2.0 * k as f32 / 1999.0;
            let q = quantize_2d(&m.signed, x, true) as usize;
            let best = (0..256)
                .min_by(|&a, &b| (m.signed[a] - x).abs().total_cmp(&(m.signed[b] - x).abs()))
                .unwrap();
            assert!(
                (m.signed[q] - x).abs() <= (m.signed[best] - x).abs() + 1e-7,
                "{x}: {q} vs {best}"
            );
        }
    }

    #[test]
    fn quantize_2d_decides_at_the_f32_midpoint_and_ties_go_to_the_even_code() {
        let m = maps();
        for (map, signed) in [(&m.signed, true), (&m.unsigned, false)] {
            for k in 0..255 {
                let mid = (map[k] + map[k + 1]) * 0.5;
                let (below, above) = (mid.next_down(), mid.next_up());
                assert_eq!(quantize_2d(map, below, signed) as usize, k, "{k} below");
                assert_eq!(quantize_2d(map, above, signed) as usize, k + 1, "{k} above");
                let even = if k % 2 == 0 { k } else { k + 1 };
                assert_eq!(quantize_2d(map, mid, signed) as usize, even, "{k} on");
            }
        }
    }

    #[test]
    fn layout_splits_small_and_large_variables() {
        let l = BlockwiseLayout::new(&[100, 5000, 4096, 10], 4096);
        assert_eq!(l.eight_bit, vec![false, true, true, false]);
        assert_eq!(l.state_offsets, vec![0, 0, 5000, 100]);
        assert_eq!(l.block_offsets, vec![0, 0, 20, 36]);
        assert_eq!((l.codes_len, l.f32_len, l.blocks), (9096, 110, 36));
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_brackets_the_value() {
        let x = 1.0f32 + 3.0 * f32::EPSILON * 1000.0; // between two bf16 values
        let lo = half::bf16::from_f32(x).to_f32().min(x);
        let mut sum = 0f64;
        let n = 20000;
        for i in 0..n {
            let r = rounding_bits(7, 3, i);
            let y = stochastic_bf16(x, r).to_f32();
            assert!(y >= lo - 1e-2 && (y - x).abs() < 0.01, "{y}");
            sum += y as f64;
        }
        let mean = sum / n as f64;
        assert!((mean - x as f64).abs() < 2e-5, "{mean} vs {x}");
    }
}
