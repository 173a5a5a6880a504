//! AdamW exactly as `torch.optim.AdamW` (the reference's `adamw_torch`): the optimizer state
//! (moments in one flat buffer each, f32 or bf16, and the step count) with its save and load.
//! The update itself is [`moe_peft_kernels::adamw`] (a CPU twin and CUDA kernels).
//!
//! With [`Optim::Adamw8bit`] / [`Optim::PagedAdamw8bit`] the moments are bitsandbytes' 8-bit
//! blockwise states instead ([`moe_peft_kernels::adam8bit`]: one byte per element and moment
//! plus an f32 scale per 256 elements, half of bf16 moments and a quarter of f32 ones); the
//! paged variant keeps them in page-locked host memory that the update kernel reads and writes
//! over the bus, so they take no device memory at all.
//!
//! candle-optimisers' `Adam` keeps its moments private (no checkpoint, so no exact resume) and
//! folds the bias corrections differently from torch; this optimizer exposes its state so a
//! resumed run continues bit for bit, and keeps the moments in a chosen dtype.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use moe_peft_kernels::{
    adam8bit_update_host, adamw_update, adamw_update_flat, Adam8bitStep, AdamWStep,
    BlockwiseLayout, FlatGrads, HostState, Maps,
};
use moe_peft_quant::dynamic::create_dynamic_map;
use serde::{Deserialize, Serialize};

use moe_peft_model::io::{HostChunks, SafetensorsWriter, TensorSpec};
use moe_peft_model::Checkpoint;

use crate::error::{Error, Result};

/// Hyper-parameters of AdamW (torch defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Keep the two moments in bf16 instead of f32 (half their memory; the update itself is
    /// computed in f32). Only for [`Optim::AdamwTorch`].
    pub bf16_moments: bool,
    /// Which AdamW (transformers' `optim` names).
    pub optim: Optim,
    /// 8-bit optimizers: variables with fewer elements keep f32 moments (bitsandbytes'
    /// `min_8bit_size`, 4096).
    pub min_8bit_size: usize,
    /// Seed of the stochastic rounding of bf16 variables (8-bit optimizers).
    pub seed: u64,
}

/// The AdamW variants, named as transformers' `--optim`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Optim {
    /// `torch.optim.AdamW` with f32 (or bf16) moments.
    #[default]
    #[serde(rename = "adamw_torch")]
    AdamwTorch,
    /// bitsandbytes' `AdamW8bit`: 8-bit blockwise moments in device memory.
    #[serde(rename = "adamw_8bit")]
    Adamw8bit,
    /// The same with the moments in page-locked host memory (no device memory; on the CPU it
    /// is [`Optim::Adamw8bit`]).
    #[serde(rename = "paged_adamw_8bit")]
    PagedAdamw8bit,
}

impl Optim {
    /// The names accepted by [`std::str::FromStr`].
    pub const NAMES: [&'static str; 3] = ["adamw_torch", "adamw_8bit", "paged_adamw_8bit"];

    /// Whether the moments are 8-bit.
    pub fn is_8bit(self) -> bool {
        !matches!(self, Optim::AdamwTorch)
    }

    /// The transformers name.
    pub fn name(self) -> &'static str {
        match self {
            Optim::AdamwTorch => "adamw_torch",
            Optim::Adamw8bit => "adamw_8bit",
            Optim::PagedAdamw8bit => "paged_adamw_8bit",
        }
    }
}

impl std::str::FromStr for Optim {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "adamw_torch" | "adamw_hf" | "adamw_torch_fused" => Ok(Optim::AdamwTorch),
            "adamw_8bit" | "adamw_bnb_8bit" => Ok(Optim::Adamw8bit),
            "paged_adamw_8bit" => Ok(Optim::PagedAdamw8bit),
            other => Err(format!(
                "unknown optimizer `{other}` (one of {})",
                Optim::NAMES.join(", ")
            )),
        }
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bf16_moments: false,
            optim: Optim::AdamwTorch,
            min_8bit_size: moe_peft_kernels::adam8bit::MIN_8BIT_SIZE,
            seed: 0,
        }
    }
}

/// AdamW over a fixed, ordered list of named variables.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    names: Vec<String>,
    vars: Vec<Var>,
    moments: Moments,
    offsets: Vec<usize>,
    /// Variables whose state this optimizer holds (all, unless sharded over ranks).
    owned: Vec<bool>,
    step: usize,
}

/// The moments of every variable (one value per optimizer, so the variants' sizes do not
/// matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Moments {
    /// f32 or bf16, one flat buffer each (variable order), with per-variable views.
    Dense {
        m_flat: Tensor,
        v_flat: Tensor,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
    },
    /// 8-bit blockwise (f32 for small variables).
    Blockwise {
        layout: BlockwiseLayout,
        maps: Box<Maps>,
        store: BlockStore,
    },
}

/// Where 8-bit state lives.
#[derive(Debug)]
enum BlockStore {
    /// Host vectors (CPU variables).
    Host(HostState),
    /// Device buffers: codes 1/2 (u8), scales 1/2, f32 moments 1/2.
    #[cfg(feature = "cuda")]
    Device([Tensor; 6]),
    /// Mapped page-locked host memory, in the same order.
    #[cfg(feature = "cuda")]
    Mapped(Box<[moe_peft_kernels::MappedHost; 6]>),
}

impl BlockStore {
    /// State from host vectors, placed for `dev` (`paged`: host memory the kernel maps).
    fn place(host: HostState, dev: &Device, paged: bool) -> Result<Self> {
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                if paged {
                    let mut bufs = Vec::with_capacity(6);
                    for bytes in host_parts(&host) {
                        let mut m = moe_peft_kernels::MappedHost::zeroed(d, bytes.len())?;
                        m.bytes_mut()?.copy_from_slice(&bytes);
                        bufs.push(m);
                    }
                    let arr: [moe_peft_kernels::MappedHost; 6] = bufs
                        .try_into()
                        .map_err(|_| Error::InvalidTrainConfig("six state buffers".into()))?;
                    Ok(BlockStore::Mapped(Box::new(arr)))
                } else {
                    let t = |v: Tensor| -> Result<Tensor> { Ok(v.to_device(dev)?) };
                    let cpu = Device::Cpu;
                    let n1 = host.codes1.len();
                    let nb = host.absmax1.len();
                    let nf = host.m32.len();
                    Ok(BlockStore::Device([
                        t(Tensor::from_vec(host.codes1, n1, &cpu)?)?,
                        t(Tensor::from_vec(host.codes2, n1, &cpu)?)?,
                        t(Tensor::from_vec(host.absmax1, nb, &cpu)?)?,
                        t(Tensor::from_vec(host.absmax2, nb, &cpu)?)?,
                        t(Tensor::from_vec(host.m32, nf, &cpu)?)?,
                        t(Tensor::from_vec(host.v32, nf, &cpu)?)?,
                    ]))
                }
            }
            _ => {
                let _ = paged;
                Ok(BlockStore::Host(host))
            }
        }
    }

    /// Bytes of device memory the state takes.
    fn device_bytes(&self) -> usize {
        match self {
            #[cfg(feature = "cuda")]
            BlockStore::Device(t) => t
                .iter()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
            _ => 0,
        }
    }
}

/// The six state vectors as little-endian bytes (the mapped buffers' contents).
#[cfg(feature = "cuda")]
fn host_parts(h: &HostState) -> [Vec<u8>; 6] {
    let f = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    [
        h.codes1.clone(),
        h.codes2.clone(),
        f(&h.absmax1),
        f(&h.absmax2),
        f(&h.m32),
        f(&h.v32),
    ]
}

/// Views of `flat` in the shapes of `vars`, at `offsets`.
fn views(flat: &Tensor, vars: &[Var], offsets: &[usize]) -> Result<Vec<Tensor>> {
    vars.iter()
        .zip(offsets)
        .map(|(v, &o)| Ok(flat.narrow(0, o, v.elem_count())?.reshape(v.shape())?))
        .collect()
}

/// Refuses to shard the state of an optimizer that is not 8-bit (only the 8-bit kernels skip
/// another rank's variables).
pub(crate) fn require_8bit_for_sharding(optim: Optim) -> Result<()> {
    if optim.is_8bit() {
        return Ok(());
    }
    Err(Error::InvalidTrainConfig(format!(
        "sharded optimizer state needs an 8-bit optimizer (adamw_8bit or paged_adamw_8bit), \
         not {}",
        optim.name()
    )))
}

/// Refuses variables that are not f32, naming the first (dense AdamW keeps f32 master weights).
fn require_f32(names: &[String], vars: &[Var]) -> Result<()> {
    if let Some(bad) = vars.iter().position(|v| v.dtype() != DType::F32) {
        return Err(Error::InvalidTrainConfig(format!(
            "adamw_torch keeps f32 variables; `{}` is {:?} (bf16 variables take adamw_8bit or \
             paged_adamw_8bit)",
            names[bad],
            vars[bad].dtype()
        )));
    }
    Ok(())
}

/// bitsandbytes' two maps of the 8-bit optimizer states.
fn bnb_maps() -> Maps {
    Maps {
        signed: create_dynamic_map(true),
        unsigned: create_dynamic_map(false),
    }
}

impl AdamW {
    /// Zero moments for `vars` (f32, bf16 with `cfg.bf16_moments`, or 8-bit with an 8-bit
    /// `cfg.optim`).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let all = vec![true; vars.len()];
        Self::new_sharded(vars, cfg, all)
    }

    /// Like [`Self::new`], but holding state only for the variables with `owned[i]` set (this
    /// rank's share of a data-parallel group's optimizer state, as ZeRO stage 1 splits it):
    /// [`Self::step_flat`] updates those alone, and [`Self::save`] writes their state alone.
    /// Only the 8-bit optimizers shard (their kernels skip a variable with no state).
    pub fn new_sharded(
        vars: Vec<(String, Var)>,
        cfg: AdamWConfig,
        owned: Vec<bool>,
    ) -> Result<Self> {
        if owned.len() != vars.len() {
            return Err(Error::InvalidTrainConfig(format!(
                "{} ownership flags for {} variables",
                owned.len(),
                vars.len()
            )));
        }
        if owned.iter().any(|o| !o) {
            require_8bit_for_sharding(cfg.optim)?;
        }
        let mut names = Vec::with_capacity(vars.len());
        let mut vs = Vec::with_capacity(vars.len());
        let mut offsets = Vec::with_capacity(vars.len());
        let dev = vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        let mut total = 0;
        for (n, var) in vars {
            offsets.push(total);
            total += var.elem_count();
            names.push(n);
            vs.push(var);
        }
        // Before any state is allocated (4.8 GB at 16B).
        if !cfg.optim.is_8bit() {
            require_f32(&names, &vs)?;
        }
        let moments = if cfg.optim.is_8bit() {
            if cfg.bf16_moments {
                return Err(Error::InvalidTrainConfig(format!(
                    "bf16 moments are for adamw_torch; {} keeps 8-bit moments",
                    cfg.optim.name()
                )));
            }
            // Another rank's variable takes no state (length 0 in the layout).
            let lens: Vec<usize> = vs
                .iter()
                .zip(&owned)
                .map(|(v, &o)| if o { v.elem_count() } else { 0 })
                .collect();
            let layout = BlockwiseLayout::new(&lens, cfg.min_8bit_size);
            let store = BlockStore::place(
                HostState::zeros(&layout),
                &dev,
                cfg.optim == Optim::PagedAdamw8bit,
            )?;
            Moments::Blockwise {
                layout,
                maps: Box::new(bnb_maps()),
                store,
            }
        } else {
            let md = if cfg.bf16_moments {
                DType::BF16
            } else {
                DType::F32
            };
            let m_flat = Tensor::zeros(total.max(1), md, &dev)?;
            let v_flat = Tensor::zeros(total.max(1), md, &dev)?;
            Moments::Dense {
                m: views(&m_flat, &vs, &offsets)?,
                v: views(&v_flat, &vs, &offsets)?,
                m_flat,
                v_flat,
            }
        };
        Ok(Self {
            cfg,
            names,
            vars: vs,
            moments,
            offsets,
            owned,
            step: 0,
        })
    }

    /// Which variables this optimizer holds state for and updates (all unless sharded).
    pub fn owned(&self) -> &[bool] {
        &self.owned
    }

    /// Steps taken.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The variables, in order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The variable names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The configuration.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Bytes of device memory the optimizer state takes (0 on the CPU and for paged state).
    pub fn state_device_bytes(&self) -> usize {
        match &self.moments {
            Moments::Dense { m_flat, v_flat, .. } => {
                if m_flat.device().is_cpu() {
                    0
                } else {
                    (m_flat.elem_count() + v_flat.elem_count()) * m_flat.dtype().size_in_bytes()
                }
            }
            Moments::Blockwise { store, .. } => store.device_bytes(),
        }
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars()[i]` (`None`: no
    /// gradient this step; with dense moments the variable and its moments are left alone, as
    /// torch does; the 8-bit optimizers count it as zeros, as [`Self::step_flat`] does).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`Self::step`] with each variable's gradient taken from a candle gradient store (as
    /// [`crate::LoraModel::backward`] returns), scaled by `clip` (1.0: unscaled).
    pub fn step_store(&mut self, grads: &GradStore, lr: f64, clip: f64) -> Result<()> {
        let g: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        self.step_scaled(&g, lr, clip)
    }

    /// [`Self::step`] with every gradient multiplied by `clip` on the fly (the coefficient of
    /// [`clip_grad_norm`], without a separate pass over the gradients).
    ///
    /// With dense moments each variable takes three in-place kernels (first moment, second
    /// moment, parameter) on its device; CPU and CUDA round identically. With 8-bit moments the
    /// gradients are gathered into a flat buffer (a missing one as zeros) and every variable is
    /// updated as by [`Self::step_flat`].
    pub fn step_scaled(&mut self, grads: &[Option<Tensor>], lr: f64, clip: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::InvalidTrainConfig(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        if let Moments::Blockwise { .. } = self.moments {
            let named: Vec<(String, Var)> = self
                .names
                .iter()
                .cloned()
                .zip(self.vars.iter().cloned())
                .collect();
            let flat = FlatGrads::new(&named, DType::F32)?;
            for (i, g) in grads.iter().enumerate() {
                if let Some(g) = g {
                    flat.add(self.vars[i].as_tensor().id(), g)?;
                }
            }
            return self.step_flat(&flat, lr, clip);
        }
        self.check_f32()?;
        self.step += 1;
        let s = self.kernel_step(lr, clip);
        let Moments::Dense { m, v, .. } = &self.moments else {
            unreachable!("blockwise moments returned above")
        };
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            adamw_update(self.vars[i].as_tensor(), &m[i], &v[i], g, &s)?;
        }
        Ok(())
    }

    /// Refuses variables that are not f32 (AdamW keeps f32 master weights).
    fn check_f32(&self) -> Result<()> {
        require_f32(&self.names, &self.vars)
    }

    /// The scalars of the kernel call for the step now counted.
    fn kernel_step(&self, lr: f64, clip: f64) -> AdamWStep {
        AdamWStep {
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            lr,
            step: self.step,
            clip,
        }
    }

    /// [`Self::step_scaled`] from a [`FlatGrads`] laid out for the same variables: every
    /// variable is updated, a variable nothing was added to with a zero gradient (as PyTorch
    /// does for the reference's experts that receive no tokens: their gradient is zeros).
    ///
    /// On CUDA this is one kernel launch for all variables; the result is bit-identical to
    /// the per-variable kernels and to the CPU.
    pub fn step_flat(&mut self, grads: &FlatGrads, lr: f64, clip: f64) -> Result<()> {
        if grads.lens().len() != self.vars.len() || grads.offsets() != self.offsets.as_slice() {
            return Err(Error::InvalidTrainConfig(format!(
                "a gradient buffer of {} variables for an optimizer of {}",
                grads.lens().len(),
                self.vars.len()
            )));
        }
        if let Moments::Dense { .. } = self.moments {
            self.check_f32()?;
        }
        self.step += 1;
        let dense = self.kernel_step(lr, clip);
        match &mut self.moments {
            Moments::Dense { m_flat, v_flat, .. } => {
                adamw_update_flat(&self.vars, &self.offsets, m_flat, v_flat, grads, &dense)?;
            }
            Moments::Blockwise {
                layout,
                maps,
                store,
            } => {
                let s = Adam8bitStep {
                    beta1: dense.beta1,
                    beta2: dense.beta2,
                    eps: dense.eps,
                    weight_decay: dense.weight_decay,
                    lr,
                    step: dense.step,
                    clip,
                    seed: self.cfg.seed,
                };
                match store {
                    BlockStore::Host(h) => {
                        adam8bit_update_host(&self.vars, grads, layout, h, maps, &s)?
                    }
                    #[cfg(feature = "cuda")]
                    BlockStore::Device(t) => {
                        let a = |i: usize| -> Result<u64> {
                            Ok(if t[i].elem_count() == 0 {
                                0
                            } else {
                                moe_peft_kernels::device_address(&t[i])?.addr()
                            })
                        };
                        let p = moe_peft_kernels::StatePointers {
                            codes1: a(0)?,
                            codes2: a(1)?,
                            absmax1: a(2)?,
                            absmax2: a(3)?,
                            m32: a(4)?,
                            v32: a(5)?,
                        };
                        moe_peft_kernels::adam8bit_update_cuda(
                            &self.vars, grads, layout, &p, maps, &s,
                        )?
                    }
                    #[cfg(feature = "cuda")]
                    BlockStore::Mapped(m) => {
                        let [c1, c2, a1, a2, m32, v32] = &mut **m;
                        let p = moe_peft_kernels::StatePointers {
                            codes1: c1.device_ptr(),
                            codes2: c2.device_ptr(),
                            absmax1: a1.device_ptr(),
                            absmax2: a2.device_ptr(),
                            m32: m32.device_ptr(),
                            v32: v32.device_ptr(),
                        };
                        moe_peft_kernels::adam8bit_update_cuda(
                            &self.vars, grads, layout, &p, maps, &s,
                        )?
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of tensor data [`Self::save`] writes for every variable (the whole state, also
    /// when this optimizer holds a share of it), without the file's header.
    pub fn state_file_bytes(&self) -> u64 {
        let lens = self.vars.iter().map(|v| v.elem_count() as u64);
        match &self.moments {
            Moments::Dense { .. } => {
                2 * lens.sum::<u64>() * self.moment_dtype().size_in_bytes() as u64 + 4
            }
            Moments::Blockwise { .. } => {
                // The layout of every variable's state, as one rank holding all of it has.
                let all: Vec<usize> = self.vars.iter().map(|v| v.elem_count()).collect();
                let layout = BlockwiseLayout::new(&all, self.cfg.min_8bit_size);
                layout.state_bytes() as u64 + 2 * 256 * 4 + 4
            }
        }
    }

    /// The dtype of dense moments.
    fn moment_dtype(&self) -> DType {
        if self.cfg.bf16_moments {
            DType::BF16
        } else {
            DType::F32
        }
    }

    /// Writes the state and the step to a safetensors file: dense moments as
    /// `<name>.exp_avg` / `<name>.exp_avg_sq`; 8-bit ones as bitsandbytes names them,
    /// `<name>.state1` / `<name>.state2` (u8 codes) and `<name>.absmax1` / `<name>.absmax2`
    /// (f32 per block), with the maps as `__qmap1__` / `__qmap2__` (variables under the 8-bit
    /// size keep `exp_avg` / `exp_avg_sq`).
    ///
    /// The file is streamed: each flat buffer in variable order, copied to the host once, a
    /// chunk at a time.
    pub fn save(&self, path: &Path) -> Result<()> {
        match &self.moments {
            Moments::Dense { m_flat, v_flat, .. } => self.save_dense(path, m_flat, v_flat),
            Moments::Blockwise {
                layout,
                maps,
                store,
            } => self.save_blockwise(path, layout, maps, store),
        }
    }

    fn save_dense(&self, path: &Path, m_flat: &Tensor, v_flat: &Tensor) -> Result<()> {
        let md = self.moment_dtype();
        let mut specs = Vec::with_capacity(2 * self.names.len() + 1);
        for suffix in ["exp_avg", "exp_avg_sq"] {
            for (n, v) in self.names.iter().zip(&self.vars) {
                specs.push(TensorSpec::new(format!("{n}.{suffix}"), md, v.dims()));
            }
        }
        specs.push(TensorSpec::new("__step__", DType::U32, &[1]));
        let total: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        let mut w = SafetensorsWriter::create(path, specs, None)?;
        for flat in [m_flat, v_flat] {
            for chunk in HostChunks::new(flat, 0, total, HOST_CHUNK_BYTES / md.size_in_bytes()) {
                w.write_host(chunk?)?;
            }
        }
        w.write_bytes(&(self.step as u32).to_le_bytes())?;
        w.finish()?;
        Ok(())
    }

    fn save_blockwise(
        &self,
        path: &Path,
        layout: &BlockwiseLayout,
        maps: &Maps,
        store: &BlockStore,
    ) -> Result<()> {
        let q: Vec<usize> = (0..self.vars.len())
            .filter(|&i| self.owned[i] && layout.eight_bit[i])
            .collect();
        let f: Vec<usize> = (0..self.vars.len())
            .filter(|&i| self.owned[i] && !layout.eight_bit[i])
            .collect();
        let mut specs = Vec::new();
        for suffix in ["state1", "state2"] {
            for &i in &q {
                let spec = TensorSpec::new(
                    format!("{}.{suffix}", self.names[i]),
                    DType::U8,
                    self.vars[i].dims(),
                );
                specs.push(spec);
            }
        }
        for suffix in ["absmax1", "absmax2"] {
            for &i in &q {
                let nb = layout.lens[i].div_ceil(moe_peft_kernels::adam8bit::BLOCK_SIZE);
                specs.push(TensorSpec::new(
                    format!("{}.{suffix}", self.names[i]),
                    DType::F32,
                    &[nb],
                ));
            }
        }
        for suffix in ["exp_avg", "exp_avg_sq"] {
            for &i in &f {
                let spec = TensorSpec::new(
                    format!("{}.{suffix}", self.names[i]),
                    DType::F32,
                    self.vars[i].dims(),
                );
                specs.push(spec);
            }
        }
        specs.push(TensorSpec::new("__qmap1__", DType::F32, &[256]));
        specs.push(TensorSpec::new("__qmap2__", DType::F32, &[256]));
        specs.push(TensorSpec::new("__step__", DType::U32, &[1]));
        let mut w = SafetensorsWriter::create(path, specs, None)?;
        let le = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        // Each buffer holds its variables in order, so writing it whole follows the specs.
        match store {
            BlockStore::Host(h) => {
                w.write_bytes(&h.codes1)?;
                w.write_bytes(&h.codes2)?;
                w.write_bytes(&le(&h.absmax1))?;
                w.write_bytes(&le(&h.absmax2))?;
                w.write_bytes(&le(&h.m32))?;
                w.write_bytes(&le(&h.v32))?;
            }
            // Device buffers reach the host a chunk at a time (a 16B model's codes are 33 GB).
            #[cfg(feature = "cuda")]
            BlockStore::Device(ts) => {
                for t in ts.iter() {
                    let chunk = HOST_CHUNK_BYTES / t.dtype().size_in_bytes();
                    for c in HostChunks::new(t, 0, t.elem_count(), chunk) {
                        w.write_host(c?)?;
                    }
                }
            }
            // Mapped buffers are host memory already, in the file's byte order.
            #[cfg(feature = "cuda")]
            BlockStore::Mapped(m) => {
                for b in m.iter() {
                    for c in b.bytes()?.chunks(HOST_CHUNK_BYTES) {
                        w.write_bytes(c)?;
                    }
                }
            }
        }
        w.write_bytes(&le(&maps.signed))?;
        w.write_bytes(&le(&maps.unsigned))?;
        w.write_bytes(&(self.step as u32).to_le_bytes())?;
        w.finish()?;
        Ok(())
    }

    /// Restores what [`Self::save`] wrote (or any safetensors file with those keys); every
    /// variable must be present with its shape, and the kind of state (dense or 8-bit) must be
    /// this optimizer's.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.load_files(&[path.to_path_buf()])
    }

    /// [`Self::load`] from the state split over several files (the shards a group with
    /// sharded state wrote, one per rank): each variable's state is taken from the file that
    /// holds it, so a run of any group size resumes from them.
    pub fn load_files(&mut self, paths: &[std::path::PathBuf]) -> Result<()> {
        // Shards of one save: each records the same step.
        if paths.len() > 1 {
            let mut steps = Vec::with_capacity(paths.len());
            for p in paths {
                let one = Checkpoint::open_files(std::slice::from_ref(p))?;
                let s = one
                    .get_raw("__step__", &Device::Cpu)
                    .and_then(|t| Ok(t.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?))
                    .map_err(|_| Error::Checkpoint {
                        path: p.display().to_string(),
                        reason: "optimizer state lacks its step count".into(),
                    })?;
                steps.push((p, s.first().copied()));
            }
            if let Some((p, s)) = steps.iter().find(|(_, s)| *s != steps[0].1) {
                return Err(Error::Checkpoint {
                    path: p.display().to_string(),
                    reason: format!(
                        "step {s:?}, but {} has step {:?}: shards of different saves",
                        steps[0].0.display(),
                        steps[0].1
                    ),
                });
            }
        }
        let ck = Checkpoint::open_files(paths)?;
        let file = match paths {
            [one] => one.display().to_string(),
            _ => paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        };
        let eight = ck.entry("__qmap1__").is_some();
        if eight != self.cfg.optim.is_8bit() {
            return Err(Error::Checkpoint {
                path: file,
                reason: format!(
                    "the optimizer state is {} but this run uses {}",
                    if eight {
                        "8-bit (adamw_8bit)"
                    } else {
                        "dense (adamw_torch)"
                    },
                    self.cfg.optim.name()
                ),
            });
        }
        if eight {
            self.load_blockwise(&ck, &file)?;
        } else {
            self.load_dense(&ck, &file)?;
        }
        let step = ck
            .get_raw("__step__", &Device::Cpu)
            .map_err(|_| Error::Checkpoint {
                path: file.clone(),
                reason: "optimizer state lacks its step count".into(),
            })?;
        let step = step.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        self.step = *step.first().ok_or_else(|| Error::Checkpoint {
            path: file.clone(),
            reason: "optimizer state has an empty step count".into(),
        })? as usize;
        Ok(())
    }

    fn load_blockwise(&mut self, ck: &Checkpoint, file: &str) -> Result<()> {
        let Moments::Blockwise { layout, maps, .. } = &self.moments else {
            unreachable!("checked by load")
        };
        let mut h = HostState::zeros(layout);
        let read = |key: &str, dims: &[usize], dtype: DType| -> Result<Tensor> {
            let e = ck.entry(key).ok_or_else(|| Error::Checkpoint {
                path: file.to_string(),
                reason: format!("optimizer state lacks `{key}`"),
            })?;
            if e.shape.as_slice() != dims {
                return Err(Error::ShapeMismatch {
                    name: key.to_string(),
                    file: file.to_string(),
                    expected: dims.to_vec(),
                    got: e.shape.clone(),
                });
            }
            Ok(ck
                .get_raw(key, &Device::Cpu)?
                .to_dtype(dtype)?
                .flatten_all()?)
        };
        for (i, (n, v)) in self.names.iter().zip(&self.vars).enumerate() {
            if !self.owned[i] {
                // Another rank's: only its presence is checked here (every rank then finds
                // the same file complete or not).
                let eight = v.elem_count() >= self.cfg.min_8bit_size;
                let nb = v
                    .elem_count()
                    .div_ceil(moe_peft_kernels::adam8bit::BLOCK_SIZE);
                let keys: Vec<(String, Vec<usize>)> = if eight {
                    vec![
                        (format!("{n}.state1"), v.dims().to_vec()),
                        (format!("{n}.state2"), v.dims().to_vec()),
                        (format!("{n}.absmax1"), vec![nb]),
                        (format!("{n}.absmax2"), vec![nb]),
                    ]
                } else {
                    vec![
                        (format!("{n}.exp_avg"), v.dims().to_vec()),
                        (format!("{n}.exp_avg_sq"), v.dims().to_vec()),
                    ]
                };
                for (key, dims) in keys {
                    let e = ck.entry(&key).ok_or_else(|| Error::Checkpoint {
                        path: file.to_string(),
                        reason: format!("optimizer state lacks `{key}`"),
                    })?;
                    if e.shape != dims {
                        return Err(Error::ShapeMismatch {
                            name: key,
                            file: file.to_string(),
                            expected: dims,
                            got: e.shape.clone(),
                        });
                    }
                }
                continue;
            }
            let so = layout.state_offsets[i];
            let len = layout.lens[i];
            if layout.eight_bit[i] {
                let nb = len.div_ceil(moe_peft_kernels::adam8bit::BLOCK_SIZE);
                let bo = layout.block_offsets[i];
                h.codes1[so..so + len].copy_from_slice(
                    &read(&format!("{n}.state1"), v.dims(), DType::U8)?.to_vec1::<u8>()?,
                );
                h.codes2[so..so + len].copy_from_slice(
                    &read(&format!("{n}.state2"), v.dims(), DType::U8)?.to_vec1::<u8>()?,
                );
                h.absmax1[bo..bo + nb].copy_from_slice(
                    &read(&format!("{n}.absmax1"), &[nb], DType::F32)?.to_vec1::<f32>()?,
                );
                h.absmax2[bo..bo + nb].copy_from_slice(
                    &read(&format!("{n}.absmax2"), &[nb], DType::F32)?.to_vec1::<f32>()?,
                );
            } else {
                h.m32[so..so + len].copy_from_slice(
                    &read(&format!("{n}.exp_avg"), v.dims(), DType::F32)?.to_vec1::<f32>()?,
                );
                h.v32[so..so + len].copy_from_slice(
                    &read(&format!("{n}.exp_avg_sq"), v.dims(), DType::F32)?.to_vec1::<f32>()?,
                );
            }
        }
        for (key, want) in [("__qmap1__", &maps.signed), ("__qmap2__", &maps.unsigned)] {
            let got = read(key, &[256], DType::F32)?.to_vec1::<f32>()?;
            if got.as_slice() != want.as_slice() {
                return Err(Error::Checkpoint {
                    path: file.to_string(),
                    reason: format!("`{key}` is not bitsandbytes' dynamic map"),
                });
            }
        }
        let dev = self
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let store = BlockStore::place(h, &dev, self.cfg.optim == Optim::PagedAdamw8bit)?;
        if let Moments::Blockwise { store: s, .. } = &mut self.moments {
            *s = store;
        }
        Ok(())
    }

    fn load_dense(&mut self, ck: &Checkpoint, file: &str) -> Result<()> {
        let dev = self
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let md = self.moment_dtype();
        let file = file.to_string();
        let total: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        let mut flats = Vec::with_capacity(2);
        for suffix in ["exp_avg", "exp_avg_sq"] {
            let keys: Vec<String> = self.names.iter().map(|n| format!("{n}.{suffix}")).collect();
            for (k, v) in keys.iter().zip(&self.vars) {
                let e = ck.entry(k).ok_or_else(|| Error::Checkpoint {
                    path: file.clone(),
                    reason: format!("optimizer state lacks `{k}`"),
                })?;
                if e.shape.as_slice() != v.dims() {
                    return Err(Error::ShapeMismatch {
                        name: k.clone(),
                        file: file.clone(),
                        expected: v.dims().to_vec(),
                        got: e.shape.clone(),
                    });
                }
            }
            let flat = Tensor::zeros(total.max(1), md, &dev)?;
            // What `save` writes: one contiguous run in variable order, read in large chunks.
            let first = keys.first().and_then(|k| ck.entry(k));
            let contiguous = first.is_some_and(|f| {
                let mut at = f.start;
                keys.iter().all(|k| {
                    ck.entry(k).is_some_and(|e| {
                        let ok = e.start == at && e.file == f.file;
                        at = e.start + e.len as u64;
                        ok && moe_peft_model::io::dtype_from_st(e.dtype) == Some(md)
                    })
                })
            });
            if contiguous {
                let (fi, start) = first.map(|f| (f.file, f.start)).unwrap_or((0, 0));
                let chunk = HOST_CHUNK_BYTES / md.size_in_bytes();
                let mut done = 0;
                while done < total {
                    let n = chunk.min(total - done);
                    let mut buf = vec![0u8; n * md.size_in_bytes()];
                    ck.read_range(fi, start + (done * md.size_in_bytes()) as u64, &mut buf)?;
                    let t = moe_peft_model::io::tensor_from_bytes(&buf, md, &[n])?;
                    flat.slice_set(&t.to_device(&dev)?, 0, done)?;
                    done += n;
                }
            } else {
                for (k, &o) in keys.iter().zip(&self.offsets) {
                    let t = ck.get_raw(k, &dev)?.to_dtype(md)?.flatten_all()?;
                    flat.slice_set(&t, 0, o)?;
                }
            }
            flats.push(flat);
        }
        let v_flat = flats.pop().expect("two moments");
        let m_flat = flats.pop().expect("two moments");
        self.moments = Moments::Dense {
            m: views(&m_flat, &self.vars, &self.offsets)?,
            v: views(&v_flat, &self.vars, &self.offsets)?,
            m_flat,
            v_flat,
        };
        Ok(())
    }
}

/// Bytes per device-to-host (or host-to-device) transfer when saving or loading state.
pub const HOST_CHUNK_BYTES: usize = 256 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_torch_reference_values() -> Result<()> {
        // torch.optim.AdamW's single-tensor algorithm (lr=0.1, betas=(0.9, 0.999), eps=1e-8,
        // weight_decay=0.01) evaluated in float64 by this Python transcription of
        // torch/optim/adamw.py `_single_tensor_adamw`:
        //   for t, g in enumerate([g1, g2], 1): p *= 1 - lr*wd; m = b1*m + (1-b1)*g
        //   v = b2*v + (1-b2)*g*g; p -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)
        // p0 = [1.0, -2.0, 3.0], g1 = [0.5, -1.0, 2.0], g2 = [0.1, 0.2, -0.3]:
        // after step 1: [0.899000002, -1.898000001, 2.8970000005]
        // after step 2: [0.8177969063826517, -1.8449993939894944, 2.8388831952054976]
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &dev)?)?;
        let mut opt = AdamW::new(
            vec![("p".into(), p.clone())],
            AdamWConfig {
                weight_decay: 0.01,
                ..Default::default()
            },
        )?;
        opt.step(&[Some(Tensor::new(&[0.5f32, -1.0, 2.0], &dev)?)], 0.1)?;
        let v = p.as_tensor().to_vec1::<f32>()?;
        for (a, b) in v.iter().zip([0.899f32, -1.898, 2.897]) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
        opt.step(&[Some(Tensor::new(&[0.1f32, 0.2, -0.3], &dev)?)], 0.1)?;
        let v = p.as_tensor().to_vec1::<f32>()?;
        for (a, b) in v.iter().zip([0.8177969f32, -1.8449994, 2.8388832]) {
            assert!((a - b).abs() < 2e-6, "{v:?}");
        }
        Ok(())
    }

    #[test]
    fn adamw_agrees_with_candle_optimisers() -> Result<()> {
        use candle_nn::optim::Optimizer;
        use candle_optimisers::adam::{Adam, ParamsAdam};
        use candle_optimisers::Decay;
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., (4, 8), &dev)?;
        let ours = Var::from_tensor(&init)?;
        let theirs = Var::from_tensor(&init)?;
        let mut a = AdamW::new(
            vec![("w".into(), ours.clone())],
            AdamWConfig {
                weight_decay: 0.05,
                ..Default::default()
            },
        )?;
        let mut b = Adam::new(
            vec![theirs.clone()],
            ParamsAdam {
                lr: 1e-2,
                weight_decay: Some(Decay::DecoupledWeightDecay(0.05)),
                ..Default::default()
            },
        )?;
        for _ in 0..5 {
            let g = Tensor::randn(0f32, 1., (4, 8), &dev)?;
            a.step(&[Some(g.clone())], 1e-2)?;
            let loss = (theirs.as_tensor() * &g)?.sum_all()?;
            b.backward_step(&loss)?;
        }
        let d = (ours.as_tensor() - theirs.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
}
