//! Sums across the concurrent shards of one micro-batch ([`crate::train::shard`]): the MoE
//! layers' balance statistics must be those of the whole micro-batch, so each shard's MoE layer
//! hands its selection counts to [`all_sum`] and continues with the sum over all shards (an
//! all-reduce, as DDP's collectives, between threads of one process).
//!
//! A thread takes part after [`join`] (the shard runner calls it on each shard's thread) until
//! the returned guard drops; a thread outside any group gets its own values back. Every shard
//! runs the same model on the same kind of batch, so all of them call [`all_sum`] the same
//! number of times in the same order. If a shard leaves early (an error, a panic), its guard
//! marks the group aborted and the others' calls return an error instead of waiting forever.

use candle_core::{bail, Result};
use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex};

/// The shards of one micro-batch.
pub struct Group {
    members: usize,
    state: Mutex<State>,
    turn: Condvar,
}

struct State {
    /// Completed sums so far.
    round: u64,
    /// Members that have added their values to the current round.
    arrived: usize,
    sum: Vec<f64>,
    /// The last completed round's sum.
    result: Vec<f64>,
    aborted: bool,
}

impl Group {
    pub fn new(members: usize) -> Arc<Self> {
        Arc::new(Self { members, state: Mutex::new(State { round: 0, arrived: 0, sum: Vec::new(), result: Vec::new(), aborted: false }), turn: Condvar::new() })
    }

    fn sum(&self, v: &[f64]) -> Result<Vec<f64>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.aborted {
            bail!("another shard of this micro-batch failed");
        }
        if s.arrived > 0 && s.sum.len() != v.len() {
            let n = s.sum.len();
            s.aborted = true;
            self.turn.notify_all();
            bail!("shards summed vectors of different lengths ({n} and {})", v.len());
        }
        if s.arrived == 0 {
            s.sum = v.to_vec();
        } else {
            // Addition order follows arrival; exact for the integer-valued counts summed here.
            s.sum.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        s.arrived += 1;
        let round = s.round;
        if s.arrived == self.members {
            s.result = std::mem::take(&mut s.sum);
            s.arrived = 0;
            s.round += 1;
            self.turn.notify_all();
            return Ok(s.result.clone());
        }
        while s.round == round && !s.aborted {
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.round == round {
            bail!("another shard of this micro-batch failed");
        }
        // The next round cannot complete before this member arrives, so `result` is this round's.
        Ok(s.result.clone())
    }

    fn abort(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.aborted = true;
        self.turn.notify_all();
    }
}

thread_local! {
    static GROUP: RefCell<Option<Arc<Group>>> = const { RefCell::new(None) };
}

/// Membership of the current thread in a group; leaving without [`Member::done`] (an error
/// return or a panic) aborts the group.
pub struct Member {
    group: Arc<Group>,
    done: bool,
}

impl Member {
    /// This member finished its work normally.
    pub fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        GROUP.with(|g| *g.borrow_mut() = None);
        if !self.done {
            self.group.abort();
        }
    }
}

/// Makes the current thread a member of `group` until the returned guard drops.
pub fn join(group: &Arc<Group>) -> Member {
    GROUP.with(|g| *g.borrow_mut() = Some(group.clone()));
    Member { group: group.clone(), done: false }
}

/// Element-wise sum of `v` over the members of the current thread's group (`v` itself outside a
/// group).
pub fn all_sum(v: &[f64]) -> Result<Vec<f64>> {
    match GROUP.with(|g| g.borrow().clone()) {
        Some(group) => group.sum(v),
        None => Ok(v.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three threads, several rounds: every member gets every round's total; outside a group
    /// the values come back unchanged; a member that leaves early fails the others' next sum.
    #[test]
    fn sums_across_members_and_aborts() {
        assert_eq!(all_sum(&[1.0, 2.0]).unwrap(), vec![1.0, 2.0]);
        let g = Group::new(3);
        let got: Vec<Vec<Vec<f64>>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..3)
                .map(|i| {
                    let g = g.clone();
                    sc.spawn(move || {
                        let m = join(&g);
                        let out = (0..4).map(|r| all_sum(&[i as f64, (r * 10) as f64]).unwrap()).collect();
                        m.done();
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for per in &got {
            for (r, v) in per.iter().enumerate() {
                assert_eq!(v, &vec![3.0, (30 * r) as f64]);
            }
        }
        let g = Group::new(2);
        let res = std::thread::scope(|sc| {
            let quitter = sc.spawn(|| {
                let _m = join(&g); // dropped without done(): aborts
            });
            let waiter = sc.spawn(|| {
                let m = join(&g);
                let r = all_sum(&[1.0]);
                m.done();
                r
            });
            quitter.join().unwrap();
            waiter.join().unwrap()
        });
        assert!(res.is_err());
    }
}
