//! Processes: trial children that die with their runner, liveness of a claimer.

use std::process::{Child, Command};

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0;
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok && n > 0 {
        String::from_utf8_lossy(&buf[..n]).to_string()
    } else {
        "localhost".into()
    }
}

/// An identifier of process `pid`'s incarnation: its start time in clock ticks since boot
/// (`/proc/<pid>/stat` field 22), so a recycled pid is not mistaken for the claimer. `None`
/// when no such process exists. Without procfs: "alive" when `kill(pid, 0)` succeeds.
pub fn process_start(pid: u32) -> Option<String> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // The command name (field 2) is in parentheses and may contain spaces.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // rest starts at field 3 (state); zombies are dead.
            if f.first() == Some(&"Z") {
                return None;
            }
            f.get(19).map(|x| x.to_string())
        }
        Err(_) if !std::path::Path::new("/proc/self/stat").exists() => {
            // SAFETY: signal 0 only checks for existence.
            (unsafe { libc::kill(pid as libc::pid_t, 0) } == 0).then(|| "alive".into())
        }
        Err(_) => None,
    }
}

/// Arranges for the child to receive SIGKILL when the thread that spawned it dies (Linux
/// `PR_SET_PDEATHSIG`), so a `kill -9` of the runner never leaves a trial training on in the
/// background (which a resumed sweep would then run a second time).
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(137); // the parent already died
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// SIGTERM, then SIGKILL after `grace` if still running; reaps the child.
pub fn terminate(child: &mut Child, grace: std::time::Duration) {
    // SAFETY: sending a signal to our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let t0 = std::time::Instant::now();
    while t0.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
