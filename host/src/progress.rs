//! Whether long operations (loading weights, quantizing, long prefills, benchmarks) show a
//! progress bar: only on a terminal, and never after [`set_quiet`] (`--quiet`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Turn progress bars and informational stderr lines off (or back on).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// True after `set_quiet(true)`.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Whether to draw progress bars: stderr is a terminal and not quiet.
pub fn bars() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}
