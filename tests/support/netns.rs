//! A small internet in Linux network namespaces (scripts/netns-nat.sh) and
//! real `barnraise` processes inside it, cleaned up whatever happens.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the NAT test cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "iptables"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "`{tool}` is not installed (`.ci/run` installs iptables)"
            ));
        }
    }
    None
}

/// The namespaces of scripts/netns-nat.sh, removed on drop.
pub struct Internet {
    pub prefix: String,
    script: PathBuf,
}

impl Internet {
    pub fn up() -> Internet {
        // Interface names are at most 15 bytes: "br" + 5 digits + "p1".
        let prefix = format!("br{:05}", std::process::id() % 100_000);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netns-nat.sh");
        let status = Command::new(&script)
            .args(["up", &prefix])
            .status()
            .expect("scripts/netns-nat.sh runs");
        assert!(status.success(), "scripts/netns-nat.sh up {prefix} failed");
        Internet { prefix, script }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .args(["down", &self.prefix])
            .status();
    }
}

/// A `barnraise` process inside a namespace, its output in a log file;
/// killed on drop.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    pub fn start(ns: &str, name: &str, args: &[&str], dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_barnraise")])
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("BARNRAISE_KEY")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("ip netns exec barnraise starts");
        Process {
            name: name.into(),
            log,
            child,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a line containing `needle` and returns the rest of it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                let at = line.find(needle).unwrap_or(0) + needle.len();
                return line[at..].trim().to_string();
            }
            assert!(
                started.elapsed() < timeout,
                "{}: no line with {needle:?} after {timeout:?}:\n{text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the process to exit successfully.
    pub fn wait_success(&mut self, timeout: Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "{} exited with {status}:\n{}",
                    self.name,
                    self.log_text()
                );
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{} still running after {timeout:?}:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
