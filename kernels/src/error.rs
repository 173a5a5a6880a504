//! Errors of the kernels crate.

/// What can go wrong in a kernel call outside candle itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The operands do not fit the op (shapes, dtypes, devices, layouts), said in words.
    #[error("{0}")]
    InvalidInput(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
