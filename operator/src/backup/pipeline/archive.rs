//! A directory as a tar stream, and back.

use std::io::{self, Read, Write};
use std::path::Path;

/// Writes a directory as a tar stream (no symlinks followed; special files skipped).
pub fn write_tar(dir: &Path, out: &mut dyn Write) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder.append_dir_all(".", dir)?;
    builder.finish()
}

/// Unpacks a tar stream into a directory.
pub fn read_tar(input: &mut dyn Read, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_overwrite(true);
    archive.unpack(dir)
}
