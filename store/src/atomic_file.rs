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
