//! Child processes that never outlive xtask.
//!
//! [`Guarded::spawn`] asks the kernel to SIGKILL the child when xtask dies (`PR_SET_PDEATHSIG`, which
//! also covers SIGKILL of xtask, where no destructor runs), and the returned guard kills and reaps the
//! child when it is dropped before the child was waited for (any `?` between spawn and wait).
//!
//! The parent-death signal is tied to the *thread* that spawned the child: children are spawned from
//! the thread that waits for them (the main thread here), never from a short-lived helper thread.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};

/// Makes `cmd`'s child receive SIGKILL when the spawning thread (here: xtask) exits.
pub fn kill_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only `prctl` and `getppid`,
    // which are async-signal-safe; it allocates nothing (the error is built from an errno or a
    // constant) and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // xtask may have died between fork and prctl: then no signal will ever come.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            Ok(())
        })
    }
}

/// A child that is killed (SIGKILL) and reaped when dropped unless it was waited for.
pub struct Guarded {
    child: Child,
    reaped: bool,
}

impl Guarded {
    /// Spawns `cmd` with [`kill_with_parent`].
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        let child = kill_with_parent(cmd).spawn()?;
        Ok(Guarded { child, reaped: false })
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        self.reaped |= status.is_some();
        Ok(status)
    }

    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait()?;
        self.reaped = true;
        Ok(status)
    }

    /// Kills the child (if it still runs) and reaps it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if !self.reaped {
            // Fails only if the child has already exited; `wait` reaps it either way.
            let _ = self.child.kill();
        }
        self.wait()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            if let Err(e) = self.child.wait() {
                eprintln!("xtask: reaping child {}: {e}", self.id());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};

    fn is_running(pid: u32) -> bool {
        // A reaped child has no /proc entry (its pid is not reused this fast in a test).
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn dropping_the_guard_kills_and_reaps_the_child() {
        let guard = Guarded::spawn(Command::new("sleep").arg("1000")).unwrap();
        let pid = guard.id();
        assert!(is_running(pid));
        drop(guard);
        assert!(!is_running(pid), "the child outlived its guard");
    }

    #[test]
    fn an_error_after_spawn_kills_the_child() {
        let mut pid = 0;
        let result = (|| -> io::Result<()> {
            let guard = Guarded::spawn(Command::new("sleep").arg("1000"))?;
            pid = guard.id();
            Err(io::Error::other("something after spawn failed"))
        })();
        assert!(result.is_err());
        assert!(pid != 0 && !is_running(pid), "the child outlived the failed function");
    }

    #[test]
    fn a_waited_child_is_not_killed() {
        let mut guard = Guarded::spawn(&mut Command::new("true")).unwrap();
        assert!(guard.wait().unwrap().success());
    }

    /// The parent-death signal is what stops the child when xtask itself is killed (no destructor
    /// runs then). The kernel sends it when the spawning thread exits, which a test can do safely.
    #[test]
    fn the_child_is_killed_when_its_parent_thread_dies() {
        let mut child =
            std::thread::spawn(|| kill_with_parent(Command::new("sleep").arg("1000")).spawn().unwrap())
                .join()
                .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("the child survived its parent thread");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
