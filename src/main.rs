use clap::Parser;

fn main() {
    // Rust ignores SIGPIPE, which turns `ember info ... | head` into a panic on the next print;
    // restore the default so a closed pipe ends the program quietly, as with any Unix tool.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = ember::cli::Cli::parse();
    if let Err(e) = ember::cli::main_with(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
