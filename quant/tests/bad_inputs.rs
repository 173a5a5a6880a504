//! Malformed bitsandbytes tensors give an `Err` that names the tensor and the file, never a
//! panic.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use moe_peft_quant::{Error, FourBitConfig, FourBitTensor};

const FILE: &str = "shard-00001.safetensors";
const P: &str = "model.layers.1.mlp.experts.0.down_proj";

fn valid(cfg: &FourBitConfig) -> HashMap<String, Tensor> {
    let w = Tensor::randn(0f32, 1., (64, 32), &Device::Cpu).unwrap();
    FourBitTensor::quantize(&w, cfg)
        .unwrap()
        .to_bnb_tensors(P)
        .unwrap()
        .into_iter()
        .collect()
}

fn state_key() -> String {
    format!("{P}.weight.quant_state.bitsandbytes__nf4")
}

fn with_json(mut m: HashMap<String, Tensor>, json: &[u8]) -> HashMap<String, Tensor> {
    let t = Tensor::from_slice(json, json.len(), &Device::Cpu).unwrap();
    m.insert(state_key(), t);
    m
}

fn json_of(m: &HashMap<String, Tensor>) -> String {
    String::from_utf8(m[&state_key()].to_vec1::<u8>().unwrap()).unwrap()
}

fn load_err(m: &HashMap<String, Tensor>) -> Error {
    FourBitTensor::from_bnb_tensors(P, &|k| m.get(k).cloned(), Some(FILE))
        .expect_err("malformed input must be an error")
}

fn assert_names(e: &Error, tensor: &str) {
    let msg = e.to_string();
    assert!(
        msg.contains(tensor),
        "message does not name `{tensor}`: {msg}"
    );
    assert!(msg.contains(FILE), "message does not name the file: {msg}");
}

#[test]
fn valid_state_loads() {
    let m = valid(&FourBitConfig::default());
    assert!(FourBitTensor::from_bnb_tensors(P, &|k| m.get(k).cloned(), Some(FILE)).is_ok());
}

#[test]
fn block_size_100() {
    // in a config
    let w = Tensor::randn(0f32, 1., (10, 10), &Device::Cpu).unwrap();
    let cfg = FourBitConfig {
        block_size: 100,
        ..FourBitConfig::default()
    };
    let e = FourBitTensor::quantize(&w, &cfg).expect_err("block size 100");
    assert!(matches!(e, Error::InvalidBlockSize(100)), "{e}");
    // in a file
    let m = valid(&FourBitConfig::nf4_no_double_quant());
    let json = json_of(&m).replace("\"blocksize\": 64", "\"blocksize\": 100");
    let e = load_err(&with_json(m, json.as_bytes()));
    assert!(matches!(e, Error::InvalidQuantState { .. }), "{e:?}");
    assert!(e.to_string().contains("block size 100"), "{e}");
    assert_names(&e, &state_key());
}

#[test]
fn packed_length_does_not_fit_json_shape() {
    let m = valid(&FourBitConfig::default());
    let json = json_of(&m).replace("\"shape\": [64, 32]", "\"shape\": [64, 33]");
    let e = load_err(&with_json(m, json.as_bytes()));
    assert!(matches!(e, Error::InvalidTensor { .. }), "{e:?}");
    assert_names(&e, &format!("{P}.weight`"));
}

#[test]
fn absmax_length_does_not_fit() {
    let mut m = valid(&FourBitConfig::nf4_no_double_quant());
    let k = format!("{P}.weight.absmax");
    let short = m[&k].narrow(0, 0, 31).unwrap();
    m.insert(k.clone(), short);
    let e = load_err(&m);
    assert_names(&e, &k);
    // fp32 absmax where double-quantized codes are expected
    let mut m = valid(&FourBitConfig::default());
    let f = m[&k].to_dtype(DType::F32).unwrap();
    m.insert(k.clone(), f);
    assert_names(&load_err(&m), &k);
}

#[test]
fn truncated_json() {
    let m = valid(&FourBitConfig::default());
    let json = json_of(&m);
    let e = load_err(&with_json(m, &json.as_bytes()[..json.len() - 7]));
    assert!(matches!(e, Error::InvalidQuantState { .. }), "{e:?}");
    assert_names(&e, &state_key());
}

#[test]
fn non_utf8_blob() {
    let m = valid(&FourBitConfig::default());
    let mut bytes = json_of(&m).into_bytes();
    bytes[3] = 0xFF;
    bytes[4] = 0xFE;
    let e = load_err(&with_json(m, &bytes));
    assert!(e.to_string().contains("UTF-8"), "{e}");
    assert_names(&e, &state_key());
}

#[test]
fn unknown_quant_type_and_missing_fields() {
    let m = valid(&FourBitConfig::default());
    let json = json_of(&m).replace("\"nf4\"", "\"nf5\"");
    let e = load_err(&with_json(m.clone(), json.as_bytes()));
    assert!(e.to_string().contains("nf5"), "{e}");
    assert_names(&e, &state_key());
    let json = json_of(&m).replace("\"dtype\": \"float32\", ", "");
    assert_names(
        &load_err(&with_json(m.clone(), json.as_bytes())),
        &state_key(),
    );
    let json = json_of(&m).replace("\"float32\"", "\"int4\"");
    assert_names(&load_err(&with_json(m, json.as_bytes())), &state_key());
}

#[test]
fn missing_tensors() {
    for suffix in [
        ".weight.absmax",
        ".weight.quant_map",
        ".weight.nested_absmax",
        ".weight.nested_quant_map",
        ".weight",
    ] {
        let mut m = valid(&FourBitConfig::default());
        let k = format!("{P}{suffix}");
        m.remove(&k);
        let e = load_err(&m);
        assert!(matches!(e, Error::MissingTensor { .. }), "{suffix}: {e:?}");
        assert_names(&e, &format!("{k}`"));
    }
    let mut m = valid(&FourBitConfig::default());
    m.remove(&state_key());
    assert_names(&load_err(&m), &state_key());
}
