//! Text generation with a KV cache: greedy or temperature + nucleus (top-p) sampling.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::{KvCache, MoeModel};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to produce.
    pub max_new_tokens: usize,
    /// 0 means greedy; otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop when this token is produced (it is included in the output).
    pub eos_token_id: Option<u32>,
    /// Stop when the output ends with one of these token sequences (included in the output).
    pub stop_sequences: Vec<Vec<u32>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_id: None,
            stop_sequences: Vec::new(),
        }
    }
}

impl GenerateOptions {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.temperature.is_nan() || self.temperature < 0.0 {
            return Err(Error::InvalidInput(format!(
                "temperature {} must be ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidInput(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks the next token from a logits row.
fn sample(logits: &[f32], opts: &GenerateOptions, rng: &mut rand::rngs::StdRng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if opts.temperature == 0.0 {
        return argmax();
    }
    let t = opts.temperature as f32;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x - max) / t).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0;
    let mut acc = 0f32;
    for p in &probs {
        kept += 1;
        acc += p.1;
        if acc as f64 >= opts.top_p {
            break;
        }
    }
    let probs = &probs[..kept];
    let mut r = rng.random::<f32>() * acc;
    for p in probs {
        if r < p.1 {
            return p.0;
        }
        r -= p.1;
    }
    probs[kept - 1].0
}

impl MoeModel {
    /// Continues `prompt` (token ids, BOS included if wanted) and returns only the new tokens.
    /// Runs without recording a graph ([`crate::grad::no_grad`]).
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<Vec<u32>> {
        let _no_graph = crate::grad::no_grad();
        opts.validate()?;
        if prompt.is_empty() {
            return Err(Error::InvalidInput("empty prompt".into()));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        let mut cache = KvCache::new(self.layers.len());
        let mut out = Vec::new();
        let mut next = Tensor::new(prompt, self.device())?.unsqueeze(0)?;
        for _ in 0..opts.max_new_tokens {
            let logits = self.forward_cached(&next, None, &mut cache)?;
            let s = logits.dim(1)?;
            let row: Vec<f32> = logits
                .narrow(1, s - 1, 1)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let tok = sample(&row, opts, &mut rng);
            out.push(tok);
            if Some(tok) == opts.eos_token_id
                || opts
                    .stop_sequences
                    .iter()
                    .any(|s| !s.is_empty() && out.ends_with(s))
            {
                break;
            }
            next = Tensor::new(&[tok], self.device())?.unsqueeze(0)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_p_keeps_the_nucleus() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let logits = [0.0f32, 5.0, 1.0, 4.9];
        assert_eq!(sample(&logits, &GenerateOptions::default(), &mut rng), 1);
        let opts = GenerateOptions {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        for _ in 0..50 {
            // token 1 alone has p ≈ 0.51 ≥ 0.5: the nucleus is {1}.
            assert_eq!(sample(&logits, &opts, &mut rng), 1);
        }
        let opts = GenerateOptions {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        };
        let picks: Vec<u32> = (0..200).map(|_| sample(&logits, &opts, &mut rng)).collect();
        assert!(picks.contains(&1) && picks.contains(&3));
        assert!(!picks.contains(&0));
    }
}
