//! Errors of the model crate.

/// Everything that can go wrong while configuring, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Quantizing or loading a quantized weight failed.
    #[error(transparent)]
    Quant(#[from] moe_peft_quant::Error),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file could not be parsed.
    #[error("{path}: invalid safetensors file: {reason}")]
    SafeTensors {
        /// The file involved.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration field has a value the model cannot use.
    #[error("invalid config: `{field}` {reason}")]
    InvalidConfig {
        /// The config.json field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// A weight the architecture needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint {location}")]
    MissingTensor {
        /// The HF parameter name.
        name: String,
        /// The file or directory looked in.
        location: String,
    },
    /// A weight has the wrong shape.
    #[error("tensor `{name}` in {file}: expected shape {expected:?}, found {got:?}")]
    ShapeMismatch {
        /// The HF parameter name.
        name: String,
        /// The file it was read from.
        file: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A weight has a dtype that cannot be converted.
    #[error("tensor `{name}` in {file}: unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The HF parameter name.
        name: String,
        /// The file it was read from.
        file: String,
        /// The dtype found.
        dtype: String,
    },
    /// The inputs of a forward pass do not fit together.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
