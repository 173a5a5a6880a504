//! Streaming safetensors I/O with bounded host memory.
//!
//! [`SafetensorsWriter`] writes the header first (every tensor's name, dtype and shape are known
//! up front) and then the tensor bytes in order, so a file of any size is written with one
//! tensor, or one chunk of a flat buffer, in host memory at a time. The file appears under its
//! name only when [`SafetensorsWriter::finish`] has flushed and synced it (temporary file +
//! rename).
//!
//! Device tensors are copied to the host exactly: [`to_host_exact`] and [`host_many`] first
//! copy the wanted elements into a fresh device buffer of exactly that size, because candle's
//! `to_device`/`to_vec1` of a CUDA *view* transfer the view's whole underlying storage (a
//! 10,000-way split of one 2.4 GB buffer would move 24 TB). [`HostChunks`] walks a range of a
//! flat device buffer a chunk at a time the same way.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The safetensors dtype name of a candle dtype.
pub fn st_dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::F64 => "F64",
        other => {
            return Err(Error::InvalidInput(format!(
                "dtype {other:?} cannot be written to safetensors here (u8, u32, i64, bf16, f16, f32, f64)"
            )))
        }
    })
}

/// The candle dtype of a safetensors dtype, if candle has it.
pub fn dtype_from_st(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        _ => return None,
    })
}

/// Name, dtype and shape of one tensor of a file being written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The key in the file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A spec.
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of the tensor.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// A piece of data on its way to the file.
enum Piece {
    Bytes(Vec<u8>),
    /// A contiguous CPU tensor, written from its storage without a copy.
    Host(Tensor),
}

/// Writes one safetensors file, header first, then the data of each [`TensorSpec`] in the order
/// given, from tensors or raw little-endian bytes.
///
/// A background thread does the file writes, so the next piece is fetched from the device and
/// prepared while the previous one goes to disk (at most [`WRITE_QUEUE`] pieces wait).
pub struct SafetensorsWriter {
    path: PathBuf,
    tmp: PathBuf,
    queue: Option<std::sync::mpsc::SyncSender<Piece>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<std::fs::File>>>,
    specs: Vec<TensorSpec>,
    /// Byte offset in the data section where each spec ends.
    ends: Vec<usize>,
    written: usize,
    next: usize,
}

/// The temporary name a file is written under before its rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Whether `a` and `b` name the same existing file or directory, compared canonically (so
/// `m/../m`, `./m`, an absolute spelling and symlinks all match `m`); false when either does not
/// exist.
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The name of the first input in `inputs` (`(what, path)`) that is the directory `out`, if any:
/// an output directory must never be one that is read from, or writing it destroys the input.
pub fn output_among_inputs<'a>(out: &Path, inputs: &[(&'a str, &Path)]) -> Option<&'a str> {
    inputs
        .iter()
        .find(|(_, p)| same_path(out, p))
        .map(|(what, _)| *what)
}

/// Copies `src` to `dst` through a temporary file renamed into place, so `dst` is never seen
/// half-written and `src` is never truncated: when both name the same file there is nothing to
/// do (a plain `std::fs::copy(f, f)` empties `f`).
pub fn copy_file(src: &Path, dst: &Path) -> std::io::Result<()> {
    if same_path(src, dst) {
        return Ok(());
    }
    let tmp = tmp_path(dst);
    std::fs::copy(src, &tmp)?;
    std::fs::rename(&tmp, dst)
}

/// Puts `src`'s contents at `dst` (replacing it atomically): a hard link where both are on one
/// file system, else a copy. Files written here are only ever replaced by a rename, never
/// rewritten in place, so a linked file keeps its contents.
pub fn link_or_copy_file(src: &Path, dst: &Path) -> std::io::Result<()> {
    if same_path(src, dst) {
        return Ok(());
    }
    let tmp = tmp_path(dst);
    if tmp.exists() {
        std::fs::remove_file(&tmp)?;
    }
    match std::fs::hard_link(src, &tmp) {
        Ok(()) => std::fs::rename(&tmp, dst),
        Err(_) => copy_file(src, dst),
    }
}

/// Pieces that may wait for the write thread.
pub const WRITE_QUEUE: usize = 2;

impl std::fmt::Debug for SafetensorsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsWriter")
            .field("path", &self.path)
            .field("written", &self.written)
            .finish()
    }
}

/// Calls `f` with the little-endian bytes of a contiguous CPU tensor, without copying them.
/// Hosts are little-endian (x86-64, aarch64), so an element's memory is its file bytes.
pub fn with_host_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    use candle_core::{CpuStorage as C, Storage};
    let (storage, layout) = t.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Err(Error::InvalidInput(
            "with_host_bytes needs a contiguous tensor".into(),
        ));
    };
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::InvalidInput(
            "with_host_bytes needs a CPU tensor".into(),
        ));
    };
    Ok(match cpu {
        C::U8(v) => f(&v[a..b]),
        C::U32(v) => f(bytemuck::cast_slice(&v[a..b])),
        C::I64(v) => f(bytemuck::cast_slice(&v[a..b])),
        C::BF16(v) => f(bytemuck::cast_slice(&v[a..b])),
        C::F16(v) => f(bytemuck::cast_slice(&v[a..b])),
        C::F32(v) => f(bytemuck::cast_slice(&v[a..b])),
        C::F64(v) => f(bytemuck::cast_slice(&v[a..b])),
        _ => {
            return Err(Error::InvalidInput(format!(
                "dtype {:?} has no byte view here",
                t.dtype()
            )))
        }
    })
}

impl SafetensorsWriter {
    /// Creates `path` (written as a temporary file until [`Self::finish`]) with a header for
    /// `specs`, whose data must then be written in that order. `metadata` goes into
    /// `__metadata__` (`{"format": "pt"}` when `None`, as `save_pretrained` writes).
    pub fn create(
        path: &Path,
        specs: Vec<TensorSpec>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        let meta = metadata.unwrap_or_else(|| [("format".to_string(), "pt".to_string())].into());
        header.insert("__metadata__".into(), serde_json::json!(meta));
        let mut ends = Vec::with_capacity(specs.len());
        let mut off = 0usize;
        for s in &specs {
            let end = off + s.byte_len();
            let entry = serde_json::json!({
                "dtype": st_dtype_name(s.dtype)?,
                "shape": s.shape,
                "data_offsets": [off, end],
            });
            if header.insert(s.name.clone(), entry).is_some() {
                return Err(Error::InvalidInput(format!(
                    "{}: tensor `{}` listed twice",
                    path.display(),
                    s.name
                )));
            }
            ends.push(end);
            off = end;
        }
        let mut text = serde_json::to_string(&header).map_err(|source| Error::Json {
            path: path.display().to_string(),
            source,
        })?;
        while (8 + text.len()) % 8 != 0 {
            text.push(' ');
        }
        let tmp = tmp_path(path);
        let f = std::fs::File::create(&tmp).map_err(|source| Error::Io {
            path: tmp.display().to_string(),
            source,
        })?;
        let mut file = std::io::BufWriter::with_capacity(8 << 20, f);
        let io = |source| Error::Io {
            path: tmp.display().to_string(),
            source,
        };
        file.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(WRITE_QUEUE);
        let thread = std::thread::spawn(move || -> std::io::Result<std::fs::File> {
            for piece in rx {
                match piece {
                    Piece::Bytes(b) => file.write_all(&b)?,
                    Piece::Host(t) => {
                        with_host_bytes(&t, |b| file.write_all(b))
                            .map_err(|e| std::io::Error::other(e.to_string()))??;
                    }
                }
            }
            file.into_inner().map_err(|e| e.into_error())
        });
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            queue: Some(tx),
            thread: Some(thread),
            specs,
            ends,
            written: 0,
            next: 0,
        })
    }

    /// The specs, in data order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Appends raw little-endian bytes (any split across tensors is allowed).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.send(bytes.len(), Piece::Bytes(bytes.to_vec()))
    }

    /// Appends the elements of a CPU tensor (any split across tensors is allowed); its storage
    /// is written as it is, without a copy.
    pub fn write_host(&mut self, t: Tensor) -> Result<()> {
        if !t.device().is_cpu() {
            return Err(Error::InvalidInput(format!(
                "{}: write_host takes a CPU tensor",
                self.path.display()
            )));
        }
        let t = if t.is_contiguous() {
            t
        } else {
            t.contiguous()?
        };
        let n = t.elem_count() * t.dtype().size_in_bytes();
        self.send(n, Piece::Host(t))
    }

    fn send(&mut self, n: usize, piece: Piece) -> Result<()> {
        let total = self.ends.last().copied().unwrap_or(0);
        if self.written + n > total {
            return Err(Error::InvalidInput(format!(
                "{}: {} bytes more than the header announces",
                self.path.display(),
                self.written + n - total
            )));
        }
        let sent = self.queue.as_ref().is_some_and(|q| q.send(piece).is_ok());
        if !sent {
            // The write thread stopped: its error says why.
            self.queue = None;
            let err = match self.thread.take().map(|h| h.join()) {
                Some(Ok(Err(e))) => e,
                _ => std::io::Error::other("the write thread stopped"),
            };
            return Err(Error::Io {
                path: self.tmp.display().to_string(),
                source: err,
            });
        }
        self.written += n;
        while self.next < self.ends.len() && self.ends[self.next] <= self.written {
            self.next += 1;
        }
        Ok(())
    }

    /// Writes the next tensor, which must match the next spec's dtype and shape and start at
    /// its first byte.
    pub fn write_tensor(&mut self, t: &Tensor) -> Result<()> {
        let Some(spec) = self.specs.get(self.next) else {
            return Err(Error::InvalidInput(format!(
                "{}: every announced tensor is already written",
                self.path.display()
            )));
        };
        let start = if self.next == 0 {
            0
        } else {
            self.ends[self.next - 1]
        };
        if self.written != start || t.dtype() != spec.dtype || t.dims() != spec.shape.as_slice() {
            return Err(Error::InvalidInput(format!(
                "{}: tensor `{}` expected as {:?} {:?}, got {:?} {:?}",
                self.path.display(),
                spec.name,
                spec.dtype,
                spec.shape,
                t.dtype(),
                t.dims()
            )));
        }
        let host = to_host_exact(t)?;
        self.write_host(host)
    }

    /// Flushes, syncs and renames the file into place; every announced byte must be written.
    pub fn finish(mut self) -> Result<PathBuf> {
        let total = self.ends.last().copied().unwrap_or(0);
        if self.written != total {
            return Err(Error::InvalidInput(format!(
                "{}: {} of {} data bytes written",
                self.path.display(),
                self.written,
                total
            )));
        }
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| Error::Io { path: p, source }
        };
        self.queue = None;
        let f = match self.thread.take().map(|h| h.join()) {
            Some(Ok(r)) => r.map_err(io(&self.tmp))?,
            _ => {
                return Err(Error::Io {
                    path: self.tmp.display().to_string(),
                    source: std::io::Error::other("the write thread panicked"),
                })
            }
        };
        f.sync_all().map_err(io(&self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        Ok(self.path)
    }
}

/// Writes `tensors` (in this order) to one safetensors file with `{"format": "pt"}` metadata,
/// moving device tensors to the host in chunks of about `chunk_bytes`.
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)], chunk_bytes: usize) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, t)| TensorSpec::new(n.clone(), t.dtype(), t.dims()))
        .collect();
    let mut w = SafetensorsWriter::create(path, specs, None)?;
    let mut i = 0;
    while i < tensors.len() {
        // A run of tensors of one dtype on one device, up to the chunk size.
        let dt = tensors[i].1.dtype();
        let mut j = i;
        let mut bytes = 0;
        while j < tensors.len()
            && tensors[j].1.dtype() == dt
            && tensors[j].1.device().same_device(tensors[i].1.device())
            && (j == i || bytes + tensors[j].1.elem_count() * dt.size_in_bytes() <= chunk_bytes)
        {
            bytes += tensors[j].1.elem_count() * dt.size_in_bytes();
            j += 1;
        }
        let group: Vec<&Tensor> = tensors[i..j].iter().map(|(_, t)| t).collect();
        w.write_host(host_many(&group)?)?;
        i = j;
    }
    w.finish()?;
    Ok(())
}

/// Splits tensors of `sizes` bytes (in order) into shards as `save_pretrained` does: a new shard
/// starts when the next tensor would take the current one past `max_shard_bytes`. Returns the
/// index range of each shard (at least one, possibly empty).
pub fn plan_shards(sizes: &[usize], max_shard_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, &b) in sizes.iter().enumerate() {
        if size > 0 && size + b > max_shard_bytes {
            out.push(start..i);
            start = i;
            size = 0;
        }
        size += b;
    }
    out.push(start..sizes.len());
    out
}

/// File names of `n` shards: `model.safetensors` alone, else `model-0000i-of-0000n.safetensors`.
pub fn shard_file_names(n: usize) -> Vec<String> {
    if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    }
}

/// Writes `model.safetensors.index.json` (total data bytes and tensor → shard map) into `dir`.
pub fn write_shard_index(
    dir: &Path,
    total_bytes: usize,
    weight_map: &BTreeMap<String, String>,
) -> Result<PathBuf> {
    let index = serde_json::json!({
        "metadata": {"total_size": total_bytes},
        "weight_map": weight_map,
    });
    let p = dir.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).map_err(|source| Error::Json {
        path: p.display().to_string(),
        source,
    })?;
    let tmp = tmp_path(&p);
    std::fs::write(&tmp, text + "\n")
        .and_then(|_| std::fs::rename(&tmp, &p))
        .map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?;
    Ok(p)
}

/// transformers' `torch_dtype` name of a float dtype (`float32` for anything else).
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// A device copy holding exactly `t`'s elements (in logical order), so that moving it to the
/// host transfers nothing else.
fn exact_device_copy(t: &Tensor) -> Result<Tensor> {
    let flat = if t.is_contiguous() {
        t.flatten_all()?
    } else {
        t.contiguous()?.flatten_all()?
    };
    let out = Tensor::zeros(flat.elem_count(), flat.dtype(), flat.device())?;
    out.slice_set(&flat, 0, 0)?;
    Ok(out)
}

/// A contiguous CPU tensor with `t`'s elements: `t` itself (or its contiguous copy) on the
/// CPU; from a device, exactly those elements are transferred.
pub fn to_host_exact(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() {
        return Ok(if t.is_contiguous() {
            t.clone()
        } else {
            t.contiguous()?
        });
    }
    Ok(exact_device_copy(t)?.to_device(&Device::Cpu)?)
}

/// Little-endian bytes of a tensor's elements on the host, copying exactly those elements from
/// a device.
pub fn host_bytes(t: &Tensor) -> Result<Vec<u8>> {
    with_host_bytes(&to_host_exact(t)?, <[u8]>::to_vec)
}

/// Several tensors of one dtype and device as one flat CPU tensor, with one transfer from the
/// device.
pub fn host_many(ts: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = ts.first() else {
        return Ok(Tensor::zeros(0, DType::U8, &Device::Cpu)?);
    };
    if let Some(t) = ts.iter().find(|t| t.dtype() != first.dtype()) {
        return Err(Error::InvalidInput(format!(
            "host_many: mixed dtypes {:?} and {:?}",
            first.dtype(),
            t.dtype()
        )));
    }
    if ts.len() == 1 {
        return Ok(to_host_exact(first)?.flatten_all()?);
    }
    let flats: Vec<Tensor> = ts
        .iter()
        .map(|t| {
            if t.is_contiguous() {
                t.flatten_all()
            } else {
                t.contiguous()?.flatten_all()
            }
        })
        .collect::<candle_core::Result<_>>()?;
    if first.device().is_cpu() {
        return Ok(Tensor::cat(&flats, 0)?);
    }
    let n: usize = flats.iter().map(Tensor::elem_count).sum();
    let buf = Tensor::zeros(n, first.dtype(), first.device())?;
    let mut off = 0;
    for f in &flats {
        buf.slice_set(f, 0, off)?;
        off += f.elem_count();
    }
    Ok(buf.to_device(&Device::Cpu)?)
}

/// Elements `[start, start + len)` of a 1-D tensor as CPU tensors of `chunk` elements (one
/// exact device-to-host copy per chunk).
#[derive(Debug)]
pub struct HostChunks<'a> {
    flat: &'a Tensor,
    pos: usize,
    end: usize,
    chunk: usize,
}

impl<'a> HostChunks<'a> {
    /// Chunks of `flat[start..start + len]` (a 1-D tensor) of `chunk` elements.
    pub fn new(flat: &'a Tensor, start: usize, len: usize, chunk: usize) -> Self {
        Self {
            flat,
            pos: start,
            end: start + len,
            chunk: chunk.max(1),
        }
    }
}

impl Iterator for HostChunks<'_> {
    /// A contiguous CPU tensor of the chunk's elements.
    type Item = Result<Tensor>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let n = self.chunk.min(self.end - self.pos);
        let r = self
            .flat
            .narrow(0, self.pos, n)
            .map_err(Error::from)
            .and_then(|v| to_host_exact(&v));
        self.pos += n;
        Some(r)
    }
}

/// A tensor from little-endian bytes on the CPU.
pub fn tensor_from_bytes(bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_matches_the_safetensors_reader() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let p = dir.path().join("a.safetensors");
        let a = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((3, 4))?;
        let b = Tensor::arange(0u32, 5, &Device::Cpu)?;
        let c = a.to_dtype(DType::BF16)?.t()?; // not contiguous
        let d = Tensor::arange(0f32, 20., &Device::Cpu)?.narrow(0, 7, 6)?; // a view
        let ts = vec![
            ("z.a".to_string(), a.clone()),
            ("b".to_string(), b.clone()),
            ("c".to_string(), c.clone()),
            ("d".to_string(), d.clone()),
        ];
        save_tensors(&p, &ts, 16)?;
        assert!(!tmp_path(&p).exists());
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 4);
        let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!((8 + n) % 8, 0);
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let back = candle_core::safetensors::load(&p, &Device::Cpu)?;
        for (k, t) in &ts {
            let got = &back[k];
            assert_eq!(got.dims(), t.dims(), "{k}");
            let diff = (got.to_dtype(DType::F32)? - t.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{k}");
        }
        Ok(())
    }

    #[test]
    fn writer_refuses_wrong_tensors_and_short_files() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let p = dir.path().join("b.safetensors");
        let specs = vec![TensorSpec::new("x", DType::F32, &[2, 2])];
        let mut w = SafetensorsWriter::create(&p, specs.clone(), None)?;
        let bad = Tensor::zeros((4,), DType::F32, &Device::Cpu)?;
        let e = w.write_tensor(&bad).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("[2, 2]"), "{e}");
        w.write_bytes(&[0u8; 8])?;
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("8 of 16"), "{e}");
        assert!(!p.exists());
        let mut w = SafetensorsWriter::create(&p, specs, None)?;
        assert!(w.write_bytes(&[0u8; 17]).is_err());
        Ok(())
    }

    #[test]
    fn shards_are_planned_as_save_pretrained() {
        assert_eq!(plan_shards(&[3, 3, 3], 6), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&[10, 1, 1], 6), vec![0..1, 1..3]);
        assert_eq!(plan_shards(&[], 6), vec![0..0]);
        assert_eq!(shard_file_names(1), vec!["model.safetensors"]);
        assert_eq!(shard_file_names(2)[1], "model-00002-of-00002.safetensors");
    }

    #[test]
    fn host_chunks_cover_a_range() -> Result<()> {
        let t = Tensor::arange(0f32, 100., &Device::Cpu)?;
        let mut all = Vec::new();
        for c in HostChunks::new(&t, 10, 25, 7) {
            all.extend_from_slice(&with_host_bytes(&c?, <[u8]>::to_vec)?);
        }
        let want: Vec<u8> = (10..35).flat_map(|i| (i as f32).to_le_bytes()).collect();
        assert_eq!(all, want);
        Ok(())
    }
}
