//! Named shared-memory segments: staged copies that outlive the process that made them.
//!
//! A segment is one file in a shared-memory directory (`/dev/shm`, or `STAGER_SHM_DIR`) whose
//! data region is mapped and used as a pool buffer ([`HostBuffer`]): bytes are copied or
//! received straight into it, so the surviving copy *is* the staged copy. When torchrun restarts
//! the workers, the new process opens the segment and finds the bytes still there.
//!
//! Layout of a segment file (`P` the page size):
//!
//! ```text
//! [0, P)                 header: magic, version, data length, record length, range count, crcs
//! [P, P + round_up(D))   data: D bytes, exactly the pool buffer's layout
//! [M, M + R)             record: opaque bytes (the caller's JSON: owner, step, tree...)
//! [M + R, ...)           ranges: (offset u64, length u64, crc32c u32, 0 u32) per checked range
//! ```
//!
//! A segment is written under a temporary name (`<final>.<pid>.tmp`) and made visible by one
//! `rename` after its record, checksums and header are written ([`SegmentWriter::publish`]): a
//! process killed at any instant leaves either no segment under the final name or a complete
//! one. Every open segment file is locked with `flock`: exclusively while it is written, shared
//! while a process holds its mapping. [`remove_segment`] removes a segment only when it can take
//! the exclusive lock (or this process holds it), so a segment that a live process uses is never
//! removed by another; a killed process's locks vanish with it.
//!
//! Space is reserved with `posix_fallocate` before anything is copied: a directory too small
//! gives a [`StagerError`] naming it and the bytes needed, never a `SIGBUS` in a copy.
//!
//! # Example
//! ```
//! use stager::shm::{open_segment, SegmentWriter};
//! let dir = std::env::temp_dir();
//! let path = dir.join(format!("stager-doc-{}.seg", std::process::id()));
//! let mut writer = SegmentWriter::create(&path, 10, None).unwrap();
//! writer.buffer_mut().unwrap().as_mut_slice().copy_from_slice(b"0123456789");
//! let buffer = writer.take_buffer().unwrap();
//! writer.publish(&buffer, b"{}", &[(0, 10)]).unwrap();
//! let opened = open_segment(&path).unwrap();
//! opened.verify().unwrap();
//! assert_eq!(opened.buffer.as_slice(), b"0123456789");
//! drop((buffer, opened));
//! assert!(stager::shm::remove_segment(&path).unwrap().is_some());
//! ```
//!
//! # Thread Safety
//! [`SegmentWriter`] is used by one thread at a time (it is `Send`); the buffers it and
//! [`open_segment`] hand out follow [`HostBuffer`]'s rules. The registry of segments this
//! process holds is behind a mutex.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Result, StagerError};
use crate::pool::{page_size, HostBuffer, MemoryPinner};

/// First bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"STGSHM01";
/// The layout version this crate writes and reads.
pub const VERSION: u32 = 1;
const HEADER_FIELDS: usize = 8 + 4 + 4 + 8 + 8 + 8 + 4 + 4;
const RANGE_BYTES: usize = 24;
/// Bounds that keep a hostile header from asking for absurd allocations.
const MAX_RECORD_BYTES: u64 = 1 << 30;
const MAX_RANGES: u64 = 1 << 26;

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Bytes mapped for `data_len` bytes of data (at least one page, so an empty copy maps too).
fn capacity_of(data_len: usize) -> usize {
    round_up(data_len.max(1), page_size())
}

/// Device and inode: a segment's identity whatever its name (it is renamed once).
type FileId = (u64, u64);

/// Segments this process has open (their locks are its own: it may remove them).
fn held() -> &'static Mutex<HashMap<FileId, usize>> {
    static HELD: OnceLock<Mutex<HashMap<FileId, usize>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// An open segment file with its `flock`; releases the lock (and the registry entry) on drop.
struct SegmentLock {
    file: File,
    id: FileId,
}

impl SegmentLock {
    fn new(file: File, path: &Path) -> Result<SegmentLock> {
        let meta = file
            .metadata()
            .map_err(|e| StagerError::io("inspecting segment", path, e))?;
        let id = (meta.dev(), meta.ino());
        *held()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_insert(0) += 1;
        Ok(SegmentLock { file, id })
    }
}

impl Drop for SegmentLock {
    fn drop(&mut self) {
        let mut map = held().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.id);
            }
        }
        // The descriptor closes after this (field drop): the flock goes with it.
    }
}

fn flock(file: &File, operation: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor the File owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Maps `capacity` bytes of `file` from offset `page_size()`, shared (writes reach the file) or
/// private (copy-on-write: the file is never changed through it).
fn map(file: &File, capacity: usize, shared: bool, path: &Path) -> Result<NonNull<u8>> {
    let flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    // SAFETY: a fresh mapping chosen by the kernel over a descriptor we own; no existing memory
    // is affected. The file is at least `page_size() + capacity` bytes (checked by callers).
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            capacity,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            file.as_raw_fd(),
            page_size() as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(StagerError::io(
            "mapping segment",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(NonNull::new(ptr.cast()).expect("mmap returned null"))
}

fn buffer_over(
    lock: Arc<SegmentLock>,
    capacity: usize,
    len: usize,
    shared: bool,
    path: &Path,
    pinner: Option<Arc<dyn MemoryPinner>>,
) -> Result<HostBuffer> {
    let ptr = map(&lock.file, capacity, shared, path)?;
    // SAFETY: `ptr` is the fresh page-aligned mapping of `capacity >= len` bytes made just above,
    // owned by the buffer from here on.
    unsafe { HostBuffer::from_mapping(ptr, capacity, len, lock, pinner) }
}

/// Why space could not be reserved in the segment directory, in words a user can act on.
fn no_space(path: &Path, needed: usize, err: std::io::Error) -> StagerError {
    let dir = path.parent().unwrap_or(Path::new("."));
    if err.raw_os_error() == Some(libc::ENOSPC) {
        let free = available_bytes(dir).map_or(String::new(), |b| format!(", {b} bytes free"));
        return StagerError::Failed(format!(
            "shared-memory directory {} is too small for the segment {}: it needs {needed} bytes{free} \
             (enlarge it, e.g. docker --shm-size, or point STAGER_SHM_DIR elsewhere); the previous \
             generation is left intact",
            dir.display(),
            path.display()
        ));
    }
    StagerError::io("reserving space for segment", path, err)
}

/// Free bytes of the filesystem holding `dir`.
pub fn available_bytes(dir: &Path) -> Option<u64> {
    let c = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we pass; `c` is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// A segment being written: its temp file (locked exclusively), and the buffer over its data.
pub struct SegmentWriter {
    temp: PathBuf,
    path: PathBuf,
    lock: Arc<SegmentLock>,
    data_len: usize,
    /// Where the data region is mapped (publish checks it is given that buffer).
    address: usize,
    buffer: Option<HostBuffer>,
    published: bool,
}

impl SegmentWriter {
    /// Creates `<path>.<pid>.tmp` with room for `data_len` bytes and maps its data region
    /// (page-locked with `pinner`). The directory must exist and be writable.
    pub fn create(
        path: &Path,
        data_len: usize,
        pinner: Option<Arc<dyn MemoryPinner>>,
    ) -> Result<SegmentWriter> {
        let dir = path.parent().unwrap_or(Path::new("."));
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StagerError::invalid(format!(
                    "shared-memory directory {} is not a directory (set STAGER_SHM_DIR to one)",
                    dir.display()
                )))
            }
            Err(e) => {
                return Err(StagerError::invalid(format!(
                    "shared-memory directory {} is not usable: {e} (set STAGER_SHM_DIR to an existing, \
                     writable directory)",
                    dir.display()
                )))
            }
        }
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{}.tmp", std::process::id()));
        let temp = PathBuf::from(name);
        let _ = std::fs::remove_file(&temp); // our own pid's leftover: a dead earlier process
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&temp)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    StagerError::invalid(format!(
                        "shared-memory directory {} is not writable: {e} (set STAGER_SHM_DIR to a \
                         writable directory)",
                        dir.display()
                    ))
                } else {
                    StagerError::io("creating segment", &temp, e)
                }
            })?;
        let cleanup = |err: StagerError| {
            let _ = std::fs::remove_file(&temp);
            err
        };
        flock(&file, libc::LOCK_EX).map_err(|e| cleanup(StagerError::io("locking", &temp, e)))?;
        let capacity = capacity_of(data_len);
        let total = page_size() + capacity;
        // SAFETY: posix_fallocate on a descriptor we own; it returns an errno, not -1.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
        if rc != 0 {
            return Err(cleanup(no_space(
                path,
                total,
                std::io::Error::from_raw_os_error(rc),
            )));
        }
        let lock = Arc::new(SegmentLock::new(file, &temp).map_err(cleanup)?);
        let buffer =
            buffer_over(lock.clone(), capacity, data_len, true, &temp, pinner).map_err(cleanup)?;
        Ok(SegmentWriter {
            temp,
            path: path.to_path_buf(),
            lock,
            data_len,
            address: buffer.as_ptr() as usize,
            buffer: Some(buffer),
            published: false,
        })
    }

    /// Like [`SegmentWriter::create`], reusing the file of an older generation `old` (its pages
    /// are already allocated: no zeroing, no new memory): `old` is renamed to the new temp
    /// name and resized. Returns `None` (nothing changed) when `old` is gone or still mapped by
    /// this process or locked by another.
    pub fn recycle(
        old: &Path,
        path: &Path,
        data_len: usize,
        pinner: Option<Arc<dyn MemoryPinner>>,
    ) -> Result<Option<SegmentWriter>> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(old)
        {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
        let meta = file
            .metadata()
            .map_err(|e| StagerError::io("inspecting segment", old, e))?;
        if held()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(meta.dev(), meta.ino()))
            || flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err()
        {
            return Ok(None);
        }
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{}.tmp", std::process::id()));
        let temp = PathBuf::from(name);
        std::fs::rename(old, &temp).map_err(|e| StagerError::io("recycling segment", old, e))?;
        let cleanup = |err: StagerError| {
            let _ = std::fs::remove_file(&temp);
            err
        };
        // Never mistaken for a published segment, whatever happens next.
        file.write_all_at(&[0u8; 8], 0)
            .map_err(|e| cleanup(StagerError::io("recycling segment", &temp, e)))?;
        let capacity = capacity_of(data_len);
        let total = page_size() + capacity;
        if meta.len() > total as u64 {
            file.set_len(total as u64)
                .map_err(|e| cleanup(StagerError::io("resizing segment", &temp, e)))?;
        }
        // SAFETY: posix_fallocate on a descriptor we own; it returns an errno, not -1.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
        if rc != 0 {
            return Err(cleanup(no_space(
                path,
                total,
                std::io::Error::from_raw_os_error(rc),
            )));
        }
        let lock = Arc::new(SegmentLock::new(file, &temp).map_err(cleanup)?);
        let buffer =
            buffer_over(lock.clone(), capacity, data_len, true, &temp, pinner).map_err(cleanup)?;
        Ok(Some(SegmentWriter {
            temp,
            path: path.to_path_buf(),
            lock,
            data_len,
            address: buffer.as_ptr() as usize,
            buffer: Some(buffer),
            published: false,
        }))
    }

    /// The buffer over the data region, until [`SegmentWriter::take_buffer`].
    pub fn buffer_mut(&mut self) -> Option<&mut HostBuffer> {
        self.buffer.as_mut()
    }

    /// Hands the data buffer to the caller (it keeps the segment locked while it lives).
    pub fn take_buffer(&mut self) -> Option<HostBuffer> {
        self.buffer.take()
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Checksums `ranges` of `data` (the segment's own buffer, every copy into it complete),
    /// writes the record and the header, and renames the segment to its final name. Afterwards
    /// the lock is shared: other processes may open the segment, none may remove it while a
    /// buffer over it lives. On failure the temp file is removed; the final name is untouched.
    pub fn publish(
        &mut self,
        data: &HostBuffer,
        record: &[u8],
        ranges: &[(u64, u64)],
    ) -> Result<()> {
        if self.published {
            return Err(StagerError::invalid("segment already published"));
        }
        let result = self.publish_inner(data, record, ranges);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.temp);
            self.published = true; // nothing left to abort
        }
        result
    }

    fn publish_inner(
        &mut self,
        data: &HostBuffer,
        record: &[u8],
        ranges: &[(u64, u64)],
    ) -> Result<()> {
        if data.len() != self.data_len || data.as_ptr() as usize != self.address {
            return Err(StagerError::invalid(
                "publish() needs the segment's own buffer",
            ));
        }
        let bytes = data.as_slice();
        for &(offset, len) in ranges {
            if offset
                .checked_add(len)
                .map_or(true, |end| end > bytes.len() as u64)
            {
                return Err(StagerError::invalid(format!(
                    "range [{offset}, +{len}) lies outside the segment's {} bytes",
                    bytes.len()
                )));
            }
        }
        let crcs = checksums(bytes, ranges);
        let mut tail = Vec::with_capacity(record.len() + ranges.len() * RANGE_BYTES);
        tail.extend_from_slice(record);
        for (&(offset, len), crc) in ranges.iter().zip(&crcs) {
            tail.extend_from_slice(&offset.to_le_bytes());
            tail.extend_from_slice(&len.to_le_bytes());
            tail.extend_from_slice(&crc.to_le_bytes());
            tail.extend_from_slice(&0u32.to_le_bytes());
        }
        let record_at = page_size() + capacity_of(self.data_len);
        let file = &self.lock.file;
        let end = record_at + tail.len();
        // SAFETY: posix_fallocate on a descriptor we own; it returns an errno, not -1.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, end as libc::off_t) };
        if rc != 0 {
            return Err(no_space(
                &self.path,
                end,
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        file.write_all_at(&tail, record_at as u64)
            .map_err(|e| no_space(&self.path, end, e))?;
        // A recycled file may be longer: the size is part of what a reader checks.
        file.set_len(end as u64)
            .map_err(|e| StagerError::io("resizing segment", &self.temp, e))?;
        let header = encode_header(self.data_len as u64, record, ranges.len() as u64, &tail);
        file.write_all_at(&header, 0)
            .map_err(|e| StagerError::io("writing segment header", &self.temp, e))?;
        std::fs::rename(&self.temp, &self.path)
            .map_err(|e| StagerError::io("publishing segment", &self.path, e))?;
        self.published = true;
        // Readers may share it from now on; removers still can't take it.
        flock(file, libc::LOCK_SH).map_err(|e| StagerError::io("locking", &self.path, e))?;
        Ok(())
    }

    /// Drops the segment being written (the temp file); the final name is untouched.
    pub fn abort(mut self) {
        self.remove_temp();
    }

    fn remove_temp(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.temp);
            self.published = true;
        }
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        self.remove_temp();
    }
}

fn encode_header(data_len: u64, record: &[u8], nranges: u64, tail: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_FIELDS);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&data_len.to_le_bytes());
    h.extend_from_slice(&(record.len() as u64).to_le_bytes());
    h.extend_from_slice(&nranges.to_le_bytes());
    h.extend_from_slice(&crc32c::crc32c(tail).to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Bytes one thread checksums at a time: ranges are split into pieces this large so that one
/// large storage is spread over every thread too.
const CHECK_PIECE: usize = 4 << 20;

/// crc32c of each range, its pieces spread over a few threads and combined per range.
fn checksums(bytes: &[u8], ranges: &[(u64, u64)]) -> Vec<u32> {
    // (range, offset in it, length) of every piece, in order.
    let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
    for (index, &(_, len)) in ranges.iter().enumerate() {
        let len = len as usize;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHECK_PIECE);
            pieces.push((index, at, n));
            at += n;
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let sums = crate::direct_io::for_each_piece(pieces.len(), threads, |i, _: &mut ()| {
        let (range, at, n) = pieces[i];
        let start = ranges[range].0 as usize + at;
        Ok::<_, std::convert::Infallible>(crc32c::crc32c(&bytes[start..start + n]))
    });
    let sums = match sums {
        Ok(sums) => sums,
        Err(never) => match never {},
    };
    crate::direct_io::combine_crc32c(
        ranges.len(),
        pieces
            .iter()
            .zip(sums)
            .map(|(&(range, _, n), crc)| (range, crc, n)),
    )
}

/// A published segment, opened: its record, checked ranges and a private (copy-on-write)
/// mapping of its data. The segment stays locked (shared) while the buffer lives.
pub struct OpenedSegment {
    /// The caller's record bytes.
    pub record: Vec<u8>,
    /// `(offset, length, crc32c)` of each checked range of the data.
    pub ranges: Vec<(u64, u64, u32)>,
    /// The data, mapped privately: writes through it never reach the segment.
    pub buffer: HostBuffer,
    /// Where it was opened.
    pub path: PathBuf,
}

impl OpenedSegment {
    /// Recomputes every range's crc32c; names the first that differs.
    pub fn verify(&self) -> Result<()> {
        verify_ranges(self.buffer.as_slice(), &self.ranges, &self.path)
    }
}

/// Recomputes the crc32c of each `(offset, length, crc)` range of `bytes` (the data of the
/// segment at `path`); names the first that differs.
pub fn verify_ranges(bytes: &[u8], ranges: &[(u64, u64, u32)], path: &Path) -> Result<()> {
    let plain: Vec<(u64, u64)> = ranges.iter().map(|&(o, l, _)| (o, l)).collect();
    if plain.iter().any(|&(o, l)| {
        o.checked_add(l)
            .map_or(true, |end| end > bytes.len() as u64)
    }) {
        return Err(StagerError::invalid(
            "a checked range lies outside the data",
        ));
    }
    let crcs = checksums(bytes, &plain);
    for (i, (&(offset, len, want), got)) in ranges.iter().zip(crcs).enumerate() {
        if want != got {
            return Err(StagerError::InvalidFile {
                path: path.to_path_buf(),
                reason: format!(
                    "range {i} (bytes {offset}..{}) fails its crc32c checksum (recorded {want:#010x}, \
                     computed {got:#010x})",
                    offset + len
                ),
            });
        }
    }
    Ok(())
}

/// The record of a published segment (header checked, data not read).
pub fn read_record(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| StagerError::io("opening segment", path, e))?;
    Ok(read_header(&file, path)?.record)
}

struct Parsed {
    data_len: usize,
    record: Vec<u8>,
    ranges: Vec<(u64, u64, u32)>,
}

fn read_header(file: &File, path: &Path) -> Result<Parsed> {
    let bad = |reason: String| StagerError::InvalidFile {
        path: path.to_path_buf(),
        reason,
    };
    let size = file
        .metadata()
        .map_err(|e| StagerError::io("inspecting segment", path, e))?
        .len();
    let mut h = [0u8; HEADER_FIELDS];
    file.read_exact_at(&mut h, 0).map_err(|_| {
        bad(format!(
            "truncated: {size} bytes, shorter than a segment header"
        ))
    })?;
    if &h[..8] != MAGIC {
        return Err(bad("not a stager shared-memory segment (bad magic)".into()));
    }
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if crc32c::crc32c(&h[..HEADER_FIELDS - 4]) != u32_at(HEADER_FIELDS - 4) {
        return Err(bad("the header fails its checksum".into()));
    }
    let version = u32_at(8);
    if version != VERSION {
        return Err(bad(format!(
            "segment layout version {version}, this stager reads {VERSION}"
        )));
    }
    let (data_len, record_len, nranges) = (u64_at(16), u64_at(24), u64_at(32));
    if record_len > MAX_RECORD_BYTES || nranges > MAX_RANGES || data_len > isize::MAX as u64 / 2 {
        return Err(bad("header sizes out of range".into()));
    }
    let record_at = (page_size() + capacity_of(data_len as usize)) as u64;
    let tail_len = record_len + nranges * RANGE_BYTES as u64;
    if size != record_at + tail_len {
        return Err(bad(format!(
            "truncated or extended: {size} bytes, its header describes {}",
            record_at + tail_len
        )));
    }
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut tail, record_at)
        .map_err(|e| StagerError::io("reading segment", path, e))?;
    if crc32c::crc32c(&tail) != u32_at(40) {
        return Err(bad("its record fails its checksum".into()));
    }
    let record = tail[..record_len as usize].to_vec();
    let mut ranges = Vec::with_capacity(nranges as usize);
    for chunk in tail[record_len as usize..].chunks_exact(RANGE_BYTES) {
        let offset = u64::from_le_bytes(chunk[0..8].try_into().expect("8"));
        let len = u64::from_le_bytes(chunk[8..16].try_into().expect("8"));
        let crc = u32::from_le_bytes(chunk[16..20].try_into().expect("4"));
        if offset.checked_add(len).map_or(true, |end| end > data_len) {
            return Err(bad(format!(
                "a checked range lies outside its {data_len} data bytes"
            )));
        }
        ranges.push((offset, len, crc));
    }
    Ok(Parsed {
        data_len: data_len as usize,
        record,
        ranges,
    })
}

/// Opens a published segment: header and record checked, data mapped privately (copy-on-write)
/// and locked shared. Checksums are checked by [`OpenedSegment::verify`].
pub fn open_segment(path: &Path) -> Result<OpenedSegment> {
    let file = File::open(path).map_err(|e| StagerError::io("opening segment", path, e))?;
    let parsed = read_header(&file, path)?;
    flock(&file, libc::LOCK_SH | libc::LOCK_NB)
        .map_err(|e| StagerError::io("locking segment (being removed?)", path, e))?;
    let lock = Arc::new(SegmentLock::new(file, path)?);
    let buffer = buffer_over(
        lock,
        capacity_of(parsed.data_len),
        parsed.data_len,
        false,
        path,
        None,
    )?;
    Ok(OpenedSegment {
        record: parsed.record,
        ranges: parsed.ranges,
        buffer,
        path: path.to_path_buf(),
    })
}

/// Removes a segment (or a temp file of one) unless another live process holds it: returns the
/// bytes freed, `None` when it is in use elsewhere (left alone), `Some(0)` when it is gone.
/// Segments this process holds are removed (their mappings stay valid until dropped).
pub fn remove_segment(path: &Path) -> Result<Option<u64>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(0)),
        Err(e) => return Err(StagerError::io("opening segment", path, e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| StagerError::io("inspecting segment", path, e))?;
    let ours = held()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&(meta.dev(), meta.ino()));
    if !ours {
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(None),
            Err(e) => return Err(StagerError::io("locking segment", path, e)),
        }
    }
    let freed = meta.blocks() * 512;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(Some(freed)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(0)),
        Err(e) => Err(StagerError::io("removing segment", path, e)),
    }
}

/// Whether a live process (this one included) holds the segment's lock.
pub fn in_use(path: &Path) -> Result<bool> {
    let file = File::open(path).map_err(|e| StagerError::io("opening segment", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| StagerError::io("inspecting segment", path, e))?;
    if held()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&(meta.dev(), meta.ino()))
    {
        return Ok(true);
    }
    match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(true),
        Err(e) => Err(StagerError::io("locking segment", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("stager-shm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        Dir(d)
    }

    fn publish(path: &Path, data: &[u8], record: &[u8]) -> HostBuffer {
        let mut w = SegmentWriter::create(path, data.len(), None).unwrap();
        w.buffer_mut().unwrap().as_mut_slice().copy_from_slice(data);
        let buffer = w.take_buffer().unwrap();
        let half = (data.len() / 2) as u64;
        w.publish(
            &buffer,
            record,
            &[(0, half), (half, data.len() as u64 - half)],
        )
        .unwrap();
        buffer
    }

    #[test]
    fn published_segment_reopens_with_its_bytes_and_record() {
        let d = dir("roundtrip");
        let path = d.0.join("a.seg");
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        drop(publish(&path, &data, b"{\"step\":3}"));
        assert!(!in_use(&path).unwrap());
        let opened = open_segment(&path).unwrap();
        opened.verify().unwrap();
        assert_eq!(opened.buffer.as_slice(), &data[..]);
        assert_eq!(opened.record, b"{\"step\":3}");
        assert_eq!(read_record(&path).unwrap(), b"{\"step\":3}");
        assert!(
            std::fs::read_dir(&d.0).unwrap().count() == 1,
            "no temp left"
        );
    }

    #[test]
    fn a_flipped_data_byte_fails_verify_and_truncation_fails_open() {
        let d = dir("damage");
        let path = d.0.join("a.seg");
        drop(publish(&path, &[7u8; 5000], b"r"));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[8], page_size() as u64 + 4000).unwrap();
        let err = open_segment(&path).unwrap().verify().unwrap_err();
        assert!(err.to_string().contains("range 1"), "{err}");
        file.set_len(page_size() as u64 + 100).unwrap();
        let err = open_segment(&path).err().unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn an_unpublished_segment_is_invisible_and_removed_on_abort() {
        let d = dir("abort");
        let path = d.0.join("a.seg");
        let w = SegmentWriter::create(&path, 100, None).unwrap();
        let temp = w.temp_path().to_path_buf();
        assert!(temp.exists() && !path.exists());
        w.abort();
        assert!(!temp.exists() && !path.exists());
    }

    #[test]
    fn a_segment_held_by_this_process_is_in_use_and_removal_frees_it() {
        let d = dir("held");
        let path = d.0.join("a.seg");
        let buffer = publish(&path, &[1u8; 3 << 12], b"r");
        assert!(in_use(&path).unwrap());
        let freed = remove_segment(&path).unwrap().unwrap();
        assert!(freed >= 3 << 12, "{freed}");
        assert_eq!(buffer.as_slice()[5], 1, "the mapping outlives the name");
    }

    #[test]
    fn a_segment_locked_by_another_holder_is_left_alone() {
        let d = dir("other");
        let path = d.0.join("a.seg");
        drop(publish(&path, &[2u8; 100], b"r"));
        // Another open file description holding the shared lock: what a live process's is.
        let other = File::open(&path).unwrap();
        flock(&other, libc::LOCK_SH).unwrap();
        assert!(in_use(&path).unwrap());
        assert_eq!(remove_segment(&path).unwrap(), None);
        assert!(path.exists());
        drop(other);
        assert!(remove_segment(&path).unwrap().unwrap() > 0);
        assert!(!path.exists());
        assert_eq!(remove_segment(&path).unwrap(), Some(0));
    }

    #[test]
    fn an_older_generation_is_recycled_only_when_nobody_maps_it() {
        let d = dir("recycle");
        let (old, new) = (d.0.join("s1.seg"), d.0.join("s3.seg"));
        let held = publish(&old, &[3u8; 20_000], b"old");
        assert!(SegmentWriter::recycle(&old, &new, 5000, None)
            .unwrap()
            .is_none());
        drop(held);
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut w = SegmentWriter::recycle(&old, &new, data.len(), None)
            .unwrap()
            .expect("recyclable");
        assert!(!old.exists());
        w.buffer_mut()
            .unwrap()
            .as_mut_slice()
            .copy_from_slice(&data);
        let buffer = w.take_buffer().unwrap();
        w.publish(&buffer, b"new", &[(0, 5000)]).unwrap();
        drop(buffer);
        let opened = open_segment(&new).unwrap();
        opened.verify().unwrap();
        assert_eq!(
            (opened.buffer.as_slice(), &opened.record[..]),
            (&data[..], &b"new"[..])
        );
    }

    #[test]
    fn checksums_split_into_pieces_match_one_pass_over_each_range() {
        let len = 3 * CHECK_PIECE + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
        let ranges = [
            (0u64, len as u64),
            (7, 0),
            (100, CHECK_PIECE as u64 + 1),
            (len as u64 - 5, 5),
        ];
        let expected: Vec<u32> = ranges
            .iter()
            .map(|&(o, l)| crc32c::crc32c(&data[o as usize..(o + l) as usize]))
            .collect();
        assert_eq!(checksums(&data, &ranges), expected);
    }

    #[test]
    fn a_missing_directory_is_named() {
        let err = SegmentWriter::create(Path::new("/nonexistent-stager-dir/a.seg"), 10, None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent-stager-dir"), "{err}");
    }
}
