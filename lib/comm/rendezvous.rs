//! Who this rank is and where rank 0 listens: from zerokit's own launcher, torchrun, Slurm's
//! srun or DeepSpeed's launcher (all of which export the same torch-style variables), or a
//! single process.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("launch environment: {0}")]
pub struct RendezvousError(pub String);

fn var(names: &[&str]) -> Option<(String, String)> {
    names.iter().find_map(|n| std::env::var(n).ok().map(|v| (n.to_string(), v)))
}

fn num(names: &[&str]) -> Result<Option<usize>, RendezvousError> {
    match var(names) {
        None => Ok(None),
        Some((n, v)) => {
            v.trim().parse().map(Some).map_err(|_| RendezvousError(format!("{n}={v} is not a non-negative integer")))
        }
    }
}

impl Rendezvous {
    /// A world of one.
    pub fn single(timeout: Duration) -> Self {
        Rendezvous {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            timeout,
        }
    }

    /// Reads RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun,
    /// zerokit, DeepSpeed) or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NTASKS_PER_NODE
    /// (inside an srun step only; MASTER_ADDR must then be exported by the batch script). None of
    /// them: one process.
    pub fn from_env(timeout: Duration) -> Result<Self, RendezvousError> {
        // Slurm's task variables describe this process only inside an srun step: a batch script
        // also has SLURM_PROCID=0 and SLURM_NTASKS, for tasks it has not started.
        let in_srun = std::env::var_os("SLURM_STEP_ID").is_some() || std::env::var_os("SLURM_STEPID").is_some();
        let pick = |torch: &'static str, slurm: &'static str| if in_srun { vec![torch, slurm] } else { vec![torch] };
        let world = num(&pick("WORLD_SIZE", "SLURM_NTASKS"))?;
        let rank = num(&pick("RANK", "SLURM_PROCID"))?;
        let (world, rank) = match (world, rank) {
            (None, None) => return Ok(Self::single(timeout)),
            (Some(w), Some(r)) => (w, r),
            (Some(_), None) => return Err(RendezvousError("WORLD_SIZE is set but RANK is not".into())),
            (None, Some(_)) => return Err(RendezvousError("RANK is set but WORLD_SIZE is not".into())),
        };
        if world == 0 || rank >= world {
            return Err(RendezvousError(format!("RANK {rank} is not below WORLD_SIZE {world}")));
        }
        let local_rank = num(&pick("LOCAL_RANK", "SLURM_LOCALID"))?.unwrap_or(rank);
        let local_world = num(&pick("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"))?.unwrap_or(world);
        let master_addr = match var(&["MASTER_ADDR"]) {
            Some((_, a)) => a,
            None if world == 1 => "127.0.0.1".into(),
            None => return Err(RendezvousError("MASTER_ADDR is not set (rank 0's host name or address)".into())),
        };
        let master_port: u16 = match var(&["MASTER_PORT"]) {
            Some((_, p)) => p.trim().parse().map_err(|_| RendezvousError(format!("MASTER_PORT={p} is not a port")))?,
            None => 29500,
        };
        // torchrun's agent already listens on MASTER_PORT with its own store (the workers join it
        // as clients), so under torchrun rank 0's control plane takes the next port.
        let master_port = if var(&["TORCHELASTIC_RUN_ID"]).is_some() {
            master_port
                .checked_add(1)
                .ok_or_else(|| RendezvousError("MASTER_PORT 65535 leaves no port for zerokit under torchrun".into()))?
        } else {
            master_port
        };
        Ok(Rendezvous { rank, world, local_rank, local_world, master_addr, master_port, timeout })
    }
}
