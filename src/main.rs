use clap::Parser;

fn main() {
    // Rust ignores SIGPIPE, which turns `ember info ... | head` into a panic on the next print;
    // restore the default so a closed pipe ends the program quietly, as with any Unix tool.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    #[cfg(unix)]
    quiet_headless_vulkan();
    let cli = ember::cli::Cli::parse();
    if let Err(e) = ember::cli::main_with(cli) {
        eprintln!("error: {}", ember::cli::shorten(&e.to_string(), 1000));
        std::process::exit(1);
    }
}

/// Mesa's Vulkan loader complains on stderr ("XDG_RUNTIME_DIR is invalid or not set") on headless
/// machines while ember probes for a GPU. Give it a private runtime directory, as a login session
/// would; done first thing, while the process has one thread.
#[cfg(unix)]
fn quiet_headless_vulkan() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = std::env::temp_dir().join(format!("ember-runtime-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let ok = std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0);
    if ok {
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}
