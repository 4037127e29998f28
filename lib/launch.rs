//! `train --nproc-per-node N`: zerokit starts its local ranks itself, as `deepspeed --num_gpus`
//! does, exporting the same variables as torchrun. With several nodes (`--nnodes`/`--node-rank`
//! or a DeepSpeed hostfile) the same command runs on every node. If any rank fails, the others are stopped and
//! the job ends with a message naming the rank.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Ranks to start on this node (one per GPU). Ignored when already started by a launcher.
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Nodes in the job.
    #[arg(long)]
    pub nnodes: Option<usize>,
    /// This node's index, 0 on the node that runs rank 0 (with --hostfile: found from the host name).
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// Address of the node of rank 0 (default 127.0.0.1, or the hostfile's first host).
    #[arg(long)]
    pub master_addr: Option<String>,
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// GPUs to use on this node, e.g. 0,1,2,3: local rank i sees only the i-th of them
    /// (default: GPU i, or the i-th of CUDA_VISIBLE_DEVICES).
    #[arg(long)]
    pub gpus: Option<String>,
    /// A DeepSpeed-style hostfile ("HOST slots=N" per line, # comments): run the same command on
    /// every host; each one starts its slots' ranks.
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// With --hostfile, how the nodes start: `none` (run the same command on every node; each
    /// finds its own line), `ssh` (this command starts every node's ranks over ssh, in the same
    /// directory, as the deepspeed launcher does with pdsh) or `print` (print each node's
    /// command, for pdsh, clush or a scheduler, and exit).
    #[arg(long, value_enum, default_value_t = NodeLauncher::None)]
    pub launcher: NodeLauncher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeLauncher {
    None,
    Ssh,
    Print,
}

/// Everything this machine answers to: its host name and the addresses of its interfaces (and
/// those its own name resolves to), so a hostfile line may name it either way.
#[derive(Debug, Clone, Default)]
pub struct ThisHost {
    pub names: Vec<String>,
    pub addrs: Vec<IpAddr>,
}

impl ThisHost {
    /// A host known by `name` alone (tests, and machines whose addresses cannot be read).
    pub fn named(name: &str) -> ThisHost {
        ThisHost { names: vec![name.to_string()], addrs: Vec::new() }
    }

    /// This machine.
    pub fn current() -> ThisHost {
        let name = hostname();
        let mut addrs = interface_addrs();
        addrs.extend(resolve(&name));
        addrs.sort();
        addrs.dedup();
        ThisHost { names: vec![name], addrs }
    }

    /// Whether the hostfile's `entry` names this machine: an address of it, its name (full or
    /// short), or a name that resolves to one of its addresses.
    pub fn is(&self, entry: &str) -> bool {
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return self.addrs.contains(&ip);
        }
        self.names.iter().any(|n| same_host(n, entry)) || resolve(entry).iter().any(|ip| self.addrs.contains(ip))
    }

    fn describe(&self) -> String {
        let addrs: Vec<String> = self.addrs.iter().map(IpAddr::to_string).collect();
        format!(
            "names {} and addresses {}",
            self.names.join(", "),
            if addrs.is_empty() { "(none read)".into() } else { addrs.join(", ") }
        )
    }
}

/// The addresses `name` resolves to (/etc/hosts, DNS); none when it does not resolve.
fn resolve(name: &str) -> Vec<IpAddr> {
    (name, 0).to_socket_addrs().map(|a| a.map(|s| s.ip()).collect()).unwrap_or_default()
}

/// The addresses of this machine's network interfaces (loopback included).
fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we only read and then free with freeifaddrs;
    // each ifa_addr is checked for null and read as the sockaddr type its family says.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() {
                match (*a).sa_family as i32 {
                    libc::AF_INET => {
                        let v4 = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// What this node starts: ranks first_rank .. first_rank + local of world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub local: usize,
    pub first_rank: usize,
    pub world: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// Parses a DeepSpeed hostfile into (host, slots) in file order.
pub fn parse_hostfile(path: &Path, text: &str) -> Result<Vec<(String, usize)>, LaunchError> {
    let bad = |line: usize, msg: String| LaunchError::Invalid(format!("{}:{line}: {msg}", path.display()));
    let mut hosts: Vec<(String, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let host = parts.next().unwrap_or_default().to_string();
        let slots = match (parts.next(), parts.next()) {
            (Some(kv), None) => kv
                .strip_prefix("slots=")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| bad(i + 1, format!("expected 'HOST slots=N' with N > 0, found '{line}'")))?,
            _ => return Err(bad(i + 1, format!("expected 'HOST slots=N', found '{line}'"))),
        };
        if hosts.iter().any(|(h, _)| *h == host) {
            return Err(bad(i + 1, format!("host {host} is listed twice")));
        }
        hosts.push((host, slots));
    }
    if hosts.is_empty() {
        return Err(LaunchError::Invalid(format!("{}: no hosts listed", path.display())));
    }
    Ok(hosts)
}

fn same_host(a: &str, b: &str) -> bool {
    let short = |s: &str| s.split('.').next().unwrap_or(s).to_ascii_lowercase();
    a.eq_ignore_ascii_case(b) || short(a) == short(b)
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl LaunchArgs {
    /// Whether this invocation starts ranks itself (several local ranks, several nodes or a hostfile).
    pub fn launches(&self) -> bool {
        self.hostfile.is_some() || self.nproc_per_node.unwrap_or(1) > 1 || self.nnodes.unwrap_or(1) > 1
    }

    /// The ranks this node starts. `this` is this machine (used with a hostfile only).
    pub fn plan(&self, this: &ThisHost) -> Result<NodePlan, LaunchError> {
        let Some(path) = &self.hostfile else {
            let (nproc, nnodes, node) =
                (self.nproc_per_node.unwrap_or(1), self.nnodes.unwrap_or(1), self.node_rank.unwrap_or(0));
            if nproc == 0 || nnodes == 0 || node >= nnodes {
                return Err(LaunchError::Invalid(format!(
                    "--nproc-per-node {nproc} --nnodes {nnodes} --node-rank {node}: need at least one rank and node-rank < nnodes"
                )));
            }
            return Ok(NodePlan {
                local: nproc,
                first_rank: node * nproc,
                world: nnodes * nproc,
                master_addr: self.master_addr.clone().unwrap_or_else(|| "127.0.0.1".into()),
                master_port: self.master_port,
            });
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| LaunchError::Invalid(format!("{}: {e}", path.display())))?;
        let hosts = parse_hostfile(path, &text)?;
        if let Some(n) = self.nnodes.filter(|&n| n != hosts.len()) {
            return Err(LaunchError::Invalid(format!(
                "--nnodes {n} but {} lists {} host(s)",
                path.display(),
                hosts.len()
            )));
        }
        let node = match self.node_rank {
            Some(r) if r < hosts.len() => r,
            Some(r) => {
                return Err(LaunchError::Invalid(format!(
                    "--node-rank {r} but {} lists {} host(s)",
                    path.display(),
                    hosts.len()
                )))
            }
            None => {
                let mine: Vec<usize> = (0..hosts.len()).filter(|&i| this.is(&hosts[i].0)).collect();
                match mine[..] {
                    [i] => i,
                    [] => {
                        return Err(LaunchError::Invalid(format!(
                            "this host is not in {} (tried its {}): pass --node-rank",
                            path.display(),
                            this.describe()
                        )))
                    }
                    _ => {
                        let names: Vec<&str> = mine.iter().map(|&i| hosts[i].0.as_str()).collect();
                        return Err(LaunchError::Invalid(format!(
                            "this host is each of {} in {}: pass --node-rank",
                            names.join(", "),
                            path.display()
                        )));
                    }
                }
            }
        };
        let slots = hosts[node].1;
        if let Some(n) = self.nproc_per_node.filter(|&n| n != slots) {
            return Err(LaunchError::Invalid(format!(
                "--nproc-per-node {n} but {} gives {} slots={slots}",
                path.display(),
                hosts[node].0
            )));
        }
        Ok(NodePlan {
            local: slots,
            first_rank: hosts[..node].iter().map(|(_, s)| s).sum(),
            world: hosts.iter().map(|(_, s)| s).sum(),
            master_addr: self.master_addr.clone().unwrap_or_else(|| hosts[0].0.clone()),
            master_port: self.master_port,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start rank {rank}: {source}")]
    Spawn { rank: usize, source: std::io::Error },
    #[error("rank {rank} failed ({status}); the other ranks were stopped")]
    RankFailed { rank: usize, status: String },
    #[error("{0}")]
    Invalid(String),
}

/// Whether this process is a rank started by a launcher that exports torch-style variables
/// (zerokit's own, torchrun, DeepSpeed's). Slurm's variables do not count here: an sbatch
/// script has SLURM_PROCID too, and `train --nproc-per-node N` there must start its ranks.
pub fn is_launched_rank() -> bool {
    std::env::var_os("RANK").is_some()
}

/// Re-executes this binary with the same arguments once per local rank and waits for them;
/// with `--launcher ssh|print` and a hostfile, starts (or prints) every node's command instead.
pub fn spawn_local_ranks(a: &LaunchArgs) -> Result<(), LaunchError> {
    if let (Some(path), true) = (&a.hostfile, a.launcher != NodeLauncher::None) {
        return launch_nodes(a, path);
    }
    // Only a hostfile needs this machine's names and addresses (reading them may wait on DNS).
    let this = if a.hostfile.is_some() { ThisHost::current() } else { ThisHost::default() };
    let plan = a.plan(&this)?;
    if let Some(g) = &a.gpus {
        let n = g.split(',').filter(|s| !s.trim().is_empty()).count();
        if n < plan.local {
            return Err(LaunchError::Invalid(format!("--gpus {g} names {n} GPU(s) for {} ranks", plan.local)));
        }
    }
    let exe = std::env::current_exe().map_err(|e| LaunchError::Spawn { rank: 0, source: e })?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Ranks on one node share its cores: each libtorch would otherwise start a thread per core
    // and N ranks would oversubscribe them N times (torchrun sets 1; we divide the cores).
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let omp = std::env::var("OMP_NUM_THREADS").ok().filter(|v| !v.is_empty());
    let threads = omp.clone().unwrap_or_else(|| (cores / plan.local).max(1).to_string());
    if omp.is_none() && plan.local > 1 {
        tracing::info!(
            "{} local ranks share {cores} cores: OMP_NUM_THREADS={threads} each (set it to override)",
            plan.local
        );
    }
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..plan.local {
        let rank = plan.first_rank + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", plan.world.to_string())
            .env("LOCAL_WORLD_SIZE", plan.local.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", plan.master_port.to_string())
            .env("OMP_NUM_THREADS", &threads);
        // Each rank sees one GPU, so device indices never mix inside a process.
        let visible = a.gpus.clone().or_else(|| std::env::var("CUDA_VISIBLE_DEVICES").ok());
        let gpu = match &visible {
            Some(list) => list.split(',').map(str::trim).filter(|s| !s.is_empty()).nth(local).map(String::from),
            None => Some(local.to_string()),
        };
        if let Some(g) = gpu {
            cmd.env("CUDA_VISIBLE_DEVICES", g);
        }
        match cmd.spawn() {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop_all(&mut children);
                return Err(LaunchError::Spawn { rank, source: e });
            }
        }
    }
    wait_all(&mut children).map_err(|(rank, status)| LaunchError::RankFailed { rank, status })
}

/// Environment variables a node's ranks get from this one (the deepspeed launcher exports the
/// same kinds): NCCL's and zerokit's settings, thread counts, library paths.
fn exported_env() -> Vec<(String, String)> {
    let wanted = |k: &str| {
        ["NCCL_", "ZEROKIT_", "TORCH_", "CUDA_"].iter().any(|p| k.starts_with(p))
            || ["OMP_NUM_THREADS", "LD_LIBRARY_PATH", "RUST_LOG"].contains(&k)
    };
    let mut v: Vec<(String, String)> = std::env::vars().filter(|(k, _)| wanted(k)).collect();
    v.sort();
    v
}

/// A word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// This invocation's arguments without the ones that say where it runs (`--launcher`,
/// `--node-rank`), which each node's command sets anew.
fn node_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.as_str() {
            "--launcher" | "--node-rank" | "--node_rank" => skip = true,
            s if s.starts_with("--launcher=") || s.starts_with("--node-rank=") || s.starts_with("--node_rank=") => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// The shell command that starts node `node`'s ranks: this directory, this binary, the same
/// arguments and settings, and its node rank.
pub fn node_command(node: usize, exe: &Path, args: &[String], cwd: &Path, env: &[(String, String)]) -> String {
    let mut words = vec!["cd".to_string(), shell_quote(&cwd.to_string_lossy()), "&&".into(), "env".into()];
    words.extend(env.iter().map(|(k, v)| shell_quote(&format!("{k}={v}"))));
    words.push(shell_quote(&exe.to_string_lossy()));
    words.extend(node_args(args).iter().map(|a| shell_quote(a)));
    words.extend(["--launcher".into(), "none".into(), "--node-rank".into(), node.to_string()]);
    words.join(" ")
}

/// `--launcher ssh|print`: every host of the hostfile runs this command with its node rank,
/// over `ssh HOST` (BatchMode: keys, not passwords), all at once; the job ends when they all
/// have, or when one fails (the others are stopped), naming it.
fn launch_nodes(a: &LaunchArgs, path: &Path) -> Result<(), LaunchError> {
    let text = std::fs::read_to_string(path).map_err(|e| LaunchError::Invalid(format!("{}: {e}", path.display())))?;
    let hosts = parse_hostfile(path, &text)?;
    let exe = std::env::current_exe().map_err(|e| LaunchError::Spawn { rank: 0, source: e })?;
    let cwd = std::env::current_dir().map_err(|e| LaunchError::Spawn { rank: 0, source: e })?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env = exported_env();
    let commands: Vec<String> = (0..hosts.len()).map(|i| node_command(i, &exe, &args, &cwd, &env)).collect();
    if a.launcher == NodeLauncher::Print {
        for ((host, _), cmd) in hosts.iter().zip(&commands) {
            println!("ssh {} {}", shell_quote(host), shell_quote(cmd));
        }
        return Ok(());
    }
    let mut nodes: Vec<(usize, Child)> = Vec::new();
    for (i, ((host, _), cmd)) in hosts.iter().zip(&commands).enumerate() {
        match Command::new("ssh").args(["-o", "BatchMode=yes", host.as_str(), cmd.as_str()]).spawn() {
            Ok(c) => nodes.push((i, c)),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(LaunchError::Invalid(format!("cannot run ssh for {host}: {e}")));
            }
        }
    }
    wait_all(&mut nodes).map_err(|(i, status)| {
        LaunchError::Invalid(format!("node {i} ({}) failed ({status}); the other nodes were stopped", hosts[i].0))
    })
}

/// Waits for every child; on the first that fails, stops the rest and returns its index and
/// exit status.
fn wait_all(children: &mut [(usize, Child)]) -> Result<(), (usize, String)> {
    loop {
        let mut running = 0;
        for i in 0..children.len() {
            let (id, child) = &mut children[i];
            match child.try_wait() {
                Ok(Some(st)) if !st.success() => {
                    let id = *id;
                    stop_all(children);
                    return Err((id, st.to_string()));
                }
                Ok(Some(_)) => {}
                Ok(None) => running += 1,
                Err(e) => {
                    let id = *id;
                    stop_all(children);
                    return Err((id, e.to_string()));
                }
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the remaining children after one failed. A bad configuration usually fails every rank
/// at once, so each first gets a short grace to exit by itself and print its own error (killing
/// at once cut rank 1's line off); then SIGTERM, and SIGKILL for any still there, as torchrun.
fn stop_all(children: &mut [(usize, Child)]) {
    let all_exited = |children: &mut [(usize, Child)], grace: Duration| {
        let deadline = std::time::Instant::now() + grace;
        loop {
            if children.iter_mut().all(|(_, c)| !matches!(c.try_wait(), Ok(None))) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    if all_exited(children, STOP_GRACE) {
        return;
    }
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    if !all_exited(children, STOP_GRACE) {
        for (_, c) in children.iter_mut() {
            let _ = c.kill();
        }
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}

/// How long stop_all waits before each escalation.
const STOP_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sh(script: &str) -> Child {
        Command::new("sh").args(["-c", script]).spawn().unwrap()
    }

    /// A rank that fails a moment after the first still prints its own error; a healthy rank is
    /// ended by SIGTERM and one that ignores SIGTERM by SIGKILL, all within the two graces.
    #[test]
    fn stopping_ranks_lets_failing_ones_finish_and_ends_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let said = dir.path().join("said");
        let start = Instant::now();
        let mut children = vec![
            (0, sh("exit 3")),
            (1, sh(&format!("sleep 0.3; echo error > '{}'; exit 3", said.display()))),
            (2, sh("sleep 60")),
            (3, sh("trap '' TERM; sleep 60 & wait; sleep 60")),
        ];
        let (rank, status) = wait_all(&mut children).unwrap_err();
        assert_eq!(rank, 0, "{status}");
        assert_eq!(std::fs::read_to_string(&said).unwrap().trim(), "error");
        assert!(start.elapsed() < STOP_GRACE * 3, "{:?}", start.elapsed());
        for (_, c) in &mut children {
            assert!(c.try_wait().unwrap().is_some());
        }
    }
}
