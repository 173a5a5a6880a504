//! Gradients through the frozen quantized layers: input gradient only, checked against central
//! finite differences.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use moe_peft_quant::{DenseLinear, FourBitConfig, FourBitLinear, FourBitTensor, Int8Linear};

fn chain(l1: &dyn ModuleT, l2: &dyn ModuleT, x: &Tensor) -> candle_core::Result<Tensor> {
    l2.forward_t(&l1.forward_t(x, true)?.tanh()?, true)?
        .sum_all()
}

/// `x → FourBitLinear → tanh → DenseLinear → sum` with `x` a `Var` (f32). The input gradient matches
/// a central finite difference of the same chain evaluated in f64 (the dequantized weights are
/// the same numbers in both dtypes; step 1e-4, truncation error ~1e-9): tolerance
/// `1e-5 · (1 + |fd|)`, which is f32 accumulation noise. It also equals the gradient through a
/// dense layer holding the dequantized weight.
#[test]
fn nf4_linear_input_gradient_matches_finite_differences() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let w1 = (Tensor::randn(0f32, 1., (32, 64), &dev)? * 0.2)?;
    let q = FourBitTensor::quantize(&w1, &FourBitConfig::default())?;
    let lin1 = FourBitLinear::new(q.clone())?;
    let lin2 = DenseLinear::new(Tensor::randn(0f32, 1., (5, 32), &dev)?);
    let x0 = Tensor::randn(0f32, 1., (2, 3, 64), &dev)?;
    let x = Var::from_tensor(&x0)?;
    let loss = chain(&lin1, &lin2, x.as_tensor())?;
    let grads = loss.backward()?;
    let gx = grads
        .get(x.as_tensor())
        .expect("x has a gradient")
        .flatten_all()?
        .to_vec1::<f32>()?;

    let x64 = x0.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let f = |v: &[f64]| -> anyhow::Result<f64> {
        let t = Tensor::from_slice(v, (2, 3, 64), &dev)?;
        Ok(chain(&lin1, &lin2, &t)?.to_scalar::<f64>()?)
    };
    let eps = 1e-4;
    let mut worst = 0f64;
    for idx in [0usize, 17, 69, 130, 191, 255, 300, 383] {
        let mut p = x64.clone();
        p[idx] += eps;
        let mut m = x64.clone();
        m[idx] -= eps;
        let fd = (f(&p)? - f(&m)?) / (2.0 * eps);
        let err = (gx[idx] as f64 - fd).abs();
        assert!(
            err <= 1e-5 * (1.0 + fd.abs()),
            "x[{idx}]: grad {} vs fd {fd}",
            gx[idx]
        );
        worst = worst.max(err);
    }
    println!("FourBitLinear chain: max |grad - finite difference| = {worst:e}");

    // same chain through a dense layer holding the dequantized weight
    let dense1 = DenseLinear::new(q.dequantize(DType::F32)?);
    let xd = Var::from_tensor(&x0)?;
    let gd = chain(&dense1, &lin2, xd.as_tensor())?.backward()?;
    let gd = gd
        .get(xd.as_tensor())
        .expect("grad")
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(
        gx, gd,
        "FourBitLinear and dense-of-dequantized give the same input gradient"
    );

    Ok(())
}

/// Frozen means frozen even when the layers are built from trainable tensors: an `FourBitLinear`
/// quantized from a `Var`, an `Int8Linear` quantized from one and a `DenseLinear` holding one
/// all pass a gradient to their input and none to the weight (a layer that kept the weight in
/// the graph would hand it one, or fail in the backward of the quantization).
#[test]
fn layers_built_from_trainable_weights_stay_frozen() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let w1 = Var::from_tensor(&(Tensor::randn(0f32, 1., (32, 64), &dev)? * 0.2)?)?;
    let w2 = Var::from_tensor(&Tensor::randn(0f32, 1., (16, 32), &dev)?)?;
    let w3 = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 16), &dev)?)?;
    let nf4 = FourBitLinear::new(FourBitTensor::quantize(
        w1.as_tensor(),
        &FourBitConfig::default(),
    )?)?;
    let int8 = Int8Linear::quantize(w2.as_tensor())?;
    let dense = DenseLinear::new(w3.as_tensor().clone());
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 64), &dev)?)?;
    let h = nf4.forward_t(x.as_tensor(), true)?.tanh()?;
    let h = int8.forward_t(&h, true)?.tanh()?;
    let grads = dense.forward_t(&h, true)?.sum_all()?.backward()?;
    let gx = grads.get(x.as_tensor()).expect("the input gets a gradient");
    assert!(gx.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
    for (name, w) in [("nf4", &w1), ("int8", &w2), ("dense", &w3)] {
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "the {name} layer's weight got a gradient"
        );
    }
    // The same chain on the bare Vars does give them gradients: the check above can fail.
    let h = x
        .as_tensor()
        .broadcast_matmul(&w1.as_tensor().t()?)?
        .tanh()?;
    let h = h.broadcast_matmul(&w2.as_tensor().t()?)?.tanh()?;
    let g = h
        .broadcast_matmul(&w3.as_tensor().t()?)?
        .sum_all()?
        .backward()?;
    assert!(g.get(w1.as_tensor()).is_some() && g.get(w3.as_tensor()).is_some());
    Ok(())
}

/// Int8Linear: the input gradient is `grad_y · W_deq`, and the weight gets none.
#[test]
fn int8_linear_input_gradient() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (16, 24), &dev)?;
    let lin = Int8Linear::quantize(&w)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 24), &dev)?)?;
    let g = Tensor::randn(0f32, 1., (4, 16), &dev)?;
    let y = lin.forward_t(x.as_tensor(), true)?;
    let grads = (&y * &g)?.sum_all()?.backward()?;
    let gx = grads.get(x.as_tensor()).expect("grad");
    let expected = g.matmul(&lin.weight().dequantize(DType::F32)?)?;
    let d = (gx - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d < 1e-5, "{d}");
    Ok(())
}
