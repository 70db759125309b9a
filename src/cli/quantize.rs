//! `ember quantize IN OUT TYPE`: re-encode a GGUF model's weights (see
//! `model::quantize`), written atomically, refusing to overwrite the input.

use super::Result;
use crate::gguf::GgufFile;
use crate::model::quantize::{quantize, QuantTarget};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Input GGUF (F32, F16, BF16 or any type ember reads)
    pub input: PathBuf,
    /// Output GGUF (written to a temporary file beside it, then renamed)
    pub output: PathBuf,
    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q4_K_M, Q5_K_M, F16 or F32 (llama.cpp's
    /// per-tensor choices for the _M mixes, no importance matrix)
    #[arg(value_name = "TYPE")]
    pub ty: String,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let target: QuantTarget = a.ty.parse()?;
    crate::files::check_output(&a.output, [a.input.as_path()])?;
    crate::files::check_regular(&a.input).map_err(|e| format!("{}: {e}", a.input.display()))?;
    let file = GgufFile::open(&a.input)?;
    let bar = indicatif::ProgressBar::new(file.tensors().len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("ember: quantising {msg} {bar:30} {pos}/{len} tensors").unwrap());
    bar.set_message(a.output.display().to_string());
    let w = quantize(&file, target, &|done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    w.write_file(&a.output).map_err(|e| format!("{}: {e}", a.output.display()))?;
    let size = std::fs::metadata(&a.output)?.len();
    eprintln!("ember: wrote {} ({:.1} MiB, {})", a.output.display(), size as f64 / (1u64 << 20) as f64, a.ty.to_ascii_uppercase());
    Ok(())
}
