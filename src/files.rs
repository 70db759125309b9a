//! Safe file handling for everything ember reads or writes: outputs are written to a temporary
//! file in the target's directory and renamed into place (so a killed or failed command never
//! leaves a partial file at the final path, nor destroys the file it replaces), an output that
//! is one of the command's inputs is refused, and only regular files are opened as inputs (a
//! FIFO would block forever, a directory fails with a misleading "No such device").
//!
//! It depends on nothing else in the crate, so every layer can use it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes `path` atomically: `write` fills a temporary file beside it
/// (`.NAME.ember-tmp-PID`), which is flushed, synced and renamed over `path` only when
/// `write` succeeded. On failure the temporary file is removed and `path` is untouched. A
/// process killed mid-write leaves at most the temporary file, never a partial `path`.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> io::Result<()> {
    let tmp = temp_path(path)?;
    // A leftover of a killed run that had the same process id is ours to replace.
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        out.flush()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        // The data must be on disk before the rename makes it the file's content.
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The temporary name `write_atomic` uses for `path`: same directory, so the rename never
/// crosses file systems.
pub fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the output path names no file"))?;
    Ok(path.with_file_name(format!(".{}.ember-tmp-{}", name.to_string_lossy(), std::process::id())))
}

/// Whether `a` and `b` are the same file (device and inode on Unix, so hard links, symlinks and
/// different spellings of one path are caught). False when either does not exist.
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else { return false };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
    }
}

/// An output path that would overwrite one of the command's inputs.
#[derive(Debug, thiserror::Error)]
#[error("refusing to write {output}: it is the same file as the input {input}; choose another output path")]
pub struct OutputIsInput {
    pub output: String,
    pub input: String,
}

/// Refuses an `output` that is the same file as any of `inputs` (checked before any work, so a
/// command never overwrites what it reads).
pub fn check_output<'a>(output: &Path, inputs: impl IntoIterator<Item = &'a Path>) -> Result<(), OutputIsInput> {
    for input in inputs {
        if same_file(output, input) {
            return Err(OutputIsInput { output: output.display().to_string(), input: input.display().to_string() });
        }
    }
    Ok(())
}

/// Fails unless `path` is a regular file (after following symlinks), with a message that says
/// what it is instead. Checked before opening: opening a FIFO for reading blocks until a writer
/// comes.
pub fn check_regular(path: &Path) -> io::Result<()> {
    let m = std::fs::metadata(path)?;
    if m.is_file() {
        return Ok(());
    }
    let what = if m.is_dir() { "a directory" } else { "not a regular file (a FIFO, socket or device)" };
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{what}; give the path of a model file")))
}

/// Bytes free for an unprivileged user on the file system that holds `path` (or its folder, when
/// `path` does not exist yet); None where unknown.
pub fn free_space(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !path.exists() => if p.as_os_str().is_empty() { Path::new(".") } else { p },
            _ => path,
        };
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: a valid NUL-terminated path and a zeroed statvfs for the call to fill.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// `dir/name.gguf` -> `dir/name<suffix>`: where a file derived from a model or a profile
/// goes beside it. A profile's samples go beside it as X.samples.gguf, not
/// X.profile.samples.gguf.
pub fn beside(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.strip_suffix(".gguf").unwrap_or(&name);
    let stem = stem.strip_suffix(".profile").unwrap_or(stem);
    path.with_file_name(format!("{stem}{suffix}"))
}
