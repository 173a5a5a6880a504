//! Tokenizing each text once (the source, then the target; the reference template's constant
//! prefix once per dataset) gives exactly the ids of the reference's rule, which tokenizes the
//! source alone and then source + target. Checked on hand-picked hard cases and on random text
//! (proptest), through `build_example` and through `build_examples`, and the structural check
//! that enables the shortcut is shown to refuse tokenizers where it would be wrong.

mod common;

use common::{deepseek, fixture, raw};
use moe_peft_data::{
    build_example, build_examples, InputPolicy, PreprocessConfig, Record, Template, TextTokenizer,
    TokenizerSettings, IGNORE_INDEX,
};
use proptest::prelude::*;

const BOS: u32 = 100000;

/// The reference's rule: `[BOS] + encode(source)` for the masked length, `[BOS] +
/// encode(source + target)` for the ids, both right-truncated to `max_len`.
fn reference(
    raw: &tokenizers::Tokenizer,
    template: &Template,
    record: &Record,
    max_len: usize,
) -> (Vec<u32>, Vec<i64>) {
    let (source, target) = template.render(record, InputPolicy::Ignore);
    let enc = |text: &str| {
        let mut ids = vec![BOS];
        ids.extend_from_slice(raw.encode(text, false).unwrap().get_ids());
        ids.truncate(max_len);
        ids
    };
    let n_source = enc(&source).len();
    let ids = enc(&format!("{source}{target}"));
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if i < n_source {
                IGNORE_INDEX
            } else {
                i64::from(t)
            }
        })
        .collect();
    (ids, labels)
}

fn templates() -> Vec<Template> {
    vec![
        Template::Reference,
        Template::DeepSeekChat,
        Template::Custom {
            prompt: "Below is an instruction.\r\n{{note}}\n### Q:\n{instruction}\n### A:\n".into(),
            target: "{output}".into(),
        },
        // The source does not end with a line break: the reference's two tokenizations run.
        Template::Custom {
            prompt: "Q: {instruction} A:".into(),
            target: " {output}".into(),
        },
    ]
}

fn hard_records() -> Vec<Record> {
    let texts = [
        "",
        " ",
        "\n",
        "\r\n",
        "plain words",
        "  leading and trailing spaces  ",
        "\n\nstarts with line breaks",
        "ends with line breaks\n\n",
        "tab\tand\u{1c}separator",
        "digits 1234567890 and 3.14159",
        "punctuation!?;:...---***",
        "中文文本和한국어 mixed with English",
        "emoji 🙂👍 and accents éàü",
        "a literal <｜end▁of▁sentence｜> token",
        "<｜begin▁of▁sentence｜>at the start",
        "<|EOT|> looks special but is text",
        "windows\r\nline\rbreaks\r",
        "$x^2 + 1$ and \\frac{a}{b}",
        "{instruction} {{braces}} }{",
    ];
    let mut out = Vec::new();
    for (i, a) in texts.iter().enumerate() {
        for b in [
            texts[(i * 7 + 3) % texts.len()],
            texts[(i * 5 + 1) % texts.len()],
        ] {
            out.push(Record::new(*a, b));
            out.push(Record::new(b, *a));
        }
    }
    out
}

#[test]
fn deepseek_tokenizer_takes_the_single_pass() {
    assert!(deepseek().splits_at_line_breaks());
}

#[test]
fn single_pass_equals_the_reference_rule_on_hard_cases() {
    let (tok, raw) = (deepseek(), raw());
    let records = hard_records();
    for template in templates() {
        for max_len in [2, 5, 40, 4096] {
            for r in &records {
                let p = build_example(r, &tok, &template, InputPolicy::Ignore, max_len).unwrap();
                let (ids, labels) = reference(&raw, &template, r, max_len);
                assert_eq!(p.example.input_ids, ids, "{template:?} {max_len} {r:?}");
                assert_eq!(p.example.labels, labels, "{template:?} {max_len} {r:?}");
            }
            // The dataset path (constant prefix tokenized once) gives the same examples.
            let config = PreprocessConfig {
                template: template.clone(),
                max_len: Some(max_len),
                drop_fully_masked: false,
                progress: false,
                ..Default::default()
            };
            let (examples, _) = build_examples(&records, &tok, &config).unwrap();
            for (e, r) in examples.iter().zip(&records) {
                let (ids, labels) = reference(&raw, &template, r, max_len);
                assert_eq!(e.input_ids, ids, "{template:?} {max_len} {r:?}");
                assert_eq!(e.labels, labels, "{template:?} {max_len} {r:?}");
            }
        }
    }
}

#[test]
fn constant_prefixes() {
    assert_eq!(
        Template::Reference.constant_prefix().unwrap(),
        format!(
            "{}\n### Instruction:\n",
            moe_peft_data::REFERENCE_SYSTEM_PROMPT
        )
    );
    assert_eq!(Template::DeepSeekChat.constant_prefix(), None);
    let custom = |prompt: &str| Template::Custom {
        prompt: prompt.into(),
        target: "{output}".into(),
    };
    assert_eq!(
        custom("A {{x}}\nB\nC {instruction}\n").constant_prefix(),
        Some("A {x}\nB\n".into())
    );
    assert_eq!(custom("no break {instruction}\n").constant_prefix(), None);
    assert_eq!(custom("{instruction}\n").constant_prefix(), None);
}

/// A modified copy of the DeepSeek tokenizer.json.
fn variant(edit: impl Fn(&mut serde_json::Value)) -> TextTokenizer {
    let text = std::fs::read_to_string(fixture("tokenizer/tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&v).unwrap()).unwrap();
    let settings =
        TokenizerSettings::from_config_file(fixture("tokenizer/tokenizer_config.json")).unwrap();
    TextTokenizer::new(inner, settings).unwrap()
}

#[test]
fn the_shortcut_is_refused_where_line_breaks_are_not_boundaries() {
    // Each edit breaks the guarantee; the check must see it.
    let no_newline_split = variant(|v| {
        v["pre_tokenizer"]["pretokenizers"]
            .as_array_mut()
            .unwrap()
            .remove(0);
    });
    assert!(!no_newline_split.splits_at_line_breaks());
    let prefix_space = variant(|v| {
        let steps = v["pre_tokenizer"]["pretokenizers"].as_array_mut().unwrap();
        let last = steps.len() - 1;
        steps[last]["add_prefix_space"] = true.into();
    });
    assert!(!prefix_space.splits_at_line_breaks());
    let normalizer = variant(|v| {
        v["normalizer"] = serde_json::json!({"type": "Lowercase"});
    });
    assert!(!normalizer.splits_at_line_breaks());
    let prepend = variant(|v| {
        v["normalizer"] = serde_json::json!({"type": "Prepend", "prepend": "Z"});
    });
    assert!(!prepend.splits_at_line_breaks());
    let lstrip = variant(|v| {
        v["added_tokens"][1]["lstrip"] = true.into();
    });
    assert!(!lstrip.splits_at_line_breaks());
    let dropout = variant(|v| {
        v["model"]["dropout"] = 0.1.into();
    });
    assert!(!dropout.splits_at_line_breaks());
    // A normalizer that prepends text to the whole string makes the shortcut wrong (the target
    // alone would get the prefix too); the refused tokenizer still gives the reference's ids
    // because it tokenizes twice.
    let r = Record::new("question", "Answer");
    let raw_variant = prepend.inner().clone();
    let p = build_example(
        &r,
        &prepend,
        &Template::Reference,
        InputPolicy::Ignore,
        4096,
    )
    .unwrap();
    let (ids, labels) = reference(&raw_variant, &Template::Reference, &r, 4096);
    assert_eq!(p.example.input_ids, ids);
    assert_eq!(p.example.labels, labels);
    let (source, target) = Template::Reference.render(&r, InputPolicy::Ignore);
    let joined = raw_variant
        .encode(format!("{source}{target}"), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut split = raw_variant
        .encode(source, false)
        .unwrap()
        .get_ids()
        .to_vec();
    split.extend_from_slice(raw_variant.encode(target, false).unwrap().get_ids());
    assert_ne!(joined, split, "the refused case is a real counterexample");
}

/// The DeepSeek tokenizer in both forms, loaded once for all proptest cases.
fn shared() -> &'static (TextTokenizer, tokenizers::Tokenizer) {
    static SHARED: std::sync::OnceLock<(TextTokenizer, tokenizers::Tokenizer)> =
        std::sync::OnceLock::new();
    SHARED.get_or_init(|| (deepseek(), raw()))
}

fn text_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("\n".to_string()),
            Just("\r".to_string()),
            Just(" ".to_string()),
            Just("  ".to_string()),
            Just("\t".to_string()),
            Just("<｜end▁of▁sentence｜>".to_string()),
            Just("<|EOT|>".to_string()),
            "[a-zA-Z]{1,8}",
            "[0-9]{1,5}",
            "[!-/:-@]{1,3}",
            "[一-龥]{1,3}",
            "[à-ÿ]{1,3}",
            any::<char>().prop_map(String::from),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn single_pass_equals_the_reference_rule_on_random_text(
        instruction in text_strategy(),
        output in text_strategy(),
        max_len in 2usize..64,
    ) {
        let (tok, raw) = shared();
        let r = Record::new(instruction, output);
        for template in templates() {
            let p = build_example(&r, tok, &template, InputPolicy::Ignore, max_len).unwrap();
            let (ids, labels) = reference(raw, &template, &r, max_len);
            prop_assert_eq!(&p.example.input_ids, &ids);
            prop_assert_eq!(&p.example.labels, &labels);
        }
    }
}
