//! TensorBoard event files (`tb/events.out.tfevents.<secs>.<host>.<pid>.<n>` in a run folder),
//! written without TensorFlow, read by TensorBoard, `EventAccumulator` and
//! `wandb sync --sync-tensorboard`.
//!
//! Format (TensorFlow `core/lib/io/record_writer.cc`, `core/util/event.proto`):
//! - TFRecord framing: `u64 len | masked_crc32c(len) u32 | data | masked_crc32c(data) u32`, little
//!   endian, CRC-32C (Castagnoli) masked as `((crc >> 15) | (crc << 17)) + 0xa282ead8`;
//! - each record is a protobuf `Event { 1: double wall_time, 2: int64 step,
//!   3: string file_version, 5: Summary summary }`, `Summary { repeated Value value = 1 }`,
//!   `Value { 1: string tag, 2: float simple_value }`; the first record of a file carries
//!   `file_version = "brain.Event:2"`.
//!
//! A run writes one event per metrics.csv row with every numeric column as a scalar tagged by
//! its column name (see [`row_scalars`]). Resume: each process writes a new file; files already
//! in `tb/` are first rewritten (atomically) without the events after the checkpoint's step, so
//! the folder never holds a step twice, whatever reader looks at it (TensorBoard's own purge of
//! "orphaned" steps is not relied on). A fresh start removes old event files, as it rewrites
//! metrics.csv.

use super::record::MetricsRow;
use crate::error::{Error, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The file-name prefix TensorBoard looks for.
pub const PREFIX: &str = "events.out.tfevents.";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, b| table[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// This machine's host name (as Python's `socket.gethostname()`), "localhost" if unknown.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// One decoded event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// (tag, simple_value) of the summary's values.
    pub scalars: Vec<(String, f32)>,
}

impl Event {
    /// The protobuf encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(1 << 3 | 1);
        out.extend_from_slice(&self.wall_time.to_le_bytes());
        if self.step != 0 {
            out.push(2 << 3);
            varint(&mut out, self.step as u64);
        }
        if let Some(v) = &self.file_version {
            bytes_field(&mut out, 3, v.as_bytes());
        }
        if !self.scalars.is_empty() {
            let mut summary = Vec::new();
            for (tag, x) in &self.scalars {
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes());
                value.push(2 << 3 | 5);
                value.extend_from_slice(&x.to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut out, 5, &summary);
        }
        out
    }

    /// Decodes the fields above (others are skipped).
    pub fn decode(b: &[u8]) -> std::result::Result<Event, String> {
        let mut e = Event { wall_time: 0.0, step: 0, file_version: None, scalars: Vec::new() };
        for (field, v) in fields(b)? {
            match (field, v) {
                (1, Wire::Fixed64(x)) => e.wall_time = f64::from_bits(x),
                (2, Wire::Varint(x)) => e.step = x as i64,
                (3, Wire::Bytes(s)) => e.file_version = Some(String::from_utf8_lossy(s).into()),
                (5, Wire::Bytes(summary)) => {
                    for (f, v) in fields(summary)? {
                        if let (1, Wire::Bytes(value)) = (f, v) {
                            let (mut tag, mut x) = (String::new(), None);
                            for (g, w) in fields(value)? {
                                match (g, w) {
                                    (1, Wire::Bytes(t)) => tag = String::from_utf8_lossy(t).into(),
                                    (2, Wire::Fixed32(bits)) => x = Some(f32::from_bits(bits)),
                                    _ => {}
                                }
                            }
                            if let Some(x) = x {
                                e.scalars.push((tag, x));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(e)
    }
}

enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn fields(mut b: &[u8]) -> std::result::Result<Vec<(u64, Wire<'_>)>, String> {
    fn read_varint(b: &mut &[u8]) -> std::result::Result<u64, String> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            x |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err("varint too long".into())
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b)?;
        let take = |b: &mut &[u8], n: usize| -> std::result::Result<u64, String> {
            if b.len() < n {
                return Err("truncated field".into());
            }
            let mut buf = [0u8; 8];
            buf[..n].copy_from_slice(&b[..n]);
            *b = &b[n..];
            Ok(u64::from_le_bytes(buf))
        };
        let v = match key & 7 {
            0 => Wire::Varint(read_varint(&mut b)?),
            1 => Wire::Fixed64(take(&mut b, 8)?),
            2 => {
                let n = read_varint(&mut b)? as usize;
                if b.len() < n {
                    return Err("truncated bytes field".into());
                }
                let (s, rest) = b.split_at(n);
                b = rest;
                Wire::Bytes(s)
            }
            5 => Wire::Fixed32(take(&mut b, 4)? as u32),
            w => return Err(format!("unsupported wire type {w}")),
        };
        out.push((key >> 3, v));
    }
    Ok(out)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Reads every record of an event file, checking both CRCs of each. A truncated last record
/// (a writer killed mid-record) ends the list, as TensorBoard treats it.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| Error::io(path, e))?;
    let bad = |at: usize, m: &str| Error::Input(format!("{}: record at byte {at}: {m}", path.display()));
    let mut events = Vec::new();
    let mut pos = 0;
    while pos + 12 <= bytes.len() {
        let len_bytes = &bytes[pos..pos + 8];
        let crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().expect("4 bytes"));
        if crc != masked_crc32c(len_bytes) {
            return Err(bad(pos, "length CRC mismatch"));
        }
        let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let start = pos + 12;
        if start + n + 4 > bytes.len() {
            break;
        }
        let data = &bytes[start..start + n];
        let crc = u32::from_le_bytes(bytes[start + n..start + n + 4].try_into().expect("4 bytes"));
        if crc != masked_crc32c(data) {
            return Err(bad(pos, "data CRC mismatch"));
        }
        events.push(Event::decode(data).map_err(|m| bad(pos, &m))?);
        pos = start + n + 4;
    }
    Ok(events)
}

/// The scalars of one metrics row, tagged by their metrics.csv column names.
pub fn row_scalars(row: &MetricsRow, accuracy: bool) -> Vec<(String, f32)> {
    let mut s = vec![("tokens", row.tokens as f64), ("lr", row.lr), ("train_loss", row.train_loss)];
    if let Some(v) = row.val_loss {
        s.push(("val_loss", v));
    }
    s.push(("grad_norm", row.grad_norm));
    s.push(("tokens_per_s", row.tokens_per_s));
    if let (true, Some(a)) = (accuracy, row.val_accuracy) {
        s.push(("val_accuracy", a));
    }
    s.into_iter().map(|(t, x)| (t.to_string(), x as f32)).collect()
}

/// Appends events to one new event file; flushes each event, fsyncs on [`EventWriter::close`]
/// and on drop.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed), named to sort after the files
    /// already there, and writes the `file_version` event.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        static N: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let newest = event_files(dir)?
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.strip_prefix(PREFIX)?.split('.').next()?.parse::<u64>().ok())
            .max();
        let secs = (now() as u64).max(newest.map_or(0, |s| s + 1));
        let name = format!("{PREFIX}{secs}.{}.{}.{}", hostname(), std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(name);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, file: BufWriter::new(file) };
        w.write(&Event { wall_time: now(), step: 0, file_version: Some("brain.Event:2".into()), scalars: Vec::new() })?;
        Ok(w)
    }

    /// The event-file writer of a run folder's `tb/` (see the module doc for resume).
    pub fn for_run(run_dir: &Path, keep_until: Option<usize>) -> Result<EventWriter> {
        let dir = run_dir.join("tb");
        if dir.exists() {
            for p in event_files(&dir)? {
                match keep_until {
                    None => fs::remove_file(&p).map_err(|e| Error::io(&p, e))?,
                    // A damaged event file must not stop a resume; TensorBoard skips bad records.
                    Some(step) => {
                        if let Err(e) = truncate_after(&p, step as i64) {
                            eprintln!("mixscale: warning: left {} as it is: {e}", p.display());
                        }
                    }
                }
            }
        }
        Self::create(&dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event and flushes it to the OS.
    pub fn write(&mut self, e: &Event) -> Result<()> {
        self.file.write_all(&frame(&e.encode())).and_then(|_| self.file.flush()).map_err(|err| Error::io(&self.path, err))
    }

    /// One event with these scalars at `step`.
    pub fn scalars(&mut self, step: i64, scalars: Vec<(String, f32)>) -> Result<()> {
        self.write(&Event { wall_time: now(), step, file_version: None, scalars })
    }

    /// Flushes and fsyncs.
    pub fn close(&mut self) -> Result<()> {
        self.file.flush().and_then(|_| self.file.get_ref().sync_all()).map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The event files in `dir`, sorted by name (TensorBoard's reading order).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(PREFIX)))
        .collect();
    v.sort();
    Ok(v)
}

/// Rewrites an event file without the summary events after `step` (atomically).
fn truncate_after(path: &Path, step: i64) -> Result<()> {
    let events = read_events(path)?;
    if events.iter().all(|e| e.scalars.is_empty() || e.step <= step) {
        return Ok(());
    }
    let mut bytes = Vec::new();
    for e in events.iter().filter(|e| e.scalars.is_empty() || e.step <= step) {
        bytes.extend_from_slice(&frame(&e.encode()));
    }
    crate::fsutil::write_atomic(path, &bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_answers() {
        // RFC 3720 (iSCSI) B.4 test vectors and the standard check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    #[test]
    fn event_round_trip() {
        let e = Event { wall_time: 1.5e9, step: 300, file_version: None, scalars: vec![("val_loss".into(), 2.5), ("lr".into(), 1e-3)] };
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);
    }
}
