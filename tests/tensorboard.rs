//! The TensorBoard event writer of the programs (`examples/common/tensorboard.rs`), tested
//! here: an example target's own unit tests are not part of `cargo test`.

#[path = "../examples/common/tensorboard.rs"]
mod tensorboard;
