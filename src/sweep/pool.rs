//! The local device pool: `devices × trials_per_device` slots, one thread each, every slot
//! claiming and running trials until the sweep is done; plus progress display.
//!
//! Progress on a terminal: one line per running trial (its key, device, step bar, losses) and
//! an overall bar of finished trials with an ETA. Elsewhere (logs, CI): one line per started
//! and finished trial on stderr.

use super::plan::Trial;
use super::worker::{Claim, Ctx};
use crate::error::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Progress display shared by the slots.
pub struct Events {
    quiet: bool,
    tty: bool,
    multi: MultiProgress,
    overall: ProgressBar,
    bars: Mutex<Vec<Option<ProgressBar>>>,
    done: AtomicUsize,
    total: usize,
}

impl Events {
    pub fn new(total: usize, already_done: usize, slots: usize, quiet: bool) -> Self {
        let tty = !quiet && std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
        let overall = multi.add(ProgressBar::new(total as u64));
        overall.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} trials | {msg} | elapsed {elapsed} | ETA {eta}").expect("template").progress_chars("=> "));
        overall.set_position(already_done as u64);
        overall.reset_eta();
        Self { quiet, tty, multi, overall, bars: Mutex::new(vec![None; slots]), done: AtomicUsize::new(already_done), total }
    }

    fn line(&self, s: String) {
        if self.quiet {
            return;
        }
        if self.tty {
            let _ = self.multi.println(s);
        } else {
            eprintln!("{s}");
        }
    }

    pub fn started(&self, slot: usize, t: &Trial, device: &str) {
        let desc: Vec<String> = t.params.iter().filter(|p| p.name != "ablate" || t.params.len() == 1).map(|p| format!("{}={}", short(&p.name), super::plan::show(&p.value))).collect();
        if self.tty {
            let b = self.multi.insert_before(&self.overall, ProgressBar::new(t.steps() as u64));
            b.set_style(ProgressStyle::with_template("{prefix} {bar:20} {pos}/{len} {msg}").expect("template").progress_chars("=> "));
            b.set_prefix(format!("{} [{device}]", t.key));
            b.set_message(desc.join(" "));
            self.bars.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some(b);
        } else {
            self.line(format!("sweep: start {} on {device}: {}", t.key, desc.join(" ")));
        }
    }

    pub fn progress(&self, slot: usize, step: usize, _total: usize, train: Option<f64>, val: Option<f64>) {
        if let Some(b) = &self.bars.lock().unwrap_or_else(|p| p.into_inner())[slot] {
            b.set_position(step as u64);
            let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
            b.set_message(format!("train {} val {}", f(train), f(val)));
        }
    }

    pub fn finished(&self, slot: usize, key: &str, status: &str, value: Option<f64>, last: bool) {
        if let Some(b) = self.bars.lock().unwrap_or_else(|p| p.into_inner())[slot].take() {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
        let n = if last { self.done.fetch_add(1, Ordering::SeqCst) + 1 } else { self.done.load(Ordering::SeqCst) };
        self.overall.set_position(n as u64);
        self.line(format!(
            "sweep: [{n}/{}] {key} {status}{}{}",
            self.total,
            value.map(|v| format!(" val_loss {v:.4}")).unwrap_or_default(),
            if last { "" } else { " (will retry)" }
        ));
    }

    pub fn note(&self, s: String) {
        self.line(s);
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// Runs slots until every trial is done (or `max_trials` trials were run by this process).
/// Returns how many trials this process ran.
pub fn run_slots(ctx: &Ctx, devices: &[String], per_device: usize, max_trials: Option<usize>) -> Result<usize> {
    let slots: Vec<String> = devices.iter().flat_map(|d| std::iter::repeat_n(d.clone(), per_device)).collect();
    let ran = AtomicUsize::new(0);
    let first_err: Mutex<Option<crate::error::Error>> = Mutex::new(None);
    let poll = Duration::from_secs_f64(ctx.sweep.heartbeat_s.clamp(0.2, 2.0));
    std::thread::scope(|s| {
        for (i, dev) in slots.iter().enumerate() {
            let (ran, first_err) = (&ran, &first_err);
            s.spawn(move || loop {
                if first_err.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                    return;
                }
                if max_trials.is_some_and(|m| ran.load(Ordering::SeqCst) >= m) {
                    return;
                }
                let r = ctx.claim(dev).and_then(|c| match c {
                    Claim::AllDone => Ok(false),
                    Claim::Wait => {
                        std::thread::sleep(poll);
                        Ok(true)
                    }
                    Claim::Trial(c) => {
                        ran.fetch_add(1, Ordering::SeqCst);
                        let e = ctx.run_trial(&c, dev, i)?;
                        ctx.events.finished(i, &c.trial.key, e.status, e.value, e.last);
                        Ok(true)
                    }
                });
                match r {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        ctx.events.note(format!("sweep: slot {i} ({dev}) stopped: {e}"));
                        first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    ctx.events.finish();
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(ran.into_inner()),
    }
}
