//! Template + tokenization + masking, checked token by token against the reference's rules and
//! against transformers' output (`fixtures/data/reference_preprocess.json`).

mod common;

use common::{deepseek, fixture, ids, ints, json, raw};
use moe_peft_data::{
    build_example, build_examples, read_records, DropReason, InputPolicy, PreprocessConfig,
    ReaderConfig, Record, Template, IGNORE_INDEX,
};

const BOS: u32 = 100000;
const EOT_TAIL: [u32; 6] = [185, 27, 91, 36, 2787, 66325]; // "\n<|EOT|>"

/// The reference's rule, restated: `[BOS] + encode(text)`, right-truncated to `max_len`.
fn reference_tokenize(raw: &tokenizers::Tokenizer, text: &str, max_len: usize) -> Vec<u32> {
    let mut ids = vec![BOS];
    ids.extend_from_slice(raw.encode(text, false).unwrap().get_ids());
    ids.truncate(max_len);
    ids
}

#[test]
fn matches_transformers_reference_output() {
    let tok = deepseek();
    let reference = json("data/reference_preprocess.json");
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let record = Record::new(
            c["instruction"].as_str().unwrap(),
            c["output"].as_str().unwrap(),
        );
        let max_len = c["max_len"].as_u64().unwrap() as usize;
        let (source, target) = Template::Reference.render(&record, InputPolicy::Ignore);
        assert_eq!(source, c["source"].as_str().unwrap(), "{name}: source text");
        assert_eq!(target, c["target"].as_str().unwrap(), "{name}: target text");
        let p = build_example(
            &record,
            &tok,
            &Template::Reference,
            InputPolicy::Ignore,
            max_len,
        )
        .unwrap();
        assert_eq!(
            p.example.input_ids,
            ids(&c["input_ids"]),
            "{name}: input_ids"
        );
        assert_eq!(p.example.labels, ints(&c["labels"]), "{name}: labels");
        assert!(!p.boundary_mismatch, "{name}");
        let source_len = c["source_len"].as_u64().unwrap() as usize;
        assert_eq!(p.source_len, source_len.min(p.example.len()), "{name}");
        match name {
            "truncation_cuts_target" => {
                assert!(p.truncated);
                assert_eq!(p.drop, None);
            }
            "prompt_exceeds_max_len" => {
                assert!(p.truncated);
                assert_eq!(p.drop, Some(DropReason::PromptTooLong));
            }
            _ => {
                assert!(!p.truncated, "{name}");
                assert_eq!(p.drop, None, "{name}");
                assert_eq!(
                    p.example.input_ids[p.example.len() - 6..],
                    EOT_TAIL,
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn worked_example_token_by_token() {
    let tok = deepseek();
    let raw = raw();
    let record = Record::new("  What is 7 + 5?\n", "7 + 5 = 12.");
    // The reference prompt, written out by hand (instruction stripped, BOS added by the tokenizer).
    let prompt = "You are an AI assistant, developed by DeepSeek Company. For politically sensitive questions, security and privacy issues, you will refuse to answer.\n### Instruction:\nWhat is 7 + 5?\n### Response:\n";
    let full = format!("{prompt}7 + 5 = 12.\n<|EOT|>");
    let prompt_ids = reference_tokenize(&raw, prompt, usize::MAX);
    let full_ids = reference_tokenize(&raw, &full, usize::MAX);
    let n_prompt = prompt_ids.len();
    assert_eq!(
        full_ids[..n_prompt],
        prompt_ids[..],
        "prompt is a token prefix of the full text"
    );

    let p = build_example(
        &record,
        &tok,
        &Template::Reference,
        InputPolicy::Ignore,
        512,
    )
    .unwrap();
    let e = &p.example;
    assert_eq!(e.input_ids, full_ids);
    assert_eq!(e.input_ids[0], BOS);
    assert_eq!(p.source_len, n_prompt);
    for (i, (&id, &label)) in e.input_ids.iter().zip(&e.labels).enumerate() {
        if i < n_prompt {
            assert_eq!(label, IGNORE_INDEX, "position {i} is prompt (BOS included)");
        } else {
            assert_eq!(label, i64::from(id), "position {i} is target");
        }
    }
    assert_eq!(e.attention_mask, vec![1; e.len()]);
    // The target starts right after "### Response:\n" and ends with "\n<|EOT|>" (5 pieces).
    assert_eq!(
        tok.decode(&e.input_ids[n_prompt..], false).unwrap(),
        "7 + 5 = 12.\n<|EOT|>"
    );
    assert_eq!(e.input_ids[e.len() - 6..], EOT_TAIL);
    assert_eq!(e.labels[e.len() - 6..], EOT_TAIL.map(i64::from));
    assert_eq!(tok.id_to_token(e.input_ids[n_prompt - 1]).unwrap(), "Ċ"); // prompt ends in "\n"
    assert_eq!(e.n_target_tokens(), full_ids.len() - n_prompt);

    // Truncation that cuts the target: 3 target tokens survive, no EOT.
    let l = n_prompt + 3;
    let p = build_example(&record, &tok, &Template::Reference, InputPolicy::Ignore, l).unwrap();
    assert!(p.truncated);
    assert_eq!(p.example.input_ids, reference_tokenize(&raw, &full, l));
    assert_eq!(p.example.input_ids, full_ids[..l]);
    assert_eq!(p.example.n_target_tokens(), 3);
    assert_eq!(
        p.example.labels[n_prompt..],
        full_ids[n_prompt..l]
            .iter()
            .map(|&x| i64::from(x))
            .collect::<Vec<_>>()[..]
    );
    assert!(!p.example.input_ids.ends_with(&EOT_TAIL));

    // Room for exactly one target token.
    let p = build_example(
        &record,
        &tok,
        &Template::Reference,
        InputPolicy::Ignore,
        n_prompt + 1,
    )
    .unwrap();
    assert_eq!(p.example.n_target_tokens(), 1);
    assert_eq!(p.drop, None);

    // The prompt exactly fills max_len: nothing to learn, dropped as PromptTooLong.
    let p = build_example(
        &record,
        &tok,
        &Template::Reference,
        InputPolicy::Ignore,
        n_prompt,
    )
    .unwrap();
    assert_eq!(p.drop, Some(DropReason::PromptTooLong));
    assert!(p.example.labels.iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(p.example.input_ids, prompt_ids);

    // The prompt alone exceeds max_len: counted and dropped (or kept fully masked on request).
    let short = n_prompt - 5;
    let cfg = PreprocessConfig {
        max_len: Some(short),
        progress: false,
        ..Default::default()
    };
    let records = vec![record.clone(), Record::new("Hi", "Hello")];
    let (examples, summary) = build_examples(&records, &tok, &cfg).unwrap();
    // The "Hi" record is dropped too if its (shorter) prompt also fills `short` tokens.
    let hi_prompt = reference_tokenize(
        &raw,
        &Template::Reference
            .render(&records[1], InputPolicy::Ignore)
            .0,
        usize::MAX,
    )
    .len();
    let expected_dropped = 1 + usize::from(hi_prompt >= short);
    assert_eq!(summary.records, 2);
    assert_eq!(summary.dropped_prompt_too_long, expected_dropped);
    assert_eq!(summary.examples, 2 - expected_dropped);
    assert_eq!(examples.len(), 2 - expected_dropped);
    let keep = PreprocessConfig {
        drop_fully_masked: false,
        ..cfg
    };
    let (examples, summary) = build_examples(&records[..1], &tok, &keep).unwrap();
    assert_eq!(summary.dropped_prompt_too_long, 1);
    assert_eq!(examples.len(), 1);
    assert_eq!(examples[0].len(), short);
    assert_eq!(examples[0].n_target_tokens(), 0);
}

#[test]
fn summary_counts_on_tiny_dataset() {
    let tok = deepseek();
    let records = read_records(
        &[fixture("data/tiny_instruct.jsonl")],
        &ReaderConfig::default(),
    )
    .unwrap();
    let cfg = PreprocessConfig {
        progress: false,
        ..Default::default()
    };
    let (examples, s) = build_examples(&records, &tok, &cfg).unwrap();
    assert_eq!(s.records, 256);
    assert_eq!(s.examples, 256);
    assert_eq!(s.dropped(), 0);
    assert_eq!(s.truncated, 0);
    assert_eq!(s.boundary_mismatches, 0);
    assert_eq!(
        s.total_tokens,
        examples.iter().map(|e| e.len()).sum::<usize>()
    );
    assert_eq!(
        s.target_tokens,
        examples.iter().map(|e| e.n_target_tokens()).sum::<usize>()
    );
    assert_eq!(s.longest, examples.iter().map(|e| e.len()).max().unwrap());
    assert_eq!(s.shortest, examples.iter().map(|e| e.len()).min().unwrap());
    let text = s.to_string();
    assert!(text.contains("records read         256"), "{text}");

    // max_len = the shortest example: every longer example is truncated or dropped.
    let cfg = PreprocessConfig {
        max_len: Some(s.shortest),
        progress: false,
        ..Default::default()
    };
    let (_, s2) = build_examples(&records, &tok, &cfg).unwrap();
    assert_eq!(s2.records, 256);
    assert_eq!(s2.examples + s2.dropped(), 256);
    assert!(s2.truncated > 0);
    assert!(s2.longest <= s.shortest);
}

#[test]
fn result_is_independent_of_thread_count() {
    let tok = deepseek();
    let records = moe_peft_data::synthetic::tiny_instruct(500, 3);
    let cfg = PreprocessConfig {
        progress: false,
        ..Default::default()
    };
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| build_examples(&records, &tok, &cfg).unwrap())
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn deepseek_chat_template() {
    let tok = deepseek();
    let record = Record::new("Hi there", "Hello! How can I help?");
    let p = build_example(
        &record,
        &tok,
        &Template::DeepSeekChat,
        InputPolicy::Ignore,
        512,
    )
    .unwrap();
    let e = &p.example;
    assert_eq!(e.input_ids[0], BOS);
    assert_eq!(*e.input_ids.last().unwrap(), 100001, "ends in EOS");
    assert!(!p.boundary_mismatch);
    // Same ids as the tokenizer's chat template rendering (BOS + "User: ..\n\nAssistant: ..<eos>").
    let rendered = "User: Hi there\n\nAssistant: Hello! How can I help?<｜end▁of▁sentence｜>";
    assert_eq!(e.input_ids, tok.encode(rendered).unwrap());
    assert_eq!(
        tok.decode(&e.input_ids[p.source_len..], false).unwrap(),
        " Hello! How can I help?<｜end▁of▁sentence｜>"
    );

    // Splitting after "Assistant: " instead would make the prompt end in a lone space token,
    // merged into " Hello" in the full text: the reference rule would then mask the first answer
    // token. The summary counts that as a boundary mismatch.
    let naive = Template::Custom {
        prompt: "User: {instruction}\n\nAssistant: ".into(),
        target: "{output}<｜end▁of▁sentence｜>".into(),
    };
    let q = build_example(&record, &tok, &naive, InputPolicy::Ignore, 512).unwrap();
    assert_eq!(q.example.input_ids, e.input_ids, "same text, same ids");
    assert!(q.boundary_mismatch);
    assert_eq!(
        q.source_len,
        p.source_len + 1,
        "one answer token lost to the mask"
    );
    let records = moe_peft_data::synthetic::tiny_instruct(50, 1);
    let cfg = |template| PreprocessConfig {
        template,
        progress: false,
        ..Default::default()
    };
    let (_, s) = build_examples(&records, &tok, &cfg(Template::DeepSeekChat)).unwrap();
    assert_eq!(s.boundary_mismatches, 0);
    let (_, s) = build_examples(&records, &tok, &cfg(naive)).unwrap();
    // Answers that start with a word ("Ġword" merges); digits are split off on their own.
    let word_answers = records
        .iter()
        .filter(|r| r.output.starts_with(|c: char| c.is_ascii_alphabetic()))
        .count();
    assert_eq!(word_answers, 29);
    assert_eq!(s.boundary_mismatches, word_answers);
}

#[test]
fn custom_template_and_input_policy() {
    let tok = deepseek();
    let record = Record::new("Translate to French.", "Bonjour").with_input("Hello");
    let t = Template::Custom {
        prompt: "### Q: {instruction}\n### Input: {input}\n### A:\n".into(),
        target: "{output}".into(),
    };
    let p = build_example(&record, &tok, &t, InputPolicy::Ignore, 512).unwrap();
    assert_eq!(
        tok.decode(&p.example.input_ids[1..], false).unwrap(),
        "### Q: Translate to French.\n### Input: Hello\n### A:\nBonjour"
    );
    let p = build_example(
        &record,
        &tok,
        &Template::Reference,
        InputPolicy::AppendToInstruction,
        512,
    )
    .unwrap();
    let text = tok.decode(&p.example.input_ids[1..], false).unwrap();
    assert!(
        text.contains(
            "### Instruction:\nTranslate to French.\n\nHello\n### Response:\nBonjour\n<|EOT|>"
        ),
        "{text}"
    );
    // An empty target adds no token: counted as NoTargetTokens.
    let empty = Template::Custom {
        prompt: "{instruction}\n".into(),
        target: "{output}".into(),
    };
    let p = build_example(
        &Record::new("x", ""),
        &tok,
        &empty,
        InputPolicy::Ignore,
        512,
    )
    .unwrap();
    assert_eq!(p.drop, Some(DropReason::NoTargetTokens));
}

#[test]
fn collate_matches_reference_collator() {
    let tok = deepseek();
    let reference = json("data/reference_preprocess.json");
    assert_eq!(reference["pad_token_id"], 100001);
    let examples: Vec<_> = reference["cases"].as_array().unwrap()[..3]
        .iter()
        .map(|c| {
            let record = Record::new(
                c["instruction"].as_str().unwrap(),
                c["output"].as_str().unwrap(),
            );
            build_example(
                &record,
                &tok,
                &Template::Reference,
                InputPolicy::Ignore,
                512,
            )
            .unwrap()
            .example
        })
        .collect();
    let rows: Vec<_> = examples.iter().collect();
    let batch = moe_peft_data::collate(&rows, &[0, 1, 2], tok.pad_id(), None);
    let flat = |key: &str| -> Vec<i64> {
        reference["collated_first_3"][key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(ints)
            .collect()
    };
    let width = reference["collated_first_3"]["input_ids"][0]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(batch.seq_len, width);
    assert_eq!(
        batch
            .input_ids
            .iter()
            .map(|&x| i64::from(x))
            .collect::<Vec<_>>(),
        flat("input_ids")
    );
    assert_eq!(batch.labels, flat("labels"));
    // With the reference template no EOS occurs inside a row, so `input_ids != pad` (reference)
    // and our length-based mask agree.
    assert_eq!(
        batch
            .attention_mask
            .iter()
            .map(|&x| i64::from(x))
            .collect::<Vec<_>>(),
        flat("attention_mask")
    );
}
