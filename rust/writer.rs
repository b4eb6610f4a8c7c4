//! Durable writer: a checkpoint file that is either the previous one or the new one, complete.
//!
//! [`write_file`] writes a [`crate::format`] file in this order:
//! 1. a temp file `<name>.<pid>.<n>.tmp` in the target directory (`O_EXCL`, space reserved with
//!    `fallocate` so a full disk fails before any data is written);
//! 2. the data section, straight from the callers' memory (staged host buffers or the tensors'
//!    own storages) with `pwritev`, many small buffers per call, large ones in 32 MiB pieces,
//!    computing each buffer's crc32c on the way; with a [`Completion`], each buffer is written as
//!    soon as its request has completed, so staging (or receiving) and writing overlap; write-back is started every
//!    32 MiB (`sync_file_range`) so the final `fsync` has little left to do;
//! 3. the header (it holds the checksums, fixed width, so its size was known from the start);
//! 4. `fsync` of the file, `rename` over the final name, `fsync` of the directory.
//!
//! Any error (ENOSPC, EACCES, EFBIG from `RLIMIT_FSIZE` — Python ignores SIGXFSZ —, a missing
//! directory) removes the temp file, leaves the previous file untouched and comes back as
//! [`StagerError::Io`] naming the final path.
//!
//! # Example
//! ```
//! use std::collections::BTreeMap;
//! use stager::format::EntrySpec;
//! use stager::writer::{write_file, Source};
//! let dir = std::env::temp_dir().join(format!("stager-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let data = vec![1f32, 2.0, 3.0];
//! let spec = EntrySpec { name: "w".into(), dtype: "F32".into(), shape: vec![3], nbytes: 12 };
//! let source = Source { ptr: data.as_ptr().cast(), request: None };
//! // SAFETY: `data` outlives the call and nobody writes it meanwhile.
//! unsafe { write_file(&dir.join("a.safetensors"), &[spec], &[source], BTreeMap::new(), None) }.unwrap();
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```
//!
//! # Thread Safety
//! `write_file` runs in the calling thread; concurrent calls on different paths are independent.
//! Two concurrent saves to the same path each write their own temp file; the last rename wins.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::completion::Completion;
use crate::error::{Result, StagerError};
use crate::format::{self, EntrySpec};

/// Bytes per `pwritev` (and between write-back kicks).
pub const WRITE_CHUNK: usize = 32 << 20;
/// Most iovecs per `pwritev` (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 1024;

/// Where the bytes of one stored buffer are.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// Start of the buffer's bytes (`EntrySpec::nbytes` of them); may be null when empty.
    pub ptr: *const u8,
    /// The request of the [`Completion`] that fills `ptr`, if any: written once it has completed.
    pub request: Option<usize>,
}

// SAFETY: plain addresses; `write_file`'s contract makes them readable from the calling thread.
unsafe impl Send for Source {}
// SAFETY: as above; a Source is never mutated through a shared reference.
unsafe impl Sync for Source {}

/// What a write did.
#[derive(Clone, Debug, Default)]
pub struct WriteReport {
    /// Bytes of the file written.
    pub file_bytes: u64,
    /// The checksum of each storage.
    pub crc32c: Vec<u32>,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The temp file for `path`: same directory, name ending in `.tmp`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name: OsString = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

/// Removes temp files of `path` left by saves whose process died (SIGKILL, power loss), so they
/// don't pile up: `<name>.<pid>.<n>.tmp` where no process `pid` exists any more. Temp files of
/// live processes (this one included) are left alone.
fn remove_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Some(prefix) = name.to_str().map(|name| format!("{name}.")) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|f| f.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some((pid, counter)) = rest.split_once('.') else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<i32>(), counter.parse::<u64>()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes the temp file unless the write was committed.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes a stager file at `path` holding `specs[i]`'s bytes from `sources[i]`, with `metadata`
/// (plus the storage names and checksums, which this function adds) in the header. Atomic and
/// durable; see the module docs.
///
/// # Safety
/// For every i, `sources[i].ptr` must point to `specs[i].nbytes` readable bytes that stay valid
/// and unchanged until this call returns; when `sources[i].request` is set they only need to be
/// valid once that request of `completion` has completed (which this function waits for).
pub unsafe fn write_file(
    path: &Path,
    specs: &[EntrySpec],
    sources: &[Source],
    mut metadata: BTreeMap<String, String>,
    completion: Option<&Completion>,
) -> Result<WriteReport> {
    let invalid = |reason: String| StagerError::InvalidFile {
        path: path.to_path_buf(),
        reason,
    };
    if specs.len() != sources.len() {
        return Err(invalid(format!(
            "{} entries but {} sources",
            specs.len(),
            sources.len()
        )));
    }
    for (index, (spec, source)) in specs.iter().zip(sources).enumerate() {
        if spec.nbytes > 0 && source.ptr.is_null() {
            return Err(invalid(format!("storage {index} has a null address")));
        }
        if let (Some(request), Some(completion)) = (source.request, completion) {
            if request >= completion.len() {
                return Err(invalid(format!(
                    "storage {index} waits for request {request} of a batch of {}",
                    completion.len()
                )));
            }
        }
    }
    let entries = format::layout_entries(specs).map_err(invalid)?;
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    metadata.insert(
        format::KEY_STORAGES.into(),
        serde_json::to_string(&names).expect("strings serialize"),
    );
    metadata.insert(
        format::KEY_CRC.into(),
        format::format_crcs(&vec![0; specs.len()]),
    );
    let mut header = format::build_header(&entries, &metadata).map_err(invalid)?;
    // Where the checksums go: the key and its opening quote can't occur unescaped inside another
    // JSON string, so this finds the metadata value itself.
    let crc_key = format!("\"{}\":\"", format::KEY_CRC);
    let crc_at = header
        .windows(crc_key.len())
        .position(|w| w == crc_key.as_bytes())
        .map(|at| at + crc_key.len())
        .expect("the header holds the checksum placeholder");
    let data_start = header.len() as u64;
    let data_len = entries.last().map_or(0, |e| e.end);
    let file_bytes = data_start + data_len;

    let io_err = |action: &'static str| {
        move |source: io::Error| StagerError::io(action, path.to_path_buf(), source)
    };
    remove_stale_temps(path);
    let temp = temp_path(path);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(&temp)
        .map_err(io_err("creating a temp file to write"))?;
    let mut guard = TempGuard {
        path: temp,
        armed: true,
    };
    let fd = file.as_raw_fd();
    reserve_space(fd, file_bytes).map_err(io_err("reserving space for"))?;

    // Data section, in file order.
    let mut crcs = vec![0u32; specs.len()];
    let mut writer = BatchWriter::new(fd, data_start);
    let zeros = [0u8; format::STORAGE_ALIGNMENT as usize];
    let mut storage = 0;
    for entry in &entries {
        if format::is_padding(&entry.name) {
            writer
                .push(zeros.as_ptr(), entry.nbytes() as usize, None)
                .map_err(io_err("writing"))?;
            continue;
        }
        let source = sources[storage];
        if let (Some(request), Some(completion)) = (source.request, completion) {
            if !completion.is_done(request) {
                // Write what is ready before sleeping on the next copy.
                writer.flush().map_err(io_err("writing"))?;
            }
            // A failed batch (a device copy, a receive) must not become a file.
            completion.wait(request, None)?;
        }
        let len = specs[storage].nbytes as usize;
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(WRITE_CHUNK);
            // SAFETY: `done + piece <= len`, inside the caller's buffer (function contract).
            let ptr = unsafe { source.ptr.add(done) };
            writer
                .push(ptr, piece, Some(&mut crcs[storage]))
                .map_err(io_err("writing"))?;
            done += piece;
        }
        storage += 1;
    }
    writer.flush().map_err(io_err("writing"))?;

    // Header, now that the checksums are known (same length: fixed-width checksums).
    let crc_text = format::format_crcs(&crcs);
    header[crc_at..crc_at + crc_text.len()].copy_from_slice(crc_text.as_bytes());
    debug_assert_eq!(
        header,
        format::build_header(&entries, &{
            metadata.insert(format::KEY_CRC.into(), crc_text);
            metadata
        })
        .unwrap()
    );
    pwrite_all(fd, &header, 0).map_err(io_err("writing the header of"))?;
    file.sync_all().map_err(io_err("fsync of"))?;
    drop(file);
    std::fs::rename(&guard.path, path).map_err(io_err("renaming the temp file over"))?;
    guard.armed = false;
    sync_parent(path).map_err(io_err("fsync of the directory of"))?;
    Ok(WriteReport {
        file_bytes,
        crc32c: crcs,
    })
}

/// Reserves the file's blocks up front (early ENOSPC / EFBIG); a no-op where unsupported.
fn reserve_space(fd: i32, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own; mode 0 extends the file.
    let rc = unsafe { libc::fallocate(fd, 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(()),
        _ => Err(err),
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Runs a positional read or write until it transfers something, retrying when a signal
/// interrupted it. `Ok(0)` means end of file (reads) or no progress (writes); the callers turn
/// that into an error, since their files never end early.
pub(crate) fn retry_interrupted(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn wrote_nothing(call: &str) -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, format!("{call} wrote nothing"))
}

fn pwrite_all(fd: i32, mut bytes: &[u8], mut offset: u64) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: writes from a live slice.
        let n = retry_interrupted(|| unsafe {
            libc::pwrite(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                offset as libc::off_t,
            )
        })?;
        if n == 0 {
            return Err(wrote_nothing("pwrite"));
        }
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Gathers consecutive pieces into one `pwritev` of up to [`WRITE_CHUNK`] bytes.
struct BatchWriter {
    fd: i32,
    offset: u64,
    iovecs: Vec<libc::iovec>,
    pending: usize,
    synced_to: u64,
}

impl BatchWriter {
    fn new(fd: i32, offset: u64) -> BatchWriter {
        BatchWriter {
            fd,
            offset,
            iovecs: Vec::with_capacity(MAX_IOVECS),
            pending: 0,
            synced_to: offset,
        }
    }

    /// Queues `len` bytes at `ptr`, folding them into `crc` first (they are hot in cache for
    /// the write that follows).
    fn push(&mut self, ptr: *const u8, len: usize, crc: Option<&mut u32>) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.pending + len > WRITE_CHUNK || self.iovecs.len() == MAX_IOVECS {
            self.flush()?;
        }
        if let Some(crc) = crc {
            // SAFETY: the caller of `write_file` guarantees `len` readable bytes at `ptr`.
            let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
            *crc = crc32c::crc32c_append(*crc, bytes);
        }
        self.iovecs.push(libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: len,
        });
        self.pending += len;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut first = 0;
        while first < self.iovecs.len() {
            let count = (self.iovecs.len() - first) as libc::c_int;
            let (fd, iovecs, offset) = (self.fd, &self.iovecs[first..], self.offset);
            // SAFETY: every iovec points to readable bytes (see `push`); pwritev only reads them.
            let n = retry_interrupted(|| unsafe {
                libc::pwritev(fd, iovecs.as_ptr(), count, offset as libc::off_t)
            })?;
            if n == 0 {
                return Err(wrote_nothing("pwritev"));
            }
            let mut written = n;
            self.offset += written as u64;
            // Skip the iovecs written whole, trim the one written in part.
            while written > 0 {
                let iov = &mut self.iovecs[first];
                if written >= iov.iov_len {
                    written -= iov.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same buffer by fewer bytes than its length.
                    iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(written) }.cast();
                    iov.iov_len -= written;
                    written = 0;
                }
            }
        }
        self.iovecs.clear();
        self.pending = 0;
        if self.offset - self.synced_to >= WRITE_CHUNK as u64 {
            // Start write-back of what was just written; the final fsync waits for it.
            // SAFETY: sync_file_range on our own descriptor; advice-like, errors are ignored
            // here because fsync reports any real failure.
            unsafe {
                libc::sync_file_range(
                    self.fd,
                    self.synced_to as libc::off_t,
                    (self.offset - self.synced_to) as libc::off_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.synced_to = self.offset;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy_engine::{CopyEngine, HostCopy};
    use crate::reader::CheckpointFile;

    #[test]
    fn temps_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.stager");
        // A pid that can't exist (above the kernel's maximum) stands for a killed saver.
        let dead = dir.path().join("ckpt.stager.2147483646.0.tmp");
        let live = dir
            .path()
            .join(format!("ckpt.stager.{}.99.tmp", std::process::id()));
        let unrelated = dir.path().join("other.stager.2147483646.0.tmp");
        for file in [&dead, &live, &unrelated] {
            std::fs::write(file, b"partial").unwrap();
        }
        remove_stale_temps(&path);
        assert!(!dead.exists());
        assert!(live.exists() && unrelated.exists());
    }

    fn specs_for(buffers: &[Vec<u8>]) -> Vec<EntrySpec> {
        buffers
            .iter()
            .enumerate()
            .map(|(i, b)| EntrySpec {
                name: format!("t{i}"),
                dtype: "U8".into(),
                shape: vec![b.len() as u64],
                nbytes: b.len() as u64,
            })
            .collect()
    }

    fn meta() -> BTreeMap<String, String> {
        let mut meta = BTreeMap::new();
        meta.insert(format::KEY_FORMAT.into(), "stager".into());
        meta.insert(format::KEY_VERSION.into(), format::VERSION.into());
        meta.insert(format::KEY_TREE.into(), "{}".into());
        meta
    }

    fn read_back(path: &Path, buffers: &[Vec<u8>]) {
        let file = CheckpointFile::open(path).unwrap();
        let layout = file.layout().unwrap();
        assert_eq!(layout.storages.len(), buffers.len());
        let mut out = vec![0u8; buffers.iter().map(|b| b.len()).sum()];
        let mut offsets = Vec::new();
        let mut at = 0;
        for b in buffers {
            offsets.push(at);
            at += b.len();
        }
        // SAFETY: `out` holds every range.
        unsafe { file.read_into(out.as_mut_ptr(), out.len(), &offsets, true) }.unwrap();
        let mut at = 0;
        for b in buffers {
            assert_eq!(&out[at..at + b.len()], &b[..]);
            at += b.len();
        }
    }

    #[test]
    fn round_trip_with_many_sizes_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let buffers: Vec<Vec<u8>> = (0..300)
            .map(|i| {
                (0..(i * 37 % 5000 + (i == 7) as usize * (WRITE_CHUNK + 3)))
                    .map(|j| (j * i) as u8)
                    .collect()
            })
            .collect();
        let sources: Vec<Source> = buffers
            .iter()
            .map(|b| Source {
                ptr: b.as_ptr(),
                request: None,
            })
            .collect();
        // SAFETY: buffers outlive the call.
        let report =
            unsafe { write_file(&path, &specs_for(&buffers), &sources, meta(), None) }.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), report.file_bytes);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        read_back(&path, &buffers);
    }

    #[test]
    fn pipelined_with_copy_job() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.safetensors");
        let buffers: Vec<Vec<u8>> = (0..16)
            .map(|i| vec![i as u8 + 1; (i + 1) * 300_000])
            .collect();
        let mut targets: Vec<Vec<u8>> = buffers.iter().map(|b| vec![0; b.len()]).collect();
        let engine = CopyEngine::new(2).unwrap();
        let copies = buffers
            .iter()
            .zip(targets.iter_mut())
            .enumerate()
            .map(|(request, (s, t))| HostCopy {
                request,
                src: s.as_ptr(),
                dst: t.as_mut_ptr(),
                len: s.len(),
            })
            .collect();
        let job = Completion::new(buffers.len());
        // SAFETY: sources and targets outlive the batch, which write_file waits on.
        unsafe { engine.submit(&job, copies, None) }.unwrap();
        let sources: Vec<Source> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| Source {
                ptr: t.as_ptr(),
                request: Some(i),
            })
            .collect();
        // SAFETY: as above.
        unsafe { write_file(&path, &specs_for(&buffers), &sources, meta(), Some(&job)) }.unwrap();
        job.wait_all(None).unwrap();
        read_back(&path, &buffers);
    }

    #[test]
    fn missing_directory_names_the_path_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("x.safetensors");
        // SAFETY: no sources.
        let err = unsafe { write_file(&path, &[], &[], meta(), None) }.unwrap_err();
        assert!(err.to_string().contains("nope/x.safetensors"), "{err}");
    }

    #[test]
    fn replaces_previous_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.safetensors");
        std::fs::write(&path, b"old").unwrap();
        let buffers = vec![vec![5u8; 1000]];
        let sources = [Source {
            ptr: buffers[0].as_ptr(),
            request: None,
        }];
        // SAFETY: buffers outlive the call.
        unsafe { write_file(&path, &specs_for(&buffers), &sources, meta(), None) }.unwrap();
        read_back(&path, &buffers);
    }
}
