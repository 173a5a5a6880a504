//! The TensorBoard event writer of the programs (`examples/common/tensorboard.rs`), tested
//! here: an example target's own unit tests are not part of `cargo test`.

#[path = "../examples/common/tensorboard.rs"]
mod tensorboard;

use std::process::Command;

/// TensorBoard itself (the Python package's `EventAccumulator`, what `tensorboard --logdir`
/// runs) reads the written events back: tags, steps and values. Needs `python3` with
/// `tensorboard`; CI installs it and sets `MOE_PEFT_REQUIRE_TENSORBOARD=1`, which turns its absence
/// into a failure instead of a skip.
#[test]
fn tensorboard_reads_the_events_back() {
    let have = Command::new("python3")
        .args(["-c", "import tensorboard"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("MOE_PEFT_REQUIRE_TENSORBOARD").as_deref() != Ok("1"),
            "MOE_PEFT_REQUIRE_TENSORBOARD=1 but python3 cannot import tensorboard"
        );
        eprintln!("skipped: python3 with the tensorboard package is not available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut w = tensorboard::EventWriter::create(dir.path()).unwrap();
    let loss: Vec<(usize, f64)> = (1..=6).map(|s| (s, 2.0 / s as f64)).collect();
    for &(s, v) in &loss {
        w.scalar("train/loss", s, v).unwrap();
        w.scalar("train/learning_rate", s, 1e-4 * s as f64).unwrap();
    }
    drop(w);
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1])
ea.Reload()
print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}))
"#;
    let o = Command::new("python3")
        .args(["-c", script, dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let series = |tag: &str| -> Vec<(usize, f32)> {
        v[tag]
            .as_array()
            .unwrap_or_else(|| panic!("TensorBoard has no {tag}: {v}"))
            .iter()
            .map(|p| {
                (
                    p[0].as_u64().unwrap() as usize,
                    p[1].as_f64().unwrap() as f32,
                )
            })
            .collect()
    };
    let want = |f: &dyn Fn(usize) -> f64| -> Vec<(usize, f32)> {
        (1..=6).map(|s| (s, f(s) as f32)).collect()
    };
    assert_eq!(series("train/loss"), want(&|s| 2.0 / s as f64));
    assert_eq!(series("train/learning_rate"), want(&|s| 1e-4 * s as f64));
}
