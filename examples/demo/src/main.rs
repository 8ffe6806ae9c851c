//! Run with `cargo run -p tollgate-demo -- [--listen ADDR] [--config FILE]`.

fn main() -> std::process::ExitCode {
    tollgate_demo::cli_main()
}
