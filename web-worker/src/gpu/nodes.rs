//! The spec's layer graph as the WGSL engine runs it: [`Node`]s resolved once from the spec (a ReLU right after a
//! dense or conv2d layer fused into that layer's bias kernel, `flatten` a view, a tied head's table marked on its
//! embedding), and the kernel shapes each node records for a batch of `rows` rows.

use starling_core::ModelSpec;
use starling_core::spec::{Activation, Conv2dDims, LayerLayout, Op, Pool2dDims};
use starling_core::transformer::{AttnDims, BlockLayout};

use super::GpuError;
use super::kernels::{
    ConvShape, ElementwiseAct, EmbedShape, EmbedTable, NormShape, PoolKind, PoolShape,
};
use super::layers::{ConvLayer, DenseLayer};
use super::transformer::{BlockLayer, HeadLayer};

/// One layer as the GPU runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Node {
    /// `relu`: the layer's own activation or a ReLU layer right after it, fused into the bias kernel.
    Dense {
        layout: LayerLayout,
        relu: bool,
    },
    Conv {
        dims: Conv2dDims,
        weight: usize,
        bias: usize,
        relu: bool,
    },
    Pool {
        dims: Pool2dDims,
        kind: PoolKind,
    },
    /// `groups`, `plane` as in [`NormShape`] (layer norm: 1, 1; group norm: groups, H·W); `sample_rows` rows of
    /// `len` per sample (layer norm of a flat vector: 1; of a sequence: T, one per position; group norm: groups).
    Norm {
        len: usize,
        sample_rows: usize,
        groups: usize,
        plane: usize,
        eps: f32,
        gamma: usize,
        beta: usize,
    },
    Act(ElementwiseAct),
    /// Token ids → `[T, C]`; `tied`: a tied head writes this table's gradient first, so this layer's adds to it.
    Embed {
        seq: usize,
        vocab: usize,
        width: usize,
        table: usize,
        tied: bool,
    },
    Pos {
        seq: usize,
        width: usize,
        table: usize,
    },
    Block {
        seq: usize,
        width: usize,
        heads: usize,
        block: BlockLayout,
    },
    Head {
        seq: usize,
        width: usize,
        vocab: usize,
        table: usize,
        head: Option<(usize, usize)>,
    },
}

impl Node {
    pub(super) fn has_params(&self) -> bool {
        !matches!(self, Self::Pool { .. } | Self::Act(_))
    }

    /// Per-sample values of the output.
    pub(super) fn out_len(&self, input: usize) -> usize {
        match *self {
            Self::Dense { layout, .. } => layout.outputs,
            Self::Conv { dims, .. } => dims.out_len(),
            Self::Pool { dims, .. } => dims.out_len(),
            Self::Norm { .. } | Self::Act(_) | Self::Pos { .. } | Self::Block { .. } => input,
            Self::Embed { seq, width, .. } => seq * width,
            Self::Head { seq, vocab, .. } => seq * vocab,
        }
    }

    /// Floats per sample a node keeps besides its output (a conv layer's unfolded input and product, a block's
    /// intermediates and sublayer scratch).
    pub(super) fn extra_len(&self) -> usize {
        match *self {
            Self::Conv { .. } => self.conv(1).map_or(0, |c| c.col_len() + c.out_len()),
            Self::Block {
                seq, width, heads, ..
            } => BlockLayer::kept_per_sequence(seq, width, heads) + seq * width,
            _ => 0,
        }
    }

    pub(super) fn block(&self, rows: usize) -> Option<BlockLayer> {
        match *self {
            Self::Block {
                seq,
                width,
                heads,
                block,
            } => Some(BlockLayer {
                dims: AttnDims {
                    batch: rows,
                    seq,
                    width,
                    heads,
                },
                block,
            }),
            _ => None,
        }
    }

    pub(super) fn embed(&self, rows: usize) -> Option<EmbedShape> {
        let (seq, width, kind, table) = match *self {
            Self::Embed {
                seq,
                vocab,
                width,
                table,
                ..
            } => (seq, width, EmbedTable::Token { vocab }, table),
            Self::Pos { seq, width, table } => (seq, width, EmbedTable::Positional, table),
            _ => return None,
        };
        Some(EmbedShape {
            positions: rows * seq,
            width,
            seq,
            kind,
            table,
        })
    }

    pub(super) fn head(&self, rows: usize) -> Option<HeadLayer> {
        match *self {
            Self::Head {
                seq,
                width,
                vocab,
                table,
                head,
            } => Some(HeadLayer {
                rows: rows * seq,
                width,
                vocab,
                table,
                head,
            }),
            _ => None,
        }
    }

    pub(super) fn conv(&self, rows: usize) -> Option<ConvLayer> {
        match *self {
            Self::Conv {
                dims, weight, bias, ..
            } => Some(conv_layer(&dims, weight, bias, rows)),
            _ => None,
        }
    }
}

pub(super) fn conv_layer(dims: &Conv2dDims, weight: usize, bias: usize, rows: usize) -> ConvLayer {
    ConvLayer {
        shape: ConvShape {
            n: rows,
            c: dims.in_c,
            h: dims.in_h,
            w: dims.in_w,
            kh: dims.kernel,
            kw: dims.kernel,
            stride: dims.stride,
            pad: dims.padding,
        },
        out_channels: dims.out_c,
        weight,
        bias,
    }
}

pub(super) fn pool_shape(dims: &Pool2dDims, rows: usize) -> PoolShape {
    PoolShape {
        n: rows,
        c: dims.channels,
        h: dims.in_h,
        w: dims.in_w,
        kh: dims.kernel,
        kw: dims.kernel,
        stride: dims.stride,
        pad: 0,
    }
}

/// Resolves the spec's layers into nodes with their per-sample input and output lengths; fails for layer graphs the
/// WGSL engine has no kernels for (an embedding that is not the first layer), so the caller can run that model on
/// the CPU backend.
pub(super) fn nodes(spec: &ModelSpec) -> Result<Vec<(Node, usize, usize)>, GpuError> {
    let mut out: Vec<(Node, usize, usize)> = Vec::new();
    for plan in spec.plan() {
        let input = plan.input.len();
        let node = match plan.op {
            Op::Dense(layout) => Node::Dense {
                layout,
                relu: layout.activation == Activation::Relu,
            },
            Op::Conv2d { dims, weight, bias } => Node::Conv {
                dims,
                weight,
                bias,
                relu: false,
            },
            Op::MaxPool2d(dims) => Node::Pool {
                dims,
                kind: PoolKind::Max,
            },
            Op::AvgPool2d(dims) => Node::Pool {
                dims,
                kind: PoolKind::Avg { count_pad: true },
            },
            Op::Flatten => continue,
            Op::Relu => {
                if let Some((Node::Dense { relu, .. } | Node::Conv { relu, .. }, _, _)) =
                    out.last_mut()
                {
                    *relu = true;
                    continue;
                }
                Node::Act(ElementwiseAct::Relu)
            }
            Op::Gelu => Node::Act(ElementwiseAct::Gelu),
            Op::LayerNorm {
                dim,
                gamma,
                beta,
                eps,
            } => Node::Norm {
                len: dim,
                sample_rows: input / dim.max(1),
                groups: 1,
                plane: 1,
                eps,
                gamma,
                beta,
            },
            Op::GroupNorm {
                dims,
                gamma,
                beta,
                eps,
            } => Node::Norm {
                len: dims.channels / dims.groups * dims.hw,
                sample_rows: dims.groups,
                groups: dims.groups,
                plane: dims.hw,
                eps,
                gamma,
                beta,
            },
            // Token ids are not differentiable: an embedding after another layer would need a zero input gradient
            // and ids computed on the GPU; no model does that.
            Op::Embedding { .. } if !out.is_empty() => {
                return Err(GpuError::Unsupported {
                    layer: "embedding after another layer",
                });
            }
            Op::Embedding {
                seq,
                vocab,
                width,
                table,
            } => Node::Embed {
                seq,
                vocab,
                width,
                table,
                tied: false,
            },
            Op::PositionalEmbedding { seq, width, table } => Node::Pos { seq, width, table },
            Op::TransformerBlock {
                seq,
                width,
                heads,
                block,
            } => Node::Block {
                seq,
                width,
                heads,
                block,
            },
            Op::LmHead {
                seq,
                width,
                vocab,
                table,
                head,
            } => Node::Head {
                seq,
                width,
                vocab,
                table,
                head,
            },
        };
        let out_len = node.out_len(input);
        out.push((node, input, out_len));
    }
    let tied: Vec<usize> = out
        .iter()
        .filter_map(|(n, ..)| match *n {
            Node::Head {
                table, head: None, ..
            } => Some(table),
            _ => None,
        })
        .collect();
    for (node, ..) in &mut out {
        if let Node::Embed { table, tied: t, .. } = node {
            *t = tied.contains(table);
        }
    }
    Ok(out)
}

pub(super) fn dense(rows: usize, l: &LayerLayout) -> DenseLayer {
    DenseLayer {
        rows,
        inputs: l.inputs,
        outputs: l.outputs,
        weight: l.weight,
        bias: l.bias,
    }
}

pub(super) fn norm_shape(node: &Node, rows: usize) -> NormShape {
    match *node {
        Node::Norm {
            len,
            sample_rows,
            groups,
            plane,
            eps,
            gamma,
            beta,
        } => NormShape {
            rows: rows * sample_rows,
            len,
            groups,
            plane,
            eps,
            gamma,
            beta,
        },
        _ => NormShape::layer(rows, 1, 0.0, 0, 0),
    }
}
