//! Saves that do not stop training for long (docs/checkpoint-format.md, "Saving in the
//! background"). A save copies this rank's state (its fp32 partition, and on rank 0 the model)
//! into host memory, pinned on CUDA, and returns; a thread then writes, hashes and syncs the
//! files into `.TAG.partial` while training goes on. The ranks agree that every rank's files are
//! written at a step boundary ([`Saver::poll`], one small control-plane exchange per step while a
//! save is out, so no rank waits on another's disk), and rank 0's thread then writes the
//! manifest, puts the tag in place and moves `latest`: `latest` only ever names a tag whose
//! files are all durable, and a crash at any moment leaves the previous checkpoint intact.
//!
//! One save is out at a time, and the host copy is made into buffers kept from one save to the
//! next: the state takes twice its size in host memory, no more. A save while one is still
//! writing waits for it first ([`Saver::wait`], which the end of a run calls too), and a failure
//! on any rank's thread comes back as an error at the next poll, save or wait, on every rank.

use super::{
    begin_save, comm_step, finish_save, link_tag, write_model_files, write_rank_file, CheckpointError, FileEntry,
    ModelFiles, SaveInfo,
};
use crate::comm::Collectives;
use crate::units::human_bytes;
use crate::zero::state::ZeroState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;
use tch::{Device, Tensor};
use tracing::info;

/// How [`Saver::save`] runs a save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    /// Copy the state to host memory, return, and write on a background thread.
    Background,
    /// Write from the state itself and return when the tag is in place and `latest` names it:
    /// no host copy, and training waits for all of it (`async_save = false`, and the last save
    /// of a run, which nothing would overlap).
    Blocking,
}

/// What one rank tells the others about its files at a step boundary.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Report {
    Writing,
    Written(Vec<(String, FileEntry)>),
    Failed(String),
}

/// What rank 0 makes of every rank's report.
#[derive(Debug, Serialize, Deserialize)]
enum Verdict {
    Wait,
    Written,
    Failed(String),
}

/// What a finished save reports (rank 0, which put the tag in place).
struct Done {
    dir: PathBuf,
    bytes: u64,
    secs: f64,
}

/// The save that is out.
struct Pending {
    tag: String,
    partial: PathBuf,
    mode: SaveMode,
    /// This rank's report once its writer has sent it.
    mine: Option<Report>,
    /// Where the writer sends it; None once the ranks agreed that every file is written.
    written: Option<mpsc::Receiver<Report>>,
    /// Rank 0: hands every rank's file entries to its writer, which then finishes the tag.
    files: Option<mpsc::Sender<Vec<(String, FileEntry)>>>,
    worker: JoinHandle<Result<Option<Done>, CheckpointError>>,
}

impl Pending {
    fn failed(&self, msg: String) -> CheckpointError {
        CheckpointError::Save { tag: self.tag.clone(), msg }
    }

    /// This rank's report, waiting for the writer when `block`.
    fn report(&mut self, block: bool) -> Report {
        if self.mine.is_none() {
            let gone = || Report::Failed("the writer thread ended without a report (it panicked)".into());
            let rx = self.written.as_ref().expect("asked only while writing");
            self.mine = if block {
                Some(rx.recv().unwrap_or_else(|_| gone()))
            } else {
                match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => Some(gone()),
                }
            };
        }
        self.mine.clone().unwrap_or(Report::Writing)
    }
}

/// Runs a rank's checkpoint saves. Every rank holds one and calls it at the same points:
/// [`save`](Self::save) at each save, [`poll`](Self::poll) once per step, [`wait`](Self::wait)
/// at the end; each is collective.
#[derive(Default)]
pub struct Saver {
    /// Host copies of the tensors the last background save wrote, reused by the next.
    host: Vec<Tensor>,
    pending: Option<Pending>,
}

impl Saver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Saves `state` (this rank's) as `info.tag` under `root`; rank 0 also saves `model` (other
    /// ranks may pass None). A save still writing is waited for first. Collective.
    pub fn save(
        &mut self,
        comm: &mut dyn Collectives,
        state: &ZeroState,
        model: Option<&ModelFiles>,
        root: &Path,
        info: SaveInfo,
        mode: SaveMode,
    ) -> Result<(), CheckpointError> {
        let t0 = Instant::now();
        self.wait(comm)?;
        let waited = t0.elapsed();
        let rank = comm.rank();
        let partial = begin_save(comm, root, &info.tag)?;
        let t1 = Instant::now();
        let (state, model, copied) = match mode {
            SaveMode::Background => self.copy_to_host(state, model)?,
            SaveMode::Blocking => {
                let live = [&state.master, &state.exp_avg, &state.exp_avg_sq].map(|t| t.shallow_clone());
                (with_partition(state, live), model.map(shallow), 0)
            }
        };
        let copy = t1.elapsed();
        let (report_tx, report_rx) = mpsc::channel();
        let (files_tx, files_rx) = match rank {
            0 => {
                let (tx, rx) = mpsc::channel();
                (Some(tx), Some(rx))
            }
            _ => (None, None),
        };
        let tag = info.tag.clone();
        let (root_dir, dir) = (root.to_path_buf(), partial.clone());
        let worker = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || write(state, model, &root_dir, &dir, info, report_tx, files_rx))
            .map_err(|e| CheckpointError::Save {
                tag: tag.clone(),
                msg: format!("cannot start a writer thread: {e}"),
            })?;
        self.pending = Some(Pending {
            tag: tag.clone(),
            partial,
            mode,
            mine: None,
            written: Some(report_rx),
            files: files_tx,
            worker,
        });
        if mode == SaveMode::Blocking {
            self.wait(comm)?;
        }
        // The stall this save cost training, to set against a synchronous save such as
        // DeepSpeed's save_checkpoint.
        let stall = t0.elapsed();
        let how = match mode {
            SaveMode::Background => format!(
                "previous save {:.3} s, host copy of {} {:.3} s; writing in the background",
                waited.as_secs_f64(),
                human_bytes(copied),
                copy.as_secs_f64()
            ),
            SaveMode::Blocking => format!("previous save {:.3} s; a blocking save", waited.as_secs_f64()),
        };
        info!("save of {tag}: training paused {:.3} s ({how})", stall.as_secs_f64());
        Ok(())
    }

    /// Saves `state` as `info.tag` from the files of tag `from`, which holds this same state
    /// (the step `from` was saved at has not moved on): rank 0 links them under the new name and
    /// writes its manifest, so nothing is copied or written again. The save still writing,
    /// which may be `from`, is waited for first. Collective; every rank returns rank 0's error.
    pub fn link(
        &mut self,
        comm: &mut dyn Collectives,
        state: &ZeroState,
        root: &Path,
        from: &str,
        info: SaveInfo,
    ) -> Result<(), CheckpointError> {
        let t0 = Instant::now();
        self.wait(comm)?;
        let partial = begin_save(comm, root, &info.tag)?;
        let outcome = if comm.rank() == 0 { link_tag(state, root, &partial, from, &info).map(Some) } else { Ok(None) };
        let doing = format!("link {from}'s files");
        if let Some(dir) = share_rank0_outcome(comm, outcome, &info.tag, &doing, &partial)? {
            info!(
                "saved checkpoint {}: the files of {from} (the same step), linked in {:.3} s",
                dir.display(),
                t0.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// Between steps: whether every rank's files of the save that is out are written, agreed on
    /// the control plane (collective while a save is writing, nothing otherwise); once they are,
    /// rank 0's thread finishes the tag. Returns at once whatever the disks are doing. An error:
    /// the save failed, on this rank or another.
    pub fn poll(&mut self, comm: &mut dyn Collectives) -> Result<(), CheckpointError> {
        let Some(p) = &mut self.pending else { return Ok(()) };
        if p.written.is_some() {
            let mine = p.report(false);
            self.agree(comm, &mine)?;
        }
        let finished = self.pending.as_ref().is_some_and(|p| p.written.is_none() && p.worker.is_finished());
        if finished {
            if let Err(e) = self.complete() {
                // Rank 0 alone finishes the tag: the other ranks learn of its failure this way.
                comm.abort(&e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits until the save that is out (if any) is complete: this rank's own files, then every
    /// rank's agreement, then rank 0's manifest, tag and `latest`. Collective. Every rank returns
    /// rank 0's error if the tag could not be finished.
    pub fn wait(&mut self, comm: &mut dyn Collectives) -> Result<(), CheckpointError> {
        let mut tag = String::new();
        let mut outcome = Ok(());
        if let Some(p) = &mut self.pending {
            tag = p.tag.clone();
            if p.written.is_some() {
                let mine = p.report(true);
                self.agree(comm, &mine)?;
            }
            outcome = match &self.pending {
                // Every rank waited for its own writer, so no report said "writing".
                Some(p) if p.written.is_some() => {
                    let e = p.failed("the ranks did not agree that the save was written".into());
                    self.pending = None;
                    Err(e)
                }
                _ => self.complete(),
            };
        }
        share_rank0_outcome(comm, outcome, &tag, "finish it", Path::new(&tag))
    }

    /// Gathers every rank's report on rank 0 and shares its verdict. When every file is written,
    /// rank 0's writer gets their entries; when one failed, the save is dropped on every rank.
    fn agree(&mut self, comm: &mut dyn Collectives, mine: &Report) -> Result<(), CheckpointError> {
        let p = self.pending.as_mut().expect("a save is out");
        let what = "checkpoint files";
        let payload = serde_json::to_vec(mine).expect("reports serialize");
        let verdict = match comm_step(comm.control().gather(&payload, what), &p.partial)? {
            Some(all) => {
                let reports: Vec<Report> = all
                    .iter()
                    .map(|b| {
                        serde_json::from_slice(b).unwrap_or_else(|e| Report::Failed(format!("unreadable report: {e}")))
                    })
                    .collect();
                let failed: Vec<String> = reports
                    .iter()
                    .enumerate()
                    .filter_map(|(r, rep)| match rep {
                        Report::Failed(m) => Some(format!("rank {r}: {m}")),
                        _ => None,
                    })
                    .collect();
                let verdict = if !failed.is_empty() {
                    Verdict::Failed(failed.join("; "))
                } else if reports.iter().all(|r| matches!(r, Report::Written(_))) {
                    let files: Vec<(String, FileEntry)> = reports
                        .into_iter()
                        .flat_map(|r| match r {
                            Report::Written(f) => f,
                            _ => Vec::new(),
                        })
                        .collect();
                    // The writer is waiting for these; if it is gone, its error comes at `complete`.
                    if let Some(tx) = p.files.take() {
                        let _ = tx.send(files);
                    }
                    Verdict::Written
                } else {
                    Verdict::Wait
                };
                let out = serde_json::to_vec(&verdict).expect("verdicts serialize");
                comm_step(comm.control().broadcast(Some(&out), what), &p.partial)?;
                verdict
            }
            None => {
                let got = comm_step(comm.control().broadcast(None, what), &p.partial)?;
                serde_json::from_slice(&got).map_err(|e| p.failed(format!("unreadable verdict from rank 0: {e}")))?
            }
        };
        match verdict {
            Verdict::Wait => Ok(()),
            Verdict::Written => {
                p.written = None;
                Ok(())
            }
            Verdict::Failed(msg) => {
                let p = self.pending.take().expect("a save is out");
                let err = p.failed(format!("the save failed in the background and was abandoned: {msg}"));
                // The host buffers are reused by the next save: the writer must be done with them.
                drop(p.files);
                let _ = p.worker.join();
                Err(err)
            }
        }
    }

    /// Joins the writer of the save that is out, whose files every rank has written, and logs
    /// how long the save took (rank 0, which finished the tag).
    fn complete(&mut self) -> Result<(), CheckpointError> {
        let p = self.pending.take().expect("a save is out");
        let done = match p.worker.join() {
            Ok(r) => r?,
            Err(_) => return Err(CheckpointError::Save { tag: p.tag, msg: "the writer thread panicked".into() }),
        };
        if let Some(d) = done {
            let how = match p.mode {
                SaveMode::Background => "in the background",
                SaveMode::Blocking => "while training waited",
            };
            info!(
                "saved checkpoint {}: {} written, hashed and synced in {:.2} s {how}",
                d.dir.display(),
                human_bytes(d.bytes),
                d.secs
            );
        }
        Ok(())
    }

    /// Copies what this rank saves into the host buffers (allocated, pinned on CUDA, by the
    /// first save; reused after), returning the copies and their size in bytes.
    fn copy_to_host(
        &mut self,
        state: &ZeroState,
        model: Option<&ModelFiles>,
    ) -> Result<(ZeroState, Option<ModelFiles>, u64), CheckpointError> {
        let mut sources: Vec<&Tensor> = Vec::new();
        if state.saves {
            sources.extend([&state.master, &state.exp_avg, &state.exp_avg_sq]);
        }
        if let Some(m) = model {
            sources.extend(m.tensors.iter().map(|(_, t)| t));
        }
        let fits = self.host.len() == sources.len()
            && self.host.iter().zip(&sources).all(|(h, s)| h.size() == s.size() && h.kind() == s.kind());
        if !fits {
            let t = Instant::now();
            self.host = sources.iter().map(|s| host_buffer(s)).collect::<Result<_, _>>()?;
            let bytes = self.host.iter().map(nbytes).sum();
            info!(
                "checkpoint host buffers: {} allocated in {:.2} s (kept for the saves that follow)",
                human_bytes(bytes),
                t.elapsed().as_secs_f64()
            );
        }
        for (h, s) in self.host.iter_mut().zip(&sources) {
            h.f_copy_(s)?;
        }
        let bytes = self.host.iter().map(nbytes).sum();
        let mut copies = self.host.iter().map(Tensor::shallow_clone);
        let partition = if state.saves {
            [(); 3].map(|_| copies.next().expect("three partition tensors"))
        } else {
            [&state.master, &state.exp_avg, &state.exp_avg_sq].map(|t| t.shallow_clone())
        };
        let model = model.map(|m| ModelFiles {
            tensors: m.tensors.iter().map(|(n, _)| (n.clone(), copies.next().expect("one copy a tensor"))).collect(),
            hf_config: m.hf_config.clone(),
        });
        Ok((with_partition(state, partition), model, bytes))
    }
}

impl Drop for Saver {
    /// A run that stops with an error still puts in place a tag whose files every rank had
    /// written (rank 0 was finishing it); one still being written stays a `.partial`, which the
    /// next run clears.
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            if p.written.is_none() {
                if let Ok(Err(e)) = p.worker.join() {
                    tracing::warn!("save of {} failed: {e}", p.tag);
                }
            }
        }
    }
}

/// Every rank's end of a step that rank 0 finishes alone (a tag's manifest and rename): rank 0's
/// error, if any, is broadcast, so each rank returns its own error first, else rank 0's, as
/// "rank 0 could not `doing`". Collective.
fn share_rank0_outcome<T>(
    comm: &mut dyn Collectives,
    outcome: Result<T, CheckpointError>,
    tag: &str,
    doing: &str,
    at: &Path,
) -> Result<T, CheckpointError> {
    let msg = outcome.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    let rank = comm.rank();
    let shared = comm_step(comm.control().broadcast((rank == 0).then_some(msg.as_bytes()), "checkpoint finished"), at)?;
    let value = outcome?;
    if shared.is_empty() {
        return Ok(value);
    }
    Err(CheckpointError::Save {
        tag: tag.to_string(),
        msg: format!("rank 0 could not {doing}: {}", String::from_utf8_lossy(&shared)),
    })
}

/// A host tensor shaped like `like`, pinned when `like` is on a CUDA device (device-to-host
/// copies into pinned memory run at the bus's speed, and free the device sooner); pageable
/// memory if pinning is refused, with a warning.
fn host_buffer(like: &Tensor) -> Result<Tensor, CheckpointError> {
    let host = Tensor::f_empty(like.size(), (like.kind(), Device::Cpu))?;
    match like.device() {
        d @ Device::Cuda(_) => Ok(host.f_pin_memory(d).unwrap_or_else(|e| {
            // Once: a save allocates a buffer per tensor, the model's included.
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::warn!("pinned host memory refused ({e}); checkpoints are copied into pageable memory")
            });
            host
        })),
        _ => Ok(host),
    }
}

fn nbytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

fn shallow(m: &ModelFiles) -> ModelFiles {
    ModelFiles {
        tensors: m.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
        hf_config: m.hf_config.clone(),
    }
}

/// `state` with its partition tensors (master, exp_avg, exp_avg_sq) replaced.
fn with_partition(state: &ZeroState, [master, exp_avg, exp_avg_sq]: [Tensor; 3]) -> ZeroState {
    ZeroState {
        stage: state.stage,
        world: state.world,
        kind: state.kind,
        layout: state.layout.clone(),
        partition: state.partition,
        saves: state.saves,
        master,
        exp_avg,
        exp_avg_sq,
        optimizer_step: state.optimizer_step,
        adamw: state.adamw,
        scaler: state.scaler.clone(),
    }
}

/// A save's background thread: this rank's files (rank 0's model files beside its partition, on
/// a second thread), reported to training; then, on rank 0, once every rank's are in, the tag
/// finished ([`finish_save`]).
fn write(
    state: ZeroState,
    model: Option<ModelFiles>,
    root: &Path,
    partial: &Path,
    info: SaveInfo,
    report: mpsc::Sender<Report>,
    files: Option<mpsc::Receiver<Vec<(String, FileEntry)>>>,
) -> Result<Option<Done>, CheckpointError> {
    let t = Instant::now();
    super::save_point("writing", &info.tag);
    let (step, tag) = (info.step, info.tag.as_str());
    let written = std::thread::scope(|s| {
        let model_files = model.map(|m| s.spawn(move || write_model_files(partial, &m, step, tag)));
        let mut mine: Vec<(String, FileEntry)> =
            write_rank_file(partial, &state, info.step, &info.tag)?.into_iter().collect();
        if let Some(h) = model_files {
            let m = h.join().map_err(|_| CheckpointError::Save {
                tag: info.tag.clone(),
                msg: "the model writer thread panicked".into(),
            })??;
            mine.extend(m);
        }
        Ok::<_, CheckpointError>(mine)
    });
    let mine = match written {
        Ok(m) => m,
        Err(e) => {
            let _ = report.send(Report::Failed(e.to_string()));
            return Err(e);
        }
    };
    tracing::debug!("save of {}: this rank's files written in {:.2} s", info.tag, t.elapsed().as_secs_f64());
    // Training may be gone (an error elsewhere): then nobody finishes this save.
    let _ = report.send(Report::Written(mine));
    let Some(files) = files else { return Ok(None) };
    let all = files.recv().map_err(|_| CheckpointError::Save {
        tag: info.tag.clone(),
        msg: "abandoned before every rank's files were in".into(),
    })?;
    let bytes = all.iter().map(|(_, e)| e.bytes).sum();
    let dir = finish_save(&state, root, partial, &info, all.into_iter().collect())?;
    Ok(Some(Done { dir, bytes, secs: t.elapsed().as_secs_f64() }))
}
