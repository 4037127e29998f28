//! `train`'s host-memory pre-check: before any rank builds its model, what this node's ranks
//! will hold in host memory (the estimate's own per-rank figures, [`super::host_breakdown`]) is
//! set against what the machine can still give: MemAvailable from /proc/meminfo, or the room
//! left under the process's memory cgroup (v2 or v1) when that is less. A machine too small
//! gets an error naming what is needed, what there is, and which settings would fit.

use super::{gpu_breakdown, host_breakdown, HostBreakdown, MemoryError, Offload, Setup, GIB};
use std::path::{Path, PathBuf};

/// Host memory this process can still take, and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    pub source: String,
}

/// MemAvailable of a /proc/meminfo text, in bytes.
pub fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// A number from a cgroup file: None for "max" (v2's no limit) and for v1's "no limit", which it
/// writes as the largest page-aligned i64.
fn cgroup_number(text: &str) -> Option<u64> {
    let n: u64 = text.trim().parse().ok()?;
    (n < 1 << 62).then_some(n)
}

/// A `key value` line of a cgroup memory.stat.
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The room left under the memory cgroup of a process whose /proc/self/cgroup reads
/// `proc_cgroup`, with the cgroup file systems mounted under `sys_root` (/sys/fs/cgroup): at
/// each level of its path that has a limit, the limit less what the level uses beyond
/// reclaimable file cache (inactive_file); the least over the levels, and which file says so.
/// None when no level has a limit.
pub fn cgroup_available(proc_cgroup: &str, sys_root: &Path) -> Option<(u64, String)> {
    let mut best: Option<(u64, String)> = None;
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        // v2: "0::/path", files memory.max and memory.current; v1: "N:memory:/path" under the
        // memory hierarchy's mount, files memory.limit_in_bytes and memory.usage_in_bytes.
        let (mount, limit_file, usage_file, inactive) = if controllers.is_empty() {
            let unified = sys_root.join("unified");
            let mount = if sys_root.join("cgroup.controllers").is_file() { sys_root.to_path_buf() } else { unified };
            (mount, "memory.max", "memory.current", "inactive_file")
        } else if controllers.split(',').any(|c| c == "memory") {
            (sys_root.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        } else {
            continue;
        };
        // The path and each of its ancestors that exists under the mount (a container may see
        // its own cgroup as the mount's root).
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for n in (0..=parts.len()).rev() {
            let dir: PathBuf = parts[..n].iter().fold(mount.clone(), |d, p| d.join(p));
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
            let Some(limit) = read(limit_file).as_deref().and_then(cgroup_number) else { continue };
            let usage = read(usage_file).as_deref().and_then(cgroup_number).unwrap_or(0);
            let cache = read("memory.stat").and_then(|s| stat_value(&s, inactive)).unwrap_or(0);
            let room = limit.saturating_sub(usage.saturating_sub(cache));
            if best.as_ref().is_none_or(|(b, _)| room < *b) {
                let what = format!("the memory cgroup's limit {} less its use ({})", gib(limit), dir.display());
                best = Some((room, what));
            }
        }
    }
    best
}

/// What this machine can still give this process: MemAvailable, or the cgroup's room when less.
pub fn read_available() -> Result<Available, MemoryError> {
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| MemoryError::HostMemory(format!("/proc/meminfo: {e}")))?;
    let bytes = meminfo_available(&meminfo)
        .ok_or_else(|| MemoryError::HostMemory("/proc/meminfo: no MemAvailable line".into()))?;
    let mut have = Available { bytes, source: "MemAvailable in /proc/meminfo".into() };
    if let Ok(cg) = std::fs::read_to_string("/proc/self/cgroup") {
        if let Some((room, what)) = cgroup_available(&cg, Path::new("/sys/fs/cgroup")) {
            if room < have.bytes {
                have = Available { bytes: room, source: what };
            }
        }
    }
    Ok(have)
}

/// One training run's place on this node, as the pre-check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    pub stage: u8,
    pub offload: Offload,
    /// Ranks started on this node.
    pub local_ranks: u64,
    /// Rank 0 runs on this node.
    pub rank0: bool,
    /// Training runs on GPUs; on CPU every device term is host memory too.
    pub gpu: bool,
    /// The run writes checkpoints (eval_iters > 0): rank 0's save copies are held only then.
    pub saves: bool,
}

/// What a node's ranks will hold in host memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Need {
    /// One rank's figures (the estimate's).
    pub per_rank: HostBreakdown,
    /// CPU runs: what the estimate counts as device memory, per rank (0 on GPUs).
    pub compute: u64,
    pub node: Node,
    /// The node's total: its ranks at their peaks, rank 0's save copies if it runs here.
    pub total: u64,
}

/// The node's need for set-up `s` (its world size is `s.world_size()`).
pub fn need(s: &Setup, node: Node) -> Need {
    let mut per_rank = host_breakdown(s, node.stage, node.offload, node.gpu);
    if !node.saves {
        per_rank.rank0 = 0;
    }
    // On CPU the device terms are host memory too, with the references' extra.
    let compute = if node.gpu {
        0
    } else {
        gpu_breakdown(s, node.stage, node.offload).total() - super::CUDA_RUNTIME_BYTES + super::reference_extra_bytes(s)
    };
    let total = per_rank.node(node.local_ranks, node.rank0) + node.local_ranks * compute;
    Need { per_rank, compute, node, total }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

/// Checks the node's need against what it has. Err: what is needed (and of what), what there
/// is, and the settings that would fit (or come closest), each with what it would need.
pub fn check(s: &Setup, node: Node, have: &Available) -> Result<Need, MemoryError> {
    let n = need(s, node);
    if n.total <= have.bytes {
        return Ok(n);
    }
    let h = &n.per_rank;
    let mut parts = Vec::new();
    if h.optimizer > 0 {
        parts.push(format!("{} offloaded optimizer state (16 bytes per parameter of its share)", gib(h.optimizer)));
    }
    if h.params > 0 {
        parts.push(format!("{} offloaded parameters", gib(h.params)));
    }
    if h.checkpoint > 0 {
        parts.push(format!("{} background-save buffers", gib(h.checkpoint)));
    }
    if n.compute > 0 {
        parts.push(format!("{} of model state, activations and buffers on the CPU device", gib(n.compute)));
    }
    parts.push(format!("a start-up peak of {} (the fp32 model built on the host and its flat copy)", gib(h.startup)));
    let rank0 = if node.rank0 && h.rank0 > 0 {
        format!(", plus {} of rank 0's save copies", gib(h.rank0))
    } else {
        String::new()
    };
    // Each setting that lowers the need, with what the node would need then.
    let mut fixes = Vec::new();
    let mut try_fix = |what: String, s2: &Setup, node2: Node| {
        let t = need(s2, node2).total;
        if t < n.total {
            let verdict = if t <= have.bytes { "fits" } else { "still too much" };
            fixes.push(format!("{what} ({}: {verdict})", gib(t)));
        }
    };
    if s.async_save {
        try_fix("async_save = false".into(), &Setup { async_save: false, ..s.clone() }, node);
    }
    match node.offload {
        Offload::OptimizerAndParams => {
            try_fix("offload_param = false".into(), s, Node { offload: Offload::Optimizer, ..node });
        }
        Offload::Params => try_fix("offload_param = false".into(), s, Node { offload: Offload::None, ..node }),
        _ => {}
    }
    if node.offload.optimizer() {
        let off = if node.offload.params() { Offload::Params } else { Offload::None };
        try_fix("offload_optimizer = false (the optimizer state on the GPU)".into(), s, Node { offload: off, ..node });
    }
    let room = have.bytes.saturating_sub(if node.rank0 { h.rank0 } else { 0 });
    let per = h.peak() + n.compute;
    let fit = room.checked_div(per).unwrap_or(node.local_ranks);
    if fit < node.local_ranks {
        fixes.push(format!(
            "at most {fit} rank(s) on this node (--nproc-per-node: each rank builds the whole fp32 model at start-up)"
        ));
    }
    Err(MemoryError::HostTooSmall(format!(
        "host memory: this node's {} rank(s) need {} at ZeRO stage {} with offload {}: per rank {}{rank0}; \
         this machine has {} available ({}). Settings that lower it: {}. `ckpt estimate` shows every row.",
        node.local_ranks,
        gib(n.total),
        node.stage,
        node.offload.label(),
        parts.join(", "),
        gib(have.bytes),
        have.source,
        if fixes.is_empty() {
            "none (a smaller model, or a machine with more memory)".into()
        } else {
            fixes.join("; ")
        },
    )))
}
