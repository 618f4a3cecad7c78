//! The `membrane` CLI.

fn main() -> std::process::ExitCode {
    membrane_agent::cli::main()
}
