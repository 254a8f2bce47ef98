//! hyper2kvm-agent: see the crate documentation and README for flags and exit codes.

fn main() -> std::process::ExitCode {
    hyper2kvm_agent::main_entry()
}
