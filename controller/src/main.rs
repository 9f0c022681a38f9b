//! The `fediversity` command: daemon and CLI.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = fediversity::cli::Cli::parse();
    match fediversity::cli::run(cli).await {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {}", fediversity::text::escape(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}
