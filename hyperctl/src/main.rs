//! hyperctl: see the crate documentation and the README for commands and exit codes.

fn main() -> std::process::ExitCode {
    hyperctl::main_entry()
}
