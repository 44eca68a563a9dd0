//! Counts the autograd nodes of one training loss of a preset, with their element counts
//! (development aid: candle's backward allocates a zero gradient and adds into it per node input).
use std::collections::BTreeMap;
fn main() {
    let path = std::env::args().nth(1).unwrap_or("architectures/attention.yaml".into());
    let (m, batch) = mixscale::testing::preset_model_and_batch(&path);
    let loss = m.loss(&batch.inputs, &batch.targets).unwrap();
    let nodes = loss.sorted_nodes();
    if std::env::var_os("LIST").is_some() {
        for n in &nodes {
            println!("{:?} {:?}", n.dims(), n.dtype());
        }
    }
    let mut by_shape: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut total = 0usize;
    for n in &nodes {
        let e = by_shape.entry(format!("{:?} contig={}", n.dims(), n.is_contiguous())).or_default();
        e.0 += 1;
        e.1 += n.elem_count();
        total += n.elem_count();
    }
    let mut v: Vec<_> = by_shape.into_iter().collect();
    v.sort_by_key(|(_, (_, e))| std::cmp::Reverse(*e));
    for (s, (c, e)) in v.iter().take(25) {
        println!("{c:4} nodes {:8.1} M elems  {s}", *e as f64 / 1e6);
    }
    println!("{} nodes, {:.1} M elements in all", nodes.len(), total as f64 / 1e6);
}
