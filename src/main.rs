//! The `mixscale` command line. Exit codes: 0 success; 1 runtime error; 2 bad input (config,
//! CLI values, files); 3 the training run diverged (recorded in summary.json); 4 `fit`: the best
//! fit did not converge (fit.json is still written, with `converged: false`); `sweep run`: a fit
//! of the sweep's `analysis:` failed (the report is still written).

mod cli;
mod cli_sweep;

/// mimalloc keeps freed pages for reuse; with glibc's malloc every large tensor is a fresh
/// mmap whose page faults cost ~25% of a CPU training step (measured with perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    mixscale::ops::cpu::set_threading_defaults();
    mixscale::ops::cpu::set_allocator_defaults();
    let code = match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            e.downcast_ref::<mixscale::Error>().map(|m| m.exit_code()).unwrap_or(1)
        }
    };
    std::process::exit(code);
}
