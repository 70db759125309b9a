//! The user cache: models fetched by `ember fetch` and the files ember derives from a model
//! (profiles, samples, predictors, placements), so that every command works from any
//! directory and a model's own folder may be read-only or shared.
//!
//! Layout under the root (`EMBER_CACHE_DIR`, else `$XDG_CACHE_HOME/ember`, else
//! `~/.cache/ember`): `models/NAME.gguf`, and `derived/STEM-FINGERPRINT/STEM.profile.gguf`
//! etc. The fingerprint identifies the model's bytes, so two files of one name (another
//! quantisation, a re-download that changed) never share derived files. Only the CLI reads
//! the environment; the library gets the resulting paths as values.

use super::Result;
use crate::engine::builder::DerivedFiles;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The environment variable that moves the cache.
pub const CACHE_ENV: &str = "EMBER_CACHE_DIR";

/// The cache's root folder (not created here).
pub fn root() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("ember"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("ember")),
        None => Err(format!("no cache folder: HOME is not set; set {CACHE_ENV} to a folder ember may write").into()),
    }
}

/// Where fetched models live.
pub fn models_dir() -> Result<PathBuf> {
    Ok(root()?.join("models"))
}

/// `-m NAME`: a model in the cache by its file name, with or without `.gguf`.
pub fn find_model(name: &str) -> Result<Option<PathBuf>> {
    // A name, not a path: "a/b" that does not exist is a missing file, not a cache entry.
    if name.is_empty() || name.contains('/') || name.contains(std::path::MAIN_SEPARATOR) {
        return Ok(None);
    }
    let dir = models_dir()?;
    for candidate in [dir.join(name), dir.join(format!("{name}.gguf"))] {
        if candidate.is_file() {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// The cached models' names, for messages.
pub fn list_models() -> Vec<String> {
    let Ok(dir) = models_dir() else { return Vec::new() };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".gguf").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The folder of the files derived from the model at `path` (not created here).
pub fn derived_dir(path: &Path) -> Result<PathBuf> {
    let fp = fingerprint(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(root()?.join("derived").join(format!("{}-{fp:016x}", stem(path))))
}

/// Where the files derived from the model at `path` are looked for and written.
pub fn derived(path: &Path) -> Result<DerivedFiles> {
    Ok(DerivedFiles::in_dir(&derived_dir(path)?, &stem(path)))
}

/// The derived file `suffix` for a model to write: in the cache, its folder created.
pub fn derived_output(path: &Path, suffix: &str) -> Result<PathBuf> {
    let dir = derived_dir(path)?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create the cache folder {}: {e} (set {CACHE_ENV} to a folder ember may write, or pass -o)", dir.display()))?;
    Ok(DerivedFiles::in_dir(&dir, &stem(path)).path(suffix))
}

/// The derived file `suffix` to read: in the cache, else beside the model (where ember wrote
/// them before the cache existed, and where users may still put them), else the cache's path
/// (named in "missing" messages).
pub fn derived_input(path: &Path, suffix: &str) -> Result<PathBuf> {
    let cached = derived(path)?.path(suffix);
    let beside = crate::files::beside(path, suffix);
    Ok(if !cached.exists() && beside.exists() { beside } else { cached })
}

fn stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}

/// A fingerprint of a model file's bytes that costs milliseconds even for a 7B model: FNV-1a
/// over its size and 64 KiB read at 33 evenly spaced offsets, first and last included. The
/// first block holds the header (metadata and tensor list), so a different model, a different
/// quantisation or a file rewritten in place with other weights gets another fingerprint.
pub fn fingerprint(path: &Path) -> std::io::Result<u64> {
    const BLOCK: u64 = 64 << 10;
    const SAMPLES: u64 = 33;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&len.to_le_bytes());
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..SAMPLES {
        let at = (len.saturating_sub(BLOCK)) * i / (SAMPLES - 1);
        f.seek(SeekFrom::Start(at))?;
        let n = read_up_to(&mut f, &mut buf)?;
        eat(&buf[..n]);
    }
    Ok(h)
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
