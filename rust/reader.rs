//! Reader: opens a stager file, validates its header, reads its buffers into host memory.
//!
//! [`CheckpointFile::open`] reads the 8-byte length and the header only (bounded by
//! [`crate::format::MAX_STAGER_HEADER_BYTES`] and by the file's size, so a hostile length cannot make it
//! allocate), and validates it ([`crate::format::parse_header`]). [`CheckpointFile::read_into`]
//! then reads the stored buffers straight into the caller's memory (a buffer of the process-wide
//! host pool, at offsets the Python side chose from the validated tree) and checks each crc32c:
//!
//! - **Direct I/O.** A staged buffer and the file's data section have the same layout (storages
//!   at 64-byte boundaries from a page-aligned start), so the data section is one run read with
//!   `O_DIRECT` (a second descriptor of the same open file, so a concurrent rename of the path
//!   cannot swap the file under us) into the page-aligned buffer, in [`IO_CHUNK`] requests,
//!   [`IO_DEPTH`] in flight; unaligned heads and tails (other layouts) are read through the page
//!   cache, and the file's last partial block is read whole when the buffer's capacity has room.
//!   Pieces whose pages are all in the page cache already (a file just written buffered, or read
//!   by someone else) are copied from it instead (`mincore`), which is faster than the device.
//!   Filesystems without direct I/O ([`crate::direct_io::probe`]) are read buffered.
//! - **Fused checksums.** Each piece's thread folds its bytes into their storages' crc32c right
//!   after they land (while the next requests are in flight); the per-piece checksums are
//!   combined at the end (`crc32c_combine`).
//!
//! [`CheckpointFile::verify`] checks every checksum without keeping the data, for
//! `stager verify`.
//!
//! # Example
//! ```no_run
//! use stager::reader::CheckpointFile;
//! let file = CheckpointFile::open("model.safetensors".as_ref()).unwrap();
//! let problems = file.verify().unwrap();
//! assert!(problems.is_empty(), "{problems:?}");
//! ```
//!
//! # Thread Safety
//! `Send + Sync`; reads use `pread`, so several threads may read one file at once.

use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::direct_io::{
    self, combine_crc32c, for_each_piece, IoMode, ThreadChunk, IO_CHUNK, IO_DEPTH,
};
use crate::error::{Result, StagerError};
use crate::format::{self, Header, Layout};

/// Consecutive storages read as one range.
struct Run {
    file_start: u64,
    file_end: u64,
    dst_start: usize,
    len: usize,
    storages: Vec<usize>,
}

/// One `pread` of a run.
struct Piece {
    run: usize,
    offset: usize,
    len: usize,
}

/// An open, header-validated stager (or safetensors) file.
pub struct CheckpointFile {
    file: File,
    path: PathBuf,
    file_len: u64,
    header: Header,
}

impl CheckpointFile {
    /// Opens `path` and validates its header. Fails with [`StagerError::InvalidFile`] saying what
    /// is wrong, or [`StagerError::Io`].
    pub fn open(path: &Path) -> Result<CheckpointFile> {
        // O_NONBLOCK: opening a FIFO must not wait for a writer (it is rejected just below).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|err| StagerError::io("opening", path, err))?;
        let meta = file
            .metadata()
            .map_err(|err| StagerError::io("reading the size of", path, err))?;
        if !meta.is_file() {
            return Err(invalid(path, "not a regular file".into()));
        }
        let file_len = meta.len();
        if file_len < 8 {
            return Err(invalid(
                path,
                format!("the file holds {file_len} bytes, too few for a safetensors header"),
            ));
        }
        let mut prefix = [0u8; 8];
        pread_slice(&file, &mut prefix, 0).map_err(|err| StagerError::io("reading", path, err))?;
        let header_len = format::header_len(&prefix, file_len).map_err(|r| invalid(path, r))?;
        let mut json = vec![0u8; header_len as usize];
        pread_slice(&file, &mut json, 8).map_err(|err| StagerError::io("reading", path, err))?;
        let header = format::parse_header(&json, file_len).map_err(|r| invalid(path, r))?;
        Ok(CheckpointFile {
            file,
            path: path.to_path_buf(),
            file_len,
            header,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The stager metadata (tree, storages, checksums), checked against the entries.
    pub fn layout(&self) -> Result<Layout> {
        format::stager_layout(&self.header).map_err(|r| invalid(&self.path, r))
    }

    /// Reads storage i's bytes to `dst + offsets[i]` for every storage, checking each crc32c when
    /// `verify`; returns how the bytes were read. Checks that every range lies inside `dst_len`
    /// and that no two overlap.
    ///
    /// Storages laid out in the buffer as in the file (the usual case: both align to 64 bytes)
    /// are read as one run, gaps included, so a file of 20,000 tensors takes a few large reads;
    /// runs are cut into [`IO_CHUNK`] pieces read by up to [`IO_DEPTH`] threads, directly where
    /// memory and file line up (see the module docs). The bytes of `[dst + dst_len, dst +
    /// dst_capacity)` may be overwritten (by the rest of the file's last block).
    ///
    /// # Safety
    /// `dst` must point to `dst_capacity >= dst_len` writable bytes that nothing else reads or
    /// writes during the call.
    pub unsafe fn read_into(
        &self,
        dst: *mut u8,
        dst_len: usize,
        dst_capacity: usize,
        offsets: &[usize],
        verify: bool,
    ) -> Result<IoMode> {
        let layout = self.layout()?;
        let storages = &layout.storages;
        if offsets.len() != storages.len() {
            return Err(invalid(
                &self.path,
                format!(
                    "{} target offsets for {} storages",
                    offsets.len(),
                    storages.len()
                ),
            ));
        }
        for (index, (storage, &offset)) in storages.iter().zip(offsets).enumerate() {
            let fits = usize::try_from(storage.nbytes)
                .ok()
                .and_then(|n| offset.checked_add(n))
                .is_some_and(|end| end <= dst_len);
            if !fits {
                return Err(invalid(
                    &self.path,
                    format!(
                        "storage {index} ({} bytes) does not fit the {dst_len}-byte buffer at offset {offset}",
                        storage.nbytes
                    ),
                ));
            }
        }
        let dst_capacity = dst_capacity.max(dst_len);
        // Runs: consecutive non-empty storages whose target offsets advance exactly like their
        // file offsets. A run is read as one range, the file's padding landing in the buffer's.
        let mut runs: Vec<Run> = Vec::new();
        for (index, (storage, &offset)) in storages.iter().zip(offsets).enumerate() {
            if storage.nbytes == 0 {
                continue;
            }
            let nbytes = storage.nbytes as usize;
            if let Some(run) = runs.last_mut() {
                let file_gap = storage.offset.checked_sub(run.file_end);
                let dst_gap = offset.checked_sub(run.dst_start + run.len);
                if file_gap.is_some()
                    && file_gap.map(|g| g as usize) == dst_gap
                    && dst_gap < Some(crate::layout::STORAGE_ALIGNMENT)
                {
                    run.len = offset + nbytes - run.dst_start;
                    run.file_end = storage.offset + storage.nbytes;
                    run.storages.push(index);
                    continue;
                }
            }
            runs.push(Run {
                file_start: storage.offset,
                file_end: storage.offset + storage.nbytes,
                dst_start: offset,
                len: nbytes,
                storages: vec![index],
            });
        }
        let mut spans: Vec<(usize, usize)> = runs
            .iter()
            .map(|r| (r.dst_start, r.dst_start + r.len))
            .collect();
        spans.sort_unstable();
        if spans.windows(2).any(|pair| pair[0].1 > pair[1].0) {
            return Err(invalid(&self.path, "target ranges overlap".into()));
        }
        // How far past its end each run may be overwritten: up to the next run's start (in the
        // buffer), or the buffer's capacity after the last.
        let mut room_after = vec![0usize; runs.len()];
        let mut by_start: Vec<usize> = (0..runs.len()).collect();
        by_start.sort_unstable_by_key(|&r| runs[r].dst_start);
        for (rank, &r) in by_start.iter().enumerate() {
            let end = runs[r].dst_start + runs[r].len;
            let limit = by_start
                .get(rank + 1)
                .map_or(dst_capacity, |&next| runs[next].dst_start);
            room_after[r] = limit - end;
        }
        // Pieces: runs cut into IO_CHUNK reads, in file order; cuts at block boundaries of the
        // file so that every piece but a run's first and last is a whole-block direct read.
        let mut pieces: Vec<Piece> = Vec::new();
        for (run_index, run) in runs.iter().enumerate() {
            let mut done = 0;
            while done < run.len {
                let file_at = run.file_start + done as u64;
                let next_cut = (file_at / IO_CHUNK as u64 + 1) * IO_CHUNK as u64;
                let len = ((next_cut - file_at) as usize).min(run.len - done);
                pieces.push(Piece {
                    run: run_index,
                    offset: done,
                    len,
                });
                done += len;
            }
        }
        let source = self.data_source();
        let direct = AtomicBool::new(source.direct.is_some());
        let base = dst as usize;
        let sums = for_each_piece(pieces.len(), IO_DEPTH, |index, _: &mut ()| {
            let piece = &pieces[index];
            let run = &runs[piece.run];
            let start = run.dst_start + piece.offset;
            let last_of_run = piece.offset + piece.len == run.len;
            let room = if last_of_run {
                room_after[piece.run]
            } else {
                0
            };
            let file_at = run.file_start + piece.offset as u64;
            // SAFETY: `[start, start + len + room)` lies inside the caller's buffer (each
            // storage was checked to fit, a run ends with a storage, and `room` stops at the
            // next run or the capacity); runs are disjoint and each piece is claimed by one
            // thread (`for_each_piece`).
            unsafe { source.read((base + start) as *mut u8, piece.len, room, file_at, &direct) }
                .map_err(|err| self.read_error(err))?;
            // Fold in the part of each storage of the run this piece holds.
            let mut parts = Vec::new();
            if verify {
                // SAFETY: as above; the bytes were just read by this thread.
                let target =
                    unsafe { std::slice::from_raw_parts((base + start) as *const u8, piece.len) };
                for &storage_index in &run.storages {
                    let s_start = offsets[storage_index];
                    let s_end = s_start + storages[storage_index].nbytes as usize;
                    let lo = s_start.max(start);
                    let hi = s_end.min(start + piece.len);
                    if lo < hi {
                        let crc = crc32c::crc32c(&target[lo - start..hi - start]);
                        parts.push((storage_index, crc, hi - lo));
                    }
                }
            }
            Ok(parts)
        })?;
        if verify {
            let crcs = combine_crc32c(storages.len(), sums.into_iter().flatten());
            for (index, storage) in storages.iter().enumerate() {
                if crcs[index] != storage.crc32c {
                    return Err(self.checksum_error(
                        index,
                        &storage.entry,
                        storage.crc32c,
                        crcs[index],
                    ));
                }
            }
        }
        Ok(if direct.load(Ordering::Relaxed) {
            source.mode
        } else {
            IoMode::Buffered
        })
    }

    /// Checks every storage's crc32c; returns one line per damaged storage (empty: all good).
    /// Reads the data section in [`IO_CHUNK`] pieces (directly where possible) into one scratch
    /// buffer per thread, [`IO_DEPTH`] threads, folding each piece into its storages' checksums.
    pub fn verify(&self) -> Result<Vec<String>> {
        let layout = self.layout()?;
        let storages = &layout.storages;
        let source = self.data_source();
        let direct = AtomicBool::new(source.direct.is_some());
        // Storages by file offset (another writer's file need not keep storage order).
        let mut by_offset: Vec<usize> = (0..storages.len())
            .filter(|&i| storages[i].nbytes > 0)
            .collect();
        by_offset.sort_unstable_by_key(|&i| storages[i].offset);
        let (data_start, data_end) = (self.header.data_start, self.file_len);
        let pieces = (data_end - data_start).div_ceil(IO_CHUNK as u64) as usize;
        let sums = for_each_piece(pieces, IO_DEPTH, |index, scratch: &mut ThreadChunk| {
            let scratch = scratch
                .at_least(IO_CHUNK, IO_CHUNK)
                .map_err(|err| StagerError::io("allocating a read buffer for", &self.path, err))?;
            let at = data_start + (index * IO_CHUNK) as u64;
            let len = (IO_CHUNK as u64).min(data_end - at) as usize;
            // SAFETY: the scratch holds IO_CHUNK bytes and belongs to this thread; the room
            // after a short last piece lies inside it too.
            unsafe { source.read(scratch.as_ptr(), len, IO_CHUNK - len, at, &direct) }
                .map_err(|err| self.read_error(err))?;
            let bytes = scratch.slice_mut(len);
            let end = at + len as u64;
            let first =
                by_offset.partition_point(|&i| storages[i].offset + storages[i].nbytes <= at);
            let mut parts = Vec::new();
            for &i in &by_offset[first..] {
                let storage = &storages[i];
                if storage.offset >= end {
                    break;
                }
                let lo = storage.offset.max(at);
                let hi = (storage.offset + storage.nbytes).min(end);
                let part = &bytes[(lo - at) as usize..(hi - at) as usize];
                parts.push((i, crc32c::crc32c(part), part.len()));
            }
            Ok(parts)
        })?;
        let crcs = combine_crc32c(storages.len(), sums.into_iter().flatten());
        let mut problems = Vec::new();
        for (index, storage) in storages.iter().enumerate() {
            let computed = crcs[index];
            if computed != storage.crc32c {
                problems.push(
                    self.checksum_error(index, &storage.entry, storage.crc32c, computed)
                        .to_string(),
                );
            }
        }
        Ok(problems)
    }

    fn advise_sequential(&self) {
        // SAFETY: advice on our own descriptor; failure changes nothing.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }

    /// The descriptors data is read through: this file, and a direct-I/O descriptor of the
    /// same open file where the filesystem supports it.
    fn data_source(&self) -> DataSource<'_> {
        open_data_source(&self.file, self.file_len)
    }

    fn read_error(&self, err: io::Error) -> StagerError {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            invalid(
                &self.path,
                "the file ended early (truncated while reading?)".into(),
            )
        } else {
            StagerError::io("reading", &self.path, err)
        }
    }

    fn checksum_error(&self, index: usize, entry: &str, stored: u32, computed: u32) -> StagerError {
        invalid(
            &self.path,
            format!(
                "crc32c checksum mismatch in storage {index} (entry {entry:?}): the file records {stored:08x}, its bytes give {computed:08x}; the data is corrupted"
            ),
        )
    }
}

/// One storage to read by [`CheckpointFile::read_storages`], and where its bytes go.
#[derive(Clone, Copy, Debug)]
pub struct StorageTarget {
    /// Index of the storage in the file's layout (`stager.storages` order).
    pub storage: usize,
    /// Where its `nbytes` bytes go.
    pub dst: *mut u8,
}

// SAFETY: a plain address; `read_storages`' contract makes it writable from any thread.
unsafe impl Send for StorageTarget {}
// SAFETY: as above; the reading threads each claim disjoint pieces of the targets.
unsafe impl Sync for StorageTarget {}

impl CheckpointFile {
    /// Reads some of the file's storages, each to its own place (a destination tensor's memory,
    /// a scratch buffer), with up to [`IO_DEPTH`] threads in [`IO_CHUNK`] pieces, folding each
    /// piece into its storage's crc32c while it is in cache when `verify`. Buffered reads: the
    /// destinations are arbitrary memory (a tensor's), not aligned for direct I/O.
    ///
    /// This is what a reader serving partial read plans needs (dcp's `read_data`): storages it
    /// does not need are not read, and the ones read whole into their destination need no
    /// second copy. Returns the indices of the storages whose checksum does not match (empty:
    /// all intact, or `verify` off), so the caller can name the items they hold.
    ///
    /// # Safety
    /// Every `dst` must point to that storage's `nbytes` writable bytes that nothing else reads
    /// or writes during the call; the ranges of different targets must not overlap.
    pub unsafe fn read_storages(
        &self,
        targets: &[StorageTarget],
        verify: bool,
    ) -> Result<Vec<usize>> {
        let layout = self.layout()?;
        let storages = &layout.storages;
        let mut seen = vec![false; storages.len()];
        for target in targets {
            let Some(flag) = seen.get_mut(target.storage) else {
                return Err(invalid(
                    &self.path,
                    format!(
                        "storage {} asked for, the file has {}",
                        target.storage,
                        storages.len()
                    ),
                ));
            };
            if std::mem::replace(flag, true) {
                return Err(invalid(
                    &self.path,
                    format!("storage {} asked for twice", target.storage),
                ));
            }
            if storages[target.storage].nbytes > 0 && target.dst.is_null() {
                return Err(invalid(
                    &self.path,
                    format!("storage {} has a null target", target.storage),
                ));
            }
        }
        // Pieces in file order, so the disk sees mostly sequential reads.
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_unstable_by_key(|&k| storages[targets[k].storage].offset);
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new(); // (target, offset, len)
        for &k in &order {
            let nbytes = storages[targets[k].storage].nbytes as usize;
            let mut done = 0;
            while done < nbytes {
                let len = (nbytes - done).min(IO_CHUNK);
                pieces.push((k, done, len));
                done += len;
            }
        }
        self.advise_sequential();
        let sums = for_each_piece(pieces.len(), IO_DEPTH, |index, _: &mut ()| {
            let (k, offset, len) = pieces[index];
            let target = targets[k];
            let storage = &storages[target.storage];
            // SAFETY: `offset + len <= nbytes` of this storage, whose bytes at `dst` are ours
            // to write (function contract); each piece is claimed by one thread
            // (`for_each_piece`).
            let bytes = unsafe { std::slice::from_raw_parts_mut(target.dst.add(offset), len) };
            pread_slice(&self.file, bytes, storage.offset + offset as u64)
                .map_err(|err| self.read_error(err))?;
            Ok(if verify { crc32c::crc32c(bytes) } else { 0 })
        })?;
        if !verify {
            return Ok(Vec::new());
        }
        // Pieces of one target are consecutive and in order.
        let crcs = combine_crc32c(
            targets.len(),
            pieces
                .iter()
                .zip(sums)
                .map(|(&(k, _, len), crc)| (k, crc, len)),
        );
        let mut damaged: Vec<usize> = targets
            .iter()
            .zip(&crcs)
            .filter(|(target, &crc)| storages[target.storage].crc32c != crc)
            .map(|(target, _)| target.storage)
            .collect();
        damaged.sort_unstable();
        Ok(damaged)
    }
}

fn invalid_data(path: &Path, reason: String) -> StagerError {
    StagerError::InvalidData {
        path: path.to_path_buf(),
        reason,
    }
}

fn invalid(path: &Path, reason: String) -> StagerError {
    StagerError::InvalidFile {
        path: path.to_path_buf(),
        reason,
    }
}

/// Where a read's bytes come from: the buffered descriptor, a direct one, and which pages are
/// in the page cache.
struct DataSource<'a> {
    buffered: &'a File,
    direct: Option<File>,
    mode: IoMode,
    file_len: u64,
    cache: Option<PageCacheView>,
}

impl DataSource<'_> {
    /// Reads `len` bytes at file offset `offset` into `dst`, all of them (a file that ends
    /// first is an `UnexpectedEof` error). `room` more bytes after `dst + len` may be
    /// overwritten. Direct where memory and file line up and the pages are not cached already;
    /// a direct read the filesystem refuses clears `direct` and is redone buffered.
    ///
    /// # Safety
    /// `dst` must point to `len + room` writable bytes nothing else accesses during the call.
    unsafe fn read(
        &self,
        dst: *mut u8,
        len: usize,
        room: usize,
        offset: u64,
        direct: &AtomicBool,
    ) -> io::Result<()> {
        let end = offset + len as u64;
        if let (Some(file), true) = (&self.direct, direct.load(Ordering::Relaxed)) {
            let cached = self
                .cache
                .as_ref()
                .is_some_and(|c| c.all_resident(offset, end));
            let (mem_align, offset_align) = self.mode.alignment();
            let align = offset_align as u64;
            let lo = offset.div_ceil(align) * align;
            let mut hi = end / align * align;
            let lo_addr = (dst as usize).wrapping_add((lo - offset) as usize);
            // The file's last partial block, read whole when the buffer has room for it.
            if end == self.file_len && end % align != 0 {
                let whole = end.div_ceil(align) * align;
                if (whole - end) as usize <= room {
                    hi = whole;
                }
            }
            if !cached && hi > lo && lo_addr % mem_align == 0 {
                // SAFETY: `[lo, hi)` maps to `[lo_addr, lo_addr + (hi - lo))`, inside
                // `dst .. dst + len + room` (contract).
                let got = unsafe {
                    direct_io::pread_full(file, lo_addr as *mut u8, (hi - lo) as usize, lo)
                };
                match got {
                    Ok(n) => {
                        let wanted = (hi.min(end) - lo) as usize;
                        if n < wanted {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        // SAFETY: head and tail lie inside `dst .. dst + len` (contract).
                        unsafe {
                            pread_exact(self.buffered, dst, (lo - offset) as usize, offset)?;
                            let tail = hi.min(end);
                            pread_exact(
                                self.buffered,
                                dst.add((tail - offset) as usize),
                                (end - tail) as usize,
                                tail,
                            )?;
                        }
                        return Ok(());
                    }
                    Err(err) if direct_io::is_direct_refusal(&err) => {
                        direct.store(false, Ordering::Relaxed);
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        // SAFETY: `dst .. dst + len` is writable (contract).
        unsafe { pread_exact(self.buffered, dst, len, offset) }
    }
}

/// The descriptors data of `file` is read through: `file`, and a direct-I/O descriptor of the
/// same open file where the filesystem supports it.
fn open_data_source(file: &File, file_len: u64) -> DataSource<'_> {
    let mode = direct_io::probe(file);
    let direct = if mode.is_direct() {
        // /proc/self/fd reopens this very file (not whatever the path names now).
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok()
    } else {
        None
    };
    if direct.is_none() {
        // SAFETY: advice on our own descriptor; failure changes nothing.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }
    DataSource {
        buffered: file,
        direct,
        mode,
        file_len,
        cache: PageCacheView::map(file, file_len),
    }
}

/// Opens `path` for reading without blocking (a FIFO must not wait for a writer) and refuses
/// anything that is not a regular file, naming what it is.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| StagerError::io("opening", path, err))?;
    let meta = file
        .metadata()
        .map_err(|err| StagerError::io("reading the size of", path, err))?;
    if !meta.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(invalid_data(path, format!("{what}, not a regular file")));
    }
    Ok((file, meta.len()))
}

/// Records [`RecordFile::parse_records`] parses at once.
pub const PARSE_THREADS: usize = 16;

/// A data file of dcp's own format: consecutive `torch.save` records (tensor items) and raw
/// bytes (bytes items), as dcp's `FileSystemWriter` and [`crate::writer::write_records_uncommitted`]
/// write them.
///
/// # Thread Safety
/// `Send + Sync`; reads use `pread`.
pub struct RecordFile {
    file: File,
    path: PathBuf,
    file_len: u64,
}

/// One byte range of a [`RecordFile`] to read, where its bytes go and the crc32 they must have.
#[derive(Clone, Copy, Debug)]
pub struct RangeTarget {
    /// File offset of the first byte.
    pub offset: u64,
    /// Bytes to read.
    pub len: u64,
    /// Where they go.
    pub dst: *mut u8,
    /// The crc32 (zlib's) of the range, checked when given.
    pub crc32: Option<u32>,
}

// SAFETY: a plain address; `read_ranges`' contract makes it writable from any thread.
unsafe impl Send for RangeTarget {}
// SAFETY: as above; each piece of a target is written by one thread.
unsafe impl Sync for RangeTarget {}

impl RecordFile {
    /// Opens `path` (a regular file: see [`open_regular`]).
    pub fn open(path: &Path) -> Result<RecordFile> {
        let (file, file_len) = open_regular(path)?;
        Ok(RecordFile {
            file,
            path: path.to_path_buf(),
            file_len,
        })
    }

    /// The file's size.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.file_len)
        {
            return Err(invalid_data(
                &self.path,
                format!(
                    "the file holds {} bytes but an item lies at [{offset}, {}): the file is shorter than the metadata says (truncated?)",
                    self.file_len,
                    offset.saturating_add(len)
                ),
            ));
        }
        Ok(())
    }

    /// Parses the `torch.save` record at `[offset, offset + len)`.
    pub fn parse_record(&self, offset: u64, len: u64) -> Result<crate::torch_record::ParsedRecord> {
        self.check_bounds(offset, len)?;
        crate::torch_record::parse_record(&self.file, offset, len).map_err(|reason| {
            invalid_data(
                &self.path,
                format!("the torch.save record at {offset}: {reason}"),
            )
        })
    }

    /// [`RecordFile::parse_record`] of every `(offset, len)`, on up to [`PARSE_THREADS`]
    /// threads: each record costs a few small reads, which a cold file serves one seek each, so
    /// many run at once.
    pub fn parse_records(
        &self,
        ranges: &[(u64, u64)],
    ) -> Vec<Result<crate::torch_record::ParsedRecord>> {
        let parsed = for_each_piece(ranges.len(), PARSE_THREADS, |index, _: &mut ()| {
            let (offset, len) = ranges[index];
            Ok::<_, Infallible>(self.parse_record(offset, len))
        });
        match parsed {
            Ok(results) => results,
            Err(never) => match never {},
        }
    }

    /// Reads every target with up to [`IO_DEPTH`] threads in [`IO_CHUNK`] pieces (direct I/O
    /// where memory and file line up and the pages are not cached), checking crc32s; returns the
    /// indices of the targets whose bytes do not match their crc32.
    ///
    /// # Safety
    /// Every `dst` must point to `len` writable bytes nothing else accesses during the call, and
    /// the targets' destinations must not overlap.
    pub unsafe fn read_ranges(&self, targets: &[RangeTarget]) -> Result<Vec<usize>> {
        for target in targets {
            self.check_bounds(target.offset, target.len)?;
            if target.len > 0 && target.dst.is_null() {
                return Err(invalid_data(
                    &self.path,
                    "a read into a null address".into(),
                ));
            }
        }
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_unstable_by_key(|&k| targets[k].offset);
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
        for &k in &order {
            let total = targets[k].len as usize;
            let mut done = 0;
            while done < total {
                let len = (total - done).min(IO_CHUNK);
                pieces.push((k, done, len));
                done += len;
            }
        }
        let source = open_data_source(&self.file, self.file_len);
        let direct = AtomicBool::new(true);
        let sums = for_each_piece(pieces.len(), IO_DEPTH, |index, chunk: &mut ThreadChunk| {
            let (k, offset, len) = pieces[index];
            let target = targets[k];
            // SAFETY: `offset + len <= target.len`, whose bytes at `dst` are ours to write
            // (function contract); each piece is claimed by one thread (`for_each_piece`).
            unsafe {
                source.read_bounced(
                    target.dst.add(offset),
                    len,
                    target.offset + offset as u64,
                    &direct,
                    chunk,
                )
            }
            .map_err(|err| {
                if err.kind() == io::ErrorKind::UnexpectedEof {
                    invalid_data(
                        &self.path,
                        "the file ended early (truncated while reading?)".into(),
                    )
                } else {
                    StagerError::io("reading", &self.path, err)
                }
            })?;
            Ok(target.crc32.map(|_| {
                let mut hasher = crc32fast::Hasher::new();
                // SAFETY: the bytes just read, ours until the call returns.
                hasher.update(unsafe { std::slice::from_raw_parts(target.dst.add(offset), len) });
                hasher
            }))
        })?;
        // crc32 (not crc32c: `torch.save`'s records), joined per target in piece order.
        let mut totals: Vec<crc32fast::Hasher> =
            targets.iter().map(|_| crc32fast::Hasher::new()).collect();
        for (&(k, _, _), piece) in pieces.iter().zip(sums) {
            if let Some(piece) = piece {
                totals[k].combine(&piece);
            }
        }
        Ok(targets
            .iter()
            .zip(totals)
            .enumerate()
            .filter(|(_, (target, total))| {
                target
                    .crc32
                    .is_some_and(|crc| crc != total.clone().finalize())
            })
            .map(|(k, _)| k)
            .collect())
    }
}

impl DataSource<'_> {
    /// Reads `len` bytes at `offset` into `dst` (any alignment): where the file is read with
    /// direct I/O and its pages are not cached, the whole blocks around the range go through a
    /// page-aligned bounce chunk (one `pread` on the direct descriptor, then a copy: memory is
    /// faster than the disk); else [`DataSource::read`].
    ///
    /// # Safety
    /// `dst` must point to `len` writable bytes nothing else accesses during the call.
    unsafe fn read_bounced(
        &self,
        dst: *mut u8,
        len: usize,
        offset: u64,
        direct: &AtomicBool,
        chunk: &mut ThreadChunk,
    ) -> io::Result<()> {
        let end = offset + len as u64;
        let cached = self
            .cache
            .as_ref()
            .is_some_and(|c| c.all_resident(offset, end));
        let (mem_align, align) = self.mode.alignment();
        let aligned_already = (dst as usize).wrapping_sub(offset as usize) % mem_align == 0;
        match &self.direct {
            Some(file)
                if direct.load(Ordering::Relaxed) && !cached && !aligned_already && len > 0 =>
            {
                let align = align as u64;
                let lo = offset / align * align;
                let hi = end.div_ceil(align) * align;
                let span = (hi - lo) as usize;
                let buffer = chunk.at_least(span, IO_CHUNK + 2 * direct_io::BLOCK)?;
                // SAFETY: the chunk holds `span` writable bytes, page-aligned.
                match unsafe { direct_io::pread_full(file, buffer.as_ptr(), span, lo) } {
                    Ok(got) => {
                        if (got as u64) < end - lo {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        let from = (offset - lo) as usize;
                        let bytes = buffer.slice_mut(span);
                        // SAFETY: `dst` holds `len` writable bytes (contract).
                        unsafe { std::ptr::copy_nonoverlapping(bytes[from..].as_ptr(), dst, len) };
                        return Ok(());
                    }
                    Err(err) if direct_io::is_direct_refusal(&err) => {
                        direct.store(false, Ordering::Relaxed);
                    }
                    Err(err) => return Err(err),
                }
            }
            _ => {}
        }
        // SAFETY: forwarded contract (no room past `len`).
        unsafe { self.read(dst, len, 0, offset, direct) }
    }
}

/// A read-only mapping of a file, only to ask the kernel which of its pages are cached
/// (`mincore`); nothing is ever read through it.
struct PageCacheView {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only passed to mincore, never dereferenced; any thread may do that.
unsafe impl Send for PageCacheView {}
// SAFETY: as above; `all_resident` takes `&self` and only reads the kernel's page-cache state.
unsafe impl Sync for PageCacheView {}

impl PageCacheView {
    fn map(file: &File, len: u64) -> Option<PageCacheView> {
        let len = usize::try_from(len).ok().filter(|&n| n > 0)?;
        // SAFETY: a new shared read-only mapping of our file; its pages are never touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(PageCacheView { ptr, len })
    }

    /// Whether every page of `[begin, end)` is in the page cache.
    fn all_resident(&self, begin: u64, end: u64) -> bool {
        let page = crate::pool::page_size() as u64;
        let first = begin / page * page;
        let end = end.min(self.len as u64);
        if end <= first {
            return false;
        }
        let pages = (end - first).div_ceil(page) as usize;
        let mut residency = vec![0u8; pages];
        // SAFETY: the range lies inside our mapping (page-aligned start); the vector has one
        // byte per page.
        let rc = unsafe {
            libc::mincore(
                (self.ptr as usize + first as usize) as *mut libc::c_void,
                (end - first) as usize,
                residency.as_mut_ptr(),
            )
        };
        rc == 0 && residency.iter().all(|&r| r & 1 == 1)
    }
}

impl Drop for PageCacheView {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Reads exactly `len` bytes at `offset` into `dst`; a file that ends first is `UnexpectedEof`.
///
/// # Safety
/// `dst` must point to `len` writable bytes nothing else accesses during the call.
unsafe fn pread_exact(file: &File, dst: *mut u8, len: usize, offset: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: forwarded contract.
    let n = unsafe { direct_io::pread_full(file, dst, len, offset) }?;
    if n < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn pread_slice(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    // SAFETY: a live, exclusively borrowed slice.
    unsafe { pread_exact(file, buf.as_mut_ptr(), buf.len(), offset) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct_io::AlignedBuf;
    use crate::format::EntrySpec;
    use crate::writer::{write_file, Source};
    use std::collections::BTreeMap;

    /// The metadata a stager file needs (an empty tree), for files of raw buffers.
    fn stager_meta() -> BTreeMap<String, String> {
        let mut meta = BTreeMap::new();
        meta.insert(format::KEY_FORMAT.into(), "stager".into());
        meta.insert(format::KEY_VERSION.into(), format::VERSION.into());
        meta.insert(format::KEY_TREE.into(), "{}".into());
        meta
    }

    /// Writes `buffers` as the `U8` entries `s0`, `s1`... of a stager file at `path`.
    fn write_buffers(path: &Path, buffers: &[Vec<u8>]) {
        let specs: Vec<EntrySpec> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| EntrySpec {
                name: format!("s{i}"),
                dtype: crate::format::Dtype::UInt8,
                shape: vec![b.len() as u64],
                nbytes: b.len() as u64,
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
        unsafe { write_file(path, &specs, &sources, stager_meta(), None, None) }.unwrap();
    }

    fn write_sample(path: &Path, data: &[u8]) {
        let meta = stager_meta();
        let spec = EntrySpec {
            name: "w".into(),
            dtype: crate::format::Dtype::UInt8,
            shape: vec![data.len() as u64],
            nbytes: data.len() as u64,
        };
        let source = Source {
            ptr: data.as_ptr(),
            request: None,
        };
        // SAFETY: data outlives the call.
        unsafe { write_file(path, &[spec], &[source], meta, None, None) }.unwrap();
    }

    #[test]
    fn flipped_byte_names_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        write_sample(&path, &data);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let file = CheckpointFile::open(&path).unwrap();
        let problems = file.verify().unwrap();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("crc32c checksum mismatch"),
            "{}",
            problems[0]
        );
        let mut out = vec![0u8; data.len()];
        // SAFETY: `out` is large enough.
        let err = unsafe { file.read_into(out.as_mut_ptr(), out.len(), out.len(), &[0], true) }
            .unwrap_err();
        assert!(err.to_string().contains("crc32c"), "{err}");
        // SAFETY: as above.
        unsafe { file.read_into(out.as_mut_ptr(), out.len(), out.len(), &[0], false) }.unwrap();
    }

    #[test]
    fn runs_with_padding_and_parallel_pieces_round_trip_and_catch_flips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.safetensors");
        let buffers: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                let len = if i == 20 {
                    3 * IO_CHUNK + 5
                } else {
                    i * 13 % 200
                };
                (0..len).map(|j| (j * 7 + i) as u8).collect()
            })
            .collect();
        write_buffers(&path, &buffers);
        // The buffer layout Python uses: 64-aligned, like the file (one run).
        let mut offsets = Vec::new();
        let mut at = 0usize;
        for b in &buffers {
            offsets.push(at);
            at += b.len().div_ceil(64) * 64;
        }
        let mut out = vec![0u8; at];
        let file = CheckpointFile::open(&path).unwrap();
        // SAFETY: `out` holds every range.
        unsafe { file.read_into(out.as_mut_ptr(), out.len(), out.len(), &offsets, true) }.unwrap();
        for (b, &o) in buffers.iter().zip(&offsets) {
            assert_eq!(&out[o..o + b.len()], &b[..]);
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let big = file.layout().unwrap().storages[20].offset as usize;
        bytes[big + 2 * IO_CHUNK + 1] ^= 4;
        std::fs::write(&path, &bytes).unwrap();
        let file = CheckpointFile::open(&path).unwrap();
        // SAFETY: as above.
        let err = unsafe { file.read_into(out.as_mut_ptr(), out.len(), out.len(), &offsets, true) }
            .unwrap_err();
        assert!(err.to_string().contains("storage 20"), "{err}");
    }

    /// A file of `sizes` storages (patterned bytes) in `dir`; returns its path and the bytes.
    fn write_patterned(dir: &Path, sizes: &[usize]) -> (PathBuf, Vec<Vec<u8>>) {
        let path = dir.join("p.safetensors");
        let buffers: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (j * 13 + i * 5 + 1) as u8).collect())
            .collect();
        write_buffers(&path, &buffers);
        (path, buffers)
    }

    #[test]
    fn direct_reads_with_and_without_room_and_in_other_layouts() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        // The last storage ends mid-block; one spans several requests.
        let sizes = [100, 2 * IO_CHUNK + 4097, 3, 5000];
        let (path, buffers) = write_patterned(dir.path(), &sizes);
        let file = CheckpointFile::open(&path).unwrap();
        let mirrored: Vec<usize> = {
            let mut at = 0;
            sizes
                .iter()
                .map(|&n| {
                    let offset = at;
                    at += n.div_ceil(64) * 64;
                    offset
                })
                .collect()
        };
        let len = mirrored[3] + sizes[3];
        let check = |out: &AlignedBuf, offsets: &[usize]| {
            for (b, &o) in buffers.iter().zip(offsets) {
                // SAFETY: `out` holds every range and nothing writes it meanwhile.
                let got = unsafe { std::slice::from_raw_parts(out.as_ptr().add(o), b.len()) };
                assert_eq!(got, &b[..]);
            }
        };
        let out = AlignedBuf::take(len + 8192).unwrap();
        for capacity in [len, out.capacity()] {
            // SAFETY: `out` holds `capacity` bytes.
            let mode =
                unsafe { file.read_into(out.as_ptr(), len, capacity, &mirrored, true) }.unwrap();
            assert!(mode.is_direct(), "{mode:?}");
            check(&out, &mirrored);
        }
        // A layout unlike the file's (each storage 1 byte further): heads and tails buffered.
        let shifted: Vec<usize> = mirrored
            .iter()
            .enumerate()
            .map(|(i, &o)| o + i + 1)
            .collect();
        let shifted_len = shifted[3] + sizes[3];
        // SAFETY: as above.
        unsafe { file.read_into(out.as_ptr(), shifted_len, out.capacity(), &shifted, true) }
            .unwrap();
        check(&out, &shifted);
        out.recycle();
        assert!(file.verify().unwrap().is_empty());
        // A flipped byte in the second request of the big storage: read_into and verify see it.
        let big = file.layout().unwrap().storages[1].offset as usize;
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[big + IO_CHUNK + 77] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let file = CheckpointFile::open(&path).unwrap();
        let problems = file.verify().unwrap();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("storage 1"), "{}", problems[0]);
    }

    #[test]
    fn target_ranges_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        write_sample(&path, &[1, 2, 3]);
        let file = CheckpointFile::open(&path).unwrap();
        let mut out = vec![0u8; 3];
        // SAFETY: the call must reject the range before writing.
        let err = unsafe { file.read_into(out.as_mut_ptr(), out.len(), out.len(), &[1], true) }
            .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn truncated_file_is_rejected_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_sample(&path, &[7u8; 5000]);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 7, 8, 100, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = CheckpointFile::open(&path).err().expect("truncated");
            assert!(
                matches!(err, StagerError::InvalidFile { .. }),
                "{cut}: {err}"
            );
        }
    }

    #[test]
    fn read_storages_reads_a_subset_to_separate_places_and_names_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subset.safetensors");
        let buffers: Vec<Vec<u8>> = (0..6)
            .map(|i| {
                let len = if i == 3 {
                    2 * IO_CHUNK + 17
                } else {
                    100 + i * 31
                };
                (0..len).map(|j| (j * 3 + i) as u8).collect()
            })
            .collect();
        write_buffers(&path, &buffers);
        let file = CheckpointFile::open(&path).unwrap();
        let wanted = [5usize, 1, 3];
        let mut outs: Vec<Vec<u8>> = wanted.iter().map(|&i| vec![0; buffers[i].len()]).collect();
        let targets: Vec<StorageTarget> = wanted
            .iter()
            .zip(outs.iter_mut())
            .map(|(&storage, out)| StorageTarget {
                storage,
                dst: out.as_mut_ptr(),
            })
            .collect();
        // SAFETY: every target is its own vector of the storage's length.
        let damaged = unsafe { file.read_storages(&targets, true) }.unwrap();
        assert!(damaged.is_empty());
        for (&i, out) in wanted.iter().zip(&outs) {
            assert_eq!(out, &buffers[i]);
        }
        // SAFETY: rejected before anything is read.
        let twice = unsafe { file.read_storages(&[targets[0], targets[0]], true) }.unwrap_err();
        assert!(twice.to_string().contains("twice"), "{twice}");
        let bad = StorageTarget {
            storage: 9,
            dst: outs[0].as_mut_ptr(),
        };
        // SAFETY: as above.
        let missing = unsafe { file.read_storages(&[bad], true) }.unwrap_err();
        assert!(missing.to_string().contains("storage 9"), "{missing}");
        // A flipped byte in the middle of the big storage is reported for that storage only.
        let mut bytes = std::fs::read(&path).unwrap();
        let big = file.layout().unwrap().storages[3].offset as usize;
        bytes[big + IO_CHUNK + 5] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let file = CheckpointFile::open(&path).unwrap();
        // SAFETY: as above.
        let damaged = unsafe { file.read_storages(&targets, true) }.unwrap();
        assert_eq!(damaged, vec![3]);
        // SAFETY: as above.
        assert!(unsafe { file.read_storages(&targets, false) }
            .unwrap()
            .is_empty());
    }

    #[test]
    fn record_file_reads_ranges_into_any_alignment_and_checks_crc32() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("d.distcp");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = RecordFile::open(&path).unwrap();
        let ranges = [
            (1u64, 2_000_000usize),
            (4096 * 3 + 64, 700_000),
            (2_999_990, 10),
        ];
        let mut outs: Vec<Vec<u8>> = ranges.iter().map(|&(_, n)| vec![0u8; n + 1]).collect();
        let mut targets: Vec<RangeTarget> = ranges
            .iter()
            .zip(&mut outs)
            .map(|(&(offset, n), out)| RangeTarget {
                offset,
                len: n as u64,
                dst: out[1..].as_mut_ptr(), // one byte off any alignment
                crc32: Some(crc32fast::hash(&data[offset as usize..offset as usize + n])),
            })
            .collect();
        targets[2].crc32 = Some(0xDEAD_BEEF);
        // SAFETY: every destination is a live, disjoint vector of its range's length.
        let bad = unsafe { file.read_ranges(&targets) }.unwrap();
        assert_eq!(bad, [2]);
        for (&(offset, n), out) in ranges.iter().zip(&outs) {
            assert_eq!(&out[1..], &data[offset as usize..offset as usize + n]);
        }
        let past = [RangeTarget {
            offset: 2_999_999,
            len: 2,
            dst: outs[2].as_mut_ptr(),
            crc32: None,
        }];
        // SAFETY: as above.
        let err = unsafe { file.read_ranges(&past) }.unwrap_err();
        assert!(
            err.to_string().contains("shorter than the metadata says"),
            "{err}"
        );
    }
}
