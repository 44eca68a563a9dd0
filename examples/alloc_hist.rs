//! Bytes a training step allocates, zero-filled or not, by size class (development aid; see
//! `ops::cpu::take`): wraps mimalloc in a counting allocator, runs two untimed steps, counts the
//! third, and lists the zero-filled allocations of 1 MiB or more by exact size.
//!     cargo run --release --example alloc_hist -- architectures/mamba2.yaml
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
struct Count;
static ON: AtomicBool = AtomicBool::new(false);
static Z: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static N: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static ZC: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static NC: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
const SLOTS: usize = 4096;
static SIZES: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static SN: AtomicU64 = AtomicU64::new(0);
fn bucket(s: usize) -> usize { match s { 0..=4095 => 0, 4096..=65535 => 1, 65536..=1048575 => 2, 1048576..=4194303 => 3, 4194304..=16777215 => 4, _ => 5 } }
unsafe impl GlobalAlloc for Count {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 { if ON.load(Relaxed) { N[bucket(l.size())].fetch_add(l.size() as u64, Relaxed); NC[bucket(l.size())].fetch_add(1, Relaxed); } mimalloc::MiMalloc.alloc(l) }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 { if ON.load(Relaxed) { Z[bucket(l.size())].fetch_add(l.size() as u64, Relaxed); ZC[bucket(l.size())].fetch_add(1, Relaxed); if l.size() >= 1 << 20 { let i = SN.fetch_add(1, Relaxed) as usize; if i < SLOTS { SIZES[i].store(l.size() as u64, Relaxed); } } } mimalloc::MiMalloc.alloc_zeroed(l) }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) { mimalloc::MiMalloc.dealloc(p, l) }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 { if ON.load(Relaxed) { N[bucket(n)].fetch_add(n as u64, Relaxed); NC[bucket(n)].fetch_add(1, Relaxed); } mimalloc::MiMalloc.realloc(p, l, n) }
}
#[global_allocator]
static G: Count = Count;
fn main() {
    let path = std::env::args().nth(1).unwrap_or("architectures/attention.yaml".into());
    let (m, batch) = mixscale::testing::preset_model_and_batch(&path);
    for i in 0..3 {
        ON.store(i == 2, Relaxed);
        let loss = m.loss(&batch.inputs, &batch.targets).unwrap();
        let g = loss.backward().unwrap();
        drop(g);
    }
    ON.store(false, Relaxed);
    let names = ["<4K", "4K-64K", "64K-1M", "1M-4M", "4M-16M", ">=16M"];
    let mut v: Vec<u64> = (0..(SN.load(Relaxed) as usize).min(SLOTS)).map(|i| SIZES[i].load(Relaxed)).collect();
    v.sort();
    let mut j = 0;
    while j < v.len() { let k = v[j..].iter().take_while(|&&x| x == v[j]).count(); println!("zeroed {} B ({} f32) x{}", v[j], v[j] / 4, k); j += k; }
    for i in 0..6 { println!("{:>8}: zeroed {:8.1} MB in {:6} | plain {:8.1} MB in {:6}", names[i], Z[i].load(Relaxed) as f64 / 1e6, ZC[i].load(Relaxed), N[i].load(Relaxed) as f64 / 1e6, NC[i].load(Relaxed)); }
}
