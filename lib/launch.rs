//! `train --nproc-per-node N`: zerokit starts its local ranks itself, as `deepspeed --num_gpus`
//! does, exporting the same variables as torchrun. With several nodes (`--nnodes`/`--node-rank`
//! or a DeepSpeed hostfile) the same command runs on every node. If any rank fails, the others are stopped and
//! the job ends with a message naming the rank.

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

    /// The ranks this node starts. `host` is this machine's name (used with a hostfile only).
    pub fn plan(&self, host: &str) -> Result<NodePlan, LaunchError> {
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
            None => hosts.iter().position(|(h, _)| same_host(h, host)).ok_or_else(|| {
                LaunchError::Invalid(format!("this host ({host}) is not in {}: pass --node-rank", path.display()))
            })?,
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

/// Re-executes this binary with the same arguments once per local rank and waits for them.
pub fn spawn_local_ranks(a: &LaunchArgs) -> Result<(), LaunchError> {
    let plan = a.plan(&hostname())?;
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
    loop {
        let mut running = 0;
        for i in 0..children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait() {
                Ok(Some(st)) if !st.success() => {
                    let rank = *rank;
                    let status = st.to_string();
                    stop_all(&mut children);
                    return Err(LaunchError::RankFailed { rank, status });
                }
                Ok(Some(_)) => {}
                Ok(None) => running += 1,
                Err(e) => {
                    let rank = *rank;
                    stop_all(&mut children);
                    return Err(LaunchError::Spawn { rank, source: e });
                }
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}
