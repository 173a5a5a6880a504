//! `LoraConfig`: PEFT's `adapter_config.json`, read and written with PEFT's field names.
//!
//! Reading accepts any superset of the fields (unknown keys are ignored). Writing emits the
//! classic field set that both old (0.13) and new PEFT load: PEFT 0.13 rejects keys it does not
//! know, such as `peft_version`.

use std::collections::BTreeMap;
use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `target_modules` / `exclude_modules`: a list of names (matched as PEFT does: the whole
/// module path, or its suffix after a dot) or one regular expression (matched against the
/// whole path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names such as `q_proj` or `mlp.experts.0.up_proj`. `all-linear` means every projection
    /// site (attention and every MLP). PEFT's `all-linear` also takes the routers where they
    /// are `nn.Linear` (Qwen-MoE, Mixtral, OLMoE, and Qwen2-MoE's `shared_expert_gate`); routers
    /// stay frozen here.
    List(Vec<String>),
    /// A regex that must match the full module path.
    Regex(String),
}

/// `layers_to_transform`: one layer index or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelection {
    /// One layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

/// `init_lora_weights`: `true` (kaiming-uniform A, zero B), `false` (random A and B: the
/// adapter changes the output from the start), or `"gaussian"` (A ~ N(0, 1/r), zero B).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` or `false`.
    Bool(bool),
    /// A named scheme; `"gaussian"` is supported.
    Named(String),
}

/// The LoRA configuration (PEFT `LoraConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scale numerator: `scaling = lora_alpha / r` (or `/ √r` with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the adapter input, training only.
    pub lora_dropout: f64,
    /// Which projections get adapters.
    pub target_modules: Option<TargetModules>,
    /// Projections excluded even if targeted (written only when set: PEFT < 0.14 rejects it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<TargetModules>,
    /// `"none"`, `"all"` or `"lora_only"`. Biases are not trained: a model whose targeted
    /// projections have biases (Qwen2-MoE's q/k/v, `attention_bias` models) refuses anything
    /// but `"none"`; on the others all three train the same parameters.
    pub bias: String,
    /// rsLoRA scaling `lora_alpha / √r`.
    pub use_rslora: bool,
    /// Per-module rank overrides, keyed by a name or regex suffix.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Modules trained in full and saved with the adapter (`embed_tokens`, `lm_head`).
    pub modules_to_save: Option<Vec<String>>,
    /// Only these layer indices get adapters.
    pub layers_to_transform: Option<LayerSelection>,
    /// The path component before the layer index (`layers`).
    pub layers_pattern: Option<serde_json::Value>,
    /// Initialization of A and B.
    pub init_lora_weights: InitLoraWeights,
    /// Whether base weights are stored `(in, out)`; must be false for DeepSeekMoE.
    pub fan_in_fan_out: bool,
    /// DoRA (not supported).
    pub use_dora: bool,
    /// `"CAUSAL_LM"`.
    pub task_type: Option<String>,
    /// `"LORA"`.
    pub peft_type: String,
    /// The base model the adapter was trained on.
    pub base_model_name_or_path: Option<String>,
    /// Revision of the base model.
    pub revision: Option<String>,
    /// Whether the adapter was saved for inference.
    pub inference_mode: bool,
    /// Kept for PEFT compatibility.
    pub layer_replication: Option<serde_json::Value>,
    /// Kept for PEFT compatibility.
    pub megatron_config: Option<serde_json::Value>,
    /// Kept for PEFT compatibility.
    pub megatron_core: Option<String>,
    /// Kept for PEFT compatibility.
    pub loftq_config: serde_json::Value,
}

impl Default for LoraConfig {
    /// PEFT's defaults (r=8, alpha=8, no dropout, no targets).
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            bias: "none".into(),
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            init_lora_weights: InitLoraWeights::Bool(true),
            fan_in_fan_out: false,
            use_dora: false,
            task_type: Some("CAUSAL_LM".into()),
            peft_type: "LORA".into(),
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            layer_replication: None,
            megatron_config: None,
            megatron_core: Some("megatron.core".into()),
            loftq_config: serde_json::json!({}),
        }
    }
}

/// The projection names of DeepSeekMoE that the reference recipe targets.
pub const DEEPSEEK_TARGETS: [&str; 7] = moe_peft_model::arch::PROJECTION_TARGETS;

impl LoraConfig {
    /// The reference recipe's QLoRA adapter: r=64, alpha=16, dropout 0.1, all seven
    /// projection types (every routed expert included), `embed_tokens` and `lm_head` trained.
    pub fn deepseek_recipe() -> Self {
        Self {
            r: 64,
            lora_alpha: 16.0,
            lora_dropout: 0.1,
            target_modules: Some(TargetModules::List(
                DEEPSEEK_TARGETS.iter().map(|s| s.to_string()).collect(),
            )),
            modules_to_save: Some(vec!["embed_tokens".into(), "lm_head".into()]),
            ..Self::default()
        }
    }

    /// Reads `adapter_config.json` (or a directory holding it).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("adapter_config.json");
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::json(&path, e))?;
        cfg.validate()
            .map_err(|e| Error::InvalidConfig(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Writes `adapter_config.json` text (classic PEFT field set, keys sorted).
    pub fn to_json(&self) -> Result<String> {
        let v = serde_json::to_value(self).map_err(|e| Error::json("adapter_config.json", e))?;
        // serde_json's Map is a BTreeMap: keys come out sorted, as PEFT writes them.
        serde_json::to_string_pretty(&v).map_err(|e| Error::json("adapter_config.json", e))
    }

    /// The scaling of a site with rank `r` and alpha `alpha`.
    pub fn scaling_for(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Rank and alpha of a site, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_alpha(&self, site: &str) -> (usize, f64) {
        let r = pattern_value(&self.rank_pattern, site).unwrap_or(self.r);
        let a = pattern_value(&self.alpha_pattern, site).unwrap_or(self.lora_alpha);
        (r, a)
    }

    /// Checks the values (PEFT's `__post_init__` plus what this implementation supports).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.r == 0 {
            return bad("`r` must be at least 1".into());
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return bad(format!("rank_pattern[{k:?}] must be at least 1"));
        }
        if !self.lora_alpha.is_finite() {
            return bad("`lora_alpha` must be finite".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "`lora_dropout` ({}) must be in [0, 1)",
                self.lora_dropout
            ));
        }
        if !matches!(self.bias.as_str(), "none" | "all" | "lora_only") {
            return bad(format!(
                "`bias` is {:?}; expected none, all or lora_only",
                self.bias
            ));
        }
        if self.use_dora {
            return bad("`use_dora` is not supported".into());
        }
        if self.fan_in_fan_out {
            return bad("`fan_in_fan_out` must be false: the models' weights are (out, in)".into());
        }
        if self.peft_type != "LORA" {
            return bad(format!(
                "`peft_type` is {:?}, expected LORA",
                self.peft_type
            ));
        }
        match &self.init_lora_weights {
            InitLoraWeights::Bool(_) => {}
            InitLoraWeights::Named(n) if n == "gaussian" => {}
            InitLoraWeights::Named(n) => {
                return bad(format!(
                    "`init_lora_weights` {n:?} is not supported (true, false, \"gaussian\")"
                ))
            }
        }
        for t in [&self.target_modules, &self.exclude_modules]
            .into_iter()
            .flatten()
        {
            match t {
                TargetModules::List(v) if v.iter().any(|s| s.is_empty()) => {
                    return bad("target/exclude module names must not be empty".into())
                }
                TargetModules::Regex(r) => {
                    if let Err(e) = Regex::new(&format!("^(?:{r})$")) {
                        return bad(format!("regex {r:?}: {e}"));
                    }
                }
                _ => {}
            }
        }
        if let Some(TargetModules::List(v)) = &self.target_modules {
            if v.is_empty() {
                return bad("`target_modules` is empty".into());
            }
        }
        if self.target_modules.is_none() {
            return bad(
                "`target_modules` must be set (a list of names, a regex or \"all-linear\")".into(),
            );
        }
        for k in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            if let Err(e) = Regex::new(&format!("(^|.*\\.){k}$")) {
                return bad(format!("pattern {k:?}: {e}"));
            }
        }
        Ok(())
    }

    /// Whether a site path (e.g. `model.layers.3.mlp.experts.17.down_proj`) gets an adapter.
    pub fn targets(&self, site: &str) -> bool {
        let hit = match &self.target_modules {
            None => false,
            Some(t) => matches(t, site, true),
        };
        if !hit {
            return false;
        }
        if let Some(ex) = &self.exclude_modules {
            if matches(ex, site, false) {
                return false;
            }
        }
        if let Some(sel) = &self.layers_to_transform {
            let pattern = match &self.layers_pattern {
                Some(serde_json::Value::String(s)) => vec![s.clone()],
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
                _ => vec!["layers".to_string()],
            };
            let idx = layer_index(site, &pattern);
            let ok = match (sel, idx) {
                (_, None) => false,
                (LayerSelection::One(l), Some(i)) => *l == i,
                (LayerSelection::Many(v), Some(i)) => v.contains(&i),
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// The names in `target_modules` (list form) that match none of `sites`.
    pub fn unmatched_targets(&self, sites: &[String]) -> Vec<String> {
        match &self.target_modules {
            Some(TargetModules::List(v)) => v
                .iter()
                .filter(|t| t.as_str() != "all-linear")
                .filter(|t| !sites.iter().any(|s| list_match(t, s)))
                .cloned()
                .collect(),
            Some(TargetModules::Regex(r)) => {
                let re = Regex::new(&format!("^(?:{r})$")).ok();
                if sites
                    .iter()
                    .any(|s| re.as_ref().is_some_and(|re| re.is_match(s)))
                {
                    vec![]
                } else {
                    vec![r.clone()]
                }
            }
            None => vec![],
        }
    }
}

fn list_match(t: &str, site: &str) -> bool {
    site == t || site.ends_with(&format!(".{t}"))
}

fn matches(t: &TargetModules, site: &str, allow_all_linear: bool) -> bool {
    match t {
        TargetModules::List(v) => v
            .iter()
            .any(|x| (allow_all_linear && x == "all-linear") || list_match(x, site)),
        TargetModules::Regex(r) if allow_all_linear && r == "all-linear" => true,
        TargetModules::Regex(r) => {
            Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(site))
        }
    }
}

fn pattern_value<T: Copy>(map: &BTreeMap<String, T>, site: &str) -> Option<T> {
    map.iter().find_map(|(k, &v)| {
        Regex::new(&format!("(^|.*\\.){k}$"))
            .ok()
            .filter(|re| re.is_match(site))
            .map(|_| v)
    })
}

fn layer_index(site: &str, patterns: &[String]) -> Option<usize> {
    let parts: Vec<&str> = site.split('.').collect();
    parts.windows(2).find_map(|w| {
        if patterns.iter().any(|p| p == w[0]) {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_matching_hits_experts_shared_and_dense_but_not_the_router() {
        let cfg = LoraConfig::deepseek_recipe();
        for s in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.5.mlp.experts.17.down_proj",
            "model.layers.5.mlp.shared_experts.up_proj",
        ] {
            assert!(cfg.targets(s), "{s}");
        }
        assert!(!cfg.targets("model.layers.5.mlp.gate"));
        assert!(!cfg.targets("lm_head"));
    }

    #[test]
    fn regex_exclude_layers_and_patterns() {
        let mut cfg = LoraConfig {
            target_modules: Some(TargetModules::Regex(r".*\.self_attn\.(q|v)_proj".into())),
            ..Default::default()
        };
        assert!(cfg.targets("model.layers.1.self_attn.q_proj"));
        assert!(!cfg.targets("model.layers.1.self_attn.k_proj"));
        cfg.layers_to_transform = Some(LayerSelection::Many(vec![0, 2]));
        assert!(!cfg.targets("model.layers.1.self_attn.q_proj"));
        assert!(cfg.targets("model.layers.2.self_attn.v_proj"));
        let mut cfg = LoraConfig::deepseek_recipe();
        cfg.exclude_modules = Some(TargetModules::List(vec!["shared_experts.up_proj".into()]));
        assert!(!cfg.targets("model.layers.1.mlp.shared_experts.up_proj"));
        assert!(cfg.targets("model.layers.1.mlp.experts.0.up_proj"));
        cfg.rank_pattern.insert("experts.0.up_proj".into(), 4);
        cfg.alpha_pattern.insert("down_proj".into(), 32.0);
        assert_eq!(
            cfg.rank_alpha("model.layers.1.mlp.experts.0.up_proj"),
            (4, 16.0)
        );
        assert_eq!(
            cfg.rank_alpha("model.layers.1.mlp.experts.10.up_proj"),
            (64, 16.0)
        );
        assert_eq!(cfg.rank_alpha("model.layers.1.mlp.down_proj"), (64, 32.0));
        assert_eq!(cfg.scaling_for(64, 16.0), 0.25);
    }

    #[test]
    fn validate_rejects_bad_values() {
        let mut cfg = LoraConfig::deepseek_recipe();
        cfg.r = 0;
        assert!(cfg.validate().unwrap_err().to_string().contains("`r`"));
        let mut cfg = LoraConfig::deepseek_recipe();
        cfg.lora_dropout = 1.0;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lora_dropout"));
        let mut cfg = LoraConfig::deepseek_recipe();
        cfg.use_dora = true;
        assert!(cfg.validate().is_err());
        let cfg = LoraConfig::default();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("target_modules"));
    }

    #[test]
    fn reads_peft_json_with_unknown_keys_and_writes_the_classic_set() {
        let text = r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_version": "0.18",
                       "task_type": "CAUSAL_LM", "peft_type": "LORA", "some_future_key": [1,2]}"#;
        let cfg: LoraConfig = serde_json::from_str(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.r, 8);
        let out: serde_json::Value = serde_json::from_str(&cfg.to_json().unwrap()).unwrap();
        let keys: Vec<&str> = out
            .as_object()
            .unwrap()
            .keys()
            .map(|s| s.as_str())
            .collect();
        assert!(!keys.contains(&"peft_version"));
        for k in [
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "bias",
            "task_type",
            "peft_type",
            "base_model_name_or_path",
            "fan_in_fan_out",
            "inference_mode",
            "init_lora_weights",
            "modules_to_save",
            "use_rslora",
            "use_dora",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "layers_pattern",
            "revision",
            "megatron_config",
            "megatron_core",
            "loftq_config",
            "layer_replication",
        ] {
            assert!(keys.contains(&k), "{k} missing");
        }
    }
}
