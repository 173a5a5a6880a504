// Compiles every `cuda/*.cu` to PTX in `OUT_DIR` when the `cuda` feature is on; does nothing
// otherwise, so CPU-only builds never need nvcc. The PTX is exported by `src/cuda.rs` for the
// crates that launch the kernels (this one, and `quant` for the weight formats).
//
// nvcc is `$NVCC` or `nvcc` on `PATH`; the virtual architecture is
// `compute_$CUDA_COMPUTE_CAP` (default 80: the kernels use bf16, which needs sm_80).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().trim_end_matches(['a', 'f']).replace('.', ""))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "80".to_string());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .expect("cuda/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        compile(&nvcc, &cap, src, &out_dir);
    }
}

fn compile(nvcc: &str, cap: &str, src: &Path, out_dir: &Path) {
    let stem = src.file_stem().expect("a .cu file has a stem");
    let ptx = out_dir.join(stem).with_extension("ptx");
    let status = Command::new(nvcc)
        .arg("--ptx")
        .arg("-O3")
        .arg("-std=c++17")
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC or put nvcc on PATH): {e}"));
    assert!(status.success(), "{nvcc} failed on {}", src.display());
}
