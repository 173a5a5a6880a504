//! A thin wrapper over a Hugging Face `tokenizer.json` that behaves like transformers'
//! `LlamaTokenizerFast` as DeepSeek-MoE configures it.
//!
//! DeepSeek's raw `tokenizer.json` has a `ByteLevel` post-processor, which adds **no** BOS. The
//! reference loads it through `AutoTokenizer` (`LlamaTokenizerFast` with `add_bos_token: true` from
//! `tokenizer_config.json`), which rebuilds the post-processor so that every encoding starts with
//! BOS `<｜begin▁of▁sentence｜>` (id 100000). [`TextTokenizer`] reproduces that: it encodes without
//! the file's post-processor special tokens and then prepends BOS (and appends EOS) as
//! `add_bos_token` / `add_eos_token` say. Truncation keeps the special tokens inside the length
//! limit and cuts the text on the right, as `tokenizer(text, max_length=L, truncation=True)` does.
//!
//! The pad id is the pad token if one is set, else the eos token (the reference's pad is
//! `<｜end▁of▁sentence｜>`, id 100001).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// The parts of `tokenizer_config.json` that matter for preprocessing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenizerSettings {
    /// Prepend the BOS token to every encoding (`add_bos_token`).
    pub add_bos_token: bool,
    /// Append the EOS token to every encoding (`add_eos_token`).
    pub add_eos_token: bool,
    /// BOS token text.
    pub bos_token: Option<String>,
    /// EOS token text.
    pub eos_token: Option<String>,
    /// Pad token text; the EOS token is used when absent.
    pub pad_token: Option<String>,
    /// `model_max_length`, if the config has a meaningful one (HF's "very large integer"
    /// sentinel is read as `None`).
    pub model_max_length: Option<usize>,
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl TokenizerSettings {
    /// Reads the relevant fields of a `tokenizer_config.json` value. Token entries may be plain
    /// strings or `AddedToken` objects (`{"content": ...}`). Missing fields keep their defaults,
    /// except `add_bos_token`, which defaults to `true` when a BOS token is named (the
    /// `LlamaTokenizerFast` default).
    pub fn from_config_value(v: &Value) -> Self {
        let bos_token = token_text(v.get("bos_token"));
        let add_bos_token = v
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(bos_token.is_some());
        let model_max_length = v
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x >= 1.0 && *x < 1e15)
            .map(|x| x as usize);
        TokenizerSettings {
            add_bos_token,
            add_eos_token: v
                .get("add_eos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token,
            eos_token: token_text(v.get("eos_token")),
            pad_token: token_text(v.get("pad_token")),
            model_max_length,
        }
    }

    /// Reads a `tokenizer_config.json` file.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Config {
            path: path.into(),
            source,
        })?;
        Ok(Self::from_config_value(&v))
    }
}

/// A `tokenizers::Tokenizer` plus the special-token behaviour of `tokenizer_config.json`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    settings: TokenizerSettings,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: u32,
    splits_at_line_breaks: bool,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("settings", &self.settings)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("splits_at_line_breaks", &self.splits_at_line_breaks)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = dir.join("tokenizer_config.json");
        let cfg = cfg.is_file().then_some(cfg);
        Self::from_files(dir.join("tokenizer.json"), cfg.as_deref())
    }

    /// Loads a `tokenizer.json` and an optional `tokenizer_config.json`. Without a config,
    /// [`TokenizerSettings::default`] applies (no BOS, no pad token), which fails with
    /// [`Error::NoPadToken`] unless the settings are supplied through [`TextTokenizer::new`].
    pub fn from_files(
        tokenizer_json: impl AsRef<Path>,
        config_json: Option<&Path>,
    ) -> Result<Self> {
        let settings = match config_json {
            Some(p) => TokenizerSettings::from_config_file(p)?,
            None => TokenizerSettings::default(),
        };
        let inner = load_tokenizer_json(tokenizer_json.as_ref())?;
        Self::new(inner, settings)
    }

    /// Wraps an already loaded tokenizer with explicit settings. Special tokens must exist in
    /// the vocabulary.
    pub fn new(inner: tokenizers::Tokenizer, settings: TokenizerSettings) -> Result<Self> {
        let lookup = |role: &'static str, tok: &Option<String>| -> Result<Option<u32>> {
            match tok {
                None => Ok(None),
                Some(t) => inner
                    .token_to_id(t)
                    .map(Some)
                    .ok_or_else(|| Error::UnknownToken {
                        role,
                        token: t.clone(),
                    }),
            }
        };
        let bos_id = lookup("bos", &settings.bos_token)?;
        let eos_id = lookup("eos", &settings.eos_token)?;
        let pad_id = lookup("pad", &settings.pad_token)?
            .or(eos_id)
            .ok_or(Error::NoPadToken)?;
        if settings.add_bos_token && bos_id.is_none() {
            return Err(Error::InvalidConfig(
                "add_bos_token is set but no bos_token is named".into(),
            ));
        }
        if settings.add_eos_token && eos_id.is_none() {
            return Err(Error::InvalidConfig(
                "add_eos_token is set but no eos_token is named".into(),
            ));
        }
        let splits_at_line_breaks = splits_at_line_breaks(&inner);
        Ok(TextTokenizer {
            inner,
            settings,
            bos_id,
            eos_id,
            pad_id,
            splits_at_line_breaks,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &TokenizerSettings {
        &self.settings
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// BOS id, if a BOS token is known.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// EOS id, if an EOS token is known.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The id batches are padded with: the pad token, else the EOS token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size including added tokens (100002 for DeepSeek; the model's embedding is
    /// padded to 102400).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `model_max_length` from the config, if any.
    pub fn model_max_length(&self) -> Option<usize> {
        self.settings.model_max_length
    }

    /// The id of a token (vocabulary entry or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of special tokens [`encode`](Self::encode) adds (BOS and/or EOS).
    pub fn num_special_tokens(&self) -> usize {
        usize::from(self.settings.add_bos_token) + usize::from(self.settings.add_eos_token)
    }

    /// Encodes text **without** BOS/EOS (`add_special_tokens=False`). Added tokens written in
    /// the text (e.g. a literal `<｜end▁of▁sentence｜>`) are still recognised.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(Error::tokenizer)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text with BOS/EOS as configured (HF `tokenizer(text)`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_truncated(text, usize::MAX)?.0)
    }

    /// Encodes text with BOS/EOS as configured and right-truncates to at most `max_len` ids,
    /// special tokens included (HF `tokenizer(text, max_length=max_len, truncation=True)`).
    /// Returns the ids and whether anything was cut.
    ///
    /// `max_len` must exceed [`num_special_tokens`](Self::num_special_tokens).
    pub fn encode_truncated(&self, text: &str, max_len: usize) -> Result<(Vec<u32>, bool)> {
        let body = self.encode_raw(text)?;
        self.add_special_tokens_truncated(&body, max_len)
    }

    /// Adds BOS/EOS as configured around already encoded text and right-truncates to at most
    /// `max_len` ids, special tokens included, exactly as [`encode_truncated`](Self::encode_truncated)
    /// does with the text's encoding. Returns the ids and whether anything was cut.
    pub fn add_special_tokens_truncated(
        &self,
        body: &[u32],
        max_len: usize,
    ) -> Result<(Vec<u32>, bool)> {
        let n_special = self.num_special_tokens();
        if max_len <= n_special {
            return Err(Error::InvalidConfig(format!(
                "max_len {max_len} leaves no room next to {n_special} special token(s)"
            )));
        }
        let keep = body.len().min(max_len - n_special);
        let mut ids = Vec::with_capacity(keep + n_special);
        if self.settings.add_bos_token {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(&body[..keep]);
        if self.settings.add_eos_token {
            ids.extend(self.eos_id);
        }
        Ok((ids, keep < body.len()))
    }

    /// Whether a line break is a hard token boundary: for any texts `a` and `b` where `a` ends
    /// with `\n` or `\r`, `encode_raw(a + b) == encode_raw(a) ++ encode_raw(b)`.
    ///
    /// Decided once from the tokenizer's structure, conservatively: no normalizer (or an empty
    /// sequence of them); a pre-tokenizer whose first step isolates every `\r` and `\n`
    /// (`Split` on `[\r\n]`, behaviour `Isolated`), followed only by steps that work on each piece
    /// on its own (`Split`, `Digits`, `Punctuation`, `Whitespace`, `WhitespaceSplit`,
    /// `CharDelimiterSplit`, `UnicodeScripts`, `BertPreTokenizer`, and `ByteLevel` without
    /// `add_prefix_space`); a model without BPE dropout; no truncation or padding inside
    /// `tokenizer.json`; and no added token that contains a line break or strips the whitespace
    /// next to it. DeepSeek's tokenizer qualifies. When it holds, a prompt that ends with a line
    /// break need not be tokenized a second time inside the full text (see
    /// [`build_example`](crate::build_example)).
    pub fn splits_at_line_breaks(&self) -> bool {
        self.splits_at_line_breaks
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(Error::tokenizer)
    }

    /// Whether `text` encodes to exactly one token (e.g. to check that an end-of-turn marker is a
    /// real special token).
    pub fn is_single_token(&self, text: &str) -> Result<bool> {
        Ok(self.encode_raw(text)?.len() == 1)
    }
}

/// See [`TextTokenizer::splits_at_line_breaks`].
fn splits_at_line_breaks(inner: &tokenizers::Tokenizer) -> bool {
    let normalizer_ok = match inner.get_normalizer() {
        None => true,
        Some(n) => serde_json::to_value(n).is_ok_and(|v| {
            v.get("type").and_then(Value::as_str) == Some("Sequence")
                && v.get("normalizers")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty)
        }),
    };
    let pre_ok = inner
        .get_pre_tokenizer()
        .and_then(|p| serde_json::to_value(p).ok())
        .is_some_and(|v| isolates_line_breaks_first(&v));
    let model_ok = match inner.get_model() {
        tokenizers::ModelWrapper::BPE(bpe) => bpe.dropout.is_none(),
        _ => true,
    };
    let added_ok = inner
        .get_added_tokens_decoder()
        .values()
        .all(|t| !t.lstrip && !t.rstrip && !t.single_word && !t.content.contains(['\n', '\r']));
    normalizer_ok
        && pre_ok
        && model_ok
        && added_ok
        && inner.get_truncation().is_none()
        && inner.get_padding().is_none()
}

/// A `Sequence` pre-tokenizer whose first step is `Split([\r\n], Isolated)` and whose other
/// steps each work on one piece at a time.
fn isolates_line_breaks_first(v: &Value) -> bool {
    let steps = match v.get("type").and_then(Value::as_str) {
        Some("Sequence") => match v.get("pretokenizers").and_then(Value::as_array) {
            Some(steps) => steps.as_slice(),
            None => return false,
        },
        _ => std::slice::from_ref(v),
    };
    let Some((first, rest)) = steps.split_first() else {
        return false;
    };
    let first_ok = first.get("type").and_then(Value::as_str) == Some("Split")
        && first.get("behavior").and_then(Value::as_str) == Some("Isolated")
        && first.get("invert").and_then(Value::as_bool) == Some(false)
        && matches!(
            first
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(Value::as_str),
            Some("[\r\n]" | "[\n\r]")
        );
    first_ok && rest.iter().all(works_per_piece)
}

/// Whether a pre-tokenizer step splits each existing piece on its own, adding nothing.
fn works_per_piece(v: &Value) -> bool {
    match v.get("type").and_then(Value::as_str) {
        Some(
            "Split" | "Digits" | "Punctuation" | "Whitespace" | "WhitespaceSplit"
            | "CharDelimiterSplit" | "UnicodeScripts" | "BertPreTokenizer",
        ) => true,
        Some("ByteLevel") => v.get("add_prefix_space").and_then(Value::as_bool) == Some(false),
        Some("Sequence") => v
            .get("pretokenizers")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().all(works_per_piece)),
        _ => false,
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    tokenizers::Tokenizer::from_bytes(bytes)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", PathBuf::from(path).display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_config_value() {
        let v: Value = serde_json::json!({
            "add_bos_token": true,
            "bos_token": {"__type": "AddedToken", "content": "<s>"},
            "eos_token": "</s>",
            "model_max_length": 1e30,
        });
        let s = TokenizerSettings::from_config_value(&v);
        assert!(s.add_bos_token);
        assert!(!s.add_eos_token);
        assert_eq!(s.bos_token.as_deref(), Some("<s>"));
        assert_eq!(s.eos_token.as_deref(), Some("</s>"));
        assert_eq!(s.pad_token, None);
        assert_eq!(s.model_max_length, None);
        let s =
            TokenizerSettings::from_config_value(&serde_json::json!({"model_max_length": 4096}));
        assert_eq!(s.model_max_length, Some(4096));
        assert!(!s.add_bos_token);
    }
}
