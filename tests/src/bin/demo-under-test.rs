//! The demo service, for the end-to-end tests to run as a separate process.

fn main() -> std::process::ExitCode {
    tollgate_tests::run_demo()
}
