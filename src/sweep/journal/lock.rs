//! The journal's inter-process lock, the same protocol as optuna 5.0's
//! `JournalFileSymlinkLock` (its default) and `JournalFileOpenLock`
//! (`optuna/storages/journal/_file.py`), so Python and Rust writers exclude each other:
//! - acquire: create `<journal>.lock` atomically — a symlink to the journal (`symlink(2)`), or a
//!   regular file with `O_CREAT|O_EXCL`; both fail with `EEXIST` while either kind exists, so the
//!   two kinds also exclude each other. Retry with exponential backoff from 1 ms to 1 s;
//! - release: `rename(lock, lock + <random> + ".rename")`, then `unlink` (so a force-release by a
//!   waiter and a late release by the owner never remove a newer lock);
//! - stale lock: when `stat(lock).st_mtime` (which follows the symlink to the journal itself) has
//!   not changed for `grace` (optuna: 30 s) while waiting, the waiter force-releases it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Which lock file optuna's writers use (both are mutually exclusive with each other).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// `JournalFileSymlinkLock`, optuna's default (NFSv2+).
    Symlink,
    /// `JournalFileOpenLock` (filesystems without symlinks, NFSv3+).
    Open,
}

/// A held lock; released on drop (also when the holder panics).
pub struct LockGuard {
    lock: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = release(&self.lock);
    }
}

/// Process-unique suffix for rename targets.
fn nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    format!("{:016x}{:08x}{:04x}", t, std::process::id(), N.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

fn release(lock: &Path) -> io::Result<()> {
    let mut renamed = lock.as_os_str().to_owned();
    renamed.push(format!("{}.rename", nonce()));
    std::fs::rename(lock, &renamed)?;
    std::fs::remove_file(&renamed)
}

fn try_create(kind: LockKind, target: &Path, lock: &Path) -> io::Result<()> {
    match kind {
        LockKind::Symlink => std::os::unix::fs::symlink(target, lock),
        LockKind::Open => std::fs::OpenOptions::new().write(true).create_new(true).open(lock).map(|_| ()),
    }
}

/// Blocks until `lock` is held. `target` is what the symlink points to (the journal, absolute).
pub fn acquire(kind: LockKind, target: &Path, lock: &Path, grace: Option<Duration>) -> io::Result<LockGuard> {
    let mut sleep = Duration::from_millis(1);
    let mut mtime: Option<SystemTime> = None;
    let mut since = Instant::now();
    let mut warned = Instant::now();
    loop {
        match try_create(kind, target, lock) {
            Ok(()) => return Ok(LockGuard { lock: lock.to_path_buf() }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if warned.elapsed() > Duration::from_secs(10) {
            eprintln!("mixscale: waiting for the journal lock {} (held by another writer)", lock.display());
            warned = Instant::now();
        }
        if let Some(grace) = grace {
            // optuna stats through the symlink; a lock that vanished or dangles is retried.
            if let Ok(m) = std::fs::metadata(lock).and_then(|m| m.modified()) {
                if mtime != Some(m) {
                    mtime = Some(m);
                    since = Instant::now();
                }
                if since.elapsed() > grace {
                    eprintln!("mixscale: the journal lock {} was not released for {grace:?}; forcibly releasing it", lock.display());
                    if release(lock).is_ok() {
                        sleep = Duration::from_millis(1);
                    }
                    mtime = None;
                    since = Instant::now();
                    continue;
                }
            }
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_secs(1));
    }
}
