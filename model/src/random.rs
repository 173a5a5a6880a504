//! Randomly initialised Hugging Face checkpoints of any size, written shard by shard.
//!
//! [`write_random_checkpoint`] writes `config.json`, shards of at most `max_shard_bytes`
//! (`model-0000i-of-0000n.safetensors`) and `model.safetensors.index.json`, in the layout and
//! parameter order of a `save_pretrained` of `DeepseekForCausalLM`. Weights follow HF's
//! `_init_weights`: projections, embeddings and (except DeepSeekMoE's) routers normal(0,
//! `initializer_range`), RMSNorm weights 1, biases 0, and DeepSeekMoE's router kaiming-uniform
//! (bound 1/√hidden) as `MoEGate.reset_parameters`, so the routing is spread over the experts
//! as in a freshly initialised model.
//!
//! Every tensor is generated from `(seed, tensor name, block)` alone, in parallel blocks of
//! [`BLOCK`] elements, so the bytes do not depend on the thread count, and host memory holds
//! two tensors at a time (one being generated while the previous one is written).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use rayon::prelude::*;

use crate::arch::{Arch, Family, QkNorm, MLP_NAMES};
use crate::error::{Error, Result};
use crate::families::ModelConfig;
use crate::io::{
    plan_shards, shard_file_names, st_dtype_name, torch_dtype_name, write_shard_index,
    SafetensorsWriter, TensorSpec,
};
use crate::layers::ATTENTION_PROJECTIONS;

/// Elements generated per independent random stream.
pub const BLOCK: usize = 1 << 16;

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamInit {
    /// normal(0, std).
    Normal(f64),
    /// All ones (RMSNorm weights).
    Ones,
    /// uniform(−bound, bound).
    Uniform(f64),
}

/// One parameter of the model: HF name, shape and initialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// HF parameter name, e.g. `model.layers.3.mlp.experts.17.down_proj.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Initialisation of a random model.
    pub init: ParamInit,
}

/// Every parameter of a model of architecture `a` in `state_dict` order (embedding, layers,
/// final norm, lm_head), named as the family names them.
pub fn parameter_specs(a: &Arch) -> Vec<ParamSpec> {
    let h = a.hidden_size;
    let (q, kv) = (a.q_width(), a.kv_width());
    let normal = ParamInit::Normal(a.initializer_range);
    let spec = |name: String, shape: Vec<usize>, init: ParamInit| ParamSpec { name, shape, init };
    let mlp = |out: &mut Vec<ParamSpec>, prefix: String, names: [&str; 3], width: usize| {
        let [g, u, d] = names;
        out.push(spec(format!("{prefix}.{g}.weight"), vec![width, h], normal));
        out.push(spec(format!("{prefix}.{u}.weight"), vec![width, h], normal));
        out.push(spec(format!("{prefix}.{d}.weight"), vec![h, width], normal));
    };
    let mut out = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![a.vocab_size, h],
        normal,
    )];
    for i in 0..a.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let shapes = [(q, h), (kv, h), (kv, h), (h, q)];
        for (k, n) in ATTENTION_PROJECTIONS.iter().enumerate() {
            let (o, inp) = shapes[k];
            out.push(spec(
                format!("{p}.self_attn.{n}.weight"),
                vec![o, inp],
                normal,
            ));
            if a.attention_bias[k] {
                out.push(spec(
                    format!("{p}.self_attn.{n}.bias"),
                    vec![o],
                    ParamInit::Normal(0.0),
                ));
            }
        }
        let norms = match a.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some((a.head_dim, a.head_dim)),
            QkNorm::Whole => Some((q, kv)),
        };
        if let Some((wq, wk)) = norms {
            out.push(spec(
                format!("{p}.self_attn.q_norm.weight"),
                vec![wq],
                ParamInit::Ones,
            ));
            out.push(spec(
                format!("{p}.self_attn.k_norm.weight"),
                vec![wk],
                ParamInit::Ones,
            ));
        }
        if a.is_moe_layer(i) {
            let m = format!("{p}.{}", a.naming.moe);
            for j in 0..a.num_experts {
                mlp(
                    &mut out,
                    format!("{m}.experts.{j}"),
                    a.naming.expert,
                    a.moe_intermediate_size,
                );
            }
            let router = if a.family == Family::DeepSeek {
                ParamInit::Uniform(1.0 / (h as f64).sqrt())
            } else {
                normal
            };
            out.push(spec(
                format!("{m}.gate.weight"),
                vec![a.num_experts, h],
                router,
            ));
            if let Some(w) = a.shared_intermediate {
                let sh = format!("{m}.{}", a.naming.shared);
                mlp(&mut out, sh.clone(), MLP_NAMES, w);
                if a.shared_gate {
                    out.push(spec(format!("{sh}_gate.weight"), vec![1, h], normal));
                }
            }
        } else {
            mlp(&mut out, format!("{p}.mlp"), MLP_NAMES, a.intermediate_size);
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            out.push(spec(format!("{p}.{n}.weight"), vec![h], ParamInit::Ones));
        }
    }
    out.push(spec("model.norm.weight".into(), vec![h], ParamInit::Ones));
    if !a.tie_word_embeddings {
        out.push(spec("lm_head.weight".into(), vec![a.vocab_size, h], normal));
    }
    out
}

/// Options of [`write_random_checkpoint`].
#[derive(Debug, Clone)]
pub struct RandomCheckpointOptions {
    /// Seed of every tensor.
    pub seed: u64,
    /// dtype of the weights (bf16 as the released checkpoint, f16 or f32).
    pub dtype: DType,
    /// Largest shard in bytes (5 GB as `save_pretrained`).
    pub max_shard_bytes: usize,
}

impl Default for RandomCheckpointOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            dtype: DType::BF16,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// What [`write_random_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct RandomCheckpointReport {
    /// Shard files, in order.
    pub shards: Vec<PathBuf>,
    /// Bytes of tensor data.
    pub bytes: usize,
    /// Parameters.
    pub parameters: usize,
}

/// SplitMix64, one independent stream per `(seed, tensor, block)`.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Two independent uniforms in (0, 1].
    fn uniforms(&mut self) -> (f32, f32) {
        let r = self.next();
        let a = ((r >> 40) as f32 + 1.0) / (1u64 << 24) as f32;
        let b = (((r >> 16) & 0xFF_FFFF) as f32 + 1.0) / (1u64 << 24) as f32;
        (a, b)
    }
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fills `out` (one block) with the values of `init`.
fn fill_block(out: &mut [f32], init: ParamInit, stream: u64) {
    let mut rng = SplitMix(stream);
    match init {
        ParamInit::Ones => out.fill(1.0),
        ParamInit::Uniform(bound) => {
            let b = bound as f32;
            for x in out.iter_mut() {
                let (u, _) = rng.uniforms();
                *x = (2.0 * u - 1.0) * b;
            }
        }
        ParamInit::Normal(std) => {
            // Box–Muller: two normals per pair of uniforms.
            let s = std as f32;
            for pair in out.chunks_mut(2) {
                let (u1, u2) = rng.uniforms();
                let r = (-2.0 * u1.ln()).sqrt() * s;
                let (sn, cs) = (std::f32::consts::TAU * u2).sin_cos();
                pair[0] = r * cs;
                if pair.len() > 1 {
                    pair[1] = r * sn;
                }
            }
        }
    }
}

/// The little-endian bytes of one random parameter in `dtype`.
pub fn random_param_bytes(spec: &ParamSpec, seed: u64, dtype: DType) -> Result<Vec<u8>> {
    let n: usize = spec.shape.iter().product();
    let esz = dtype.size_in_bytes();
    let mut bytes = vec![0u8; n * esz];
    let base = seed ^ fnv(&spec.name);
    bytes
        .par_chunks_mut(BLOCK * esz)
        .enumerate()
        .try_for_each(|(i, out)| -> Result<()> {
            let mut vals = vec![0f32; out.len() / esz];
            let stream = base.wrapping_add((i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            fill_block(&mut vals, spec.init, stream);
            match dtype {
                DType::F32 => out.copy_from_slice(bytemuck::cast_slice(&vals)),
                DType::BF16 => {
                    for (o, v) in out.chunks_exact_mut(2).zip(&vals) {
                        o.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
                    }
                }
                DType::F16 => {
                    for (o, v) in out.chunks_exact_mut(2).zip(&vals) {
                        o.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
                    }
                }
                other => {
                    return Err(Error::InvalidInput(format!(
                        "random checkpoint dtype {other:?} (bf16, f16 or f32)"
                    )))
                }
            }
            Ok(())
        })?;
    Ok(bytes)
}

/// Writes a random checkpoint of `cfg` into `dir` (see the module docs). A generator thread
/// produces the next tensor while the current one is written.
pub fn write_random_checkpoint<C: Into<ModelConfig> + Clone>(
    cfg: &C,
    dir: &Path,
    opts: &RandomCheckpointOptions,
) -> Result<RandomCheckpointReport> {
    let cfg: ModelConfig = cfg.clone().into();
    cfg.validate()?;
    st_dtype_name(opts.dtype)?;
    if !matches!(opts.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(Error::InvalidInput(format!(
            "random checkpoint dtype {:?} (bf16, f16 or f32)",
            opts.dtype
        )));
    }
    if opts.max_shard_bytes == 0 {
        return Err(Error::InvalidInput(
            "max_shard_bytes must be positive".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let specs = parameter_specs(&cfg.arch()?);
    let esz = opts.dtype.size_in_bytes();
    let sizes: Vec<usize> = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() * esz)
        .collect();
    let plan: Vec<Vec<usize>> = plan_shards(&sizes, opts.max_shard_bytes)
        .into_iter()
        .map(|r| r.collect())
        .collect();
    let n = plan.len();
    let names = shard_file_names(n);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(1);
    let gen_specs = specs.clone();
    let (seed, dtype) = (opts.seed, opts.dtype);
    let generator = std::thread::spawn(move || {
        for s in &gen_specs {
            if tx.send(random_param_bytes(s, seed, dtype)).is_err() {
                return;
            }
        }
    });
    let mut weight_map = BTreeMap::new();
    let mut shards = Vec::with_capacity(n);
    let mut total = 0usize;
    let mut result = Ok(());
    for (k, idx) in plan.iter().enumerate() {
        let path = dir.join(&names[k]);
        let tspecs: Vec<TensorSpec> = idx
            .iter()
            .map(|&i| TensorSpec::new(specs[i].name.clone(), opts.dtype, &specs[i].shape))
            .collect();
        let mut w = match SafetensorsWriter::create(&path, tspecs, None) {
            Ok(w) => w,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        for &i in idx {
            let bytes = match rx.recv() {
                Ok(b) => b,
                Err(_) => Err(Error::InvalidInput("the generator thread stopped".into())),
            };
            if let Err(e) = bytes.and_then(|b| {
                total += b.len();
                w.write_bytes(&b)
            }) {
                result = Err(e);
                break;
            }
            weight_map.insert(specs[i].name.clone(), names[k].clone());
        }
        if result.is_err() {
            break;
        }
        match w.finish() {
            Ok(p) => shards.push(p),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    drop(rx);
    let _ = generator.join();
    result?;
    if n > 1 {
        write_shard_index(dir, total, &weight_map)?;
    }
    let mut c = cfg.clone();
    c.set_saved_format(None, torch_dtype_name(opts.dtype));
    c.to_file(dir.join("config.json"))?;
    Ok(RandomCheckpointReport {
        shards,
        bytes: total,
        parameters: specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, MoeModel};

    /// Tiny configs of every family, each with its variants switched on.
    fn tiny_configs() -> Vec<ModelConfig> {
        use crate::config::DeepSeekMoeConfig;
        use crate::families::*;
        vec![
            DeepSeekMoeConfig::tiny(96).into(),
            Qwen2MoeConfig {
                vocab_size: 96,
                hidden_size: 32,
                intermediate_size: 48,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                moe_intermediate_size: 16,
                shared_expert_intermediate_size: 24,
                num_experts: 4,
                num_experts_per_tok: 2,
                mlp_only_layers: vec![0],
                ..Default::default()
            }
            .into(),
            Qwen3MoeConfig {
                vocab_size: 96,
                hidden_size: 32,
                intermediate_size: 48,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: Some(16),
                moe_intermediate_size: 16,
                num_experts: 4,
                num_experts_per_tok: 2,
                attention_bias: true,
                ..Default::default()
            }
            .into(),
            MixtralConfig {
                vocab_size: 96,
                hidden_size: 32,
                intermediate_size: 16,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: Some(2),
                num_local_experts: 4,
                ..Default::default()
            }
            .into(),
            OlmoeConfig {
                vocab_size: 96,
                hidden_size: 32,
                intermediate_size: 16,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: Some(2),
                num_experts: 4,
                num_experts_per_tok: 2,
                ..Default::default()
            }
            .into(),
        ]
    }

    #[test]
    fn specs_are_the_models_weights() -> Result<()> {
        for cfg in tiny_configs() {
            let arch = cfg.arch()?;
            let specs = parameter_specs(&arch);
            let total: usize = specs
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            assert_eq!(total, arch.num_parameters(), "{:?}", arch.family);
            let model = MoeModel::random(cfg, &LoadOptions::default(), 0)?;
            let mut seen = BTreeMap::new();
            model.visit_weights(&mut |name, w| {
                seen.insert(name.to_string(), w.shape());
                Ok(())
            })?;
            let mine: BTreeMap<String, Vec<usize>> = specs
                .iter()
                .map(|s| (s.name.clone(), s.shape.clone()))
                .collect();
            assert_eq!(mine, seen, "{:?}", arch.family);
        }
        Ok(())
    }

    #[test]
    fn values_follow_the_init_and_the_seed() -> Result<()> {
        let spec = ParamSpec {
            name: "w".into(),
            shape: vec![300, 1000],
            init: ParamInit::Normal(0.02),
        };
        let a = random_param_bytes(&spec, 7, DType::F32)?;
        let v: &[f32] = bytemuck::cast_slice(&a);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 2e-4, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "{}", var.sqrt());
        assert_eq!(a, random_param_bytes(&spec, 7, DType::F32)?);
        assert_ne!(a, random_param_bytes(&spec, 8, DType::F32)?);
        let u = ParamSpec {
            init: ParamInit::Uniform(0.5),
            ..spec.clone()
        };
        let b = random_param_bytes(&u, 1, DType::F32)?;
        let v: &[f32] = bytemuck::cast_slice(&b);
        assert!(v.iter().all(|x| x.abs() <= 0.5));
        assert!(v.iter().any(|x| *x > 0.45) && v.iter().any(|x| *x < -0.45));
        let h = random_param_bytes(&spec, 7, DType::BF16)?;
        assert_eq!(h.len(), 600_000);
        Ok(())
    }

    #[test]
    fn sharded_checkpoint_loads() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        for (k, cfg) in tiny_configs().into_iter().enumerate() {
            let out = dir.path().join(k.to_string());
            let rep = write_random_checkpoint(
                &cfg,
                &out,
                &RandomCheckpointOptions {
                    seed: 3,
                    dtype: DType::F32,
                    max_shard_bytes: 40_000,
                },
            )?;
            assert!(rep.shards.len() > 1);
            assert_eq!(rep.bytes, 4 * cfg.arch()?.num_parameters());
            let m = MoeModel::from_pretrained(&out, &LoadOptions::default())?;
            let mut want = cfg.clone();
            want.set_saved_format(None, "float32");
            assert_eq!(m.config(), &want);
            assert!(m.unused_checkpoint_tensors().is_empty());
            let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 2]], &candle_core::Device::Cpu)?;
            let out = m.forward_t(&ids, None, false)?;
            let l = out.logits.flatten_all()?.to_vec1::<f32>()?;
            assert!(l.iter().all(|x| x.is_finite()));
        }
        Ok(())
    }
}
