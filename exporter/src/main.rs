//! hyperexport: see the crate documentation and the README for flags and exit codes.

fn main() -> std::process::ExitCode {
    hyperexport::main_entry()
}
