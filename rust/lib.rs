//! stager: the engine behind the `stager` Python package.
//!
//! Data flows one way, one module a step:
//! [`pool`] (host buffers that live across checkpoints) → [`copy_engine`] (parallel chunked copies
//! with per-request completion) → then optionally the durable writer or a transport.
//! The crate has no Python in it; `python` (behind the `python` feature) converts types and errors
//! for the `stager._native` extension module and nothing more.

pub mod copy_engine;
pub mod cuda;
pub mod error;
pub mod format;
pub mod limits;
pub mod pool;
pub mod reader;
pub mod writer;

#[cfg(feature = "python")]
mod python;

pub use error::{Result, StagerError};
