//! Gradients through the frozen quantized layers: input gradient only, checked against central
//! finite differences.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use moe_peft_quant::{DenseLinear, Int8Linear, Nf4Absmax, Nf4Config, Nf4Linear, Nf4Tensor};

fn chain(l1: &dyn ModuleT, l2: &dyn ModuleT, x: &Tensor) -> candle_core::Result<Tensor> {
    l2.forward_t(&l1.forward_t(x, true)?.tanh()?, true)?
        .sum_all()
}

/// `x → Nf4Linear → tanh → DenseLinear → sum` with `x` a `Var` (f32). The input gradient matches
/// a central finite difference of the same chain evaluated in f64 (the dequantized weights are
/// the same numbers in both dtypes; step 1e-4, truncation error ~1e-9): tolerance
/// `1e-5 · (1 + |fd|)`, which is f32 accumulation noise. It also equals the gradient through a
/// dense layer holding the dequantized weight, and no weight tensor gets a gradient.
#[test]
fn nf4_linear_input_gradient_matches_finite_differences() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let w1 = (Tensor::randn(0f32, 1., (32, 64), &dev)? * 0.2)?;
    let q = Nf4Tensor::quantize(&w1, &Nf4Config::default())?;
    let lin1 = Nf4Linear::new(q.clone())?;
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
    println!("Nf4Linear chain: max |grad - finite difference| = {worst:e}");

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
        "Nf4Linear and dense-of-dequantized give the same input gradient"
    );

    // frozen: nothing but x (and intermediates) gets a gradient; none of the stored parts
    let mut parts = vec![lin1.weight().packed().clone()];
    if let Nf4Absmax::Double(s) = lin1.weight().absmax() {
        parts.extend([s.codes.clone(), s.map.clone(), s.nested_absmax.clone()]);
    }
    for p in &parts {
        assert!(grads.get(p).is_none(), "a stored part got a gradient");
        assert!(!grads.get_ids().any(|id| *id == p.id()));
    }
    assert!(
        grads.get(lin2.weight()).is_none(),
        "dense frozen weight got a gradient"
    );
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
