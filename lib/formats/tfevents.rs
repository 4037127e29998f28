//! TensorBoard event files: what `tensorboard --logdir` reads and `wandb sync
//! --sync-tensorboard` imports. A file is a sequence of TFRecords (length, masked CRC-32C of the
//! length, a serialized `tensorflow.Event` protobuf, masked CRC-32C of it); the first event names
//! the format version, each later one carries scalar summaries for a step. Only scalars are
//! written. The messages below mirror tensorflow/core/util/event.proto and
//! tensorflow/core/framework/summary.proto field for field (numbers and types), encoded by
//! prost; no generated code is needed for these few fields.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `Summary.Value` with its `simple_value` (field 2 of the `value` oneof).
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, tag = "2")]
    simple_value: f32,
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of data holding CRCs stays
/// strong.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// An event file of its own in a log directory (a run that resumes starts another one beside
/// it; TensorBoard reads every file of the directory as one run).
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and a new `events.out.tfevents.<time>.<host>.<pid>` file in it.
    pub fn create(dir: &Path, host: &str) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let secs = now() as u64;
        let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{}", std::process::id()));
        let file = std::fs::OpenOptions::new().create_new(true).append(true).open(&path)?;
        let mut w = EventWriter { file, path };
        w.write(Event { wall_time: now(), step: 0, what: Some(What::FileVersion("brain.Event:2".into())) })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars of one step (tag, value); non-finite values are written as they are (TensorBoard
    /// shows NaN and Inf).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let value = values.iter().map(|(t, v)| SummaryValue { tag: t.to_string(), simple_value: *v as f32 }).collect();
        self.write(Event { wall_time: now(), step: step as i64, what: Some(What::Summary(Summary { value })) })
    }

    /// One record in one write, so a crash leaves whole records (a reader stops at a torn last one).
    fn write(&mut self, e: Event) -> std::io::Result<()> {
        self.file.write_all(&record(&prost::Message::encode_to_vec(&e)))
    }
}
