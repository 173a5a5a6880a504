//! Double quantization: bitsandbytes' 8-bit "dynamic" map and blockwise 8-bit quantization of
//! the first-level absmax values.
//!
//! With `compress_statistics=True` bitsandbytes stores the fp32 absmax of the 4-bit blocks as
//! 8-bit codes: `offset = mean(absmax)`, then `quantize_blockwise(absmax - offset, blocksize=256)`
//! with the signed dynamic map of `create_dynamic_map()` (QLoRA's "8-bit Floats"). Dequantizing
//! is `absmax[k] = map[q[k]] * nested_absmax[k / 256] + offset`: a rounded multiply, then a
//! rounded add (two roundings, no FMA).
//!
//! The quantizer follows the CUDA kernel (`kQuantizeBlockwise` with `dQuantize<0>`): scale by
//! `1 / nested_absmax`, binary search over the sorted 256-entry map, then round to the nearer
//! neighbour by midpoint (`x > midpoint` goes up). The map is the canonical one; bitsandbytes'
//! CPU backend (0.49) overwrites `map[0]` with `-1.0` in the shared map, so checkpoints
//! quantized on CPU store `-1.0` there. Loading always uses the map stored in the file.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Number of entries of an 8-bit map.
pub const DYNAMIC_MAP_LEN: usize = 256;

/// The block size bitsandbytes uses for the second-level (nested) quantization.
pub const NESTED_BLOCK_SIZE: usize = 256;

/// `torch.linspace(start, end, steps, dtype=float32)` as computed on CPU: `start + step * i` for
/// the first half and `end - step * (steps - 1 - i)` for the second, each with a single rounding
/// (torch's vectorised kernel fuses the multiply-add).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `float(10 ** e)` rounded to fp32 (Python evaluates `10 ** -k` as a correctly rounded double).
fn pow10_f32(e: i32) -> f32 {
    // Parsing a decimal literal is correctly rounded; the f64 -> f32 step matches torch's cast of
    // the Python scalar.
    format!("1e{e}")
        .parse::<f64>()
        .map(|v| v as f32)
        .unwrap_or(0.0)
}

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted
/// fp32 values built from `torch.linspace(0.1, 1, ·)` midpoints scaled by powers of ten, plus 0
/// and 1. With `signed = true` this is the map double quantization uses; its smallest entry is
/// `-0.99296874`, not `-1`.
pub fn create_dynamic_map(signed: bool) -> [f32; DYNAMIC_MAP_LEN] {
    const MAX_EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(DYNAMIC_MAP_LEN);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = if signed {
            (1usize << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS)) + 1
        } else {
            (1usize << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS + 1)) + 1
        };
        let boundaries = linspace_f32(0.1, 1.0, fraction_items);
        let scale = pow10_f32(-(MAX_EXPONENT_BITS - 1) + i);
        let means: Vec<f32> = boundaries.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|&m| scale * m));
        if signed {
            data.extend(means.iter().map(|&m| -(scale * m)));
        }
    }
    // additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1 = 0 for the defaults
    data.push(0.0);
    data.push(1.0);
    data.resize(DYNAMIC_MAP_LEN, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; DYNAMIC_MAP_LEN];
    out.copy_from_slice(&data);
    // torch's sort puts -0.0 and 0.0 as equal; no -0.0 is produced above, so total order is fine.
    out
}

/// The signed dynamic map, built once.
pub fn dynamic_map() -> &'static [f32; DYNAMIC_MAP_LEN] {
    static MAP: OnceLock<[f32; DYNAMIC_MAP_LEN]> = OnceLock::new();
    MAP.get_or_init(|| create_dynamic_map(true))
}

/// The 8-bit code of a scaled value: bitsandbytes' CUDA `dQuantize<0>` (binary search over the
/// sorted map, then round to the nearer neighbour by midpoint), verbatim.
pub fn quantize_8bit_value(code: &[f32; DYNAMIC_MAP_LEN], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64usize;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let q = if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot
        } else {
            pivot
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot
        } else {
            pivot
        }
    };
    q as u8
}

/// Blockwise 8-bit quantization with `code` (bitsandbytes `quantize_blockwise`): returns the
/// codes and the fp32 absmax per block. Scaling is `x * (1 / max(absmax, 1e-38))`.
pub fn quantize_blockwise_8bit(
    input: &[f32],
    code: &[f32; DYNAMIC_MAP_LEN],
    block_size: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    if block_size == 0 {
        return Err(Error::InvalidBlockSize(block_size));
    }
    let mut q = vec![0u8; input.len()];
    let mut absmax = vec![0f32; input.len().div_ceil(block_size)];
    q.par_chunks_mut(block_size)
        .zip(absmax.par_iter_mut())
        .zip(input.par_chunks(block_size))
        .for_each(|((qb, ab), xb)| {
            let m = xb.iter().fold(0f32, |m, &v| m.max(v.abs()));
            *ab = m;
            let inv = 1.0f32 / m.max(1e-38);
            for (o, &v) in qb.iter_mut().zip(xb) {
                *o = quantize_8bit_value(code, v * inv);
            }
        });
    Ok((q, absmax))
}

/// The double-quantized form of a first-level absmax vector.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuantized {
    /// One 8-bit code per first-level block.
    pub codes: Vec<u8>,
    /// fp32 absmax per nested block of `absmax - offset`.
    pub nested_absmax: Vec<f32>,
    /// `mean(absmax)` in fp32.
    pub offset: f32,
}

/// `mean` of fp32 values, accumulated in f64 and rounded once to fp32 (within 1 ulp of torch's
/// CPU and CUDA reductions).
pub fn mean_f32(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let s: f64 = v.iter().map(|&x| x as f64).sum();
    (s / v.len() as f64) as f32
}

/// Double quantization of `absmax`: `offset = mean(absmax)`, then 8-bit blockwise quantization
/// of `absmax - offset` (fp32 subtraction) with `code` in blocks of `nested_block_size`.
pub fn double_quantize(
    absmax: &[f32],
    code: &[f32; DYNAMIC_MAP_LEN],
    nested_block_size: usize,
) -> Result<DoubleQuantized> {
    let offset = mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centered, code, nested_block_size)?;
    Ok(DoubleQuantized {
        codes,
        nested_absmax,
        offset,
    })
}

/// Inverse of [`double_quantize`] into `out`:
/// `out[k] = code[q[k]] * nested_absmax[k / nested_block_size] + offset` (two roundings).
pub fn dequantize_absmax_into(
    q: &[u8],
    code: &[f32],
    nested_absmax: &[f32],
    nested_block_size: usize,
    offset: f32,
    out: &mut [f32],
) -> Result<()> {
    if code.len() != DYNAMIC_MAP_LEN {
        return Err(Error::ShapeMismatch {
            name: "nested_quant_map".into(),
            expected: format!("{DYNAMIC_MAP_LEN} values"),
            got: format!("{} values", code.len()),
        });
    }
    if nested_block_size == 0 {
        return Err(Error::InvalidBlockSize(nested_block_size));
    }
    if q.len() != out.len() || nested_absmax.len() != q.len().div_ceil(nested_block_size) {
        return Err(Error::ShapeMismatch {
            name: "nested_absmax".into(),
            expected: format!(
                "{} nested blocks of {nested_block_size} for {} codes",
                q.len().div_ceil(nested_block_size),
                q.len()
            ),
            got: format!("{} values", nested_absmax.len()),
        });
    }
    for ((ob, qb), &na) in out
        .chunks_mut(nested_block_size)
        .zip(q.chunks(nested_block_size))
        .zip(nested_absmax)
    {
        for (o, &c) in ob.iter_mut().zip(qb) {
            let scaled = code[c as usize] * na;
            *o = scaled + offset;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_shape_and_landmarks() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert_eq!(m[255], 1.0);
        assert_eq!(m[127], 0.0);
        // smallest entry is the canonical -0.99296874 (bnb CPU overwrites it with -1.0)
        assert_eq!(m[0], -0.992_968_74);
        assert_eq!(m[254], 0.992_968_74);
        assert_eq!(m[1], -0.978_906_3);
        // symmetric apart from the extra 1.0
        for k in 0..127 {
            assert_eq!(m[k], -m[254 - k], "entry {k}");
        }
        // smallest magnitude: 1e-6 * 0.55
        assert!((m[128] - 5.5e-7).abs() < 1e-12, "{}", m[128]);
    }

    #[test]
    fn linspace_uses_fused_halves() {
        // torch.linspace(0.1, 1, 65, dtype=float32) element 32 (second half) is end - step*32
        let l = linspace_f32(0.1, 1.0, 65);
        assert_eq!(l[0], 0.1);
        assert_eq!(l[64], 1.0);
        let step = (1.0f32 - 0.1) / 64.0;
        assert_eq!(l[32], (-step).mul_add(32.0, 1.0));
        assert_eq!(l[31], step.mul_add(31.0, 0.1));
    }

    #[test]
    fn quantize_8bit_is_nearest_with_midpoint_ties_up() {
        let m = dynamic_map();
        for k in 0..256 {
            assert_eq!(quantize_8bit_value(m, m[k]) as usize, k, "exact entry {k}");
        }
        for k in 0..255 {
            let mid = (m[k] + m[k + 1]) * 0.5;
            let above = f32::from_bits(if mid > 0.0 {
                mid.to_bits() + 1
            } else {
                mid.to_bits() - 1
            });
            // `x > midpoint` goes up; the midpoint itself stays down
            if mid > m[k] && above < m[k + 1] {
                assert_eq!(
                    quantize_8bit_value(m, above) as usize,
                    k + 1,
                    "above mid {k}"
                );
            }
        }
        assert_eq!(quantize_8bit_value(m, 1.0), 255);
        assert_eq!(quantize_8bit_value(m, -1.0), 0);
        assert_eq!(quantize_8bit_value(m, 0.0), 127);
    }

    #[test]
    fn double_quant_round_trip_is_close() {
        let absmax: Vec<f32> = (0..600)
            .map(|i| 0.5 + ((i * 7919) % 613) as f32 / 613.0)
            .collect();
        let dq = double_quantize(&absmax, dynamic_map(), 256).unwrap();
        assert_eq!(dq.codes.len(), 600);
        assert_eq!(dq.nested_absmax.len(), 3);
        let mut back = vec![0f32; 600];
        dequantize_absmax_into(
            &dq.codes,
            dynamic_map(),
            &dq.nested_absmax,
            256,
            dq.offset,
            &mut back,
        )
        .unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            // the dynamic map has ~1/64 relative resolution near its top
            assert!((a - b).abs() < 0.5 * 0.02, "{a} vs {b}");
        }
    }

    #[test]
    fn constant_absmax_gives_zero_nested_absmax() {
        let absmax = vec![0.37f32; 300];
        let dq = double_quantize(&absmax, dynamic_map(), 256).unwrap();
        assert_eq!(dq.offset, 0.37);
        assert_eq!(dq.nested_absmax, vec![0.0, 0.0]);
        assert!(dq.codes.iter().all(|&c| c == 127), "code of 0.0");
        let mut back = vec![0f32; 300];
        dequantize_absmax_into(
            &dq.codes,
            dynamic_map(),
            &dq.nested_absmax,
            256,
            dq.offset,
            &mut back,
        )
        .unwrap();
        assert!(back.iter().all(|&v| v == 0.37));
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut out = [0f32; 3];
        assert!(
            dequantize_absmax_into(&[0, 0, 0], dynamic_map(), &[], 256, 0.0, &mut out).is_err()
        );
        assert!(
            dequantize_absmax_into(&[0, 0, 0], &[0.0; 16], &[1.0], 256, 0.0, &mut out).is_err()
        );
    }
}
