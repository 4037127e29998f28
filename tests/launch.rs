//! Launch plans: DeepSpeed-style hostfiles and the ranks each node starts.

use std::path::Path;
use zerokit::launch::{parse_hostfile, LaunchArgs, NodePlan};

fn args(hostfile: Option<&Path>) -> LaunchArgs {
    LaunchArgs {
        nproc_per_node: None,
        nnodes: None,
        node_rank: None,
        master_addr: None,
        master_port: 29500,
        gpus: None,
        hostfile: hostfile.map(Path::to_path_buf),
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
        a.plan("n1").unwrap(),
        NodePlan { local: 3, first_rank: 2, world: 6, master_addr: "n0".into(), master_port: 29500 }
    );
    assert_eq!(a.plan("N2.example.org").unwrap().first_rank, 5);
    // An explicit --node-rank wins; --master-addr overrides the first host.
    let mut b = args(Some(&p));
    b.node_rank = Some(0);
    b.master_addr = Some("10.0.0.1".into());
    assert_eq!(
        b.plan("elsewhere").unwrap(),
        NodePlan { local: 2, first_rank: 0, world: 6, master_addr: "10.0.0.1".into(), master_port: 29500 }
    );
}

#[test]
fn inconsistent_launch_flags_are_refused() {
    let (_d, p) = hostfile("n0 slots=2\nn1 slots=2\n");
    let e = args(Some(&p)).plan("other").unwrap_err().to_string();
    assert!(e.contains("this host (other) is not in") && e.contains("--node-rank"), "{e}");
    let mut a = args(Some(&p));
    a.nnodes = Some(3);
    assert!(a.plan("n0").unwrap_err().to_string().contains("--nnodes 3 but"));
    let mut a = args(Some(&p));
    a.nproc_per_node = Some(4);
    assert!(a.plan("n0").unwrap_err().to_string().contains("--nproc-per-node 4 but"));
    let mut a = args(Some(&p));
    a.node_rank = Some(2);
    assert!(a.plan("n0").unwrap_err().to_string().contains("--node-rank 2 but"));
    let mut a = args(None);
    a.nnodes = Some(2);
    a.node_rank = Some(2);
    assert!(a.plan("n0").unwrap_err().to_string().contains("node-rank < nnodes"));
    let e = args(Some(Path::new("/nonexistent/hostfile"))).plan("n0").unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/hostfile:"), "{e}");
}

#[test]
fn without_a_hostfile_ranks_follow_the_node_rank() {
    let mut a = args(None);
    a.nproc_per_node = Some(4);
    a.nnodes = Some(2);
    a.node_rank = Some(1);
    assert_eq!(
        a.plan("any").unwrap(),
        NodePlan { local: 4, first_rank: 4, world: 8, master_addr: "127.0.0.1".into(), master_port: 29500 }
    );
    assert!(!args(None).launches());
    assert!(a.launches());
}
