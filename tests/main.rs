//! One integration-test binary; one module per area.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shared helpers: tiny configs, temp folders, running the CLI.
mod util;

/// Finite-difference gradient checks of the norms, FFNs, ops and the whole model.
mod grads;
/// The `attn` core op against its f64 reference, and `mixscale op` file round trips.
mod ops;
/// Gated DeltaNet core op: chunked vs token loop vs f64 loop (values, gradients), CLI round trip.
mod gdn;
/// Bad YAML and CLI input: messages name file, line and key path; nothing is left behind.
mod config_errors;
/// Training: determinism, bit-exact resume, accumulation, divergence, outputs.
mod training;
/// Every preset in architectures/ parses, resolves and builds.
mod presets;
/// CPU vs CUDA parity (skipped without a GPU).
mod gpu;
/// Token files and MQAR through the training loop: masked loss, accuracy, located errors.
mod datasets;
/// Scaling-law fitting: Epoch's Chinchilla refit, Step Law, synthetic recovery, bad input.
mod fit;
/// Sweeps: expansion, identity, plan, runs with real kills, concurrent workers, retries.
mod sweep;
/// IsoFLOP, DeepSeek, MoE-sparsity and annealing laws on synthetic data; degenerate input.
mod fit_laws;
/// Plots (SVG/PNG), report and the sweep analysis hook.
mod plot;
