//! The tokenizer wrapper against `fixtures/tokenizer/expected.json` (Python `tokenizers` and
//! transformers' `LlamaTokenizerFast`), plus the `<|EOT|>` finding.

mod common;

use common::{deepseek, fixture, ids, json, raw};
use moe_peft_data::{Error, TextTokenizer, TokenizerSettings};

#[test]
fn expected_json_samples_match_python() {
    let tok = deepseek();
    let exp = json("tokenizer/expected.json");
    let samples = exp["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    for s in samples {
        let name = s["name"].as_str().unwrap();
        let text = s["text"].as_str().unwrap();
        // Raw ids (tokenizers.Tokenizer.encode(text, add_special_tokens=False)).
        assert_eq!(
            tok.encode_raw(text).unwrap(),
            ids(&s["ids"]),
            "{name}: raw ids"
        );
        let hf = ids(&s["ids_hf_fast_tokenizer"]);
        if name == "chat_template" {
            // The rendered chat string already holds BOS; HF was called with add_special_tokens=False.
            assert_eq!(tok.encode_raw(text).unwrap(), hf, "{name}");
        } else {
            // LlamaTokenizerFast with add_bos_token prepends BOS 100000.
            assert_eq!(tok.encode(text).unwrap(), hf, "{name}: with BOS");
            assert_eq!(hf[0], 100000);
        }
        assert_eq!(
            tok.decode(&ids(&s["ids"]), false).unwrap(),
            s["decoded"].as_str().unwrap()
        );
    }
}

#[test]
fn special_tokens_from_config() {
    let tok = deepseek();
    assert_eq!(tok.bos_id(), Some(100000));
    assert_eq!(tok.eos_id(), Some(100001));
    assert_eq!(tok.pad_id(), 100001, "pad = <｜end▁of▁sentence｜>");
    assert!(tok.settings().add_bos_token);
    assert!(!tok.settings().add_eos_token);
    assert_eq!(tok.model_max_length(), Some(16384));
    assert_eq!(tok.vocab_size(), 100002);
    // The raw tokenizer.json post-processor adds no BOS, even with add_special_tokens=true.
    let raw = raw();
    let enc = raw.encode("Hello world", true).unwrap();
    assert_ne!(enc.get_ids()[0], 100000);
    assert_eq!(tok.encode("Hello world").unwrap()[1..], *enc.get_ids());
}

#[test]
fn eot_is_plain_text_not_a_token() {
    let tok = deepseek();
    // Not in the vocabulary and not an added token: only BOS and EOS are added tokens.
    assert_eq!(tok.token_to_id("<|EOT|>"), None);
    assert!(!tok.is_single_token("<|EOT|>").unwrap());
    let eot = tok.encode_raw("<|EOT|>").unwrap();
    let pieces: Vec<String> = eot.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["<", "|", "E", "OT", "|>"]);
    // Same as transformers' LlamaTokenizerFast (reference_preprocess.json, generated in Python).
    let reference = json("data/reference_preprocess.json");
    assert_eq!(eot, ids(&reference["eot"]["ids"]));
    assert_eq!(reference["eot"]["in_vocab"], false);
    // After "\n" (how the reference target ends) the pieces are the same, preceded by Ċ (185).
    let tail = tok.encode_raw("answer\n<|EOT|>").unwrap();
    assert_eq!(tail[tail.len() - 6..], [185, 27, 91, 36, 2787, 66325]);
    // Whereas the DeepSeek EOS text is one added token.
    assert_eq!(
        tok.encode_raw("<｜end▁of▁sentence｜>").unwrap(),
        vec![100001]
    );
}

#[test]
fn truncation_keeps_bos_and_cuts_right() {
    let tok = deepseek();
    let text = "The quick brown fox jumps over the lazy dog.";
    let full = tok.encode(text).unwrap();
    let (cut, truncated) = tok.encode_truncated(text, 5).unwrap();
    assert!(truncated);
    assert_eq!(cut, full[..5]);
    assert_eq!(cut[0], 100000);
    let (same, truncated) = tok.encode_truncated(text, full.len()).unwrap();
    assert!(!truncated);
    assert_eq!(same, full);
    assert!(matches!(
        tok.encode_truncated(text, 1),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn explicit_files_and_settings() {
    // Without tokenizer_config.json there is no BOS and no pad token.
    let e = TextTokenizer::from_files(fixture("tokenizer/tokenizer.json"), None).unwrap_err();
    assert!(matches!(e, Error::NoPadToken), "{e}");
    let settings = TokenizerSettings {
        eos_token: Some("<｜end▁of▁sentence｜>".into()),
        ..Default::default()
    };
    let t = TextTokenizer::new(raw(), settings).unwrap();
    assert_eq!(t.pad_id(), 100001);
    assert_eq!(t.encode("Hello").unwrap(), vec![17464]);
    let bad = TokenizerSettings {
        pad_token: Some("<pad>".into()),
        ..Default::default()
    };
    assert!(matches!(
        TextTokenizer::new(raw(), bad),
        Err(Error::UnknownToken { role: "pad", .. })
    ));
    let missing = TextTokenizer::from_dir(fixture("nonexistent"));
    assert!(matches!(missing, Err(Error::Io { .. })));
}
