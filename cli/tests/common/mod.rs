//! Helpers shared by the tests that drive the real `starling` binary as subprocesses.

use std::path::PathBuf;
use std::process::Child;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_starling");

/// Kills (SIGKILL) every child still running when dropped, so a failing test leaves no processes behind.
pub struct Kill(pub Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A fresh scratch directory named after `tag`, the process and the time.
pub fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let p = std::env::temp_dir().join(format!("starling-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}
