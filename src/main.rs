use clap::Parser;

fn main() {
    let cli = ember::cli::Cli::parse();
    if let Err(e) = ember::cli::main_with(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
