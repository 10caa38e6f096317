//! LM checkpoints as safetensors: one named F32 tensor per parameter tensor of [`LmSpec::layout`], with the spec
//! and the vocabulary in the metadata, so `starling job sample` (and numpy / PyTorch) can load them.
//!
//! Names and shapes (C = width, V = vocab, T = context, H4 = 4·C): `tok_emb [V, C]`, `pos_emb [T, C]`, for each
//! block `i`: `blocks.{i}.ln1.gamma [C]`, `.ln1.beta [C]`, `.attn.qkv.weight [C, 3C]`, `.attn.qkv.bias [3C]`,
//! `.attn.out.weight [C, C]`, `.attn.out.bias [C]`, `.ln2.gamma`, `.ln2.beta`, `.mlp.fc.weight [C, H4]`,
//! `.mlp.fc.bias [H4]`, `.mlp.proj.weight [H4, C]`, `.mlp.proj.bias [C]`; then `ln_f.gamma`, `ln_f.beta` and, when
//! untied, `head.weight [C, V]`, `head.bias [V]`. Weights are `[in, out]`: `y = x @ weight + bias` (the transpose
//! of PyTorch's `nn.Linear.weight`). Metadata: `starling.lm_spec` (the spec's JSON), `starling.vocab` (JSON array
//! of the V token strings, when known), `starling.step`.

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};

use super::{BlockLayout, LmSpec, MLP_RATIO};
use crate::data::{DataError, TensorData, encode_safetensors};
use crate::spec::{ModelSpec, Op};

/// Every tensor of the layout: name, shape and offset in the flat buffer, in layout order.
pub fn tensors(spec: &LmSpec) -> Vec<(String, Vec<usize>, usize)> {
    let l = spec.layout();
    let (v, t, c) = (spec.vocab as usize, spec.context as usize, spec.width());
    let mut out = vec![
        ("tok_emb".to_string(), vec![v, c], l.tok),
        ("pos_emb".to_string(), vec![t, c], l.pos),
    ];
    for (i, b) in l.blocks.iter().enumerate() {
        out.extend(
            block_tensors(b, c)
                .into_iter()
                .map(|(name, shape, off)| (format!("blocks.{i}.{name}"), shape, off)),
        );
    }
    out.push(("ln_f.gamma".to_string(), vec![c], l.lnf_gamma));
    out.push(("ln_f.beta".to_string(), vec![c], l.lnf_beta));
    if let Some((w, b)) = l.head {
        out.push(("head.weight".to_string(), vec![c, v], w));
        out.push(("head.bias".to_string(), vec![v], b));
    }
    out
}

/// One block's tensors as `(name, shape, offset)`, in layout order.
pub fn block_tensors(b: &BlockLayout, c: usize) -> Vec<(&'static str, Vec<usize>, usize)> {
    let h = MLP_RATIO * c;
    vec![
        ("ln1.gamma", vec![c], b.ln1_gamma),
        ("ln1.beta", vec![c], b.ln1_beta),
        ("attn.qkv.weight", vec![c, 3 * c], b.qkv_weight),
        ("attn.qkv.bias", vec![3 * c], b.qkv_bias),
        ("attn.out.weight", vec![c, c], b.out_weight),
        ("attn.out.bias", vec![c], b.out_bias),
        ("ln2.gamma", vec![c], b.ln2_gamma),
        ("ln2.beta", vec![c], b.ln2_beta),
        ("mlp.fc.weight", vec![c, h], b.fc_weight),
        ("mlp.fc.bias", vec![h], b.fc_bias),
        ("mlp.proj.weight", vec![h, c], b.proj_weight),
        ("mlp.proj.bias", vec![c], b.proj_bias),
    ]
}

/// A loaded checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LmCheckpoint {
    pub spec: LmSpec,
    pub params: Vec<f32>,
    pub vocab: Option<Vec<String>>,
    pub step: u64,
}

/// Writes a checkpoint (see the module docs for names and metadata).
pub fn to_safetensors(ck: &LmCheckpoint) -> Result<Vec<u8>, DataError> {
    let list = tensors(&ck.spec);
    let views: Vec<(&str, Vec<usize>, TensorData<'_>)> = list
        .iter()
        .map(|(name, shape, off)| {
            let len: usize = shape.iter().product();
            (
                name.as_str(),
                shape.clone(),
                TensorData::F32(&ck.params[*off..*off + len]),
            )
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert(
        "starling.lm_spec".to_string(),
        serde_json::to_string(&ck.spec).map_err(|e| DataError::Shape(e.to_string()))?,
    );
    if let Some(v) = &ck.vocab {
        meta.insert(
            "starling.vocab".to_string(),
            serde_json::to_string(v).map_err(|e| DataError::Shape(e.to_string()))?,
        );
    }
    meta.insert("starling.step".to_string(), ck.step.to_string());
    encode_safetensors(&views, &meta)
}

/// Reads a checkpoint written by [`to_safetensors`], checking every tensor's dtype and shape against the spec.
pub fn from_safetensors(bytes: &[u8]) -> Result<LmCheckpoint, DataError> {
    let bad = |reason: String| DataError::Malformed {
        format: "LM checkpoint",
        reason,
    };
    let file = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    // Either our own LM checkpoint (`starling.lm_spec`, `tok_emb`, …) or a job export of the layer graph
    // (`starling.spec`, `layers.{i}.…`, as `GET /jobs/{id}/checkpoint` writes it).
    let (spec, names) = if let Some(json) = meta.get("starling.lm_spec") {
        let spec = LmSpec::from_json(json).map_err(|e| bad(e.to_string()))?;
        (spec, tensors(&spec))
    } else if let Some(json) = meta.get("starling.spec") {
        let graph = ModelSpec::from_json(json).map_err(|e| bad(e.to_string()))?;
        let spec = LmSpec::from_model_spec(&graph).ok_or_else(|| {
            bad("its model is not a language model (embedding, positional_embedding, transformer blocks, layer_norm, lm_head)".into())
        })?;
        (spec, graph_tensors(&graph))
    } else {
        return Err(bad(
            "no starling.lm_spec or starling.spec metadata: not a Starling checkpoint".into(),
        ));
    };
    let vocab = match meta.get("starling.vocab") {
        Some(v) => Some(
            serde_json::from_str::<Vec<String>>(v)
                .map_err(|e| bad(format!("starling.vocab: {e}")))?,
        ),
        None => None,
    };
    let step = meta
        .get("starling.step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut params = vec![0.0f32; spec.param_count()];
    for (name, shape, off) in names {
        let t = file
            .tensor(&name)
            .map_err(|_| DataError::Shape(format!("tensor `{name}` is missing")))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
            return Err(DataError::Shape(format!(
                "`{name}` is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            )));
        }
        for (dst, c) in params[off..].iter_mut().zip(t.data().chunks_exact(4)) {
            *dst = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(LmCheckpoint {
        spec,
        params,
        vocab,
        step,
    })
}

/// The tensors a job export writes for a language-model graph: `layers.{i}.{suffix}` with the suffixes of
/// [`super::graph::op_tensors`], and `layers.{i}.weight` / `.bias` for a `layer_norm`'s `γ` / `β`.
pub fn graph_tensors(spec: &ModelSpec) -> Vec<(String, Vec<usize>, usize)> {
    let mut out = Vec::new();
    for (i, p) in spec.plan().iter().enumerate() {
        if let Some(list) = super::graph::op_tensors(&p.op) {
            out.extend(
                list.into_iter()
                    .map(|(suffix, shape, off)| (format!("layers.{i}.{suffix}"), shape, off)),
            );
        } else if let Op::LayerNorm {
            dim, gamma, beta, ..
        } = p.op
        {
            out.push((format!("layers.{i}.weight"), vec![dim], gamma));
            out.push((format!("layers.{i}.bias"), vec![dim], beta));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_covers_every_parameter() {
        for tied in [true, false] {
            let spec = LmSpec {
                vocab: 5,
                context: 4,
                width: 8,
                heads: 2,
                layers: 2,
                tied,
            };
            let list = tensors(&spec);
            let covered: usize = list
                .iter()
                .map(|(_, s, _)| s.iter().product::<usize>())
                .sum();
            assert_eq!(covered, spec.param_count());
            let ck = LmCheckpoint {
                spec,
                params: (0..spec.param_count()).map(|i| i as f32).collect(),
                vocab: Some(["a", "b", "c", "d", "\n"].map(String::from).to_vec()),
                step: 42,
            };
            let bytes = to_safetensors(&ck).unwrap();
            assert_eq!(from_safetensors(&bytes).unwrap(), ck);
            assert!(from_safetensors(&bytes[..bytes.len() - 4]).is_err());
        }
        let plain =
            encode_safetensors(&[("x", vec![1], TensorData::F32(&[1.0]))], &BTreeMap::new())
                .unwrap();
        assert!(
            matches!(from_safetensors(&plain), Err(DataError::Malformed { reason, .. }) if reason.contains("lm_spec"))
        );
    }
}
