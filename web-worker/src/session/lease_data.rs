//! The datasets `local_lease`s name (protocol v2), as a worker keeps them: a classifier's rows, or a language
//! model's token stream (whose "rows" are window starts), decoded from a `dataset` payload or a cache entry, checked
//! against their SHA-256, and gathered into a lease's features and labels.

use starling_core::protocol::{DatasetEncoding, decode_dataset, decode_token_dataset};

/// A dataset a `local_lease` names, decoded and checked: a classifier's rows, or a language model's token stream
/// (whose "rows" are window starts).
#[derive(Debug)]
pub(super) enum LeaseData {
    Rows(starling_core::data::Dataset),
    Tokens(starling_core::tokens::TokenStream),
}

impl LeaseData {
    /// Decodes a `dataset` payload (or a cache entry's) in `encoding` and checks it against `sha256`.
    pub(super) fn decode(
        encoding: DatasetEncoding,
        payload: &[u8],
        sha256: &str,
    ) -> Result<Self, String> {
        match encoding {
            DatasetEncoding::Stk1Deflate => decode_token_dataset(encoding, payload, sha256)
                .map(|ds| {
                    Self::Tokens(starling_core::tokens::TokenStream {
                        tokens: ds.tokens,
                        context: ds.context as usize,
                    })
                })
                .map_err(|e| e.to_string()),
            _ => decode_dataset(encoding, payload, sha256)
                .map(Self::Rows)
                .map_err(|e| e.to_string()),
        }
    }

    /// The features and labels of the lease rows `idx` (row indices, or window starts) for a model of `input`
    /// features per row.
    pub(super) fn gather(&self, idx: &[u32], input: usize) -> Result<(Vec<f32>, Vec<u32>), String> {
        match self {
            LeaseData::Rows(ds) => {
                if ds.dim != input {
                    return Err(format!(
                        "dataset rows are {} wide, the model takes {input}",
                        ds.dim
                    ));
                }
                if let Some(bad) = idx.iter().find(|i| **i as usize >= ds.rows()) {
                    return Err(format!(
                        "row {bad} is past the dataset's {} rows",
                        ds.rows()
                    ));
                }
                Ok(ds.gather(idx))
            }
            // A language model's rows are window starts: ids `s..s+T` as f32, the next tokens as labels.
            LeaseData::Tokens(stream) => {
                if stream.context != input {
                    return Err(format!(
                        "the token stream's windows are {} long, the model takes {input}",
                        stream.context
                    ));
                }
                if let Some(bad) = idx.iter().find(|i| **i as usize >= stream.windows()) {
                    return Err(format!(
                        "window {bad} is past the stream's {} windows",
                        stream.windows()
                    ));
                }
                let (ids, targets) = stream.gather(idx);
                Ok((ids.into_iter().map(|i| i as f32).collect(), targets))
            }
        }
    }
}
