//! bitsandbytes serialization of 4-bit weights (`Linear4bit._save_to_state_dict`).
//!
//! For a module prefix `P`, bitsandbytes writes:
//!
//! | key | content |
//! |---|---|
//! | `P.weight` | U8 `[ceil(numel / 2), 1]`, packed codes (high nibble first) |
//! | `P.weight.absmax` | U8 `[n_blocks]` codes when double-quantized, else F32 `[n_blocks]` |
//! | `P.weight.quant_map` | F32 `[16]`, the code book |
//! | `P.weight.nested_absmax` | F32 `[ceil(n_blocks / 256)]` (double quant only) |
//! | `P.weight.nested_quant_map` | F32 `[256]`, the dynamic map (double quant only) |
//! | `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 bytes of `json.dumps({...})` |
//!
//! The JSON holds `quant_type`, `blocksize`, `dtype`, `shape` and, when nested,
//! `nested_blocksize`, `nested_dtype` and `nested_offset`, in that order and with Python's
//! `json.dumps` separators and float `repr` (see `QuantState.as_dict(packed=True)` and
//! `utils.pack_dict_to_tensor` in bitsandbytes). Loading always dequantizes with the map, code
//! book and offset stored in the file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use serde::Deserialize;

use crate::dynamic::DYNAMIC_MAP_LEN;
use crate::error::{Error, Result};
use crate::four_bit::{DoubleQuantState, FourBitAbsmax, FourBitTensor};
use crate::nf4::{check_block_size, num_blocks, QuantType, VALID_BLOCK_SIZES};

/// The key infix of the packed quant-state blob, before the quant type.
pub const QUANT_STATE_KEY: &str = "quant_state.bitsandbytes__";

/// The torch name bitsandbytes records for a dtype (`str(dtype).strip("torch.")`).
pub fn torch_dtype_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("float32"),
        DType::BF16 => Some("bfloat16"),
        DType::F16 => Some("float16"),
        DType::F64 => Some("float64"),
        _ => None,
    }
}

/// Inverse of [`torch_dtype_name`].
pub fn dtype_from_torch_name(name: &str) -> Option<DType> {
    match name {
        "float32" => Some(DType::F32),
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float64" => Some(DType::F64),
        _ => None,
    }
}

/// Python's `repr(float)` (as `json.dumps` writes floats): shortest round-trip digits, fixed
/// notation for decimal exponents in `[-4, 16)`, else `d.ddde±XX`.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let e = format!("{x:e}");
    let (mant, exp) = match e.split_once('e') {
        Some(p) => p,
        None => return e,
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    let sign = if x < 0.0 { "-" } else { "" };
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    if !(-4..16).contains(&exp) {
        let m = if digits.len() == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.unsigned_abs())
    } else if exp >= 0 {
        let int_digits = exp as usize + 1;
        if digits.len() <= int_digits {
            format!("{sign}{digits}{}.0", "0".repeat(int_digits - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..int_digits], &digits[int_digits..])
        }
    } else {
        format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
    }
}

/// The JSON fields of the packed quant state.
#[derive(Debug, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Option<Vec<usize>>,
    nested_blocksize: Option<usize>,
    nested_dtype: Option<String>,
    nested_offset: Option<f64>,
}

/// Whether module prefix `P` is stored in bitsandbytes 4-bit layout: `P.weight` and one of
/// `P.weight.quant_state.bitsandbytes__nf4` / `__fp4` exist.
pub fn is_bnb_4bit(prefix: &str, has: &dyn Fn(&str) -> bool) -> bool {
    has(&format!("{prefix}.weight"))
        && [QuantType::Nf4, QuantType::Fp4]
            .iter()
            .any(|qt| has(&quant_state_key(prefix, *qt)))
}

fn quant_state_key(prefix: &str, qt: QuantType) -> String {
    format!("{prefix}.weight.{QUANT_STATE_KEY}{}", qt.as_str())
}

struct Ctx<'a> {
    file: Option<&'a str>,
}

impl Ctx<'_> {
    fn file(&self) -> Option<String> {
        self.file.map(str::to_string)
    }
    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            name: name.to_string(),
            file: self.file(),
        }
    }
    fn bad_state(&self, name: &str, reason: impl Into<String>) -> Error {
        Error::InvalidQuantState {
            name: name.to_string(),
            file: self.file(),
            reason: reason.into(),
        }
    }
    fn bad_tensor(&self, name: &str, expected: impl Into<String>, t: &Tensor) -> Error {
        Error::InvalidTensor {
            name: name.to_string(),
            file: self.file(),
            expected: expected.into(),
            got: format!("{:?} {:?}", t.dtype(), t.dims()),
        }
    }
    fn get(&self, get: &dyn Fn(&str) -> Option<Tensor>, name: &str) -> Result<Tensor> {
        get(name).ok_or_else(|| self.missing(name))
    }
    /// Checks dtype and element count (any shape with that many elements).
    fn expect(&self, t: &Tensor, name: &str, dtype: DType, len: usize, what: &str) -> Result<()> {
        if t.dtype() != dtype || t.elem_count() != len {
            return Err(self.bad_tensor(name, format!("{dtype:?} [{len}] ({what})"), t));
        }
        Ok(())
    }
}

impl FourBitTensor {
    /// The packed quant-state JSON, byte for byte as bitsandbytes writes it, e.g.
    /// `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [1408, 2048],
    /// "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0123}`.
    pub fn bnb_quant_state_json(&self) -> Result<String> {
        let dtype = torch_dtype_name(self.dtype()).ok_or_else(|| {
            Error::InvalidConfig(format!("dtype {:?} has no torch name", self.dtype()))
        })?;
        let shape: Vec<String> = self.dims().iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{dtype}\", \"shape\": [{}]",
            self.quant_type().as_str(),
            self.block_size(),
            shape.join(", ")
        );
        if let FourBitAbsmax::Double(st) = self.absmax() {
            s.push_str(&format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                st.block_size,
                py_float_repr(st.offset as f64)
            ));
        }
        s.push('}');
        Ok(s)
    }

    /// The tensors `Linear4bit._save_to_state_dict` writes for module prefix `prefix`
    /// (see the module docs), on this tensor's device.
    pub fn to_bnb_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let w = format!("{prefix}.weight");
        let dev = self.device();
        let n_packed = self.packed().elem_count();
        let mut out = vec![(w.clone(), self.packed().reshape((n_packed, 1))?)];
        match self.absmax() {
            FourBitAbsmax::Fp32(a) => out.push((format!("{w}.absmax"), a.clone())),
            FourBitAbsmax::Double(s) => out.push((format!("{w}.absmax"), s.codes.clone())),
        }
        out.push((
            format!("{w}.quant_map"),
            Tensor::from_slice(self.code(), 16, dev)?,
        ));
        if let FourBitAbsmax::Double(s) = self.absmax() {
            out.push((format!("{w}.nested_absmax"), s.nested_absmax.clone()));
            out.push((format!("{w}.nested_quant_map"), s.map.copy()?));
        }
        let json = self.bnb_quant_state_json()?.into_bytes();
        let len = json.len();
        out.push((
            quant_state_key(prefix, self.quant_type()),
            Tensor::from_vec(json, len, dev)?,
        ));
        Ok(out)
    }

    /// Reads the bitsandbytes tensors of module prefix `prefix` through `get` (which returns
    /// `None` for an absent key). `file` only names the source in errors. The parts are moved to
    /// the device of `P.weight`. The stored `quant_map`, `nested_quant_map` and `nested_offset`
    /// are kept and used to dequantize (a CPU-quantized checkpoint's `-1.0` map entry included).
    ///
    /// Errors (never panics) name the tensor and file: a missing `weight`, `absmax`,
    /// `quant_map`, `nested_*` or quant-state tensor; a blob that is not UTF-8 or not the
    /// expected JSON; an unknown `quant_type` or one that does not match the key; an unsupported
    /// `blocksize` or `dtype`; element counts that do not fit the JSON `shape`.
    pub fn from_bnb_tensors(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        file: Option<&str>,
    ) -> Result<Self> {
        let cx = Ctx { file };
        let wkey = format!("{prefix}.weight");
        let weight = cx.get(get, &wkey)?;
        let device = weight.device().clone();

        let nf4_key = quant_state_key(prefix, QuantType::Nf4);
        let fp4_key = quant_state_key(prefix, QuantType::Fp4);
        let (qs_key, key_qt, blob) = match (get(&nf4_key), get(&fp4_key)) {
            (Some(b), None) => (nf4_key, QuantType::Nf4, b),
            (None, Some(b)) => (fp4_key, QuantType::Fp4, b),
            (None, None) => return Err(cx.missing(&format!("{nf4_key}` (or `{fp4_key}"))),
            (Some(_), Some(_)) => {
                return Err(
                    cx.bad_state(&nf4_key, format!("both `{nf4_key}` and `{fp4_key}` exist"))
                )
            }
        };
        if blob.dtype() != DType::U8 {
            return Err(cx.bad_tensor(&qs_key, "U8 bytes of a JSON object", &blob));
        }
        let bytes = blob.flatten_all()?.to_vec1::<u8>()?;
        let json = std::str::from_utf8(&bytes)
            .map_err(|e| cx.bad_state(&qs_key, format!("not UTF-8: {e}")))?;
        let st: QuantStateJson = serde_json::from_str(json)
            .map_err(|e| cx.bad_state(&qs_key, format!("bad JSON: {e}")))?;

        let qt = QuantType::from_name(&st.quant_type).ok_or_else(|| {
            cx.bad_state(
                &qs_key,
                format!(
                    "unknown quant_type {:?} (expected \"nf4\" or \"fp4\")",
                    st.quant_type
                ),
            )
        })?;
        if qt != key_qt {
            return Err(cx.bad_state(
                &qs_key,
                format!("quant_type {:?} does not match the key", st.quant_type),
            ));
        }
        check_block_size(st.blocksize).map_err(|e| cx.bad_state(&qs_key, e.to_string()))?;
        let dtype = dtype_from_torch_name(&st.dtype)
            .ok_or_else(|| cx.bad_state(&qs_key, format!("unsupported dtype {:?}", st.dtype)))?;
        let dims = st
            .shape
            .clone()
            .ok_or_else(|| cx.bad_state(&qs_key, "`shape` is null"))?;
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                cx.bad_state(
                    &qs_key,
                    format!("shape {dims:?} has no elements or overflows"),
                )
            })?;

        // packed codes: U8 [ceil(n/2), 1] (or flat)
        let n_packed = numel.div_ceil(2);
        let packed_ok = weight.dtype() == DType::U8
            && (weight.dims() == [n_packed, 1] || weight.dims() == [n_packed]);
        if !packed_ok {
            return Err(cx.bad_tensor(
                &wkey,
                format!("U8 [{n_packed}, 1] (packed 4-bit codes of shape {dims:?})"),
                &weight,
            ));
        }
        let n_blocks = num_blocks(numel, st.blocksize);

        let map_key = format!("{wkey}.quant_map");
        let quant_map = cx.get(get, &map_key)?;
        cx.expect(&quant_map, &map_key, DType::F32, 16, "the 4-bit code book")?;
        let code_vec = quant_map.flatten_all()?.to_vec1::<f32>()?;
        let mut code = [0f32; 16];
        code.copy_from_slice(&code_vec);

        let absmax_key = format!("{wkey}.absmax");
        let absmax = cx.get(get, &absmax_key)?;
        let nested_key = format!("{wkey}.nested_absmax");
        let nested_json = st.nested_offset.is_some() || st.nested_blocksize.is_some();
        let absmax = match get(&nested_key) {
            Some(nested_absmax) => {
                let offset = st
                    .nested_offset
                    .ok_or_else(|| cx.bad_state(&qs_key, "`nested_offset` missing"))?;
                if !offset.is_finite() {
                    return Err(
                        cx.bad_state(&qs_key, format!("nested_offset {offset} is not finite"))
                    );
                }
                let nbs = st
                    .nested_blocksize
                    .ok_or_else(|| cx.bad_state(&qs_key, "`nested_blocksize` missing"))?;
                if !VALID_BLOCK_SIZES.contains(&nbs) {
                    return Err(cx.bad_state(&qs_key, format!("invalid nested_blocksize {nbs}")));
                }
                if let Some(nd) = &st.nested_dtype {
                    if nd != "float32" {
                        return Err(
                            cx.bad_state(&qs_key, format!("unsupported nested_dtype {nd:?}"))
                        );
                    }
                }
                let nmap_key = format!("{wkey}.nested_quant_map");
                let map = cx.get(get, &nmap_key)?;
                cx.expect(
                    &absmax,
                    &absmax_key,
                    DType::U8,
                    n_blocks,
                    "double-quantized absmax codes",
                )?;
                cx.expect(
                    &nested_absmax,
                    &nested_key,
                    DType::F32,
                    n_blocks.div_ceil(nbs),
                    "one absmax per nested block",
                )?;
                cx.expect(
                    &map,
                    &nmap_key,
                    DType::F32,
                    DYNAMIC_MAP_LEN,
                    "the 8-bit map",
                )?;
                FourBitAbsmax::Double(DoubleQuantState {
                    codes: absmax.to_device(&device)?,
                    map: map.to_device(&device)?,
                    nested_absmax: nested_absmax.to_device(&device)?,
                    offset: offset as f32,
                    block_size: nbs,
                })
            }
            None if nested_json => return Err(cx.missing(&nested_key)),
            None => {
                cx.expect(
                    &absmax,
                    &absmax_key,
                    DType::F32,
                    n_blocks,
                    "fp32 absmax per block",
                )?;
                FourBitAbsmax::Fp32(absmax.to_device(&device)?)
            }
        };
        FourBitTensor::from_parts(
            weight,
            absmax,
            code,
            Shape::from(dims),
            dtype,
            st.blocksize,
            qt,
        )
    }
}

/// A safetensors file with bitsandbytes 4-bit modules, split into quantized modules (keyed by
/// module prefix `P`, whose weight is `P.weight`) and the remaining plain tensors (by key).
#[derive(Debug, Default)]
pub struct BnbCheckpoint {
    /// 4-bit weights by module prefix.
    pub quantized: BTreeMap<String, FourBitTensor>,
    /// Every tensor that is not part of a 4-bit module, by key.
    pub dense: BTreeMap<String, Tensor>,
}

/// Loads a whole safetensors file in bitsandbytes layout onto `device`.
pub fn load_bnb_safetensors(path: impl AsRef<Path>, device: &Device) -> Result<BnbCheckpoint> {
    let path = path.as_ref();
    let fname = path.display().to_string();
    let mut all: HashMap<String, Tensor> = candle_core::safetensors::load(path, device)?;
    let mut prefixes = Vec::new();
    for k in all.keys() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let suffix = format!(".weight.{QUANT_STATE_KEY}{}", qt.as_str());
            if let Some(p) = k.strip_suffix(&suffix) {
                prefixes.push(p.to_string());
            }
        }
    }
    prefixes.sort();
    prefixes.dedup();
    let mut quantized = BTreeMap::new();
    for p in &prefixes {
        let t = FourBitTensor::from_bnb_tensors(p, &|k| all.get(k).cloned(), Some(&fname))?;
        quantized.insert(p.clone(), t);
    }
    for p in &prefixes {
        let w = format!("{p}.weight");
        for suffix in [
            "",
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
            ".quant_state.bitsandbytes__nf4",
            ".quant_state.bitsandbytes__fp4",
        ] {
            all.remove(&format!("{w}{suffix}"));
        }
    }
    Ok(BnbCheckpoint {
        quantized,
        dense: all.into_iter().collect(),
    })
}

/// A tensor's bytes for safetensors (little endian), without candle's panicking `View`.
struct OwnedView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &OwnedView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn owned_view(name: &str, t: &Tensor) -> Result<OwnedView> {
    use safetensors::Dtype as S;
    let flat = t.flatten_all()?;
    let (dtype, data): (S, Vec<u8>) = match t.dtype() {
        DType::U8 => (S::U8, flat.to_vec1::<u8>()?),
        DType::U32 => (S::U32, le(flat.to_vec1::<u32>()?, u32::to_le_bytes)),
        DType::I64 => (S::I64, le(flat.to_vec1::<i64>()?, i64::to_le_bytes)),
        DType::F32 => (S::F32, le(flat.to_vec1::<f32>()?, f32::to_le_bytes)),
        DType::F64 => (S::F64, le(flat.to_vec1::<f64>()?, f64::to_le_bytes)),
        DType::BF16 => (
            S::BF16,
            le(flat.to_vec1::<half::bf16>()?, |v| v.to_bits().to_le_bytes()),
        ),
        DType::F16 => (
            S::F16,
            le(flat.to_vec1::<half::f16>()?, |v| v.to_bits().to_le_bytes()),
        ),
        other => {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: "dtype u8, u32, i64, f32, f64, bf16 or f16".into(),
                got: format!("{other:?}"),
            })
        }
    };
    Ok(OwnedView {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

fn le<T: Copy, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for x in v {
        out.extend_from_slice(&f(x));
    }
    out
}

/// Writes quantized modules (keyed by module prefix) in bitsandbytes layout plus plain tensors
/// (keyed by tensor name) to one safetensors file with metadata `{"format": "pt"}`, as
/// `save_pretrained` does. A key written twice is an error.
pub fn save_bnb_safetensors(
    path: impl AsRef<Path>,
    quantized: &BTreeMap<String, FourBitTensor>,
    dense: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let mut views: BTreeMap<String, OwnedView> = BTreeMap::new();
    let mut insert = |k: String, t: &Tensor| -> Result<()> {
        let v = owned_view(&k, t)?;
        if views.insert(k.clone(), v).is_some() {
            return Err(Error::InvalidConfig(format!(
                "tensor `{k}` would be written twice"
            )));
        }
        Ok(())
    };
    for (prefix, q) in quantized {
        for (k, t) in q.to_bnb_tensors(prefix)? {
            insert(k, &t)?;
        }
    }
    for (k, t) in dense {
        insert(k.clone(), t)?;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = path.as_ref();
    safetensors::serialize_to_file(views.iter(), Some(meta), path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FourBitConfig;

    #[test]
    fn python_float_repr() {
        let cases = [
            (0.05165407806634903, "0.05165407806634903"),
            (0.2458203136920929, "0.2458203136920929"),
            (1e-05, "1e-05"),
            (-2.5e-07, "-2.5e-07"),
            (0.0001, "0.0001"),
            (0.1, "0.1"),
            (123.0, "123.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (2.5, "2.5"),
            (f32::MIN_POSITIVE as f64, "1.1754943508222875e-38"),
        ];
        for (x, s) in cases {
            assert_eq!(py_float_repr(x), s, "{x:e}");
        }
    }

    #[test]
    fn json_blob_format() -> Result<()> {
        let w = Tensor::arange(0f32, 48., &Device::Cpu)?.reshape((6, 8))?;
        let q = FourBitTensor::quantize(&w, &FourBitConfig::nf4_no_double_quant())?;
        assert_eq!(
            q.bnb_quant_state_json()?,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [6, 8]}"#
        );
        let q = FourBitTensor::quantize(&w.to_dtype(DType::BF16)?, &FourBitConfig::fp4())?;
        let s = q.bnb_quant_state_json()?;
        assert!(s.starts_with(
            r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [6, 8], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "#
        ), "{s}");
        Ok(())
    }

    #[test]
    fn is_bnb_4bit_needs_weight_and_state() {
        let keys = [
            "a.weight",
            "a.weight.quant_state.bitsandbytes__nf4",
            "b.weight",
        ];
        let has = |k: &str| keys.contains(&k);
        assert!(is_bnb_4bit("a", &has));
        assert!(!is_bnb_4bit("b", &has));
        assert!(!is_bnb_4bit("c", &has));
    }
}
