//! Memory-mapped Hugging Face checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.
//!
//! Tensors are read one at a time from the mapped files and converted to the requested dtype,
//! so loading never holds a second full copy of the weights in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A checkpoint on disk, memory-mapped.
pub struct Checkpoint {
    files: Vec<PathBuf>,
    st: MmapedSafetensors,
    /// name → (file index, shape, dtype)
    index: HashMap<String, (usize, Vec<usize>, safetensors::Dtype)>,
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
        for f in files {
            if !f.exists() {
                return Err(Error::Io {
                    path: f.display().to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                });
            }
        }
        // SAFETY: the files are mapped read-only; as with every mmap, a concurrent writer
        // truncating them is undefined behaviour, which is the documented contract of
        // `MmapedSafetensors`.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::SafeTensors {
            path: files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            reason: e.to_string(),
        })?;
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let bytes = std::fs::File::open(f).map_err(|source| Error::Io {
                path: f.display().to_string(),
                source,
            })?;
            // SAFETY: as above.
            let map = unsafe { memmap2::Mmap::map(&bytes) }.map_err(|source| Error::Io {
                path: f.display().to_string(),
                source,
            })?;
            let (_, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::SafeTensors {
                    path: f.display().to_string(),
                    reason: e.to_string(),
                })?;
            for (name, info) in meta.tensors() {
                index.insert(name.clone(), (i, info.shape.clone(), info.dtype));
            }
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
            st,
            index,
            location,
        })
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
        self.index.get(name).map(|(_, s, _)| s.as_slice())
    }

    /// The file holding a tensor (for error messages).
    pub fn file_of(&self, name: &str) -> String {
        match self.index.get(name) {
            Some((i, _, _)) => self.files[*i].display().to_string(),
            None => self.location.clone(),
        }
    }

    /// Reads a tensor as stored (dtype and shape of the file).
    pub fn get_raw(&self, name: &str, device: &Device) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                location: self.location.clone(),
            });
        }
        self.st.load(name, device).map_err(|e| Error::SafeTensors {
            path: self.file_of(name),
            reason: format!("tensor `{name}`: {e}"),
        })
    }

    /// Reads a floating-point tensor, checks its shape and converts it to `dtype`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some((_, got, st_dtype)) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                location: self.location.clone(),
            });
        };
        if got.as_slice() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                file: self.file_of(name),
                expected: shape.to_vec(),
                got: got.clone(),
            });
        }
        if !matches!(
            st_dtype,
            safetensors::Dtype::F32
                | safetensors::Dtype::BF16
                | safetensors::Dtype::F16
                | safetensors::Dtype::F64
        ) {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                file: self.file_of(name),
                dtype: format!("{st_dtype:?}"),
            });
        }
        let t = self.get_raw(name, &Device::Cpu)?;
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        Ok(t.to_device(device)?)
    }
}
