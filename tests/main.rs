//! One integration-test binary; one module per area.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shared helpers: tiny configs, temp folders, running the CLI.
mod util;

/// Finite-difference gradient checks of the norms, FFNs, ops and the whole model.
mod grads;
/// The `attn` core op against its f64 reference, and `mixscale op` file round trips.
mod ops;
/// Forgetting attention (FoX): fused vs composed vs f64 loop, gradients, golden fixtures, layer.
mod fox;
/// MoBA: fused (selected blocks only) vs masked composed vs f64 loop, gradients, golden fixtures, layer.
mod moba;
/// Gated DeltaNet core op: chunked vs token loop vs f64 loop (values, gradients), CLI round trip.
mod gdn;
/// Mamba-2 SSD core op: chunked vs token loop vs step vs f64 loop (values, gradients), CLI round trip.
mod ssd;
/// Core ops against fixtures written by the reference implementations (tests/golden/make_*.py).
mod golden;
/// RWKV-7: WKV-7 op forms (chunked/recurrent/step/f64), layer, channel-mix, golden fixtures, CLI.
mod rwkv7;
/// Bad YAML and CLI input: messages name file, line and key path; nothing is left behind.
mod config_errors;
/// Training: determinism, bit-exact resume, accumulation, divergence, outputs.
mod training;
/// Data-parallel shards of a micro-batch: same gradients as the whole one; exact splits only.
mod shard;
/// Every preset in architectures/ parses, resolves and builds.
mod presets;
/// PyTorch references in bench/ vs mixscale: parameter tables, loss trends (skipped without torch).
mod bench_torch;
/// CPU vs CUDA parity (skipped without a GPU).
mod gpu;
/// Token files and MQAR through the training loop: masked loss, accuracy, located errors.
mod datasets;
/// The MAD suite through training: per-split masking, macro accuracy, located errors.
mod mad;
/// Scaling-law fitting: Epoch's Chinchilla refit, Step Law, synthetic recovery, bad input.
mod fit;
/// `data prepare` (text/JSONL → shards), tokenizers vs tiktoken, Megatron indexes, bits per byte.
mod data_prepare;
/// Study record: Optuna journal replay, round trips, torn tails, concurrent writers, Python interop.
mod journal;
/// TensorBoard event files beside metrics.csv: framing, CRCs, resume, EventAccumulator.
mod tensorboard;
/// Sweeps: expansion, identity, plan, runs with real kills, concurrent workers, retries.
mod sweep;
/// IsoFLOP, DeepSeek, MoE-sparsity and annealing laws on synthetic data; degenerate input.
mod fit_laws;
/// Plots (SVG/PNG), report and the sweep analysis hook.
mod plot;
/// MoE feed-forward: dense equivalence, dispatch vs dense reference, gradients, balancing, accounting.
mod moe;
/// Multi-token prediction (Gloeckle, DeepSeek-V3): gradients, label shifts, main-loss semantics.
mod mtp;
/// Mixed precision (bf16 compute, f32 masters) for every block kind: forward, gradients, training.
mod precision;
