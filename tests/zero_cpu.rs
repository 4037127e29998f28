//! ZeRO on CPU ranks through the real `train` binary: N ranks at every stage match one rank on
//! the same global batch, resume is exact, resume on another world size works, a dead rank ends
//! the job, and a crash during a save leaves `latest` loadable.

mod common;

use common::tiny::{assert_close, config, copy_dir, dataset, losses, port, train, train_command};
use std::path::Path;
use std::process::Stdio;

#[test]
fn n_ranks_match_one_rank_at_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    // One rank with the whole global batch (12 sequences) is the reference.
    let reference = train(&tmp.path().join("ref"), &data, 1, "batch_size = 12", &[]);
    assert!(reference.ok, "{}", reference.stderr);
    assert_eq!(reference.losses.len(), 20);
    assert!(reference.losses[19].1 < reference.losses[0].1 - 0.3, "loss should fall: {:?}", reference.losses);
    for stage in 0..=2 {
        for n in [2usize, 3, 4] {
            let extra = format!("batch_size = {}\nzero_stage = {stage}", 12 / n);
            let r = train(&tmp.path().join(format!("s{stage}n{n}")), &data, n, &extra, &[]);
            assert!(r.ok, "stage {stage}, {n} ranks: {}", r.stderr);
            assert_close(&r.losses, &reference.losses, 1e-6, &format!("stage {stage}, {n} ranks"));
        }
    }
}

#[test]
fn two_nodes_from_a_hostfile_with_uneven_slots_match_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let reference = train(&tmp.path().join("ref"), &data, 1, "batch_size = 12\nmax_iters = 6", &[]);
    assert!(reference.ok, "{}", reference.stderr);
    // Node 0 runs rank 0, node 1 ranks 1 and 2: the same command on both, as on a real cluster.
    let dir = tmp.path().join("nodes");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, &data, "batch_size = 4\nzero_stage = 2\nmax_iters = 6");
    let hostfile = dir.join("hostfile");
    std::fs::write(&hostfile, "# DeepSpeed style\nnode-a slots=1\nnode-b.cluster slots=2  # two ranks\n").unwrap();
    let p = port().to_string();
    let node = |r: &str| {
        let launch: Vec<String> = [
            "--hostfile",
            hostfile.to_str().unwrap(),
            "--node-rank",
            r,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &p,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        train_command(&cfg, &launch, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let (n1, n0) = (node("1"), node("0"));
    let (o1, o0) = (n1.wait_with_output().unwrap(), n0.wait_with_output().unwrap());
    assert!(
        o0.status.success() && o1.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o0.stderr),
        String::from_utf8_lossy(&o1.stderr)
    );
    assert_close(&losses(&dir.join("out")), &reference.losses, 1e-6, "2 nodes (1 + 2 ranks), stage 2");
}

/// `--launcher ssh`: one command starts every node of a hostfile over ssh, each with its node
/// rank, in the same directory. `ssh` here is a stand-in on PATH that runs the command on this
/// machine (CI has no ssh server); what it is given is what `ssh HOST CMD` would run there.
#[test]
fn a_hostfile_launched_over_ssh_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let reference = train(&tmp.path().join("ref"), &data, 1, "batch_size = 12\nmax_iters = 6", &[]);
    assert!(reference.ok, "{}", reference.stderr);
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = tmp.path().join("ssh.log");
    let ssh = bin.join("ssh");
    // ssh -o BatchMode=yes HOST CMD: record the host, run CMD.
    std::fs::write(&ssh, format!("#!/bin/sh\necho \"$3\" >> {}\nexec sh -c \"$4\"\n", log.display())).unwrap();
    std::fs::set_permissions(&ssh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("nodes");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, &data, "batch_size = 4\nzero_stage = 2\nmax_iters = 6");
    let hostfile = dir.join("hostfile");
    std::fs::write(&hostfile, "127.0.0.1 slots=1\nlocalhost slots=2\n").unwrap();
    let launch: Vec<String> =
        ["--hostfile", hostfile.to_str().unwrap(), "--launcher", "ssh", "--master-port", &port().to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let o = train_command(&cfg, &launch, &[("PATH", &path)]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let hosts = std::fs::read_to_string(&log).unwrap();
    let mut hosts: Vec<&str> = hosts.lines().collect();
    hosts.sort();
    assert_eq!(hosts, ["127.0.0.1", "localhost"], "one ssh per host");
    assert_close(&losses(&dir.join("out")), &reference.losses, 1e-6, "hostfile over ssh (1 + 2 ranks), stage 2");
}

#[test]
fn a_new_run_refuses_an_out_dir_with_checkpoints_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let dir = tmp.path().join("run");
    let first = train(&dir, &data, 1, "max_iters = 4\neval_interval = 2\nalways_save_checkpoint = true", &[]);
    assert!(first.ok, "{}", first.stderr);
    let listing = |d: &Path| {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
            .collect();
        v.sort();
        v
    };
    let before = (listing(&first.out), std::fs::read(first.out.join("latest")).unwrap());
    let again = train(&dir, &data, 1, "max_iters = 3\neval_interval = 1\nalways_save_checkpoint = true", &[]);
    assert!(!again.ok);
    assert!(
        again.stderr.contains("already holds checkpoints of an earlier run")
            && again.stderr.contains("init_from=resume"),
        "{}",
        again.stderr
    );
    assert_eq!((listing(&first.out), std::fs::read(first.out.join("latest")).unwrap()), before);
}

#[test]
fn slurm_batch_scripts_launch_and_srun_tasks_are_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let reference = train(&tmp.path().join("ref"), &data, 1, "batch_size = 8\nmax_iters = 4", &[]);
    assert!(reference.ok, "{}", reference.stderr);
    // An sbatch script's environment (SLURM_PROCID=0 for tasks it has not started): zerokit's
    // launcher still starts the two ranks asked for.
    let sbatch = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "0"), ("SLURM_JOB_ID", "7")];
    let r = train(&tmp.path().join("sbatch"), &data, 2, "batch_size = 4\nmax_iters = 4", &sbatch);
    assert!(r.ok, "{}", r.stderr);
    assert_close(&r.losses, &reference.losses, 1e-6, "launcher inside an sbatch script");
    // Two srun tasks: each process is a rank, told by Slurm's variables alone.
    let dir = tmp.path().join("srun");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, &data, "batch_size = 4\nmax_iters = 4");
    let p = port().to_string();
    let tasks: Vec<_> = ["1", "0"]
        .iter()
        .map(|r| {
            let env = [
                ("SLURM_STEP_ID", "0"),
                ("SLURM_PROCID", r),
                ("SLURM_LOCALID", r),
                ("SLURM_NTASKS", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", p.as_str()),
            ];
            train_command(&cfg, &[], &env).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for t in tasks {
        let o = t.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_close(&losses(&dir.join("out")), &reference.losses, 1e-6, "two srun tasks");
}

#[test]
fn models_that_cannot_serve_the_config_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let dir = tmp.path().join("run");
    let first = train(&dir, &data, 1, "max_iters = 2\neval_interval = 2\nalways_save_checkpoint = true", &[]);
    assert!(first.ok, "{}", first.stderr);
    let longer = train(&dir, &data, 1, "init_from = \"resume\"\nmax_iters = 4\nblock_size = 32", &[]);
    assert!(!longer.ok);
    assert!(longer.stderr.contains("block_size 32 is larger than the model's 16 positions"), "{}", longer.stderr);
    let hub = train(&tmp.path().join("hub"), &data, 1, "init_from = \"gpt2\"", &[]);
    assert!(!hub.ok);
    assert!(hub.stderr.contains("init_from = \"gpt2\": not a directory. zerokit downloads nothing"), "{}", hub.stderr);
}

#[test]
fn gradient_accumulation_matches_a_larger_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let reference = train(&tmp.path().join("ref"), &data, 1, "batch_size = 8", &[]);
    assert!(reference.ok, "{}", reference.stderr);
    for stage in 0..=2 {
        let extra = format!("batch_size = 2\ngradient_accumulation_steps = 2\nzero_stage = {stage}");
        let r = train(&tmp.path().join(format!("acc{stage}")), &data, 2, &extra, &[]);
        assert!(r.ok, "{}", r.stderr);
        assert_close(&r.losses, &reference.losses, 1e-6, &format!("stage {stage}, accumulation 2 x 2 ranks"));
    }
}

#[test]
fn resume_is_exact_and_works_on_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let common = "batch_size = 3\nzero_stage = 2\nalways_save_checkpoint = true\neval_interval = 10\nkeep_last = 5";
    let full = train(&tmp.path().join("full"), &data, 2, common, &[]);
    assert!(full.ok, "{}", full.stderr);

    let part = tmp.path().join("part");
    let first = train(&part, &data, 2, &format!("{common}\nmax_iters = 10"), &[]);
    assert!(first.ok, "{}", first.stderr);
    // The run ended with `final` (step 10), which `latest` names and the resume continues from.
    assert_eq!(std::fs::read_to_string(first.out.join("latest")).unwrap().trim(), "final");
    assert!(first.out.join("step_00000010/manifest.json").is_file());
    // step 10 was saved in the background (async_save's default), and `final`, at the same step,
    // links its files (tests/crash.rs holds background saves to blocking ones byte for byte).
    let log = std::fs::read_to_string(first.out.join("logs/rank000.log")).unwrap();
    assert!(log.contains("save of step_00000010: training paused") && log.contains("writing in the background"));
    assert!(log.contains("the files of step_00000010 (the same step), linked"), "{log}");
    for f in ["model.safetensors", "rank_00000.safetensors", "rank_00001.safetensors", "config.json"] {
        let read = |tag: &str| std::fs::read(first.out.join(tag).join(f)).unwrap();
        assert!(read("step_00000010") == read("final"), "{f} differs between step_00000010 and final");
    }
    let resumed = train(&part, &data, 2, &format!("{common}\ninit_from = \"resume\""), &[]);
    assert!(resumed.ok, "{}", resumed.stderr);
    let tail: Vec<_> = resumed.losses.iter().filter(|(s, _)| *s > 10).copied().collect();
    let want: Vec<_> = full.losses.iter().filter(|(s, _)| *s > 10).copied().collect();
    assert_close(&tail, &want, 0.0, "resume on the same world size");

    // From the tag saved in the background, on the same world size: exactly the same losses.
    let d = tmp.path().join("from_background");
    std::fs::create_dir_all(d.join("out")).unwrap();
    copy_dir(&first.out.join("step_00000010"), &d.join("out/step_00000010"));
    std::fs::write(d.join("out/latest"), "step_00000010\n").unwrap();
    let r = train(&d, &data, 2, &format!("{common}\ninit_from = \"resume\""), &[]);
    assert!(r.ok, "{}", r.stderr);
    let tail: Vec<_> = r.losses.iter().filter(|(s, _)| *s > 10).copied().collect();
    assert_close(&tail, &want, 0.0, "resume from a tag saved in the background");

    // Saved on 2 ranks at stage 2, continued on 3 ranks at stage 1 and on 1 rank at stage 0.
    for (n, stage) in [(3usize, 1u8), (1, 0)] {
        let d = tmp.path().join(format!("re{n}"));
        std::fs::create_dir_all(d.join("out")).unwrap();
        copy_dir(&first.out.join("step_00000010"), &d.join("out/step_00000010"));
        std::fs::write(d.join("out/latest"), "step_00000010\n").unwrap();
        let extra = format!("batch_size = {}\nzero_stage = {stage}\neval_interval = 10\ninit_from = \"resume\"", 6 / n);
        let r = train(&d, &data, n, &extra, &[]);
        assert!(r.ok, "{}", r.stderr);
        let tail: Vec<_> = r.losses.iter().filter(|(s, _)| *s > 10).copied().collect();
        assert_close(&tail, &want, 1e-5, &format!("resume on {n} ranks at stage {stage}"));
    }

    // Tokens seen add up across runs with different global batches (16 tokens a sequence).
    let d = tmp.path().join("tokens");
    std::fs::create_dir_all(d.join("out")).unwrap();
    copy_dir(&first.out.join("step_00000010"), &d.join("out/step_00000010"));
    std::fs::write(d.join("out/latest"), "step_00000010\n").unwrap();
    let r = train(
        &d,
        &data,
        1,
        "batch_size = 2\nmax_iters = 12\neval_interval = 2\nalways_save_checkpoint = true\ninit_from = \"resume\"",
        &[],
    );
    assert!(r.ok, "{}", r.stderr);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.out.join("step_00000012/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["tokens_seen"].as_u64(), Some(10 * 6 * 16 + 2 * 2 * 16));
}

#[test]
fn a_dead_rank_ends_the_job_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let t = std::time::Instant::now();
    let r =
        train(&tmp.path().join("dead"), &data, 3, "batch_size = 2\nzero_stage = 2", &[("ZEROKIT_TEST_EXIT", "1:5")]);
    assert!(!r.ok);
    assert!(r.stderr.contains("rank 1 failed"), "{}", r.stderr);
    assert!(t.elapsed().as_secs() < 60, "the job took {:?} to stop", t.elapsed());
}

#[test]
fn a_crash_during_save_leaves_latest_loadable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let common = "batch_size = 3\nzero_stage = 1\nalways_save_checkpoint = true\neval_interval = 5";
    let r = train(
        &tmp.path().join("crash"),
        &data,
        2,
        common,
        &[("ZEROKIT_TEST_CRASH_AT", "rank files gathered@step_00000010")],
    );
    assert!(!r.ok, "the save hook should have killed rank 0");
    assert_eq!(std::fs::read_to_string(r.out.join("latest")).unwrap().trim(), "step_00000005");
    assert!(r.out.join(".step_00000010.partial").exists(), "the interrupted save stays in its .partial directory");
    assert!(!r.out.join("step_00000010").exists());
    let resumed =
        train(&tmp.path().join("crash"), &data, 2, &format!("{common}\ninit_from = \"resume\"\nmax_iters = 12"), &[]);
    assert!(resumed.ok, "{}", resumed.stderr);
    assert!(resumed.stderr.contains("resumed from") && resumed.stderr.contains("at step 5"), "{}", resumed.stderr);
    assert!(resumed.stderr.contains("recovered: ") && resumed.stderr.contains(".step_00000010.partial: removed"));
    assert!(!resumed.out.join(".step_00000010.partial").exists(), "start-up clears the partial");
}

/// The same configuration error on every rank reaches the console as whole lines, one per rank,
/// each saying which rank it came from (they used to cut into each other).
#[test]
fn an_error_on_several_ranks_prints_whole_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let run = train(
        &tmp.path().join("a"),
        &data,
        2,
        "train_batch_size = 3\nbatch_size = 0\ngradient_accumulation_steps = 0",
        &[],
    );
    assert!(!run.ok);
    let lines: Vec<&str> = run.stderr.lines().filter(|l| l.contains("train_batch_size 3")).collect();
    let want = "error: train_batch_size 3 is not a multiple of the world size 2";
    assert!(lines.iter().any(|l| l.starts_with(want)), "{}", run.stderr);
    assert!(lines.iter().any(|l| l.starts_with(&format!("[rank 1] {want}"))), "{}", run.stderr);
    assert!(lines.iter().all(|l| l.starts_with(want) || l.starts_with(&format!("[rank 1] {want}"))), "{}", run.stderr);
}

/// In fp32 nothing scales the loss: a skipped step says its gradient was not finite, not that a
/// loss scale (which does not exist) overflowed.
#[test]
fn fp32_skips_are_not_reported_as_loss_scale_overflows() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let run = train(
        &tmp.path().join("a"),
        &data,
        1,
        "learning_rate = 1e30\nmin_lr = 1e30\nmax_iters = 4\ngrad_clip = 0.0",
        &[],
    );
    assert!(run.stderr.contains("(step skipped: non-finite gradient)"), "{}", run.stderr);
    assert!(!run.stderr.contains("loss scale"), "{}", run.stderr);
}

/// zerokit's launcher divides the node's cores among its local ranks (torchrun sets 1): two
/// ranks that each start a thread per core run several times slower on a small machine.
#[test]
fn local_ranks_share_the_cores() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let run = train(&tmp.path().join("a"), &data, 2, "max_iters = 1", &[]);
    assert!(run.ok, "{}", run.stderr);
    let cores = std::thread::available_parallelism().unwrap().get();
    for r in 0..2 {
        let log = std::fs::read_to_string(run.out.join(format!("logs/rank{r:03}.log"))).unwrap();
        assert!(log.contains(&format!("intra-op threads: {}", (cores / 2).max(1))), "rank {r}: {log}");
    }
    let run = train(&tmp.path().join("b"), &data, 2, "max_iters = 1\ndtype = \"fp16\"", &[("OMP_NUM_THREADS", "1")]);
    let log = std::fs::read_to_string(run.out.join("logs/rank001.log")).unwrap();
    assert!(log.contains("intra-op threads: 1"), "{log}");
    assert_eq!(run.stderr.matches("fp16 on CPU is slow").count(), 1, "{}", run.stderr);
}

/// The configuration printed at start and saved in the manifest shows the model in effect: a
/// preset's shape, not the custom-model defaults (n_layer 4, n_embd 128) it replaced.
#[test]
fn the_printed_configuration_shows_the_presets_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let extra = "model = \"gpt2\"\nblock_size = 8\nbatch_size = 1\nmax_iters = 1\neval_iters = 1\nlog_interval = 1";
    let run = train(&tmp.path().join("a"), &data, 1, extra, &[]);
    assert!(run.ok, "{}", run.stderr);
    for want in ["n_layer = 12", "n_head = 12", "n_embd = 768"] {
        assert!(run.stderr.contains(want), "{want} not in\n{}", run.stderr);
    }
}
