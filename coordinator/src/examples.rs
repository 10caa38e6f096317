//! A job's examples: the rows of a classifier's dataset, or the windows of a language model's token stream
//! (issue 13), behind one interface, so the scheduler leases, recomputes and evaluates either the same way.
//!
//! For a token stream a "row" is a window start `s` (`core::tokens::TokenStream`): its features are the ids
//! `s..s + T` as f32 and its labels the next tokens `s + 1..s + T + 1`, so a batch of `r` rows carries `r × T`
//! features and `r × T` labels (`ModelSpec::labels_per_row` is `T`).

use std::borrow::Cow;

use starling_core::data::{DataError, Dataset, encode_raw, parse_upload};
use starling_core::tokens::{TokenDataset, TokenError, TokenStream, encode_tokens, parse_tokens};

/// One side (training or held-out) of a job's data.
#[derive(Debug, Clone, PartialEq)]
pub enum Examples {
    /// A classifier's rows: features and one label each.
    Rows(Dataset),
    /// A token stream cut into windows of the context length.
    Tokens {
        stream: TokenStream,
        /// Ids are `0..vocab_size`.
        vocab_size: u32,
        /// The text of each id, when the owner uploaded it (samples and the export's `starling.vocab`).
        vocab: Option<Vec<String>>,
    },
}

impl From<Dataset> for Examples {
    fn from(d: Dataset) -> Self {
        Self::Rows(d)
    }
}

/// Why stored examples could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ExamplesError {
    #[error(transparent)]
    Rows(#[from] DataError),
    #[error(transparent)]
    Tokens(#[from] TokenError),
}

impl Examples {
    /// Rows a step may draw: a dataset's rows, or a stream's window starts.
    pub fn rows(&self) -> usize {
        match self {
            Self::Rows(d) => d.rows(),
            Self::Tokens { stream, .. } => stream.windows(),
        }
    }

    /// Features and labels of `rows` (row indices, or window starts), in the lease payload's layout.
    pub fn gather(&self, rows: &[u32]) -> (Vec<f32>, Vec<u32>) {
        match self {
            Self::Rows(d) => d.gather(rows),
            Self::Tokens { stream, .. } => {
                let (ids, targets) = stream.gather(rows);
                (ids.into_iter().map(|i| i as f32).collect(), targets)
            }
        }
    }

    /// The whole held-out set as one batch: every row, or a stream's non-overlapping windows (each held-out
    /// token's prediction counted once, `TokenStream::eval_starts`), so the loss is in nats per token.
    pub fn eval_batch(&self) -> (Cow<'_, [f32]>, Cow<'_, [u32]>) {
        match self {
            Self::Rows(d) => (Cow::Borrowed(&d.features), Cow::Borrowed(&d.labels)),
            Self::Tokens { stream, .. } => {
                let (x, y) = self.gather(&stream.eval_starts());
                (Cow::Owned(x), Cow::Owned(y))
            }
        }
    }

    /// The token vocabulary's text, when this is a token stream that has one.
    pub fn vocab(&self) -> Option<&[String]> {
        match self {
            Self::Tokens { vocab, .. } => vocab.as_deref(),
            Self::Rows(_) => None,
        }
    }

    /// `(context, vocabulary size)` of a token stream; `None` for rows.
    pub fn tokens(&self) -> Option<(usize, u32)> {
        match self {
            Self::Tokens {
                stream, vocab_size, ..
            } => Some((stream.context, *vocab_size)),
            Self::Rows(_) => None,
        }
    }

    /// The stored form: raw `SDS1` for rows, `STK1` (u16 ids when they fit) for tokens.
    pub fn encode(&self) -> Result<Vec<u8>, ExamplesError> {
        match self {
            Self::Rows(d) => Ok(encode_raw(d)),
            Self::Tokens {
                stream,
                vocab_size,
                vocab,
            } => {
                let ds = TokenDataset::new(
                    stream.tokens.clone(),
                    *vocab_size,
                    stream.context as u32,
                    0,
                    vocab.clone(),
                )?;
                let width = if *vocab_size <= u16::MAX as u32 + 1 {
                    2
                } else {
                    4
                };
                Ok(encode_tokens(&ds, width)?)
            }
        }
    }

    /// Reads the stored form back (either format).
    pub fn decode(bytes: &[u8]) -> Result<Self, ExamplesError> {
        if starling_core::tokens::is_token_upload(bytes) {
            let ds = parse_tokens(bytes)?;
            Ok(Self::Tokens {
                stream: TokenStream {
                    tokens: ds.tokens,
                    context: ds.context as usize,
                },
                vocab_size: ds.vocab_size,
                vocab: ds.vocab,
            })
        } else {
            Ok(Self::Rows(parse_upload(bytes)?.train))
        }
    }
}

/// `(token count, context)` from the first bytes of a stored `STK1` stream (`None`: not one), so a listing can
/// count windows without reading the stream.
pub fn token_header(head: &[u8]) -> Option<(u64, u32)> {
    if head.len() < starling_core::tokens::HEADER_BYTES
        || !starling_core::tokens::is_token_upload(head)
    {
        return None;
    }
    let context = u32::from_le_bytes(head[12..16].try_into().ok()?);
    let n = u64::from_le_bytes(head[16..24].try_into().ok()?);
    Some((n, context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_stream_round_trips_and_leases_windows_with_next_token_labels() {
        let ex = Examples::Tokens {
            stream: TokenStream {
                tokens: vec![0, 1, 2, 3, 4, 0, 1],
                context: 3,
            },
            vocab_size: 5,
            vocab: Some(["a", "b", "c", "d", "e"].map(String::from).to_vec()),
        };
        let bytes = ex.encode().expect("encode");
        assert_eq!(Examples::decode(&bytes).expect("decode"), ex);
        assert_eq!(token_header(&bytes), Some((7, 3)));
        assert_eq!(ex.rows(), 4);
        let (x, y) = ex.gather(&[1, 3]);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 3.0, 4.0, 0.0]);
        assert_eq!(y, vec![2, 3, 4, 4, 0, 1]);
        // Non-overlapping evaluation windows: starts 0 and 3.
        let (x, y) = ex.eval_batch();
        assert_eq!(x.len(), 6);
        assert_eq!(&y[..], &[1, 2, 3, 4, 0, 1]);
    }
}
