//! One error type for the whole engine.
//!
//! Every fallible call in the crate returns [`StagerError`]; the Python bindings convert it once,
//! at the boundary, into `stager.StagerError`. Messages say what was wrong and, where there is one,
//! which path, buffer or partner it concerns, so a user can act on them without a traceback.

use std::path::PathBuf;

/// Errors raised by the staging engine.
#[derive(Debug, thiserror::Error)]
pub enum StagerError {
    /// A stage needs more host memory than `memory_budget_bytes` allows, even after reusing and
    /// releasing every free buffer the pool holds.
    #[error("memory budget exceeded: staging needs {needed} bytes but the budget is {budget} bytes ({in_use} bytes still held by earlier staged results)")]
    BudgetExceeded {
        needed: usize,
        budget: usize,
        in_use: usize,
    },

    /// The operating system refused memory (mmap, memfd, mlock...).
    #[error("host allocation of {bytes} bytes failed: {source}")]
    Allocation {
        bytes: usize,
        #[source]
        source: std::io::Error,
    },

    /// A copy request that does not fit the destination buffer or overlaps itself.
    #[error("invalid copy: {0}")]
    InvalidCopy(String),

    /// An I/O error on a file, with the path it happened on.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint file that is not what it claims to be.
    #[error("invalid stager file {path}: {reason}")]
    InvalidFile { path: PathBuf, reason: String },

    /// A CUDA driver call failed.
    #[error("CUDA error in {call}: {message}")]
    Cuda { call: &'static str, message: String },

    /// Waiting for something took longer than allowed.
    #[error("timed out after {seconds:.1}s waiting for {what}")]
    Timeout { what: String, seconds: f64 },
}

impl StagerError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        StagerError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Result alias used across the crate.
pub type Result<T, E = StagerError> = std::result::Result<T, E>;
