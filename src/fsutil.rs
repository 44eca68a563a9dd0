//! Durable file writes shared by run records, checkpoints and fit results.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes a file and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Atomically replaces `path` with `bytes`: a temporary file in the same folder (named with the
/// process id, so concurrent writers never share one), fsync, rename, then fsync of the folder.
/// Readers see the old file or the new one, never a partial one; the temporary file is removed
/// if the rename fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    write_synced(&tmp, bytes)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
    Ok(())
}

/// fsyncs a folder (so a rename inside it is durable); best effort.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
