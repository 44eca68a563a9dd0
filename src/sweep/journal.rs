//! The study record: an Optuna journal file (`JournalStorage(JournalFileBackend(path))`), read
//! and written from Rust, so `optuna.load_study`, `optuna-dashboard <file>` and Python workers
//! share one file with mixscale.
//!
//! Format and semantics are optuna 5.0's (`optuna/storages/journal/_storage.py`, `_file.py`;
//! notes in the project's sweeps-storage reference, section 1a):
//! - one JSON object per line, written as `json.dumps(op, separators=(",", ":"))` writes it
//!   (Python float `repr`, `ensure_ascii`, bare `NaN` / `Infinity` / `-Infinity` for
//!   non-finite values) — see [`Op`] for the op codes and fields;
//! - ids come from replay, not from the file ([`Replay`]): trial ids count CREATE_TRIAL ops
//!   across the file, numbers count per study;
//! - params are stored as optuna stores them: the distribution JSON string and the internal
//!   float (a categorical stores the *index* of the choice); [`TrialRecord::params`] shows the
//!   external value;
//! - writers take optuna's lock (`<file>.lock`, a symlink by default; [`LockKind`]), append all
//!   lines of a batch in one `write` on an `O_APPEND` file, `fsync`, and release;
//! - readers take no lock. A last line without `\n` (a writer still writing, or one that was
//!   killed) is ignored, as is an invalid last line; an invalid line anywhere else is an error
//!   naming the file and line.
//! - torn tail: before appending (under the lock) and on [`Journal::open`], bytes after the
//!   last valid line are cut off — appending after them would merge them with the next line
//!   and make the file unreadable for every reader. The cut bytes are kept in `<file>.torn`.
//!
//! API:
//! ```text
//! Journal::open(path) / open_with(path, LockKind)   create (+ parent dirs), validate, repair tail
//! journal.read()        -> Vec<StudyRecord>         replay, no lock (incremental: only new lines)
//! journal.replay()      -> Replay                   the same, with ids and lookups
//! journal.transact(|replay| Ok((ops, r))) -> r      under the lock: replay to EOF, decide, append
//! journal.append(ops)                               transact without looking
//! replay_file(path)     -> Replay                   read-only (no create, lock or repair)
//! decode_line(line)     -> (worker_id, Op)          one line; Op::encode(worker_id) is the inverse
//! ```
//! [`Journal::transact`] is how a worker claims work atomically: e.g. find the first WAITING
//! trial and append SET_TRIAL_STATE_VALUES(RUNNING) for it, or append CREATE_TRIAL knowing it
//! gets [`Replay::next_trial_id`]. The batch is checked against the replay first (in the
//! cases where optuna raises for the issuing worker: unknown study or trial, finished trial,
//! duplicate study name, incompatible distribution, RUNNING → RUNNING) and nothing is written
//! if any op fails.
//!
//! Non-finite values inside attribute values (`serde_json::Value` cannot hold NaN) read back
//! as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`. A malformed op is an error (as it is for
//! optuna) unless optuna skips it before reading it: an op on an unknown or deleted study, or
//! on an unknown or finished trial.

mod dist;
mod lock;
mod ops;
mod pyjson;
mod replay;

pub use dist::Distribution;
pub use lock::LockKind;
pub use ops::{Direction, Op, TrialState};
pub use pyjson::{float_repr, iso_from_unix, now_iso};
pub use replay::{Replay, StudyRecord, TrialRecord};

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// optuna's default grace period before a waiter force-releases a lock nobody refreshed.
pub const LOCK_GRACE: Duration = Duration::from_secs(30);

/// An Optuna-compatible journal file.
pub struct Journal {
    path: PathBuf,
    /// Absolute path, what the lock symlink points to.
    target: PathBuf,
    lock_path: PathBuf,
    lock_kind: LockKind,
    grace: Option<Duration>,
    worker_id: String,
    cache: Mutex<Cache>,
}

/// The replay of the file's first `offset` bytes (`lines` complete lines).
#[derive(Default)]
struct Cache {
    offset: u64,
    lines: u64,
    replay: Replay,
}

impl Journal {
    /// Opens (creating it and its parent folders) the journal at `path` with optuna's default
    /// symlink lock; validates it and repairs a torn tail.
    pub fn open(path: &Path) -> Result<Journal> {
        Self::open_with(path, LockKind::Symlink)
    }

    /// [`Journal::open`] with the lock kind the file's other writers use.
    pub fn open_with(path: &Path, lock_kind: LockKind) -> Result<Journal> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        OpenOptions::new().append(true).create(true).open(path).map_err(|e| Error::io(path, e))?;
        let target = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let host = crate::train::tensorboard::hostname();
        let j = Journal {
            path: path.to_path_buf(),
            target,
            lock_path: lock_path.into(),
            lock_kind,
            grace: Some(LOCK_GRACE),
            worker_id: format!("mixscale-{host}-{}-{}", std::process::id(), lock_nonce()),
            cache: Mutex::new(Cache::default()),
        };
        let tail = j.sync(&mut j.cache())?;
        if tail > 0 {
            j.transact(|_| Ok((Vec::new(), ())))?;
        }
        Ok(j)
    }

    /// Sets how long a waiter lets an unchanged lock stand before force-releasing it (optuna:
    /// 30 s); `None` waits forever.
    pub fn with_lock_grace(mut self, grace: Option<Duration>) -> Self {
        self.grace = grace;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `worker_id` this journal writes on its lines.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The live studies with their trials (replayed without the lock).
    pub fn read(&self) -> Result<Vec<StudyRecord>> {
        let mut c = self.cache();
        self.sync(&mut c)?;
        Ok(c.replay.studies())
    }

    /// The replayed state (without the lock), for lookups by id or name.
    pub fn replay(&self) -> Result<Replay> {
        let mut c = self.cache();
        self.sync(&mut c)?;
        Ok(c.replay.clone())
    }

    /// Under the lock: replays the file to its end, lets `f` decide, and appends `f`'s ops in
    /// one write + fsync (nothing when it returns none). A CREATE_TRIAL of a live study in the
    /// batch gets id `replay.next_trial_id()` + (how many such ops precede it in the batch).
    /// Ops that optuna would reject from their own writer are an error, and then nothing is
    /// written; an error from `f` also writes nothing.
    pub fn transact<R>(&self, f: impl FnOnce(&Replay) -> Result<(Vec<Op>, R)>) -> Result<R> {
        let _guard = lock::acquire(self.lock_kind, &self.target, &self.lock_path, self.grace)
            .map_err(|e| Error::io(&self.lock_path, e))?;
        let mut c = self.cache();
        let tail = self.sync(&mut c)?;
        if tail > 0 {
            self.cut_tail(&mut c)?;
        }
        let (ops, r) = f(&c.replay)?;
        if !ops.is_empty() {
            self.write_ops(&mut c, &ops)?;
        }
        Ok(r)
    }

    /// Appends `ops` under the lock (see [`Journal::transact`]).
    pub fn append(&self, ops: Vec<Op>) -> Result<()> {
        self.transact(|_| Ok((ops, ())))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, line: Option<u64>, message: impl Into<String>) -> Error {
        Error::Journal { path: self.path.clone(), line, message: message.into() }
    }

    /// Replays the lines appended since the last sync. Returns how many bytes after the last
    /// replayed line were left alone (a partial last line, or an invalid last line).
    fn sync(&self, c: &mut Cache) -> Result<u64> {
        let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let len = f.metadata().map_err(|e| Error::io(&self.path, e))?.len();
        if len < c.offset {
            *c = Cache::default(); // replaced or truncated by someone else: start over
        }
        let mut buf = Vec::with_capacity((len - c.offset) as usize);
        f.seek(SeekFrom::Start(c.offset))
            .and_then(|_| (&mut f).take(len - c.offset).read_to_end(&mut buf))
            .map_err(|e| Error::io(&self.path, e))?;
        let mut pos = 0;
        while let Some(nl) = buf[pos..].iter().position(|b| *b == b'\n') {
            let end = pos + nl + 1;
            let lineno = c.lines + 1;
            let parsed = std::str::from_utf8(&buf[pos..pos + nl])
                .map_err(|e| format!("invalid UTF-8: {e}"))
                .and_then(pyjson::parse);
            let value = match parsed {
                Ok(v) => v,
                // optuna tolerates an undecodable line only when nothing follows it.
                Err(_) if end == buf.len() => break,
                Err(e) => return Err(self.err(Some(lineno), e)),
            };
            let applied = match ops::decode_value(&value) {
                Ok(d) => c.replay.apply(&d, false),
                Err(_) if c.replay.skip_unread(&value) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = applied {
                *c = Cache::default();
                return Err(self.err(Some(lineno), e));
            }
            c.offset += (nl + 1) as u64;
            c.lines += 1;
            pos = end;
        }
        Ok((buf.len() - pos) as u64)
    }

    /// Under the lock: moves the bytes after the last valid line to `<file>.torn` and truncates.
    fn cut_tail(&self, c: &mut Cache) -> Result<()> {
        let io = |e| Error::io(&self.path, e);
        let mut f = OpenOptions::new().read(true).write(true).open(&self.path).map_err(io)?;
        let mut tail = Vec::new();
        f.seek(SeekFrom::Start(c.offset)).and_then(|_| f.read_to_end(&mut tail)).map_err(io)?;
        let mut torn = self.path.as_os_str().to_owned();
        torn.push(".torn");
        let torn = PathBuf::from(torn);
        let mut t = OpenOptions::new().append(true).create(true).open(&torn).map_err(|e| Error::io(&torn, e))?;
        t.write_all(&tail).and_then(|_| t.write_all(b"\n")).and_then(|_| t.sync_all()).map_err(|e| Error::io(&torn, e))?;
        f.set_len(c.offset).and_then(|_| f.sync_all()).map_err(io)?;
        eprintln!(
            "mixscale: {}: cut {} bytes of an unfinished last line (a killed writer); kept in {}",
            self.path.display(),
            tail.len(),
            torn.display()
        );
        Ok(())
    }

    /// Checks `ops` against the replay (strict), then appends them in one write + fsync.
    fn write_ops(&self, c: &mut Cache, ops: &[Op]) -> Result<()> {
        let mut text = String::new();
        for (k, op) in ops.iter().enumerate() {
            let at = |e: String| self.err(None, format!("op {} of the batch ({op:?}): {e}", k + 1));
            let line = op.encode(&self.worker_id).map_err(at)?;
            // Replay exactly what readers will see (datetimes filled, floats round-tripped).
            let checked = ops::decode(&line).and_then(|d| c.replay.apply(&d, true));
            if let Err(e) = checked {
                *c = Cache::default();
                return Err(at(e));
            }
            text.push_str(&line);
            text.push('\n');
        }
        let written = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()));
        if let Err(e) = written {
            *c = Cache::default();
            return Err(Error::io(&self.path, e));
        }
        c.offset += text.len() as u64;
        c.lines += ops.len() as u64;
        Ok(())
    }
}

/// Replays the journal at `path` without creating, locking or repairing it (what optuna's
/// reader sees; a torn or invalid last line is ignored).
pub fn replay_file(path: &Path) -> Result<Replay> {
    let j = Journal {
        path: path.to_path_buf(),
        target: path.to_path_buf(),
        lock_path: PathBuf::new(),
        lock_kind: LockKind::Symlink,
        grace: None,
        worker_id: String::new(),
        cache: Mutex::new(Cache::default()),
    };
    j.replay()
}

/// Decodes one journal line into its writer's `worker_id` and the op (the inverse of
/// [`Op::encode`]); the message says what optuna would fail on.
pub fn decode_line(line: &str) -> std::result::Result<(String, Op), String> {
    ops::decode(line).map(|d| (d.worker_id, d.op))
}

fn lock_nonce() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut x = t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32) ^ (&t as *const _ as u64);
    // splitmix64 finalizer
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    format!("{:016x}", x ^ (x >> 31))
}
