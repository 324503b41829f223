//! Durable file publication, in one place: a file becomes visible under its final name only
//! complete and fsynced, and the rename itself is made durable by an fsync of the directory
//! (rename is atomic but not durable without it).

use std::fs::File;
use std::path::Path;

use crate::error::SegmentError;

/// fsync a directory so that the renames and unlinks in it survive a power loss.
pub fn fsync_dir(dir: &Path) -> Result<(), SegmentError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| SegmentError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Remove a file if it exists; used for temporary files whose absence is the goal.
pub fn remove_if_exists(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a temporary file");
    }
}

/// Write `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SegmentError> {
    write_atomically_with(path, |w| w.write_all(bytes))
}

/// [`write_atomically`] what `write` writes (through a buffer), for a file too large to hold
/// in memory first.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), SegmentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SegmentError::Io { path, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let mut buffered = std::io::BufWriter::with_capacity(1 << 20, &mut file);
    write(&mut buffered)
        .and_then(|()| buffered.flush())
        .map_err(io(&tmp))?;
    drop(buffered);
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    fsync_dir(dir)
}

/// Create `dir` (and its parents) private to the owner, as the archive is, and make its
/// entry durable (an fsync of its parent); nothing when it exists.
pub fn create_private_dir(dir: &Path) -> Result<(), SegmentError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| SegmentError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => fsync_dir(parent),
        _ => Ok(()),
    }
}
