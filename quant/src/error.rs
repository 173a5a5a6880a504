//! Errors of the quantization crate.

/// Everything that can go wrong while quantizing, loading or saving frozen weights.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file could not be parsed or written.
    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),
    /// JSON could not be parsed or written.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The block size is not one bitsandbytes accepts.
    #[error(
        "invalid block size {0}: bitsandbytes accepts 32, 64, 128, 256, 512, 1024, 2048 or 4096"
    )]
    InvalidBlockSize(usize),
    /// A tensor has a shape or dtype that does not fit.
    #[error("tensor `{name}`: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The tensor (or site) name.
        name: String,
        /// What was expected.
        expected: String,
        /// What was found.
        got: String,
    },
    /// A tensor the format needs is absent.
    #[error("tensor `{name}` is missing{}", in_file(.file))]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The file looked in, when known.
        file: Option<String>,
    },
    /// The bitsandbytes `quant_state` JSON blob is malformed (not UTF-8, truncated, a field
    /// missing or out of range, an unknown `quant_type`, an unsupported `blocksize`, ...).
    #[error("tensor `{name}`{}: invalid bitsandbytes quant_state: {reason}", in_file(.file))]
    InvalidQuantState {
        /// The key of the quant_state tensor.
        name: String,
        /// The file it came from, when known.
        file: Option<String>,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor of a bitsandbytes checkpoint has the wrong dtype or element count.
    #[error("tensor `{name}`{}: expected {expected}, got {got}", in_file(.file))]
    InvalidTensor {
        /// The tensor key.
        name: String,
        /// The file it came from, when known.
        file: Option<String>,
        /// What was expected.
        expected: String,
        /// What was found.
        got: String,
    },
    /// A configuration value is out of range.
    #[error("invalid quantization config: {0}")]
    InvalidConfig(String),
}

fn in_file(file: &Option<String>) -> String {
    file.as_ref()
        .map(|f| format!(" in {f}"))
        .unwrap_or_default()
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Turns this error into a `candle_core::Error`, for use inside `Module::forward` and ops.
    pub(crate) fn into_candle(self) -> candle_core::Error {
        match self {
            Error::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}
