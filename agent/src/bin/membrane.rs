//! The `membrane` CLI.

fn main() -> std::process::ExitCode {
    // `membrane ... | head`: when the reader goes away the command ends as other Unix tools do
    // (status 141, SIGPIPE's), not with a panic (Rust ignores SIGPIPE, so printing fails).
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
    membrane_agent::cli::main()
}
