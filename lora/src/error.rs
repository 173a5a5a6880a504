//! Errors of the LoRA crate.

/// Everything that can go wrong while injecting, training, saving, loading or merging adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] moe_peft_model::Error),
    /// Quantization failed.
    #[error(transparent)]
    Quant(#[from] moe_peft_quant::Error),
    /// A kernel call failed (flat gradients, the AdamW update).
    #[error(transparent)]
    Kernels(#[from] moe_peft_kernels::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file could not be parsed or written.
    #[error("{path}: {reason}")]
    SafeTensors {
        /// The file involved.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid LoRA config: {0}")]
    InvalidConfig(String),
    /// A training setting is invalid.
    #[error("invalid training config: {0}")]
    InvalidTrainConfig(String),
    /// One [`TrainConfig`](crate::TrainConfig) field has a value outside its range. `field` is
    /// the field's name, which is also transformers' `TrainingArguments` name and the
    /// command-line flag of the programs.
    #[error("invalid training config: {field} {value}: {rule}")]
    InvalidTrainSetting {
        /// The field (`learning_rate`, `adam_beta1`, …).
        field: &'static str,
        /// Its value as given.
        value: String,
        /// What it must be.
        rule: &'static str,
    },
    /// `target_modules` (or `modules_to_save`) names something the model does not have.
    #[error(
        "target module(s) {missing:?} match no projection of the model; valid names: {valid:?}"
    )]
    UnknownTargetModule {
        /// The names that matched nothing.
        missing: Vec<String>,
        /// What can be targeted.
        valid: Vec<String>,
    },
    /// An adapter tensor does not fit the model.
    #[error("adapter tensor `{name}` in {file}: expected shape {expected:?}, found {got:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The file.
        file: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// An adapter file lacks a tensor or has one the model cannot place.
    #[error("adapter {file}: {reason}")]
    AdapterMismatch {
        /// The file.
        file: String,
        /// What does not fit.
        reason: String,
    },
    /// Merging adapters that are already merged.
    #[error("the adapters are already merged into the base weights; unmerge first")]
    AlreadyMerged,
    /// Unmerging adapters that are not merged.
    #[error("the adapters are not merged")]
    NotMerged,
    /// The loss or gradients stopped being finite.
    #[error("non-finite {what} at step {step}: training stopped before the update, the adapter is unchanged")]
    NonFinite {
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The optimizer step.
        step: usize,
    },
    /// A checkpoint is unusable.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub(crate) fn json(path: impl AsRef<std::path::Path>, source: serde_json::Error) -> Self {
        Self::Json {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
