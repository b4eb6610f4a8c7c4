//! One atomic commit: temp file in the target directory → write → fsync → rename → fsync of the
//! directory. Every file stager persists goes through [`AtomicFile`]: `stager.save`, the streamed
//! replica, the `persist_format="torch"` replica (Python writes `torch.save`'s bytes into the
//! temp file's descriptor) and dcp's per-rank files.
//!
//! A crash at any instant leaves the previous file or the new one under the final name, complete;
//! the only debris is a temp file, and the next successful save or stage in that directory sweeps
//! it away:
//!
//! - **One temp pattern** for every writer: `<final name>.<pid>.<n>.stager.tmp`, in the target's
//!   directory (so the rename stays on one filesystem), created with `O_EXCL`. Over-long final
//!   names are shortened in the temp name, which needs only to be unique.
//! - **Liveness by `flock`.** A writer holds an exclusive `flock` on its temp file from before it
//!   is used until after it is renamed; the kernel drops the lock when the process dies, however
//!   it dies. The sweep ([`sweep_stale_temps`], run by [`AtomicFile::create`]) removes a temp file
//!   of the pattern only if it is a regular file whose lock it can take, so a live writer's temp
//!   (in this process or any other, even one that reused a dead writer's pid) is never touched,
//!   and files that merely resemble the pattern but are not regular files are left alone.
//!   This process's own live temp files are also known by inode and skipped, so the sweep stays
//!   right where `flock` is emulated with per-process POSIX locks (NFS) and two threads save into
//!   one directory. Where the filesystem has no `flock` the sweep falls back to "the pid in the
//!   name is gone".
//!   Files of other names are never touched. Temp names of stager 0.1 (`<final>.<pid>.<n>.tmp`,
//!   `<final>.<pid>.recv.tmp[.<pid>.<n>.tmp]`) are still recognised, for the final name being
//!   saved only, when their pid is gone.
//! - **Only regular files are replaced.** The final path is resolved first: a symlink is followed
//!   (as `torch.save` writes through one) and its target is replaced atomically in the target's
//!   own directory, the link left as it is; a device, FIFO, socket or directory at the final path
//!   (or at the end of the links) is refused with an error naming the path and what it is, before
//!   anything is written, and checked again just before the rename. A replaced file's permission
//!   bits carry over to the new one.
//! - **Only files this process could open for writing are replaced**, as `torch.save` (which
//!   opens the path for writing) allows: a rename needs only a writable directory, so in a
//!   world-writable directory another user's read-only file would otherwise be replaced (and
//!   change owner). An existing target that `faccessat(W_OK, AT_EACCESS)` refuses (another
//!   user's file, a mode-0444 file, a read-only mount) is refused before anything is written,
//!   and again just before the rename, with the errno kept.
//!
//! # Example
//! ```
//! use std::io::Write;
//! use stager::commit::AtomicFile;
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("out.bin");
//! let mut file = AtomicFile::create(&path).unwrap();
//! file.file().write_all(b"all or nothing").unwrap();
//! file.commit().unwrap();
//! assert_eq!(std::fs::read(&path).unwrap(), b"all or nothing");
//! assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
//! ```
//!
//! # Thread Safety
//! An [`AtomicFile`] is `Send + Sync` (its [`std::fs::File`] takes `&self` for positional I/O);
//! `commit` and `abort` consume it. Concurrent saves to one path each write their own temp file;
//! the last rename wins.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Result, StagerError};

/// What every stager temp file's name ends with.
pub const TEMP_SUFFIX: &str = ".stager.tmp";
/// Bytes of the final name kept in a temp name (NAME_MAX is 255).
const MAX_NAME_IN_TEMP: usize = 200;
/// Most symlinks followed from the final path (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `(device, inode)` of every temp file this process is writing (created, not yet renamed or
/// removed).
static LIVE_TEMPS: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

fn live_temps() -> std::sync::MutexGuard<'static, Vec<(u64, u64)>> {
    LIVE_TEMPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A file being written under a temp name, committed by renaming it over its final name.
///
/// Dropping it uncommitted removes the temp file (the same as [`AtomicFile::abort`]).
pub struct AtomicFile {
    /// `None` once committed or aborted.
    file: Option<File>,
    temp: PathBuf,
    /// The file the rename replaces: the requested path with symlinks resolved.
    target: PathBuf,
    /// The path as the caller gave it, for messages.
    requested: PathBuf,
    /// Whether everything written so far has been fsynced.
    synced: bool,
    /// `(device, inode)` of the temp file, in [`LIVE_TEMPS`] until it is renamed or removed.
    identity: (u64, u64),
}

impl AtomicFile {
    /// Resolves `path` (following symlinks; refusing anything that is not a regular file),
    /// sweeps stale stager temp files from the target's directory and creates a locked temp file
    /// there. Errors name `path`.
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let target = resolve_target(path)?;
        let dir = parent_dir(&target).to_path_buf();
        let name = target.file_name().ok_or_else(|| {
            StagerError::io(
                "choosing a file name for",
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
            )
        })?;
        sweep_stale_temps(&dir, Some(name));
        let mode = match std::fs::metadata(&target) {
            Ok(meta) => meta.permissions().mode() & 0o7777,
            Err(_) => 0o644,
        };
        let (file, temp, identity) = create_locked_temp(&dir, name, mode)
            .map_err(|err| StagerError::io("creating a temp file to write", path, err))?;
        Ok(AtomicFile {
            file: Some(file),
            temp,
            target,
            requested: path.to_path_buf(),
            synced: false,
            identity,
        })
    }

    /// The open temp file (read-write).
    pub fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("an AtomicFile is open until commit or abort")
    }

    /// Marks the file as possibly written since the last [`AtomicFile::sync`] (for callers that
    /// hand its descriptor to someone else).
    pub fn mark_dirty(&mut self) {
        self.synced = false;
    }

    /// Where the bytes are until the commit.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The file the commit replaces (symlinks resolved).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The path the caller asked for.
    pub fn requested_path(&self) -> &Path {
        &self.requested
    }

    /// `fsync` of the temp file; [`AtomicFile::commit`] then skips its own.
    pub fn sync(&mut self) -> Result<()> {
        self.file()
            .sync_all()
            .map_err(|err| StagerError::io("fsync of", &self.requested, err))?;
        self.synced = true;
        Ok(())
    }

    /// `fsync` (unless [`AtomicFile::sync`] just did), `rename` over the target, `fsync` of the
    /// directory. On error the temp file is removed and the previous file stays.
    pub fn commit(mut self) -> Result<()> {
        if !self.synced {
            self.sync()?;
        }
        check_replaceable(&self.target, &self.requested)?;
        std::fs::rename(&self.temp, &self.target)
            .map_err(|err| StagerError::io("renaming the temp file over", &self.requested, err))?;
        // Renamed: the lock may go now (the sweep never looks at final names).
        self.file = None;
        self.forget();
        File::open(parent_dir(&self.target))
            .and_then(|dir| dir.sync_all())
            .map_err(|err| StagerError::io("fsync of the directory of", &self.requested, err))
    }

    /// Removes the temp file; the previous file stays.
    pub fn abort(mut self) {
        self.discard();
    }

    fn discard(&mut self) {
        if self.file.is_some() {
            // Unlinked while still locked, so no sweep can race with it.
            let _ = std::fs::remove_file(&self.temp);
            self.file = None;
            self.forget();
        }
    }

    fn forget(&self) {
        let mut live = live_temps();
        if let Some(index) = live.iter().position(|&id| id == self.identity) {
            live.swap_remove(index);
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        self.discard();
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// What a non-regular file is, in words.
fn describe(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

fn not_regular(requested: &Path, target: &Path, file_type: std::fs::FileType) -> StagerError {
    let what = if target == requested {
        format!("it is {}", describe(file_type))
    } else {
        format!(
            "it links to {}, which is {}",
            target.display(),
            describe(file_type)
        )
    };
    StagerError::io(
        "refusing to replace",
        requested,
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file; stager only replaces regular files"),
        ),
    )
}

/// The file a save to `path` replaces: `path` itself, or where its symlinks lead.
fn resolve_target(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..=MAX_SYMLINKS {
        let meta = match std::fs::symlink_metadata(&current) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(current),
            Err(err) => return Err(StagerError::io("inspecting", path, err)),
        };
        let file_type = meta.file_type();
        if file_type.is_symlink() {
            let link = std::fs::read_link(&current)
                .map_err(|err| StagerError::io("reading the symlink", path, err))?;
            current = if link.is_absolute() {
                link
            } else {
                parent_dir(&current).join(link)
            };
            continue;
        }
        if file_type.is_file() {
            check_writable(&current, path)?;
            return Ok(current);
        }
        return Err(not_regular(path, &current, file_type));
    }
    Err(StagerError::io(
        "resolving",
        path,
        io::Error::from_raw_os_error(libc::ELOOP),
    ))
}

/// Just before the rename: the target must still be a regular file, a symlink (replaced
/// itself: someone swapped it meanwhile) or absent.
fn check_replaceable(target: &Path, requested: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if !meta.is_file() && !meta.file_type().is_symlink() => {
            Err(not_regular(requested, target, meta.file_type()))
        }
        Ok(meta) if meta.is_file() => check_writable(target, requested),
        _ => Ok(()),
    }
}

/// An existing regular file at `target` must be one this process could open for writing (with
/// its effective ids, as `open(O_WRONLY)` would check): see the module docs.
fn check_writable(target: &Path, requested: &Path) -> Result<()> {
    let Ok(c_path) = std::ffi::CString::new(target.as_os_str().as_bytes()) else {
        return Ok(()); // a NUL in the path: creating the temp file reports it
    };
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call; faccessat only
    // reads it.
    let status = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::W_OK,
            libc::AT_EACCESS,
        )
    };
    if status == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => Err(StagerError::io(
            "refusing to replace a file this process could not open for writing (torch.save \
             refuses it too):",
            requested,
            err,
        )),
        _ => Ok(()), // gone meanwhile, or a check the filesystem cannot answer: the rename decides
    }
}

/// `<name>.<pid>.<n>.stager.tmp` in `dir`, created exclusively and `flock`ed before anyone can
/// mistake it for debris.
fn create_locked_temp(
    dir: &Path,
    name: &OsStr,
    mode: u32,
) -> io::Result<(File, PathBuf, (u64, u64))> {
    let short = shorten(name);
    loop {
        let mut temp_name = short.clone();
        temp_name.push(format!(
            ".{}.{}{TEMP_SUFFIX}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let temp = dir.join(temp_name);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_CLOEXEC)
            .open(&temp)
        {
            Ok(file) => file,
            // Another host's writer with our pid and counter (a shared directory): next name.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        };
        // SAFETY: flock on a descriptor we own; blocks only while a sweep is looking at it.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0;
        if !locked {
            let err = io::Error::last_os_error();
            if !lock_unsupported(&err) {
                let _ = std::fs::remove_file(&temp);
                return Err(err);
            }
        }
        // A sweep may have removed the file between its creation and our lock: the name must
        // still be this file, else start over with a new one.
        let ours = file.metadata()?;
        let identity = (ours.dev(), ours.ino());
        live_temps().push(identity);
        match std::fs::symlink_metadata(&temp) {
            Ok(meta) if (meta.dev(), meta.ino()) == identity => {}
            _ => {
                let mut live = live_temps();
                if let Some(index) = live.iter().position(|&id| id == identity) {
                    live.swap_remove(index);
                }
                continue;
            }
        }
        // umask may have narrowed the mode; a replaced file's bits carry over exactly.
        let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
        return Ok((file, temp, identity));
    }
}

fn lock_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

fn shorten(name: &OsStr) -> OsString {
    let bytes = name.as_bytes();
    if bytes.len() <= MAX_NAME_IN_TEMP {
        return name.to_owned();
    }
    OsStr::from_bytes(&bytes[..MAX_NAME_IN_TEMP]).to_owned()
}

/// The pid in a temp name of the current pattern, `<anything>.<pid>.<n>.stager.tmp`.
fn temp_pid(name: &[u8]) -> Option<i32> {
    let rest = name.strip_suffix(TEMP_SUFFIX.as_bytes())?;
    let mut fields = rest.rsplitn(3, |&b| b == b'.');
    let counter = fields.next()?;
    let pid = fields.next()?;
    fields.next().filter(|prefix| !prefix.is_empty())?;
    digits(counter)?;
    digits(pid)
}

/// The pid in a stager 0.1 temp name of `final_name`: `<final>.<pid>.<n>.tmp`,
/// `<final>.<pid>.recv.tmp` or `<final>.<pid>.recv.tmp.<pid>.<n>.tmp`.
fn legacy_temp_pid(name: &[u8], final_name: &[u8]) -> Option<i32> {
    let rest = name
        .strip_prefix(final_name)?
        .strip_prefix(b".")?
        .strip_suffix(b".tmp")?;
    let (pid, tail) = split_field(rest)?;
    let pid = digits(pid)?;
    let valid = match tail {
        b"recv" => true,
        _ if tail.starts_with(b"recv.tmp.") => {
            let inner = &tail[b"recv.tmp.".len()..];
            split_field(inner).is_some_and(|(p, n)| digits(p).is_some() && digits(n).is_some())
        }
        _ => digits(tail).is_some(),
    };
    valid.then_some(pid)
}

fn split_field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let dot = bytes.iter().position(|&b| b == b'.')?;
    Some((&bytes[..dot], &bytes[dot + 1..]))
}

fn digits(field: &[u8]) -> Option<i32> {
    if field.is_empty() || field.len() > 10 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks whether the process exists.
    pid > 0
        && unsafe { libc::kill(pid, 0) } != 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Removes every stale stager temp file in `dir` (see the module docs); `final_name` also
/// matches the 0.1 patterns of that name. Returns how many were removed. Errors (an unreadable
/// directory, a file that vanished) only mean less is swept: the save that follows reports
/// anything that matters.
pub fn sweep_stale_temps(dir: &Path, final_name: Option<&OsStr>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let bytes = name.as_bytes();
        let (pid, legacy) = match temp_pid(bytes) {
            Some(pid) => (pid, false),
            None => match final_name.and_then(|f| legacy_temp_pid(bytes, f.as_bytes())) {
                Some(pid) => (pid, true),
                None => continue,
            },
        };
        if remove_if_stale(&entry.path(), pid, legacy) {
            removed += 1;
        }
    }
    removed
}

fn remove_if_stale(path: &Path, pid: i32, legacy: bool) -> bool {
    // O_NONBLOCK: a FIFO of that name must not block us (it is skipped just below).
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return false;
    };
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.is_file() || live_temps().contains(&(meta.dev(), meta.ino())) {
        return false;
    }
    // SAFETY: flock on a descriptor we own; non-blocking.
    let stale = if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        // Nobody holds it: a dead writer's, unless it is a 0.1 temp (never locked) of a live one.
        !legacy || process_gone(pid)
    } else {
        let err = io::Error::last_os_error();
        lock_unsupported(&err) && process_gone(pid)
    };
    if !stale {
        return false;
    }
    // Still the file we locked (not a new one that took the name meanwhile)?
    match std::fs::symlink_metadata(path) {
        Ok(now) if now.ino() == meta.ino() && now.dev() == meta.dev() => {
            std::fs::remove_file(path).is_ok()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn commit_replaces_and_abort_keeps_previous() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let file = AtomicFile::create(&path).unwrap();
        file.file().write_all(b"never").unwrap();
        let temp = file.temp_path().to_path_buf();
        assert!(temp.to_str().unwrap().ends_with(TEMP_SUFFIX));
        file.abort();
        assert!(!temp.exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let file = AtomicFile::create(&path).unwrap();
        file.file().write_all(b"new").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(names(dir.path()), ["f.bin"]);
    }

    #[test]
    fn dropping_uncommitted_removes_the_temp() {
        let dir = tempfile::tempdir().unwrap();
        let file = AtomicFile::create(&dir.path().join("d.bin")).unwrap();
        file.file().write_all(b"x").unwrap();
        drop(file);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn symlink_is_followed_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = dir.path().join("real");
        std::fs::create_dir(&real_dir).unwrap();
        let real = real_dir.join("target.bin");
        std::fs::write(&real, b"old").unwrap();
        let link = dir.path().join("link.bin");
        symlink("real/target.bin", &link).unwrap();
        let file = AtomicFile::create(&link).unwrap();
        assert_eq!(file.temp_path().parent().unwrap(), real_dir);
        file.file().write_all(b"new").unwrap();
        file.commit().unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        // A dangling link creates its target, as open(path, "wb") would.
        let dangling = dir.path().join("dangling.bin");
        symlink("real/new.bin", &dangling).unwrap();
        let file = AtomicFile::create(&dangling).unwrap();
        file.file().write_all(b"fresh").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(real_dir.join("new.bin")).unwrap(), b"fresh");
    }

    #[test]
    fn special_files_are_refused_by_name_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let link = dir.path().join("to-null");
        symlink("/dev/null", &link).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        for (path, kind) in [
            (&fifo, "a FIFO"),
            (&link, "a character device"),
            (&sub, "a directory"),
        ] {
            let err = AtomicFile::create(path).err().expect("refused");
            let text = err.to_string();
            assert!(
                text.contains(path.to_str().unwrap()) && text.contains(kind),
                "{text}"
            );
        }
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(names(dir.path()), ["fifo", "sub", "to-null"]);
    }

    #[test]
    fn sweep_removes_dead_temps_of_any_name_and_keeps_live_and_foreign_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A live writer's temp (locked by an AtomicFile of this process).
        let live = AtomicFile::create(&d.join("live.bin")).unwrap();
        let live_name = live.temp_path().file_name().unwrap().to_owned();
        // Dead writers' temps (unlocked), of other final names too.
        for name in [
            "a.stager.2147483646.0.stager.tmp",
            "rank_1_replica_partner_0.pt.99999999.7.stager.tmp",
        ] {
            std::fs::write(d.join(name), b"partial").unwrap();
        }
        // Not ours: other patterns, and a FIFO matching ours.
        for name in ["notes.tmp", "x.1.2.tmp", "y.stager.tmp", ".1.2.stager.tmp"] {
            std::fs::write(d.join(name), b"keep").unwrap();
        }
        let fifo = d.join("z.3.4.stager.tmp");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        // 0.1 temps of "ckpt": dead pid removed, live pid kept.
        let own_pid = std::process::id();
        for name in [
            "ckpt.2147483646.0.tmp".to_string(),
            "ckpt.2147483646.recv.tmp".to_string(),
            "ckpt.2147483646.recv.tmp.2147483646.3.tmp".to_string(),
            format!("ckpt.{own_pid}.5.tmp"),
        ] {
            std::fs::write(d.join(name), b"old").unwrap();
        }
        let removed = sweep_stale_temps(d, Some(OsStr::new("ckpt")));
        assert_eq!(removed, 5, "{:?}", names(d));
        let mut expected = vec![
            ".1.2.stager.tmp".to_string(),
            format!("ckpt.{own_pid}.5.tmp"),
            live_name.into_string().unwrap(),
            "notes.tmp".into(),
            "x.1.2.tmp".into(),
            "y.stager.tmp".into(),
            "z.3.4.stager.tmp".into(),
        ];
        expected.sort();
        assert_eq!(names(d), expected);
        live.commit().unwrap();
    }

    #[test]
    fn temp_name_patterns() {
        assert_eq!(temp_pid(b"m.safetensors.12.3.stager.tmp"), Some(12));
        assert_eq!(temp_pid(b"12.3.stager.tmp"), None);
        assert_eq!(temp_pid(b"m.x.3.stager.tmp"), None);
        assert_eq!(legacy_temp_pid(b"m.12.3.tmp", b"m"), Some(12));
        assert_eq!(legacy_temp_pid(b"m.12.recv.tmp", b"m"), Some(12));
        assert_eq!(legacy_temp_pid(b"m.12.recv.tmp.12.0.tmp", b"m"), Some(12));
        assert_eq!(legacy_temp_pid(b"m.12.recv.tmp.12.tmp", b"m"), None);
        assert_eq!(legacy_temp_pid(b"n.12.3.tmp", b"m"), None);
    }

    #[test]
    fn long_names_still_get_a_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n".repeat(250));
        let file = AtomicFile::create(&path).unwrap();
        file.file().write_all(b"long").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"long");
    }
}
