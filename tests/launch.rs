//! Launch plans: DeepSpeed-style hostfiles and the ranks each node starts.

use std::path::Path;
use zerokit::launch::{node_command, parse_hostfile, LaunchArgs, NodeLauncher, NodePlan, ThisHost};

fn args(hostfile: Option<&Path>) -> LaunchArgs {
    LaunchArgs {
        nproc_per_node: None,
        nnodes: None,
        node_rank: None,
        master_addr: None,
        master_port: 29500,
        gpus: None,
        hostfile: hostfile.map(Path::to_path_buf),
        launcher: NodeLauncher::None,
    }
}

fn hostfile(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hostfile");
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

#[test]
fn hostfile_lines_comments_and_slots() {
    let p = Path::new("hf");
    let hosts = parse_hostfile(p, "# cluster\nworker-1 slots=4\n\n  worker-2   slots=2 # small\n").unwrap();
    assert_eq!(hosts, vec![("worker-1".to_string(), 4), ("worker-2".to_string(), 2)]);
}

#[test]
fn bad_hostfiles_name_the_file_and_line() {
    let p = Path::new("/etc/hf");
    for (text, want) in [
        ("a slots=2\nb\n", "/etc/hf:2: expected 'HOST slots=N'"),
        ("a slots=0\n", "/etc/hf:1: expected 'HOST slots=N' with N > 0"),
        ("a slots=x\n", "/etc/hf:1: expected 'HOST slots=N' with N > 0"),
        ("a slots=1 extra\n", "/etc/hf:1: expected 'HOST slots=N'"),
        ("a slots=1\na slots=2\n", "/etc/hf:2: host a is listed twice"),
        ("# nothing\n", "/etc/hf: no hosts listed"),
    ] {
        let e = parse_hostfile(p, text).unwrap_err().to_string();
        assert!(e.contains(want), "{text:?}: {e}");
    }
}

#[test]
fn each_host_starts_its_slots_with_the_right_first_rank() {
    let (_d, p) = hostfile("n0 slots=2\nn1.example.org slots=3\nn2 slots=1\n");
    let a = args(Some(&p));
    // Found by host name, full or short.
    assert_eq!(
        a.plan(&ThisHost::named("n1")).unwrap(),
        NodePlan { local: 3, first_rank: 2, world: 6, master_addr: "n0".into(), master_port: 29500 }
    );
    assert_eq!(a.plan(&ThisHost::named("N2.example.org")).unwrap().first_rank, 5);
    // An explicit --node-rank wins; --master-addr overrides the first host.
    let mut b = args(Some(&p));
    b.node_rank = Some(0);
    b.master_addr = Some("10.0.0.1".into());
    assert_eq!(
        b.plan(&ThisHost::named("elsewhere")).unwrap(),
        NodePlan { local: 2, first_rank: 0, world: 6, master_addr: "10.0.0.1".into(), master_port: 29500 }
    );
}

#[test]
fn inconsistent_launch_flags_are_refused() {
    let (_d, p) = hostfile("n0 slots=2\nn1 slots=2\n");
    let e = args(Some(&p)).plan(&ThisHost::named("other")).unwrap_err().to_string();
    assert!(e.contains("this host is not in") && e.contains("names other") && e.contains("--node-rank"), "{e}");
    let mut a = args(Some(&p));
    a.nnodes = Some(3);
    assert!(a.plan(&ThisHost::named("n0")).unwrap_err().to_string().contains("--nnodes 3 but"));
    let mut a = args(Some(&p));
    a.nproc_per_node = Some(4);
    assert!(a.plan(&ThisHost::named("n0")).unwrap_err().to_string().contains("--nproc-per-node 4 but"));
    let mut a = args(Some(&p));
    a.node_rank = Some(2);
    assert!(a.plan(&ThisHost::named("n0")).unwrap_err().to_string().contains("--node-rank 2 but"));
    let mut a = args(None);
    a.nnodes = Some(2);
    a.node_rank = Some(2);
    assert!(a.plan(&ThisHost::named("n0")).unwrap_err().to_string().contains("node-rank < nnodes"));
    let e = args(Some(Path::new("/nonexistent/hostfile"))).plan(&ThisHost::named("n0")).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/hostfile:"), "{e}");
}

#[test]
fn without_a_hostfile_ranks_follow_the_node_rank() {
    let mut a = args(None);
    a.nproc_per_node = Some(4);
    a.nnodes = Some(2);
    a.node_rank = Some(1);
    assert_eq!(
        a.plan(&ThisHost::named("any")).unwrap(),
        NodePlan { local: 4, first_rank: 4, world: 8, master_addr: "127.0.0.1".into(), master_port: 29500 }
    );
    assert!(!args(None).launches());
    assert!(a.launches());
}

/// A hostfile line may name this machine by any of its addresses, or by a name that resolves to
/// one; a host on several lines, or on none, is refused saying what was tried.
#[test]
fn this_host_is_found_by_name_address_or_resolution() {
    let (_d, p) = hostfile("10.1.2.3 slots=2\nnode-b slots=1\n");
    let box_ = ThisHost { names: vec!["box".into()], addrs: vec!["10.1.2.3".parse().unwrap()] };
    assert_eq!(args(Some(&p)).plan(&box_).unwrap().local, 2);
    // The real machine: `localhost` resolves to a loopback address its interfaces carry.
    let here = ThisHost::current();
    assert!(here.addrs.iter().any(|a| a.is_loopback()), "{here:?}");
    assert!(here.is("localhost") && here.is("127.0.0.1") && !here.is("192.0.2.77"), "{here:?}");
    let (_d2, p2) = hostfile("192.0.2.77 slots=1\nlocalhost slots=3\n");
    assert_eq!(
        args(Some(&p2)).plan(&here).unwrap(),
        NodePlan { local: 3, first_rank: 1, world: 4, master_addr: "192.0.2.77".into(), master_port: 29500 }
    );
    let (_d3, p3) = hostfile("localhost slots=1\n127.0.0.1 slots=1\n");
    let e = args(Some(&p3)).plan(&here).unwrap_err().to_string();
    assert!(e.contains("this host is each of localhost, 127.0.0.1"), "{e}");
    let elsewhere = ThisHost { names: vec!["c".into()], addrs: vec!["10.9.9.9".parse().unwrap()] };
    let e = args(Some(&p)).plan(&elsewhere).unwrap_err().to_string();
    assert!(e.contains("tried its names c and addresses 10.9.9.9"), "{e}");
}

/// Each node's command: the same directory, binary, arguments and settings, its node rank, and
/// no --launcher or --node-rank left from the original command; quoted for a shell.
#[test]
fn node_commands_carry_the_job_to_each_node() {
    let args: Vec<String> =
        ["cfg dir/c.toml", "--hostfile", "hf", "--launcher", "ssh", "--node-rank=1", "--set", "x='y'"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let env = vec![("NCCL_DEBUG".to_string(), "WARN".to_string())];
    let cmd = node_command(2, Path::new("/opt/zk/train"), &args, Path::new("/work/run 1"), &env);
    assert_eq!(
        cmd,
        r#"cd '/work/run 1' && env NCCL_DEBUG=WARN /opt/zk/train 'cfg dir/c.toml' --hostfile hf --set 'x='\''y'\''' --launcher none --node-rank 2"#
    );
}
