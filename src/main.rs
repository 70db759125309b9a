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
    ember::cli::quiet_headless_vulkan();
    let cli = ember::cli::Cli::parse();
    if let Err(e) = ember::cli::main_with(cli) {
        eprintln!("error: {}", ember::cli::shorten(&e.to_string(), 1000));
        std::process::exit(1);
    }
}
