//! Memory-mapped Hugging Face checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.
//!
//! Only the headers are read when a checkpoint is opened. Each tensor is then read on its own
//! with positioned reads (no memory map), moved to the target device and converted there, so
//! host memory holds one tensor at a time, never the model: a 33 GB checkpoint loads into a
//! GPU with a few hundred MB of resident host memory.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where one tensor lives in a checkpoint.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Index of the file (see [`Checkpoint::files`]).
    pub file: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// dtype as stored.
    pub dtype: safetensors::Dtype,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    /// Bytes of data.
    pub len: usize,
}

/// A checkpoint on disk: headers parsed, data read tensor by tensor.
pub struct Checkpoint {
    files: Vec<PathBuf>,
    handles: Vec<std::fs::File>,
    index: HashMap<String, TensorEntry>,
    location: String,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.files)
            .field("tensors", &self.index.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// Reads the header of one safetensors file: `(name, entry)` pairs with absolute offsets.
fn read_header(
    path: &Path,
    file_index: usize,
    f: &std::fs::File,
) -> Result<Vec<(String, TensorEntry)>> {
    let bad = |reason: String| Error::SafeTensors {
        path: path.display().to_string(),
        reason,
    };
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let file_len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact_at(&mut n, 0)
        .map_err(|e| bad(format!("cannot read the header length: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(format!(
            "header length {n} does not fit a file of {file_len} bytes"
        )));
    }
    let mut buf = vec![0u8; 8 + n as usize];
    f.read_exact_at(&mut buf, 0).map_err(io)?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&buf[8..]).map_err(|e| bad(format!("bad header: {e}")))?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    let mut spans: Vec<(usize, usize, String)> = Vec::new();
    for (name, info) in meta.tensors() {
        let (b, e) = info.data_offsets;
        let elems: usize = info.shape.iter().product();
        if e < b || elems * info.dtype.bitsize() != (e - b) * 8 {
            return Err(bad(format!(
                "tensor `{name}`: offsets {b}..{e} do not fit shape {:?} of {:?}",
                info.shape, info.dtype
            )));
        }
        if data_start + e as u64 > file_len {
            return Err(bad(format!(
                "tensor `{name}` ends at byte {} but the file has {file_len} (truncated?)",
                data_start + e as u64
            )));
        }
        spans.push((b, e, name.clone()));
        out.push((
            name.clone(),
            TensorEntry {
                file: file_index,
                shape: info.shape.clone(),
                dtype: info.dtype,
                start: data_start + b as u64,
                len: e - b,
            },
        ));
    }
    spans.sort();
    let mut at = 0;
    for (b, e, name) in &spans {
        if *b != at {
            return Err(bad(format!("tensor `{name}` starts at {b}, expected {at}")));
        }
        at = *e;
    }
    Ok(out)
}

impl Checkpoint {
    /// Opens the weights of a model directory: `model.safetensors.index.json` with its shards if
    /// present, else `model.safetensors`, else every `*.safetensors` file in it.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            return Self::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_files(&[single]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io {
                path: dir.display().to_string(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Io {
                path: dir.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors, model.safetensors.index.json or *.safetensors here",
                ),
            });
        }
        Self::open_files(&files)
    }

    /// Opens the shards named by a `model.safetensors.index.json`.
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
            path: index.display().to_string(),
            source,
        })?;
        let parsed: IndexFile = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index.display().to_string(),
            source,
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = parsed.weight_map.values().cloned().collect();
        shards.sort();
        shards.dedup();
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let ck = Self::open_files(&files)?;
        for (name, shard) in &parsed.weight_map {
            if !ck.index.contains_key(name) {
                return Err(Error::MissingTensor {
                    name: name.clone(),
                    location: format!(
                        "{} (listed in {})",
                        dir.join(shard).display(),
                        index.display()
                    ),
                });
            }
        }
        Ok(ck)
    }

    /// Opens explicit safetensors files (a tensor found in several takes the last).
    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut handles = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let h = std::fs::File::open(f).map_err(|source| Error::Io {
                path: f.display().to_string(),
                source,
            })?;
            for (name, e) in read_header(f, i, &h)? {
                index.insert(name, e);
            }
            handles.push(h);
        }
        let location = match files {
            [one] => one.display().to_string(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        };
        Ok(Self {
            files: files.to_vec(),
            handles,
            index,
            location,
        })
    }

    /// Where a tensor lives, if present.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name)
    }

    /// Tensor names in storage order: by file, then by offset (the order that reads each file
    /// front to back).
    pub fn names_in_storage_order(&self) -> Vec<String> {
        let mut v: Vec<(&String, &TensorEntry)> = self.index.iter().collect();
        v.sort_by_key(|(_, e)| (e.file, e.start));
        v.into_iter().map(|(n, _)| n.clone()).collect()
    }

    /// The raw little-endian bytes of a tensor, read from its file.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: self.location.clone(),
        })?;
        let mut buf = vec![0u8; e.len];
        self.handles[e.file]
            .read_exact_at(&mut buf, e.start)
            .map_err(|source| Error::Io {
                path: format!("{} (tensor `{name}`)", self.files[e.file].display()),
                source,
            })?;
        Ok(buf)
    }

    /// Reads `buf.len()` bytes of file `file` (an index into [`Self::files`]) at `start`.
    pub fn read_range(&self, file: usize, start: u64, buf: &mut [u8]) -> Result<()> {
        let (Some(h), Some(p)) = (self.handles.get(file), self.files.get(file)) else {
            return Err(Error::InvalidInput(format!(
                "no file {file} in this checkpoint"
            )));
        };
        h.read_exact_at(buf, start).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })
    }

    /// Reads a tensor into host memory as stored.
    fn read_cpu(&self, name: &str) -> Result<Tensor> {
        let e = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            location: self.location.clone(),
        })?;
        let Some(dtype) = crate::io::dtype_from_st(e.dtype) else {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                file: self.file_of(name),
                dtype: format!("{:?}", e.dtype),
            });
        };
        let n: usize = e.shape.iter().product();
        if n * dtype.size_in_bytes() != e.len {
            return Err(Error::SafeTensors {
                path: self.file_of(name),
                reason: format!(
                    "tensor `{name}`: {} bytes for shape {:?} of {:?}",
                    e.len, e.shape, e.dtype
                ),
            });
        }
        let f = &self.handles[e.file];
        let path = &self.files[e.file];
        fn read_typed<T: bytemuck::Pod + candle_core::WithDType>(
            f: &std::fs::File,
            start: u64,
            n: usize,
            shape: &[usize],
            what: String,
        ) -> Result<Tensor> {
            let mut v = vec![T::zeroed(); n];
            f.read_exact_at(bytemuck::cast_slice_mut::<T, u8>(&mut v), start)
                .map_err(|source| Error::Io { path: what, source })?;
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        }
        let what = format!("{} (tensor `{name}`)", path.display());
        match dtype {
            DType::U8 => read_typed::<u8>(f, e.start, n, &e.shape, what),
            DType::U32 => read_typed::<u32>(f, e.start, n, &e.shape, what),
            DType::I64 => read_typed::<i64>(f, e.start, n, &e.shape, what),
            DType::BF16 => read_typed::<half::bf16>(f, e.start, n, &e.shape, what),
            DType::F16 => read_typed::<half::f16>(f, e.start, n, &e.shape, what),
            DType::F32 => read_typed::<f32>(f, e.start, n, &e.shape, what),
            DType::F64 => read_typed::<f64>(f, e.start, n, &e.shape, what),
            other => Err(Error::UnsupportedDtype {
                name: name.to_string(),
                file: self.file_of(name),
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// The files of this checkpoint.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|e| e.shape.as_slice())
    }

    /// The file holding a tensor (for error messages).
    pub fn file_of(&self, name: &str) -> String {
        match self.index.get(name) {
            Some(e) => self.files[e.file].display().to_string(),
            None => self.location.clone(),
        }
    }

    /// Reads a tensor as stored (dtype and shape of the file) onto `device`.
    pub fn get_raw(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.read_cpu(name)?;
        Ok(if device.is_cpu() {
            t
        } else {
            t.to_device(device)?
        })
    }

    /// Reads a floating-point tensor, checks its shape and converts it to `dtype` on `device`
    /// (on a GPU the conversion runs there).
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some(e) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                location: self.location.clone(),
            });
        };
        if e.shape.as_slice() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                file: self.file_of(name),
                expected: shape.to_vec(),
                got: e.shape.clone(),
            });
        }
        if !matches!(
            e.dtype,
            safetensors::Dtype::F32
                | safetensors::Dtype::BF16
                | safetensors::Dtype::F16
                | safetensors::Dtype::F64
        ) {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                file: self.file_of(name),
                dtype: format!("{:?}", e.dtype),
            });
        }
        let t = self.get_raw(name, device)?;
        Ok(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }
}
