//! stager: the engine behind the `stager` Python package.
//!
//! Data flows one way, one module a step:
//!
//! ```text
//! tensors ─ table ─▶ pool ─▶ copy_engine / cuda ─▶ staged buffer ─┬▶ writer (format, commit) ─▶ file
//!           layout    (host buffers)  (completion per storage)     └▶ transport (Python) ─▶ peer
//!                                                     file ─▶ reader ─▶ pool buffer ─▶ tensors
//! ```
//!
//! - [`table`]: a state_dict's tensors, flat: distinct storages, views, their place in one buffer;
//!   [`unchanged`]: incremental staging's records of the previous stage, matched in one pass;
//! - [`layout`]: the one layout shared by buffers, files and the wire (alignment, view flags,
//!   header keys, range checks);
//! - [`pool`]: host buffers that live across checkpoints (pinned, shared, budgeted);
//! - [`copy_engine`]: host copies on worker threads; [`cuda`]: device copies on own streams;
//! - [`completion`]: "request i is done", shared by every producer and consumer of staged bytes;
//! - [`format`], [`writer`], [`reader`]: the file format, the durable writer, the validating reader;
//!   [`commit`]: the one atomic commit every persisted file goes through; [`direct_io`]: how the
//!   writer and reader reach the device (O_DIRECT, requests in flight, bounce chunks);
//! - [`shm`]: named shared-memory segments, staged copies that outlive the process;
//! - [`torch_record`]: `torch.save` records, the items of dcp's own data files;
//! - [`limits`]: the machine's copy limits, for the benchmark;
//! - [`error`]: one error type, converted once at the Python boundary.
//!
//! The crate has no Python in it; `python` (behind the `python` feature) converts types and errors
//! for the `stager._native` extension module and nothing more.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod commit;
pub mod completion;
pub mod copy_engine;
pub mod cuda;
pub mod direct_io;
pub mod dtype;
pub mod error;
pub mod format;
pub mod layout;
pub mod limits;
pub mod pool;
pub mod reader;
pub mod shm;
pub mod table;
pub mod torch_record;
pub mod unchanged;
pub mod writer;

#[cfg(feature = "python")]
mod python;

pub use error::{Result, StagerError};
