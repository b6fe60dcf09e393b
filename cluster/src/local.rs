//! etcd members run as child processes on loopback: what the tests, `fathom-bench` and a
//! laptop cluster start (Debian's `etcd-server`, `/usr/bin/etcd`). Each member gets its own
//! data directory and two free ports; members can be killed and started again, and all stop
//! when this is dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::{Etcd, Timeouts};

/// Why local etcd members could not run.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot run {program}: {error} (install Debian's etcd-server: apt-get install -y etcd-server)")]
    Spawn {
        program: String,
        error: std::io::Error,
    },
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    #[error("etcd member {member} did not serve within {seconds} s; its log: {log}")]
    NotReady {
        member: usize,
        seconds: u64,
        log: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Members of one etcd cluster on loopback.
pub struct LocalEtcd {
    program: String,
    members: Vec<Member>,
    token: String,
}

/// A free loopback port, held (by its listener) until the caller lets it go: the ports of
/// one cluster are all taken before any is let go, so none is handed out twice.
fn free_port(held: &mut Vec<TcpListener>) -> Result<u16, LocalError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(LocalError::Port)?;
    let port = listener.local_addr().map_err(LocalError::Port)?.port();
    held.push(listener);
    Ok(port)
}

impl LocalEtcd {
    /// Starts `members` members with data under `dir`, and waits until the cluster serves.
    pub fn start(dir: &Path, members: usize) -> Result<Self, LocalError> {
        let program = std::env::var("FATHOM_ETCD").unwrap_or_else(|_| "etcd".into());
        let mut all = Vec::new();
        let mut held = Vec::new();
        for index in 0..members {
            all.push(Member {
                name: format!("m{index}"),
                client_port: free_port(&mut held)?,
                peer_port: free_port(&mut held)?,
                data: dir.join(format!("etcd-m{index}")),
                log: dir.join(format!("etcd-m{index}.log")),
                child: None,
            });
        }
        let token = format!("fathom-{}-{}", std::process::id(), free_port(&mut held)?);
        drop(held);
        let mut local = Self {
            program,
            members: all,
            token,
        };
        for index in 0..members {
            local.spawn(index)?;
        }
        local.wait_ready(Duration::from_secs(20))?;
        Ok(local)
    }

    /// `host:port` of each member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| format!("127.0.0.1:{}", member.client_port))
            .collect()
    }

    fn spawn(&mut self, index: usize) -> Result<(), LocalError> {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &mut self.members[index];
        std::fs::create_dir_all(&member.data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)?;
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let child = Command::new(&self.program)
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Loopback: a lost heartbeat is a dead member, not a slow network.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|error| LocalError::Spawn {
                program: self.program.clone(),
                error,
            })?;
        member.child = Some(child);
        Ok(())
    }

    /// Waits until every running member answers and the cluster has a leader.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<(), LocalError> {
        let deadline = Instant::now() + limit;
        for index in 0..self.members.len() {
            if self.members[index].child.is_none() {
                continue;
            }
            let endpoint = vec![format!("127.0.0.1:{}", self.members[index].client_port)];
            let mut client = Etcd::new(&endpoint, Timeouts::default()).expect("one endpoint");
            loop {
                if client.get("/fathom-ready-check").is_ok() {
                    break;
                }
                let exited = self.members[index]
                    .child
                    .as_mut()
                    .and_then(|child| child.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() >= deadline {
                    return Err(LocalError::NotReady {
                        member: index,
                        seconds: limit.as_secs(),
                        log: tail(&self.members[index].log),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Kills member `index` (SIGKILL) and reaps it.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops member `index` (SIGSTOP) or lets it go on (SIGCONT): a member that hangs.
    pub fn signal(&self, index: usize, signal: i32) {
        if let Some(child) = &self.members[index].child {
            // SAFETY: kill(2) on a child this struct spawned and has not reaped.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }

    /// Starts member `index` again on its data.
    pub fn restart(&mut self, index: usize) -> Result<(), LocalError> {
        self.kill(index);
        self.spawn(index)?;
        self.wait_ready(Duration::from_secs(20))
    }

    /// Kills every member.
    pub fn stop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
