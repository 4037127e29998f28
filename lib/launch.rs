//! `train --nproc-per-node N`: zerokit starts its local ranks itself, as `deepspeed --num_gpus`
//! does, exporting the same variables as torchrun. If any rank fails, the others are stopped and
//! the job ends with a message naming the rank.

use std::process::{Child, Command};
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Ranks to start on this node (one per GPU). Ignored when already started by a launcher.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0 on the node that runs rank 0.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of the node of rank 0.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// GPUs to use on this node, e.g. 0,1,2,3: local rank i sees only the i-th of them
    /// (default: GPU i, or the i-th of CUDA_VISIBLE_DEVICES).
    #[arg(long)]
    pub gpus: Option<String>,
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

/// Whether this process is a rank started by some launcher (zerokit's, torchrun, srun).
pub fn is_launched_rank() -> bool {
    std::env::var_os("RANK").is_some() || std::env::var_os("SLURM_PROCID").is_some()
}

/// Re-executes this binary with the same arguments once per local rank and waits for them.
pub fn spawn_local_ranks(a: &LaunchArgs) -> Result<(), LaunchError> {
    if a.nproc_per_node == 0 || a.nnodes == 0 || a.node_rank >= a.nnodes {
        return Err(LaunchError::Invalid(format!(
            "--nproc-per-node {} --nnodes {} --node-rank {}: need at least one rank and node-rank < nnodes",
            a.nproc_per_node, a.nnodes, a.node_rank
        )));
    }
    if let Some(g) = &a.gpus {
        let n = g.split(',').filter(|s| !s.trim().is_empty()).count();
        if n < a.nproc_per_node {
            return Err(LaunchError::Invalid(format!("--gpus {g} names {n} GPU(s) for {} ranks", a.nproc_per_node)));
        }
    }
    let exe = std::env::current_exe().map_err(|e| LaunchError::Spawn { rank: 0, source: e })?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let world = a.nnodes * a.nproc_per_node;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..a.nproc_per_node {
        let rank = a.node_rank * a.nproc_per_node + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc_per_node.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", a.master_port.to_string());
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
