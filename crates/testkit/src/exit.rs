//! The crate's only `unsafe` code: registering a hook that runs when the process exits.

use std::io;

/// Runs `hook` when the process exits normally (after `main` returns or on `process::exit`).
pub(crate) fn at_exit(hook: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `hook` is a plain function with the C ABI and no arguments, as atexit expects.
    if unsafe { libc::atexit(hook) } == 0 { Ok(()) } else { Err(io::Error::other("atexit failed")) }
}
