//! Child processes that die with the test process.
//!
//! A server the harness starts is killed when its [`crate::Spawned`] drops. That does not run
//! when the test process itself is killed: by a CI timeout, by Ctrl-C on one test binary, or by
//! a closed pipe (`cargo test | head`). Its servers then live on, holding ports, files and CPU
//! that the next run on the machine competes with.
//!
//! So on Linux every long-lived child starts under `setpriv --pdeathsig KILL` (util-linux,
//! Essential on Debian), which asks the kernel to SIGKILL it when its parent goes. The kernel
//! means the parent *thread*: a child spawned from a thread that ends (tokio's blocking pool
//! ends idle threads after 10 s) would be killed mid-test. So [`spawn_tied`] forks every such
//! child from one thread that lives as long as the test process.
//!
//! `setpriv` sets the signal after the fork: a test process killed in that instant leaves the
//! child behind, as before. Without `setpriv`, children start as plain processes.

use std::ffi::OsStr;
use std::io;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;

/// Spawns `program`, set up by `configure` (arguments, environment, stdio), so that it gets
/// SIGKILL when the test process dies.
pub fn spawn_tied(
    program: impl AsRef<OsStr>,
    configure: impl FnOnce(&mut Command),
) -> io::Result<Child> {
    let mut command = tied(program.as_ref());
    configure(&mut command);
    let (reply, answer) = mpsc::channel();
    spawner()
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// The thread that forks tied children. Its sender lives in a static, so it never stops.
fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("tied-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("the spawner thread starts");
        requests
    })
}

/// A command for `program` that the kernel kills when the thread that spawns it ends.
fn tied(program: &OsStr) -> Command {
    if has_setpriv() {
        let mut command = Command::new("setpriv");
        command.args(["--pdeathsig", "KILL", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Whether `setpriv --pdeathsig` can be used here (Linux with util-linux).
fn has_setpriv() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        cfg!(target_os = "linux")
            && Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--", "true"])
                .output()
                .is_ok_and(|out| out.status.success())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};

    /// Waits up to 5 s for `child` to end.
    fn ended(child: &mut Child) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_tied_child_is_killed_when_its_parent_thread_ends() {
        assert!(
            has_setpriv(),
            "setpriv (util-linux) is missing: the harness cannot tie servers to the test process"
        );
        // Forked from a thread that then ends, as a dying test process's threads all do. It
        // waits first until `setpriv` has surely set the signal and run `sleep`.
        let mut child = std::thread::spawn(|| {
            let child = tied(OsStr::new("sleep")).arg("60").spawn();
            std::thread::sleep(Duration::from_millis(500));
            child
        })
        .join()
        .unwrap()
        .unwrap();
        let status = ended(&mut child);
        if status.is_none() {
            let _ = child.kill();
        }
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(9),
            "the child outlived the thread that spawned it"
        );
    }

    #[test]
    fn spawn_tied_children_outlive_the_thread_that_asked() {
        // Asked for from a short-lived thread (as from tokio's blocking pool): the spawner
        // thread is the parent, so the child lives on after the asking thread ends.
        let mut child = std::thread::spawn(|| {
            spawn_tied("sleep", |c| {
                c.arg("60");
            })
        })
        .join()
        .unwrap()
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let alive = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let _ = child.wait();
        assert!(alive, "the child died with the thread that asked for it");
    }

    #[test]
    fn a_program_that_cannot_start_is_an_error() {
        let err = spawn_tied("/nonexistent/shardlite-test-program", |_| {});
        if has_setpriv() {
            // setpriv starts, then fails to exec the program: it exits non-zero.
            let mut child = err.unwrap();
            assert!(!child.wait().unwrap().success());
        } else {
            assert!(err.is_err());
        }
    }
}
