//! metrics.jsonl (one JSON line per logged step and evaluation) and the loss plot, both
//! written by rank 0.

use super::state::TrainError;
use std::io::Write;
use std::path::Path;

/// Evaluated losses by step, (train, val).
pub(super) type Evals = (Vec<(f64, f64)>, Vec<(f64, f64)>);

/// Appends one JSON line. The line goes out in one write: formatted straight into the file, a
/// value is many small writes, and a run killed between two of them leaves half a line that the
/// next run's first line would be glued to (and lost with). A line left unfinished anyway (a
/// crash of an older zerokit) is ended first.
pub(super) fn append_jsonl(path: &Path, v: serde_json::Value) -> Result<(), TrainError> {
    use std::os::unix::fs::FileExt;
    let io = |e| crate::fsutil::FsError::io(path, e);
    let mut f = std::fs::OpenOptions::new().create(true).read(true).append(true).open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut last = [b'\n'];
    if len > 0 {
        f.read_exact_at(&mut last, len - 1).map_err(io)?;
    }
    let line = format!("{}{v}\n", if last[0] == b'\n' { "" } else { "\n" });
    f.write_all(line.as_bytes()).map_err(io)?;
    Ok(())
}

/// The evaluations (train, val) that metrics.jsonl holds up to `upto`, for the plot of a resumed run.
pub(super) fn earlier_evals(path: &Path, upto: u64) -> Evals {
    let mut evals = (Vec::new(), Vec::new());
    for v in std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if let (Some(s), Some(t), Some(vl)) = (v["step"].as_u64(), v["train_loss"].as_f64(), v["val_loss"].as_f64()) {
            if s <= upto {
                evals.0.push((s as f64, t));
                evals.1.push((s as f64, vl));
            }
        }
    }
    evals
}

/// Draws the train and val curves into out_dir/loss.png; a failure is a warning, not the end
/// of the run.
pub(super) fn write_plot(out_dir: &Path, evals: &Evals) {
    use crate::plot::{write_loss_plot, Series};
    let series = [
        Series { label: "train".into(), color: [31, 119, 180], points: evals.0.clone() },
        Series { label: "val".into(), color: [255, 127, 14], points: evals.1.clone() },
    ];
    if let Err(e) = write_loss_plot(&out_dir.join("loss.png"), "loss", &series, 800, 500) {
        tracing::warn!("loss plot not written: {e}");
    }
}
