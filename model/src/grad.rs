//! Switching graph building off for inference, as `torch.no_grad()`.
//!
//! candle records an operation whenever one of its inputs is a variable or was computed from
//! one. Adapters, fully trained modules and full fine-tuning hold their weights as variables,
//! so without this a forward pass for evaluation or generation would keep every intermediate
//! activation alive in the graph (and a KV cache would keep the graphs of all earlier steps).
//! Inside [`no_grad`], the layers that hold variables use detached views of them, so nothing is
//! recorded. The flag is per thread.

use std::cell::Cell;

use candle_core::Tensor;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether forward passes on this thread record a graph (true unless inside [`no_grad`]).
pub fn is_grad_enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Turns graph recording off on this thread until the guard is dropped.
#[must_use = "graph recording comes back on when the guard is dropped"]
pub fn no_grad() -> NoGradGuard {
    let prev = ENABLED.with(|e| e.replace(false));
    NoGradGuard { prev }
}

/// Restores the previous graph-recording state when dropped.
#[derive(Debug)]
pub struct NoGradGuard {
    prev: bool,
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        ENABLED.with(|e| e.set(self.prev));
    }
}

/// `t` as a layer should use it: itself, or a detached view inside [`no_grad`].
pub fn tracked(t: &Tensor) -> Tensor {
    if is_grad_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn guard_nests_and_restores() -> candle_core::Result<()> {
        let v = Var::new(&[1f32, 2.], &Device::Cpu)?;
        assert!(is_grad_enabled());
        assert!(tracked(v.as_tensor()).track_op());
        {
            let _g = no_grad();
            assert!(!is_grad_enabled());
            assert!(!tracked(v.as_tensor()).track_op());
            {
                let _h = no_grad();
            }
            assert!(!is_grad_enabled());
        }
        assert!(is_grad_enabled());
        Ok(())
    }
}
