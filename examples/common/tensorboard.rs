//! TensorBoard event files: scalar summaries as `Event` protobufs (`prost`, the fields of
//! TensorFlow's `event.proto` and `summary.proto` that scalars use) in TFRecord framing (length,
//! masked CRC-32C of the length, the record, masked CRC-32C of the record; `crc32c`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `tensorflow.Event`: `wall_time = 1`, `step = 2`, `oneof what { file_version = 3; summary = 5 }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// The payload.
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// `file_version = 3`, `"brain.Event:2"` in the first record.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// `summary = 5`.
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`: `repeated Value value = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: `tag = 1`, `oneof value { float simple_value = 2; }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// Series name, e.g. `train/loss`.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// TFRecord's masked CRC-32C.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// Writes scalars to `events.out.tfevents.<time>.moe-peft`.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

fn now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

impl EventWriter {
    /// Creates the event file in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let t = now();
        let path = dir.join(format!("events.out.tfevents.{}.moe-peft", t.as_secs()));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self { file, path };
        w.record(&Event {
            wall_time: t.as_secs_f64(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, event: &Event) -> Result<()> {
        let data = prost::Message::encode_to_vec(event);
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(&data);
        buf.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Adds one scalar point.
    pub fn scalar(&mut self, tag: &str, step: usize, value: f64) -> Result<()> {
        self.record(&Event {
            wall_time: now().as_secs_f64(),
            step: step as i64,
            what: Some(What::Summary(Summary {
                value: vec![SummaryValue {
                    tag: tag.into(),
                    simple_value: Some(value as f32),
                }],
            })),
        })
    }
}

/// Reads an event file back: every record's framing and both CRCs are checked, and each record
/// is decoded as an `Event`.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .with_context(|| format!("{}: record at byte {at} is cut short", path.display()))?;
        let (len_bytes, len_crc) = head.split_at(8);
        anyhow::ensure!(
            u32::from_le_bytes(len_crc.try_into()?) == masked_crc(len_bytes),
            "{}: length CRC of the record at byte {at}",
            path.display()
        );
        let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into()?))?;
        let data = bytes
            .get(at + 12..at + 12 + len)
            .with_context(|| format!("{}: record at byte {at} is cut short", path.display()))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .with_context(|| format!("{}: record at byte {at} has no CRC", path.display()))?;
        anyhow::ensure!(
            u32::from_le_bytes(crc.try_into()?) == masked_crc(data),
            "{}: data CRC of the record at byte {at}",
            path.display()
        );
        out.push(
            <Event as prost::Message>::decode(data)
                .with_context(|| format!("{}: record at byte {at}", path.display()))?,
        );
        at += 16 + len;
    }
    Ok(out)
}

/// These tests run from `tests/tensorboard.rs`, which includes this file (example targets'
/// own tests are not part of `cargo test`).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The CRC-32C check value (RFC 3720, B.4), and TFRecord's masking of it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn event_file_holds_framed_version_and_scalars() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut w = EventWriter::create(dir.path())?;
        w.scalar("train/loss", 3, 1.25)?;
        w.scalar("train/learning_rate", 300, 2e-4)?;
        let events = read_events(w.path())?;
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        let scalar = |e: &Event| match &e.what {
            Some(What::Summary(s)) => (e.step, s.value[0].tag.clone(), s.value[0].simple_value),
            other => panic!("not a summary: {other:?}"),
        };
        assert_eq!(scalar(&events[1]), (3, "train/loss".into(), Some(1.25)));
        assert_eq!(
            scalar(&events[2]),
            (300, "train/learning_rate".into(), Some(2e-4f32))
        );
        // The wire bytes are TensorFlow's: wall_time fixed64 (0x09), step varint (0x10; 300 is
        // 0xAC 0x02), simple_value fixed32 (0x15).
        let bytes = std::fs::read(w.path())?;
        let find = |needle: &[u8]| bytes.windows(needle.len()).any(|x| x == needle);
        assert!(find(&[0x10, 0xAC, 0x02]));
        let mut v = vec![0x15];
        v.extend_from_slice(&1.25f32.to_le_bytes());
        assert!(find(&v));
        // A flipped byte is caught by the CRC.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 6] ^= 1;
        let p = dir.path().join("bad");
        std::fs::write(&p, bad)?;
        assert!(read_events(&p).is_err());
        Ok(())
    }
}
