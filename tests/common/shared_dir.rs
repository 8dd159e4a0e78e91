//! A directory shared by the tests of one test binary, under Cargo's `CARGO_TARGET_TMPDIR`.
//!
//! A `TempDir` kept in a static is never dropped, so it is never removed and every run left
//! one more in /tmp. This directory has a fixed name inside the target directory instead and
//! is emptied when a run starts, so nothing accumulates.

use std::path::{Path, PathBuf};

/// `<CARGO_TARGET_TMPDIR>/<name>`, emptied and created anew; call it once per process.
pub fn shared_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot empty {}: {e}", dir.display()),
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
