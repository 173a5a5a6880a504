//! The bitsandbytes 4-bit code books (NF4, FP4) and the blockwise CPU kernels.
//!
//! Everything here follows bitsandbytes (`csrc/kernels.cu`: `kQuantizeBlockwise`, `dQuantizeNF4`,
//! `dQuantizeFP4`, `kDequantizeBlockwise`; `functional.py:get_4bit_type`):
//!
//! * the input is flattened row-major and cut into blocks of `block_size` elements; the last
//!   block may be partial and gets its own absmax;
//! * `absmax[b] = max |x|` over the block, in fp32;
//! * each element is scaled by the reciprocal, `x * (1 / absmax)` (one fp32 division per block,
//!   with `absmax` clamped to at least `1e-38` as in bitsandbytes' reference path, so an all-zero
//!   block quantizes to the code of 0), and mapped to the nearest code value with bitsandbytes'
//!   decision trees (`x > threshold` goes up);
//! * element `2j` goes to the **high** nibble of byte `j`, element `2j + 1` to the low nibble; an
//!   odd element count pads the last low nibble with the code of `0.0`, as the CUDA kernel does;
//! * dequantization is `out[j] = T(code[nibble(j)] * absmax[j / block_size])`: one fp32 multiply
//!   (never fused), then one round-to-nearest-even conversion to the output type.
//!
//! The kernels work on slices and run in parallel over groups of blocks with rayon.

// The code books and thresholds are bitsandbytes' literals, digit for digit.
#![allow(clippy::excessive_precision)]

use half::{bf16, f16};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The NF4 code book (`get_4bit_type("nf4")`), indexed by nibble value; sorted ascending.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The FP4 code book (`get_4bit_type("fp4")`), in bit-pattern order (sign bit `0b1000`, then a
/// 3-bit magnitude): `[0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3] / 12`,
/// each entry the correctly rounded fp32 quotient as torch computes it.
pub const FP4_CODE: [f32; 16] = [
    0.0 / 12.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0, // 12 / 12
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0 / 12.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -12.0 / 12.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// The 15 decision thresholds of bitsandbytes' `dQuantizeNF4` (the midpoints of [`NF4_CODE`]),
/// as the fp32 literals of the CUDA source, ascending. The NF4 code of a scaled value `x` is the
/// number of thresholds `t` with `x > t`.
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// The magnitude thresholds of bitsandbytes' `dQuantizeFP4`, ascending (fp32 literals of the
/// CUDA source).
pub const FP4_THRESHOLDS: [f32; 7] = [
    0.002_604_17,
    0.085_937_5,
    0.208_333_33,
    0.291_666_67,
    0.416_666_7,
    0.583_333,
    0.833_333_3,
];

/// FP4 magnitude rank (0 = smallest) to its 3-bit pattern.
const FP4_RANK_TO_BITS: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// The largest block size (bitsandbytes' too).
pub const MAX_BLOCK_SIZE: usize = 4096;

/// Block sizes bitsandbytes' `quantize_4bit` accepts.
pub const VALID_BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Checks that `block_size` is one of [`VALID_BLOCK_SIZES`].
pub fn check_block_size(block_size: usize) -> Result<()> {
    if VALID_BLOCK_SIZES.contains(&block_size) {
        Ok(())
    } else {
        Err(Error::InvalidBlockSize(block_size))
    }
}

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat4 (QLoRA), the default.
    #[default]
    Nf4,
    /// bitsandbytes' 4-bit float (1 sign bit, 3 magnitude bits, absmax 12).
    Fp4,
}

impl QuantType {
    /// The 16-entry code book, indexed by nibble value.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }

    /// The bitsandbytes name: `"nf4"` or `"fp4"`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses a bitsandbytes name (`"nf4"` / `"fp4"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// The code of a value already scaled into `[-1, 1]` (fast, branch-free form; equal to
    /// [`quantize_nf4_tree`] / [`quantize_fp4_tree`] for every input, NaN included).
    #[inline(always)]
    pub fn quantize_scaled(self, x: f32) -> u8 {
        match self {
            QuantType::Nf4 => nf4_index(x),
            QuantType::Fp4 => fp4_index(x),
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[inline(always)]
fn nf4_index(x: f32) -> u8 {
    let mut c = 0u32;
    for t in NF4_THRESHOLDS {
        c += (x > t) as u32;
    }
    c as u8
}

#[inline(always)]
fn fp4_index(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    let mut rank = 0usize;
    for t in FP4_THRESHOLDS {
        rank += (a > t) as usize;
    }
    FP4_RANK_TO_BITS[rank] | sign
}

/// bitsandbytes' `dQuantizeNF4` decision tree, verbatim (the reference for [`QuantType::quantize_scaled`]).
pub fn quantize_nf4_tree(x: f32) -> u8 {
    if x > 0.03979014977812767 {
        if x > 0.3893125355243683 {
            if x > 0.6427869200706482 {
                if x > 0.8614784181118011 {
                    0b1111
                } else {
                    0b1110
                }
            } else if x > 0.5016634166240692 {
                0b1101
            } else {
                0b1100
            }
        } else if x > 0.2035212516784668 {
            if x > 0.2920137718319893 {
                0b1011
            } else {
                0b1010
            }
        } else if x > 0.1202552504837513 {
            0b1001
        } else {
            0b1000
        }
    } else if x > -0.33967943489551544 {
        if x > -0.13791173323988914 {
            if x > -0.045525018125772476 {
                0b0111
            } else {
                0b0110
            }
        } else if x > -0.23460740596055984 {
            0b0101
        } else {
            0b0100
        }
    } else if x > -0.6106329262256622 {
        if x > -0.4599952697753906 {
            0b0011
        } else {
            0b0010
        }
    } else if x > -0.8480964004993439 {
        0b0001
    } else {
        0b0000
    }
}

/// bitsandbytes' `dQuantizeFP4` decision tree, verbatim.
pub fn quantize_fp4_tree(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let x = x.abs();
    if x > 0.291_666_67 {
        if x > 0.583_333 {
            if x > 0.833_333_3 {
                0b0011 + sign
            } else {
                0b0010 + sign
            }
        } else if x > 0.416_666_7 {
            0b101 + sign
        } else {
            0b100 + sign
        }
    } else if x > 0.085_937_5 {
        if x > 0.208_333_33 {
            0b0111 + sign
        } else {
            0b0110 + sign
        }
    } else if x > 0.002_604_17 {
        0b0001 + sign
    } else {
        sign
    }
}

/// An element type the quantizer reads (converted exactly to fp32; `f64` is rounded).
pub trait InElem: Copy + Send + Sync {
    /// Converts to fp32.
    fn to_f32(self) -> f32;
}

/// An element type the dequantizer writes (converted from fp32 with round-to-nearest-even).
pub trait OutElem: Copy + Send + Sync + Default {
    /// Converts from fp32.
    fn from_f32(v: f32) -> Self;
}

impl InElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl InElem for f64 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}
impl InElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}
impl InElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl OutElem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl OutElem for f64 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}
impl OutElem for bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
impl OutElem for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Elements handled by one rayon task (a whole number of blocks).
const ELEMS_PER_TASK: usize = 1 << 15;

fn blocks_per_task(block_size: usize) -> usize {
    (ELEMS_PER_TASK / block_size).max(1)
}

/// Number of blocks of `block_size` covering `n` elements.
pub fn num_blocks(n: usize, block_size: usize) -> usize {
    n.div_ceil(block_size)
}

/// Blockwise 4-bit quantization of `input` (flattened): returns the packed bytes
/// (`ceil(n / 2)`, element `2j` in the high nibble) and the fp32 absmax per block.
///
/// Errors if `block_size` is zero, odd or above [`MAX_BLOCK_SIZE`] (bitsandbytes' own sizes
/// are checked by [`check_block_size`]).
pub fn quantize_4bit<T: InElem>(
    input: &[T],
    block_size: usize,
    quant_type: QuantType,
) -> Result<(Vec<u8>, Vec<f32>)> {
    if block_size == 0 || block_size % 2 != 0 || block_size > MAX_BLOCK_SIZE {
        return Err(Error::InvalidBlockSize(block_size));
    }
    let n = input.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; num_blocks(n, block_size)];
    let bpt = blocks_per_task(block_size);
    packed
        .par_chunks_mut(bpt * block_size / 2)
        .zip(absmax.par_chunks_mut(bpt))
        .zip(input.par_chunks(bpt * block_size))
        .for_each(|((p, a), x)| {
            // One scratch buffer per task (a zeroed stack array per block cost more than the
            // block's own work at block size 64).
            let mut codes = vec![0u8; block_size + 2];
            for ((pb, ab), xb) in p
                .chunks_mut(block_size / 2)
                .zip(a.iter_mut())
                .zip(x.chunks(block_size))
            {
                *ab = match quant_type {
                    QuantType::Nf4 => quantize_block(xb, pb, &mut codes, nf4_index),
                    QuantType::Fp4 => quantize_block(xb, pb, &mut codes, fp4_index),
                };
            }
        });
    Ok((packed, absmax))
}

/// `max |x|` over a block, ignoring NaN like CUDA's `fmaxf`. Computed on the magnitude bits
/// (for non-NaN floats their integer order is the float order), which vectorizes.
#[inline(always)]
fn block_absmax<T: InElem>(x: &[T]) -> f32 {
    let mut m = 0u32;
    for &v in x {
        let b = v.to_f32().to_bits() & 0x7FFF_FFFF;
        let b = if b > 0x7F80_0000 { 0 } else { b };
        m = m.max(b);
    }
    f32::from_bits(m)
}

/// Quantizes one block into `out` (`ceil(x.len() / 2)` bytes); returns its absmax. Codes go
/// through the scratch buffer `codes` (at least `x.len() + 1` bytes) so the code loop and the
/// packing loop are simple enough to vectorize.
#[inline(always)]
fn quantize_block<T: InElem>(
    x: &[T],
    out: &mut [u8],
    codes: &mut [u8],
    index: impl Fn(f32) -> u8,
) -> f32 {
    let absmax = block_absmax(x);
    let inv = 1.0f32 / absmax.max(1e-38);
    let len = x.len();
    debug_assert!(codes.len() > len, "scratch buffer too short");
    for (c, &v) in codes[..len].iter_mut().zip(x) {
        *c = index(v.to_f32() * inv);
    }
    // an odd tail pairs with a 0.0, as the CUDA kernel's zero-filled load does
    codes[len] = index(0.0);
    for (o, p) in out.iter_mut().zip(codes[..len + 1].chunks_exact(2)) {
        *o = (p[0] << 4) | p[1];
    }
    absmax
}

/// Blockwise 4-bit dequantization into `out` (its length is the element count):
/// `out[j] = T(code[nibble(j)] * absmax[j / block_size])`.
///
/// Errors if the slice lengths do not fit together.
pub fn dequantize_4bit_into<T: OutElem>(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    block_size: usize,
    out: &mut [T],
) -> Result<()> {
    let n = out.len();
    check_lengths(packed.len(), absmax.len(), n, block_size)?;
    let bpt = blocks_per_task(block_size);
    out.par_chunks_mut(bpt * block_size)
        .zip(packed.par_chunks(bpt * block_size / 2))
        .zip(absmax.par_chunks(bpt))
        .for_each(|((o, p), a)| {
            for ((ob, pb), &am) in o
                .chunks_mut(block_size)
                .zip(p.chunks(block_size / 2))
                .zip(a.iter())
            {
                dequantize_block(pb, am, code, ob);
            }
        });
    Ok(())
}

/// Dequantizes one block: a 16-entry table of `T(code[i] * absmax)`, then one lookup per nibble.
#[inline(always)]
fn dequantize_block<T: OutElem>(packed: &[u8], absmax: f32, code: &[f32; 16], out: &mut [T]) {
    let mut table = [T::default(); 16];
    for (t, &c) in table.iter_mut().zip(code.iter()) {
        *t = T::from_f32(c * absmax);
    }
    let even = out.len() & !1;
    let (pairs, tail) = out.split_at_mut(even);
    for (o, &b) in pairs.chunks_exact_mut(2).zip(packed.iter()) {
        o[0] = table[(b >> 4) as usize];
        o[1] = table[(b & 0x0F) as usize];
    }
    if let (Some(o), Some(&b)) = (tail.first_mut(), packed.get(even / 2)) {
        *o = table[(b >> 4) as usize];
    }
}

fn check_lengths(packed: usize, absmax: usize, n: usize, block_size: usize) -> Result<()> {
    if block_size == 0 || block_size % 2 != 0 {
        return Err(Error::InvalidBlockSize(block_size));
    }
    if packed != n.div_ceil(2) {
        return Err(Error::ShapeMismatch {
            name: "packed 4-bit codes".into(),
            expected: format!("{} bytes for {n} elements", n.div_ceil(2)),
            got: format!("{packed} bytes"),
        });
    }
    if absmax != num_blocks(n, block_size) {
        return Err(Error::ShapeMismatch {
            name: "absmax".into(),
            expected: format!(
                "{} blocks of {block_size} for {n} elements",
                num_blocks(n, block_size)
            ),
            got: format!("{absmax} values"),
        });
    }
    Ok(())
}

/// Unpacks `n` 4-bit codes (high nibble first).
pub fn unpack_codes(packed: &[u8], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for &b in packed {
        out.push(b >> 4);
        out.push(b & 0x0F);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NF4 table of bitsandbytes (`functional.py:get_4bit_type("nf4")`), as f64 literals.
    const BNB_NF4: [f64; 16] = [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ];

    #[test]
    fn nf4_code_matches_bitsandbytes_and_is_sorted() {
        for (i, (&ours, &bnb)) in NF4_CODE.iter().zip(BNB_NF4.iter()).enumerate() {
            assert_eq!(ours, bnb as f32, "entry {i}");
            // the bnb literals are exactly fp32 values
            assert_eq!(ours as f64, bnb, "entry {i} is not an exact fp32");
        }
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_CODE[7], 0.0);
    }

    #[test]
    fn nf4_thresholds_are_midpoints() {
        for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
            let mid = (NF4_CODE[k] as f64 + NF4_CODE[k + 1] as f64) / 2.0;
            assert!((t as f64 - mid).abs() < 1e-7, "threshold {k}: {t} vs {mid}");
        }
    }

    #[test]
    fn fp4_code_in_bit_pattern_order() {
        let expect = [
            0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
            -2.0, -3.0,
        ];
        for (i, (&c, &e)) in FP4_CODE.iter().zip(expect.iter()).enumerate() {
            assert_eq!(c.to_bits(), (e / 12.0f32).to_bits(), "entry {i}");
        }
        assert_eq!(FP4_CODE[3], 1.0);
        assert!(FP4_CODE[8].is_sign_negative() && FP4_CODE[8] == 0.0);
        // the CUDA dequantization LUT literals give the same fp32 values
        let lut = [
            0.0f32,
            0.005_208_333_333,
            0.666_666_67,
            1.0,
            0.333_333_33,
            0.5,
            0.166_666_67,
            0.25,
        ];
        for (i, &l) in lut.iter().enumerate() {
            assert_eq!(FP4_CODE[i], l, "lut {i}");
            assert_eq!(FP4_CODE[i + 8], -l, "lut {i} negative");
        }
    }

    fn probe_values() -> Vec<f32> {
        let mut v = vec![
            f32::NAN,
            -f32::NAN,
            0.0,
            -0.0,
            1.0,
            -1.0,
            1.5,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for &t in NF4_THRESHOLDS.iter().chain(FP4_THRESHOLDS.iter()) {
            for s in [1.0f32, -1.0] {
                let t = t * s;
                v.extend([
                    t,
                    f32::from_bits(t.to_bits() + 1),
                    f32::from_bits(t.to_bits() - 1),
                ]);
            }
        }
        for i in -20_000..=20_000 {
            v.push(i as f32 / 20_000.0);
        }
        v
    }

    #[test]
    fn branch_free_codes_equal_the_bnb_trees() {
        for x in probe_values() {
            assert_eq!(
                QuantType::Nf4.quantize_scaled(x),
                quantize_nf4_tree(x),
                "nf4 {x:e}"
            );
            assert_eq!(
                QuantType::Fp4.quantize_scaled(x),
                quantize_fp4_tree(x),
                "fp4 {x:e}"
            );
        }
    }

    #[test]
    fn nf4_tree_picks_the_nearest_code() {
        for i in -10_000..=10_000 {
            let x = i as f32 / 10_000.0;
            let c = quantize_nf4_tree(x) as usize;
            let best = (0..16)
                .min_by(|&a, &b| {
                    (NF4_CODE[a] - x)
                        .abs()
                        .partial_cmp(&(NF4_CODE[b] - x).abs())
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
                .unwrap_or(0);
            let d_c = (NF4_CODE[c] - x).abs();
            let d_b = (NF4_CODE[best] - x).abs();
            assert!(d_c <= d_b + 1e-7, "x={x}: code {c} vs nearest {best}");
        }
    }

    #[test]
    fn fp4_tree_picks_the_nearest_magnitude() {
        for i in 0..=10_000 {
            let x = i as f32 / 10_000.0;
            for s in [1.0f32, -1.0] {
                let x = x * s;
                let c = quantize_fp4_tree(x) as usize;
                let d_c = (FP4_CODE[c] - x).abs();
                let d_min = FP4_CODE
                    .iter()
                    .map(|&v| (v - x).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!(
                    d_c <= d_min + 1e-6,
                    "x={x}: code {c} off by {d_c} vs {d_min}"
                );
            }
        }
    }

    #[test]
    fn packing_puts_the_even_element_in_the_high_nibble() {
        // 4 elements, one block: scaled values -1, 1, 0, 0.5626 -> codes 0, 15, 7, 13
        let x = [-2.0f32, 2.0, 0.0, 1.125_234];
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(a, vec![2.0]);
        assert_eq!(p, vec![0x0F, 0x7D]);
        assert_eq!(unpack_codes(&p, 4), vec![0, 15, 7, 13]);
    }

    #[test]
    fn odd_count_pads_low_nibble_with_the_code_of_zero() {
        let x = [1.0f32, -1.0, 0.5];
        let (p, _) = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1] & 0x0F, 7, "NF4 pad");
        assert_eq!(p[1] >> 4, quantize_nf4_tree(0.5));
        let (p, _) = quantize_4bit(&x, 64, QuantType::Fp4).unwrap();
        assert_eq!(p[1] & 0x0F, 0, "FP4 pad");
        let mut out = [0f32; 3];
        dequantize_4bit_into(&p, &[1.0], &FP4_CODE, 64, &mut out).unwrap();
        assert_eq!(out, [1.0, -1.0, 0.5]);
    }

    #[test]
    fn partial_last_block_has_its_own_absmax() {
        // 64 + 16 elements with block 64: two blocks, the second partial
        let x: Vec<f32> = (0..80)
            .map(|i| if i < 64 { (i as f32) / 10.0 } else { -0.25 })
            .collect();
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(a, vec![6.3, 0.25]);
        assert_eq!(p.len(), 40);
        let codes = unpack_codes(&p, 80);
        assert!(
            codes[64..].iter().all(|&c| c == 0),
            "-0.25/0.25 = -1 -> code 0"
        );
        let mut out = vec![0f32; 80];
        dequantize_4bit_into(&p, &a, &NF4_CODE, 64, &mut out).unwrap();
        assert!(out[64..].iter().all(|&v| v == -0.25));
        assert_eq!(out[63], 6.3);
    }

    #[test]
    fn zero_block_quantizes_to_the_code_of_zero() {
        let x = [0.0f32; 64];
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(a[0], 0.0);
        assert!(p.iter().all(|&b| b == 0x77));
    }

    #[test]
    fn dequantize_is_code_times_absmax_without_fma() {
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..1000).map(|_| next() * 3.0).collect();
        for bs in [32, 64, 256] {
            let (p, a) = quantize_4bit(&x, bs, QuantType::Nf4).unwrap();
            let codes = unpack_codes(&p, x.len());
            let mut out = vec![0f32; x.len()];
            dequantize_4bit_into(&p, &a, &NF4_CODE, bs, &mut out).unwrap();
            let mut outb = vec![bf16::ZERO; x.len()];
            dequantize_4bit_into(&p, &a, &NF4_CODE, bs, &mut outb).unwrap();
            for j in 0..x.len() {
                let e = NF4_CODE[codes[j] as usize] * a[j / bs];
                assert_eq!(out[j].to_bits(), e.to_bits());
                assert_eq!(outb[j], bf16::from_f32(e));
                // nearest code: error at most half the largest gap (-1 .. -0.696) times absmax
                assert!((out[j] - x[j]).abs() <= a[j / bs] * 0.1520, "j={j}");
            }
        }
    }

    #[test]
    fn bf16_input_equals_its_f32_widening() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let xw: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        assert_eq!(
            quantize_4bit(&xb, 64, QuantType::Nf4).unwrap(),
            quantize_4bit(&xw, 64, QuantType::Nf4).unwrap()
        );
    }

    #[test]
    fn absmax_ignores_nan_like_fmaxf() {
        let x = [0.5f32, f32::NAN, -3.0, 2.0, -f32::NAN, 1e-40];
        assert_eq!(block_absmax(&x), 3.0);
        assert_eq!(block_absmax(&[f32::NAN, f32::NAN]), 0.0);
        assert_eq!(block_absmax(&[f32::NEG_INFINITY, 1.0]), f32::INFINITY);
        let y: Vec<f32> = (0..777)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        assert_eq!(block_absmax(&y), y.iter().fold(0f32, |m, v| m.max(v.abs())));
    }

    #[test]
    fn largest_block_and_out_of_range_sizes() {
        let x: Vec<f32> = (0..4097).map(|i| (i as f32).sin()).collect();
        let (p, a) = quantize_4bit(&x, 4096, QuantType::Nf4).unwrap();
        assert_eq!((p.len(), a.len()), (2049, 2));
        assert_eq!(p[2048] & 0x0F, 7);
        assert!(quantize_4bit(&x, 8192, QuantType::Nf4).is_err());
        assert!(quantize_4bit(&x, 0, QuantType::Nf4).is_err());
        assert!(quantize_4bit(&x, 63, QuantType::Nf4).is_err());
    }

    #[test]
    fn length_checks_fail_cleanly() {
        let mut out = [0f32; 10];
        assert!(dequantize_4bit_into(&[0u8; 4], &[1.0], &NF4_CODE, 64, &mut out).is_err());
        assert!(dequantize_4bit_into(&[0u8; 5], &[1.0, 1.0], &NF4_CODE, 64, &mut out).is_err());
        assert!(check_block_size(100).is_err());
        assert!(check_block_size(64).is_ok());
    }
}
