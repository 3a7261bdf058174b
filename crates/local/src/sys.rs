//! The crate's only `unsafe` code: thin, safe wrappers around the libc calls that std does not
//! offer (effective uid, user lookup, signals, parent-death signal).

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The (uid, gid) of the system user `name`, or `None` if there is no such user.
pub(crate) fn user_ids(name: &str) -> io::Result<Option<(u32, u32)>> {
    let c_name = CString::new(name).map_err(io::Error::other)?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: an all-zero `passwd` (null pointers, zero ids) is a valid value; getpwnam_r
        // only writes into it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and `buf.len()` is the
        // true size of `buf`; getpwnam_r is the thread-safe variant (no static buffer).
        let rc = unsafe {
            libc::getpwnam_r(c_name.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result)
        };
        if rc == libc::ERANGE && buf.len() < 1024 * 1024 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        return Ok((!result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)));
    }
}

/// Sends `signal` to `child` unless it has already been reaped.
///
/// Checking `try_wait` first is what makes this sound with respect to pid reuse: until we reap
/// the child (only we do), its pid stays allocated, even as a zombie.
pub(crate) fn signal(child: &mut Child, signal: libc::c_int) -> io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: kill has no memory-safety preconditions; the pid belongs to our unreaped child.
    if unsafe { libc::kill(pid, signal) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Makes the child receive `signal` when the thread that forks it exits, and refuses to start
/// it if this process is already gone by the time the setting takes effect.
///
/// std runs `pre_exec` closures after switching uid/gid, and the kernel clears the parent-death
/// signal on credential changes, so the setting must be made here and not earlier.
pub(crate) fn set_parent_death_signal(cmd: &mut Command, signal: libc::c_int) {
    let parent = std::process::id();
    let signal = libc::c_ulong::try_from(signal).unwrap_or(libc::SIGKILL as libc::c_ulong);
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are
    // allowed: prctl and getppid are plain syscalls, and it neither allocates nor locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died between fork and prctl: nobody will ever signal us.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}
