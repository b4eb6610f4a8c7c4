//! One error type for the whole engine.
//!
//! Every fallible call in the crate returns [`StagerError`]; the Python bindings convert it once,
//! at the boundary, into `stager.StagerError`. Messages say what was wrong and, where there is one,
//! which path, buffer or partner it concerns, so a user can act on them without a traceback.
//! Variants keep what a program needs to tell failures apart without parsing text: the operating
//! system's errno ([`StagerError::errno`]) and CUDA's `CUresult` ([`StagerError::cuda_code`]).
//!
//! # Example
//! ```
//! use stager::StagerError;
//! let err = StagerError::io("writing", "/ckpt/a.stager", std::io::Error::from_raw_os_error(28));
//! assert_eq!(err.errno(), Some(28)); // ENOSPC
//! assert!(err.to_string().contains("/ckpt/a.stager"));
//! ```

use std::path::PathBuf;

/// Errors raised by the staging engine.
#[derive(Debug, thiserror::Error)]
pub enum StagerError {
    /// A stage needs more host memory than `memory_budget_bytes` allows, even after reusing and
    /// releasing every free buffer the pool holds.
    #[error("memory budget exceeded: staging needs {needed} bytes but the budget is {budget} bytes ({in_use} bytes still held by earlier staged results)")]
    BudgetExceeded {
        /// Bytes the stage asked for.
        needed: usize,
        /// The pool's budget.
        budget: usize,
        /// Bytes held by buffers still in use.
        in_use: usize,
    },

    /// The operating system refused memory (mmap, memfd, mlock...).
    #[error("host allocation of {bytes} bytes failed: {source}")]
    Allocation {
        /// Bytes asked for.
        bytes: usize,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// An argument out of range or inconsistent with the others (a copy that does not fit its
    /// buffer, overlapping ranges, a request index past the end, a thread count of zero...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An I/O error on a file, with the path it happened on.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("writing", "opening"...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error (its errno is kept).
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint file that is not what it claims to be.
    #[error("invalid stager file {path}: {reason}")]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A file of another format (a dcp data file, a `.metadata`) that is not what it claims to be.
    #[error("{path}: {reason}")]
    InvalidData {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A CUDA driver call failed.
    #[error("CUDA error in {call}: {message}")]
    Cuda {
        /// The driver call.
        call: &'static str,
        /// The driver's `CUresult`, when the failure came from the driver (not from a missing one).
        code: Option<i32>,
        /// What the driver (or the loader) said.
        message: String,
    },

    /// Waiting for something took longer than allowed.
    #[error("timed out after {seconds:.1}s waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        seconds: f64,
    },

    /// An object made before `fork()` was used in the child, where its threads do not exist.
    #[error("{what} was created in process {parent} and cannot be used in its forked child {child}: create a new one in the child")]
    Forked {
        /// The object ("the copy engine"...).
        what: &'static str,
        /// The process that made it.
        parent: u32,
        /// This process.
        child: u32,
    },

    /// A batch of requests ended in failure: every waiter sees why.
    #[error("{0}")]
    Failed(String),
}

impl StagerError {
    /// An [`StagerError::Io`] naming `action` and `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StagerError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// An [`StagerError::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        StagerError::InvalidArgument(message.into())
    }

    /// The operating system's error number behind this error, if there is one (ENOSPC, EACCES...).
    pub fn errno(&self) -> Option<i32> {
        match self {
            StagerError::Io { source, .. } | StagerError::Allocation { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    /// CUDA's `CUresult` behind this error, if it came from a driver call.
    pub fn cuda_code(&self) -> Option<i32> {
        match self {
            StagerError::Cuda { code, .. } => *code,
            _ => None,
        }
    }

    /// A copy of this error for a second waiter. The copy has the same text, errno and CUDA code;
    /// only the `source()` chain of an I/O error is flattened into its message.
    pub fn duplicate(&self) -> StagerError {
        let copy_io = |source: &std::io::Error| match source.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::new(source.kind(), source.to_string()),
        };
        match self {
            StagerError::BudgetExceeded {
                needed,
                budget,
                in_use,
            } => StagerError::BudgetExceeded {
                needed: *needed,
                budget: *budget,
                in_use: *in_use,
            },
            StagerError::Allocation { bytes, source } => StagerError::Allocation {
                bytes: *bytes,
                source: copy_io(source),
            },
            StagerError::InvalidArgument(message) => StagerError::InvalidArgument(message.clone()),
            StagerError::Io {
                action,
                path,
                source,
            } => StagerError::Io {
                action,
                path: path.clone(),
                source: copy_io(source),
            },
            StagerError::InvalidFile { path, reason } => StagerError::InvalidFile {
                path: path.clone(),
                reason: reason.clone(),
            },
            StagerError::InvalidData { path, reason } => StagerError::InvalidData {
                path: path.clone(),
                reason: reason.clone(),
            },
            StagerError::Cuda {
                call,
                code,
                message,
            } => StagerError::Cuda {
                call,
                code: *code,
                message: message.clone(),
            },
            StagerError::Timeout { what, seconds } => StagerError::Timeout {
                what: what.clone(),
                seconds: *seconds,
            },
            StagerError::Forked {
                what,
                parent,
                child,
            } => StagerError::Forked {
                what,
                parent: *parent,
                child: *child,
            },
            StagerError::Failed(message) => StagerError::Failed(message.clone()),
        }
    }
}

/// Result alias used across the crate.
pub type Result<T, E = StagerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_and_cuda_code_survive_duplication() {
        let enospc = StagerError::io("writing", "/x", std::io::Error::from_raw_os_error(28));
        assert_eq!(enospc.duplicate().errno(), Some(28));
        assert_eq!(enospc.duplicate().to_string(), enospc.to_string());
        let cuda = StagerError::Cuda {
            call: "cuMemcpyDtoHAsync",
            code: Some(700),
            message: "illegal address".into(),
        };
        assert_eq!(cuda.duplicate().cuda_code(), Some(700));
        assert_eq!(StagerError::invalid("x").errno(), None);
    }
}
