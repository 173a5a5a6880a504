//! Prompt templates: turn a [`Record`] into a `(source, target)` text pair.
//!
//! The training text is `source + target`; the loss is taken on the target only.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::Record;

/// The system prompt of DeepSeek-MoE's `finetune.py` `build_instruction_prompt`, verbatim.
pub const REFERENCE_SYSTEM_PROMPT: &str = "You are an AI assistant, developed by DeepSeek Company. For politically sensitive questions, security and privacy issues, you will refuse to answer.";

/// The end-of-turn marker the reference appends to every target (`EOT_TOKEN = "<|EOT|>"`).
///
/// In the DeepSeekMoE / DeepSeek LLM vocabulary this is **not** a special token: it is plain text
/// and tokenizes to five BPE pieces, `<` `|` `E` `OT` `|>` (ids 27, 91, 36, 2787, 66325). It is a
/// DeepSeek-Coder special token that the MoE script inherited. We keep it for fidelity to the
/// reference.
pub const REFERENCE_EOT: &str = "<|EOT|>";

/// The DeepSeek end-of-sentence token text (id 100001 in the DeepSeek LLM / MoE vocabulary).
pub const DEEPSEEK_EOS: &str = "<｜end▁of▁sentence｜>";

/// How a record is rendered into source (prompt) and target (answer) text.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Template {
    /// Exactly DeepSeek-MoE `finetune.py`:
    ///
    /// source = `"{REFERENCE_SYSTEM_PROMPT}\n### Instruction:\n{instruction.strip()}\n### Response:\n"`,
    /// target = `"{output}\n<|EOT|>"`.
    ///
    /// `strip()` is Python's `str.strip()` with no argument (see [`py_strip`]). The output is not
    /// stripped. BOS is added by the tokenizer, not by the template.
    #[default]
    Reference,
    /// DeepSeek LLM / MoE chat format, as the tokenizer's `chat_template` renders one user turn and
    /// one assistant turn: `User: {instruction}\n\nAssistant: {output}<｜end▁of▁sentence｜>` (BOS is
    /// added by the tokenizer).
    ///
    /// The source/target split is placed **before** the space that follows `Assistant:`
    /// (source `"User: {instruction}\n\nAssistant:"`, target `" {output}<｜end▁of▁sentence｜>"`).
    /// The concatenated text is identical to the chat template, and the source is what the
    /// template renders with `add_generation_prompt=True`. Splitting after the space instead would
    /// make the source end in a lone `Ġ` token that, in the full text, is merged into the first
    /// answer word, so the reference's "tokenize source separately" rule would mask the first
    /// answer token.
    DeepSeekChat,
    /// User-defined templates with `{instruction}`, `{input}` and `{output}` placeholders.
    ///
    /// Substitution is a single left-to-right pass, so braces inside the record's text are never
    /// re-interpreted. `{{` and `}}` produce literal braces; any other `{...}` is kept verbatim.
    /// `{input}` is the record's input or the empty string.
    Custom {
        /// Source (prompt) template.
        prompt: String,
        /// Target (answer) template; should contain `{output}`.
        target: String,
    },
}

/// Whether the record's `input` field goes into the instruction.
///
/// The reference script ignores `input` entirely (Open-Platypus rows almost always have an empty
/// `input`), so the default is [`InputPolicy::Ignore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputPolicy {
    /// Ignore `input` (the reference behaviour).
    #[default]
    Ignore,
    /// If `input` is non-empty after trimming whitespace, the instruction becomes
    /// `"{instruction}\n\n{input}"` before the template is applied. (A `Custom` template can use
    /// `{input}` directly instead.)
    AppendToInstruction,
}

/// Python's `str.isspace()` for one character.
///
/// Python counts as whitespace the characters of bidirectional class WS, B or S or category Zs.
/// That is Rust's [`char::is_whitespace`] (the Unicode `White_Space` property) plus the four ASCII
/// separators U+001C..U+001F, which Python treats as whitespace and Rust does not.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no argument.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

impl Template {
    /// Checks a custom template: the target must contain `{output}` and placeholders must be
    /// known.
    pub fn validate(&self) -> Result<()> {
        if let Template::Custom { prompt, target } = self {
            for (name, t) in [("prompt", prompt), ("target", target)] {
                for p in placeholders(t) {
                    if !matches!(p.as_str(), "instruction" | "input" | "output") {
                        return Err(Error::InvalidConfig(format!(
                            "custom {name} template has unknown placeholder `{{{p}}}` (use {{instruction}}, {{input}}, {{output}}; write {{{{ for a literal brace)"
                        )));
                    }
                }
            }
            if !placeholders(target).iter().any(|p| p == "output") {
                return Err(Error::InvalidConfig(
                    "custom target template must contain {output}".into(),
                ));
            }
        }
        Ok(())
    }

    /// The text every rendered source starts with, cut after its last line break (`None` when
    /// that leaves nothing). With a tokenizer where a line break is a token boundary
    /// ([`TextTokenizer::splits_at_line_breaks`](crate::TextTokenizer::splits_at_line_breaks)),
    /// this part is tokenized once for the whole dataset. For the reference template it is the
    /// system prompt line and `### Instruction:\n`.
    pub fn constant_prefix(&self) -> Option<String> {
        let literal = match self {
            Template::Reference => format!("{REFERENCE_SYSTEM_PROMPT}\n### Instruction:\n"),
            Template::DeepSeekChat => return None,
            Template::Custom { prompt, .. } => {
                // The literal text before the first placeholder, with `{{`/`}}` unescaped.
                let (mut i, b) = (0, prompt.as_bytes());
                while i < b.len() {
                    match b[i] {
                        b'{' if b.get(i + 1) == Some(&b'{') => i += 2,
                        b'}' if b.get(i + 1) == Some(&b'}') => i += 2,
                        b'{' => break,
                        _ => i += 1,
                    }
                }
                substitute(&prompt[..i], &|_| None)
            }
        };
        let end = literal.rfind(['\n', '\r'])? + 1;
        Some(literal[..end].to_string())
    }

    /// Renders `(source, target)` for one record.
    pub fn render(&self, record: &Record, input_policy: InputPolicy) -> (String, String) {
        let input = record.input.as_deref().unwrap_or("");
        let merged;
        let instruction = match input_policy {
            InputPolicy::AppendToInstruction if !input.trim().is_empty() => {
                merged = format!("{}\n\n{}", record.instruction, input);
                merged.as_str()
            }
            _ => record.instruction.as_str(),
        };
        match self {
            Template::Reference => (
                format!(
                    "{REFERENCE_SYSTEM_PROMPT}\n### Instruction:\n{}\n### Response:\n",
                    py_strip(instruction)
                ),
                format!("{}\n{REFERENCE_EOT}", record.output),
            ),
            Template::DeepSeekChat => (
                format!("User: {instruction}\n\nAssistant:"),
                format!(" {}{DEEPSEEK_EOS}", record.output),
            ),
            Template::Custom { prompt, target } => {
                let vars = |name: &str| match name {
                    "instruction" => Some(instruction),
                    "input" => Some(input),
                    "output" => Some(record.output.as_str()),
                    _ => None,
                };
                (substitute(prompt, &vars), substitute(target, &vars))
            }
        }
    }
}

/// The `{name}` placeholders of a template (escaped `{{`/`}}` skipped).
fn placeholders(t: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => i += 2,
            b'}' if b.get(i + 1) == Some(&b'}') => i += 2,
            b'{' => {
                if let Some(end) = t[i + 1..].find('}') {
                    out.push(t[i + 1..i + 1 + end].to_string());
                    i += end + 2;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

fn substitute<'a>(t: &str, vars: &dyn Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(t.len() + 256);
    let mut rest = t;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if let Some(after) = tail.strip_prefix('{') {
            match after
                .find('}')
                .and_then(|end| Some((end, vars(&after[..end])?)))
            {
                Some((end, value)) => {
                    out.push_str(value);
                    rest = &after[end + 1..];
                }
                None => {
                    out.push('{');
                    rest = after;
                }
            }
        } else {
            out.push('}');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_template_verbatim() {
        let r = Record::new("  What is 2+2?\n", "4");
        let (s, t) = Template::Reference.render(&r, InputPolicy::Ignore);
        assert_eq!(
            s,
            "You are an AI assistant, developed by DeepSeek Company. For politically sensitive questions, security and privacy issues, you will refuse to answer.\n### Instruction:\nWhat is 2+2?\n### Response:\n"
        );
        assert_eq!(t, "4\n<|EOT|>");
    }

    #[test]
    fn python_strip_semantics() {
        assert_eq!(py_strip("\u{1c}\u{a0} x y\u{3000}\t\u{1f}"), "x y");
        assert_eq!(py_strip("\u{200b}x"), "\u{200b}x"); // ZWSP is not whitespace in Python either
        assert!(is_py_space('\u{85}'));
        assert!(!is_py_space('a'));
    }

    #[test]
    fn input_policy() {
        let r = Record::new("Summarize.", "ok").with_input("Some text.");
        let (s, _) = Template::Reference.render(&r, InputPolicy::Ignore);
        assert!(!s.contains("Some text."));
        let (s, _) = Template::Reference.render(&r, InputPolicy::AppendToInstruction);
        assert!(s.contains("### Instruction:\nSummarize.\n\nSome text.\n### Response:\n"));
        let blank = Record::new("Summarize.", "ok").with_input("  ");
        let (s, _) = Template::Reference.render(&blank, InputPolicy::AppendToInstruction);
        assert!(s.contains("### Instruction:\nSummarize.\n### Response:\n"));
    }

    #[test]
    fn deepseek_chat() {
        let r = Record::new("Hi", "Hello!");
        let (s, t) = Template::DeepSeekChat.render(&r, InputPolicy::Ignore);
        assert_eq!(
            format!("{s}{t}"),
            "User: Hi\n\nAssistant: Hello!<｜end▁of▁sentence｜>"
        );
        assert_eq!(s, "User: Hi\n\nAssistant:");
    }

    #[test]
    fn custom_single_pass() {
        let t = Template::Custom {
            prompt: "Q: {instruction} [{input}] {{x}}\n".into(),
            target: "{output}</s>".into(),
        };
        t.validate().unwrap();
        let r = Record::new("say {output}", "done").with_input("ctx");
        let (s, tg) = t.render(&r, InputPolicy::Ignore);
        assert_eq!(s, "Q: say {output} [ctx] {x}\n");
        assert_eq!(tg, "done</s>");
        let bad = Template::Custom {
            prompt: "{instruction}".into(),
            target: "no output".into(),
        };
        assert!(bad.validate().is_err());
        let bad = Template::Custom {
            prompt: "{instr}".into(),
            target: "{output}".into(),
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn serde_roundtrip() {
        for t in [
            Template::Reference,
            Template::DeepSeekChat,
            Template::Custom {
                prompt: "a{instruction}".into(),
                target: "{output}".into(),
            },
        ] {
            let j = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<Template>(&j).unwrap(), t);
        }
        assert_eq!(
            serde_json::to_string(&Template::Reference).unwrap(),
            r#"{"type":"reference"}"#
        );
    }
}
