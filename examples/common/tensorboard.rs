//! A minimal TensorBoard event-file writer: scalar summaries in TFRecord framing
//! (`length`, masked CRC32C of the length, an `Event` protobuf, masked CRC32C of the data).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78;
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Encodes `Event { wall_time = 1, step = 2, file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: EventBody<'_>) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint
    varint(step as u64, &mut e);
    match body {
        EventBody::Version(v) => field_bytes(3, v.as_bytes(), &mut e),
        EventBody::Scalar(tag, value) => {
            // Summary { value = 1: Value { tag = 1, simple_value = 2 (float) } }
            let mut val = Vec::new();
            field_bytes(1, tag.as_bytes(), &mut val);
            val.push(0x15); // field 2, fixed32
            val.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            field_bytes(1, &val, &mut summary);
            field_bytes(5, &summary, &mut e);
        }
    }
    e
}

enum EventBody<'a> {
    Version(&'a str),
    Scalar(&'a str, f32),
}

/// Writes scalars to `events.out.tfevents.<time>.moe-peft`.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates the event file in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let path = dir.join(format!("events.out.tfevents.{}.moe-peft", now.as_secs()));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self { file, path };
        w.record(&event(
            now.as_secs_f64(),
            0,
            EventBody::Version("brain.Event:2"),
        ))?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked(data).to_le_bytes());
        self.file.write_all(&buf)?;
        self.file.flush()?;
        Ok(())
    }

    /// Adds one scalar point.
    pub fn scalar(&mut self, tag: &str, step: usize, value: f64) -> Result<()> {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.record(&event(t, step as i64, EventBody::Scalar(tag, value as f32)))
    }
}

/// These tests run from `tests/tensorboard.rs`, which includes this file (example targets'
/// own tests are not part of `cargo test`).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The CRC-32C check value (RFC 3720, B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// Splits a TFRecord file into its records, checking both masked CRCs of each.
    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc_len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(
                crc_len,
                masked(len_bytes),
                "length CRC of the record at {at}"
            );
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked(data), "data CRC of the record at {at}");
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn event_file_holds_framed_version_and_scalars() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut w = EventWriter::create(dir.path())?;
        w.scalar("train/loss", 3, 1.25)?;
        w.scalar("train/learning_rate", 300, 2e-4)?;
        let recs = records(&std::fs::read(w.path())?);
        assert_eq!(recs.len(), 3);
        // Event: wall_time (0x09, 8 bytes), step (0x10, varint), then the body.
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|x| x == needle);
        assert_eq!(recs[0][0], 0x09);
        assert!(find(&recs[0], b"brain.Event:2"));
        assert_eq!(&recs[1][9..11], &[0x10, 3]);
        assert!(find(&recs[1], b"train/loss"));
        let mut v = vec![0x15];
        v.extend_from_slice(&1.25f32.to_le_bytes());
        assert!(find(&recs[1], &v), "simple_value 1.25");
        // step 300 as a varint: 0xAC 0x02
        assert_eq!(&recs[2][9..12], &[0x10, 0xAC, 0x02]);
        let mut v = vec![0x15];
        v.extend_from_slice(&2e-4f32.to_le_bytes());
        assert!(find(&recs[2], &v), "simple_value 2e-4");
        Ok(())
    }
}
