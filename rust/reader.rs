//! Reader: opens a stager file, validates its header, reads its buffers into host memory.
//!
//! [`CheckpointFile::open`] reads the 8-byte length and the header only (bounded by
//! [`crate::format::MAX_HEADER_BYTES`] and by the file's size, so a hostile length cannot make it
//! allocate), and validates it ([`crate::format::parse_header`]). [`CheckpointFile::read_into`]
//! then reads each stored buffer with large `pread`s straight into the caller's memory (a pool
//! buffer, at offsets the Python side chose from the validated tree) and checks its crc32c while
//! the bytes are still in cache. [`CheckpointFile::verify`] checks every checksum without keeping
//! the data, for `stager verify`.
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

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StagerError};
use crate::format::{self, Header, Layout};

/// Bytes per `pread`; each piece's checksum is folded in right after it lands.
pub const READ_CHUNK: usize = 8 << 20;

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
        pread_exact(&file, &mut prefix, 0).map_err(|err| StagerError::io("reading", path, err))?;
        let header_len = format::header_len(&prefix, file_len).map_err(|r| invalid(path, r))?;
        let mut json = vec![0u8; header_len as usize];
        pread_exact(&file, &mut json, 8).map_err(|err| StagerError::io("reading", path, err))?;
        let header = format::parse_header(&json, file_len).map_err(|r| invalid(path, r))?;
        Ok(CheckpointFile {
            file,
            path: path.to_path_buf(),
            file_len,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The stager metadata (tree, storages, checksums), checked against the entries.
    pub fn layout(&self) -> Result<Layout> {
        format::stager_layout(&self.header).map_err(|r| invalid(&self.path, r))
    }

    /// Reads storage i's bytes to `dst + offsets[i]` for every storage, checking each crc32c when
    /// `verify`. Checks that every range lies inside `dst_len` and that no two overlap.
    ///
    /// # Safety
    /// `dst` must point to `dst_len` writable bytes that nothing else reads or writes during the
    /// call.
    pub unsafe fn read_into(
        &self,
        dst: *mut u8,
        dst_len: usize,
        offsets: &[usize],
        verify: bool,
    ) -> Result<()> {
        let layout = self.layout()?;
        if offsets.len() != layout.storages.len() {
            return Err(invalid(
                &self.path,
                format!(
                    "{} target offsets for {} storages",
                    offsets.len(),
                    layout.storages.len()
                ),
            ));
        }
        let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(offsets.len());
        for (index, (storage, &offset)) in layout.storages.iter().zip(offsets).enumerate() {
            let end = usize::try_from(storage.nbytes)
                .ok()
                .and_then(|n| offset.checked_add(n))
                .filter(|&end| end <= dst_len)
                .ok_or_else(|| {
                    invalid(
                        &self.path,
                        format!(
                            "storage {index} ({} bytes) does not fit the {dst_len}-byte buffer at offset {offset}",
                            storage.nbytes
                        ),
                    )
                })?;
            if storage.nbytes > 0 {
                ranges.push((offset, end));
            }
        }
        ranges.sort_unstable();
        if ranges.windows(2).any(|pair| pair[0].1 > pair[1].0) {
            return Err(invalid(&self.path, "target ranges overlap".into()));
        }
        self.advise_sequential();
        for (index, (storage, &offset)) in layout.storages.iter().zip(offsets).enumerate() {
            let len = storage.nbytes as usize;
            // SAFETY: `[offset, offset + len)` was checked to lie inside the caller's buffer.
            let target = unsafe { std::slice::from_raw_parts_mut(dst.add(offset), len) };
            let mut crc = 0u32;
            for (piece_index, piece) in target.chunks_mut(READ_CHUNK).enumerate() {
                let at = storage.offset + (piece_index * READ_CHUNK) as u64;
                pread_exact(&self.file, piece, at).map_err(|err| self.read_error(err))?;
                if verify {
                    crc = crc32c::crc32c_append(crc, piece);
                }
            }
            if verify && crc != storage.crc32c {
                return Err(self.checksum_error(index, &storage.entry, storage.crc32c, crc));
            }
        }
        Ok(())
    }

    /// Checks every storage's crc32c; returns one line per damaged storage (empty: all good).
    pub fn verify(&self) -> Result<Vec<String>> {
        let layout = self.layout()?;
        self.advise_sequential();
        let mut scratch = vec![0u8; READ_CHUNK];
        let mut problems = Vec::new();
        for (index, storage) in layout.storages.iter().enumerate() {
            let mut crc = 0u32;
            let mut done = 0u64;
            while done < storage.nbytes {
                let piece = (storage.nbytes - done).min(READ_CHUNK as u64) as usize;
                pread_exact(&self.file, &mut scratch[..piece], storage.offset + done)
                    .map_err(|err| self.read_error(err))?;
                crc = crc32c::crc32c_append(crc, &scratch[..piece]);
                done += piece as u64;
            }
            if crc != storage.crc32c {
                problems.push(
                    self.checksum_error(index, &storage.entry, storage.crc32c, crc)
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

fn invalid(path: &Path, reason: String) -> StagerError {
    StagerError::InvalidFile {
        path: path.to_path_buf(),
        reason,
    }
}

fn pread_exact(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: reads into a live, exclusively borrowed slice.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::EntrySpec;
    use crate::writer::{write_file, Source};
    use std::collections::BTreeMap;

    fn write_sample(path: &Path, data: &[u8]) {
        let mut meta = BTreeMap::new();
        meta.insert(format::KEY_FORMAT.into(), "stager".into());
        meta.insert(format::KEY_VERSION.into(), format::VERSION.into());
        meta.insert(format::KEY_TREE.into(), "{}".into());
        let spec = EntrySpec {
            name: "w".into(),
            dtype: "U8".into(),
            shape: vec![data.len() as u64],
            nbytes: data.len() as u64,
        };
        let source = Source {
            ptr: data.as_ptr(),
            request: None,
        };
        // SAFETY: data outlives the call.
        unsafe { write_file(path, &[spec], &[source], meta, None) }.unwrap();
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
        let err = unsafe { file.read_into(out.as_mut_ptr(), out.len(), &[0], true) }.unwrap_err();
        assert!(err.to_string().contains("crc32c"), "{err}");
        // SAFETY: as above.
        unsafe { file.read_into(out.as_mut_ptr(), out.len(), &[0], false) }.unwrap();
    }

    #[test]
    fn target_ranges_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        write_sample(&path, &[1, 2, 3]);
        let file = CheckpointFile::open(&path).unwrap();
        let mut out = vec![0u8; 3];
        // SAFETY: the call must reject the range before writing.
        let err = unsafe { file.read_into(out.as_mut_ptr(), out.len(), &[1], true) }.unwrap_err();
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
}
