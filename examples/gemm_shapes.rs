//! GEMM throughput of the `gemm` crate at the projection shapes of a preset step, beside
//! mixscale's packed AVX2 sgemm where it is enabled (dev aid):
//!     cargo run --release --example gemm_shapes -- [threads] [--tiles | --d512]
use std::time::Instant;
fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    // (m, k, n, a_transposed, b_transposed) — the attention preset's d=128 linear layers.
    let tiles = std::env::args().any(|a| a == "--tiles");
    let shapes_big = [
        (4096, 128, 384, false, false), (4096, 384, 128, false, true), (128, 4096, 384, true, false), (128, 4096, 384, false, false), (384, 4096, 128, true, false), (384, 4096, 128, false, false),
        (4096, 128, 352, false, false), (4096, 352, 128, false, false), (4096, 352, 128, false, true),
        (352, 4096, 128, true, false), (128, 4096, 352, true, false), (4096, 128, 512, false, true),
        (512, 4096, 128, true, false), (128, 4096, 128, true, false), (128, 2048, 128, true, false), (128, 2048, 352, true, false), (352, 2048, 128, true, false),
        (1024, 1024, 1024, false, false),
    ];
    // attention tiles (single-threaded inside the kernel's tasks): S = Q Kᵀ, P V, dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q
    let shapes_tiles = [
        (64, 32, 256, false, true), (64, 32, 256, false, false), (64, 32, 128, false, true), (64, 32, 128, false, false), (64, 32, 64, false, true), (64, 32, 64, false, false), (64, 256, 32, false, false), (64, 128, 32, false, false),
        (256, 64, 32, true, false), (128, 64, 32, true, false), (256, 256, 32, false, false), (256, 32, 256, false, true),
        // the MoE preset's expert products (1024 routed rows, d 128, hidden 176): forward, dx, dW
        (1024, 128, 176, false, false), (1024, 176, 128, false, false), (1024, 128, 176, false, true), (1024, 176, 128, false, true),
        (176, 1024, 128, true, false), (128, 1024, 176, true, false),
    ];
    // `--d512`: the d_model=512 attention preset's products (qkv, o, FFN 1376, head 512; dx and dW)
    let shapes_d512 = [
        (4096, 512, 1536, false, false), (4096, 1536, 512, false, true), (512, 4096, 1536, true, false),
        (4096, 512, 512, false, false), (512, 4096, 512, true, false),
        (4096, 512, 1376, false, false), (4096, 1376, 512, false, true), (512, 4096, 1376, true, false), (1376, 4096, 512, true, false),
        (4096, 1376, 512, false, false), (4096, 512, 1376, false, true),
    ];
    let d512 = std::env::args().any(|a| a == "--d512");
    let shapes: Vec<_> = if tiles { shapes_tiles.to_vec() } else if d512 { shapes_d512.to_vec() } else { shapes_big.to_vec() };
    let threads = if tiles { 1 } else { threads };
    for (m, k, n, ta, tb) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        // a stored [m,k] (or [k,m] when ta), b [k,n] (or [n,k] when tb)
        let (a_cs, a_rs) = if ta { (m as isize, 1) } else { (1, k as isize) };
        let (b_cs, b_rs) = if tb { (k as isize, 1) } else { (1, n as isize) };
        let run = |c: &mut Vec<f32>| unsafe {
            gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), a_cs, a_rs, b.as_ptr(), b_cs, b_rs, 1.0, 1.0, false, false, false,
                if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None })
        };
        for _ in 0..3 { run(&mut c); }
        let reps = 30;
        let (best, mean) = timed(reps, || run(&mut c));
        let fl = 2.0 * (m * n * k) as f64;
        print!("{m:5}x{k:5}x{n:5} ta={ta:5} tb={tb:5}  best {:6.1} GF/s  mean {:6.1} GF/s", fl / best / 1e9, fl / mean / 1e9);
        // mixscale's packed sgemm (CPUs with AVX2 and no AVX-512), same threads
        if mixscale::ops::sgemm::enabled() {
            use mixscale::ops::sgemm::{try_sgemm, Operand};
            let (ars, acs) = if ta { (1, m) } else { (k, 1) };
            let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
            let (best, mean) = timed(reps, || {
                try_sgemm(m, n, k, &mut c, n, true, Operand { data: &a, rs: ars, cs: acs }, Operand { data: &b, rs: brs, cs: bcs }, 1.0, threads);
            });
            print!("   sgemm best {:6.1} GF/s  mean {:6.1} GF/s", fl / best / 1e9, fl / mean / 1e9);
        }
        // mixscale's unpacked micro-kernel (row-major b only), single-threaded
        if tiles && !tb {
            let (ars, acs) = if ta { (1, m) } else { (k, 1) };
            let run_t = |c: &mut Vec<f32>| mixscale::ops::tile_mm::try_mm_f32(m, n, k, c, n, false, (&a, ars, acs), (&b, n), 1.0);
            if run_t(&mut c) {
                let (best, _) = timed(reps, || {
                    run_t(&mut c);
                });
                print!("   tile_mm best {:6.1} GF/s", fl / best / 1e9);
            }
        }
        println!();
    }
}

/// Best and mean seconds of `reps` calls of `f`.
fn timed(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    let (mut best, mut tot) = (f64::MAX, 0.0);
    for _ in 0..reps {
        let t0 = Instant::now();
        f();
        let s = t0.elapsed().as_secs_f64();
        best = best.min(s);
        tot += s;
    }
    (best, tot / reps as f64)
}
