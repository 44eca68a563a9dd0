//! Row selection before a fit: `best_per` keeps, in each group of rows that share the values of
//! the given columns, only the row with the lowest objective — e.g. `best_per: [arch, N]` keeps
//! the best learning rate of every model size, the usual frontier filter before fitting loss
//! against size or compute (Kaplan et al. 2020 and Hoffmann et al. 2022 fit the best run per
//! size; Bi et al. 2024 (DeepSeek LLM) fit near-optimal hyperparameters per budget).

use super::csv::{parse_number, Table};

/// Keeps the lowest-`objective` row of each group of equal `by` values (string equality after
/// trimming, or numeric equality). Rows whose objective is missing or not finite (diverged runs
/// report `inf`/`nan`) never win a group; groups with no finite objective keep nothing. Every
/// removal is reported. A missing column removes every row and says so.
pub fn best_per(table: &Table, by: &[String], objective: &str) -> (Table, Vec<String>) {
    if by.is_empty() || table.records.is_empty() {
        return (table.clone(), vec![]);
    }
    let mut cols = Vec::new();
    for name in by.iter().map(String::as_str).chain(std::iter::once(objective)) {
        match table.column(name) {
            Some(j) => cols.push(j),
            None => {
                let msg = format!("`best_per`: no column `{name}` in {} (columns: {}); all rows excluded", table.path.display(), table.header_list());
                return (Table { records: vec![], ..table.clone() }, vec![msg]);
            }
        }
    }
    let jo = cols.pop().expect("objective column");
    let key = |f: &[String]| -> Vec<String> {
        cols.iter()
            .map(|&j| {
                let s = f[j].trim();
                // Numeric keys compare by value ("1e6" and "1000000" are one group).
                match parse_number(s) {
                    Some(v) if v.is_finite() => format!("{v:e}"),
                    _ => s.to_string(),
                }
            })
            .collect()
    };
    // Best row index per group, in first-appearance order of the groups.
    let mut groups: Vec<(Vec<String>, Option<(usize, f64)>)> = Vec::new();
    for (i, (_, f)) in table.records.iter().enumerate() {
        let k = key(f);
        let y = parse_number(f[jo].trim()).filter(|y| y.is_finite());
        let slot = match groups.iter_mut().find(|(g, _)| *g == k) {
            Some(s) => s,
            None => {
                groups.push((k, None));
                groups.last_mut().unwrap()
            }
        };
        if let Some(y) = y {
            if slot.1.map_or(true, |(_, b)| y < b) {
                slot.1 = Some((i, y));
            }
        }
    }
    let mut keep: Vec<usize> = groups.iter().filter_map(|(_, b)| b.map(|(i, _)| i)).collect();
    keep.sort_unstable();
    let n_out = table.records.len() - keep.len();
    let mut ex = Vec::new();
    if n_out > 0 {
        ex.push(format!(
            "{n_out} rows not the lowest `{objective}` of their ({}) group (`best_per`); excluded",
            by.join(", ")
        ));
    }
    let records = keep.into_iter().map(|i| table.records[i].clone()).collect();
    (Table { records, ..table.clone() }, ex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn keeps_the_best_row_of_each_group() {
        let t = Table::parse(
            Path::new("r.csv"),
            "arch,N,lr,loss\nattn,100,1e-3,4.0\nattn,100,3e-3,3.5\nattn,1e2,1e-2,inf\nattn,200,1e-3,3.2\ngdn,100,1e-3,3.9\ngdn,200,1e-3,nan\n",
        )
        .unwrap();
        let (kept, ex) = best_per(&t, &["arch".into(), "N".into()], "loss");
        let rows: Vec<(usize, &str)> = kept.records.iter().map(|(l, f)| (*l, f[3].as_str())).collect();
        // attn/100 (3 rows, "1e2" is the same N) -> 3.5; attn/200 -> 3.2; gdn/100 -> 3.9; gdn/200 has no finite loss.
        assert_eq!(rows, vec![(3, "3.5"), (5, "3.2"), (6, "3.9")]);
        assert_eq!(ex.len(), 1);
        assert!(ex[0].starts_with("3 rows not the lowest `loss` of their (arch, N) group"), "{}", ex[0]);
    }

    #[test]
    fn missing_column_excludes_everything_and_says_so() {
        let t = Table::parse(Path::new("r.csv"), "N,loss\n1,2\n").unwrap();
        let (kept, ex) = best_per(&t, &["arch".into()], "loss");
        assert!(kept.records.is_empty());
        assert!(ex[0].contains("no column `arch`") && ex[0].contains("`N`, `loss`"), "{}", ex[0]);
    }
}
