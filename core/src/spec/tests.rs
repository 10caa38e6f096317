//! Spec tests: v1 compatibility (same model, same layout, same initial values), shape inference, the parameter
//! layout of each layer kind, and every validation message.

use super::*;

const V1: &str = r#"{"input": 784, "layers": [{"units": 128, "activation": "relu"}, {"units": 10, "activation": "none"}]}"#;

/// The demo-sized CNN of docs/PROTOCOL.md's example.
const CNN: &str = r#"{"input": [1, 28, 28], "layers": [
    {"type": "conv2d", "out_channels": 16, "kernel": 5, "stride": 1, "padding": 2}, {"type": "relu"},
    {"type": "max_pool2d", "kernel": 2, "stride": 2},
    {"type": "conv2d", "out_channels": 32, "kernel": 5, "padding": 2}, {"type": "relu"},
    {"type": "max_pool2d", "kernel": 2},
    {"type": "flatten"}, {"type": "dense", "units": 10}]}"#;

#[test]
fn mnist_layout_is_documented_one() {
    let spec = ModelSpec::mnist_mlp();
    spec.validate().unwrap();
    assert_eq!(spec.param_count(), 784 * 128 + 128 + 128 * 10 + 10);
    let layout = spec.dense_layout().unwrap();
    assert_eq!(layout[0].weight, 0);
    assert_eq!(layout[0].bias, 784 * 128);
    assert_eq!(layout[1].weight, 784 * 128 + 128);
    assert_eq!(layout[1].bias, 784 * 128 + 128 + 1280);
    assert_eq!(layout[0].activation, Activation::Relu);
}

#[test]
fn v1_specs_parse_to_the_same_model_as_before() {
    let v1 = ModelSpec::from_json(V1).unwrap();
    assert_eq!(v1, ModelSpec::mnist_mlp());
    assert_eq!(v1.input_len(), 784);
    // Written the v2 way (a separate relu layer, `[784]` input), it is the same model: same layout, same init.
    let v2 = ModelSpec::from_json(
        r#"{"input": [784], "layers": [{"type": "dense", "units": 128}, {"type": "relu"}, {"type": "dense", "units": 10}]}"#,
    )
    .unwrap();
    assert_eq!(v2.dense_layout(), v1.dense_layout());
    assert_eq!(v2.param_count(), v1.param_count());
    assert_eq!(v2.init_params(3), v1.init_params(3));
    // What the coordinator stores and sends parses back to the same spec.
    let again = ModelSpec::from_json(&serde_json::to_string(&v1).unwrap()).unwrap();
    assert_eq!(again, v1);
    // Mixed: a v1 layer after v2 layers.
    let mixed = ModelSpec::from_json(
        r#"{"input": 784, "layers": [{"type": "dense", "units": 128, "activation": "relu"}, {"units": 10, "activation": "none"}]}"#,
    )
    .unwrap();
    assert_eq!(mixed, v1);
}

#[test]
fn cnn_shapes_and_layout() {
    let spec = ModelSpec::from_json(CNN).unwrap();
    assert_eq!(spec.input_len(), 784);
    assert_eq!(spec.classes(), 10);
    assert_eq!(spec.dense_layout(), None);
    let plans = spec.plan();
    let shapes: Vec<String> = plans.iter().map(|p| p.output.to_string()).collect();
    assert_eq!(
        shapes,
        [
            "[16, 28, 28]",
            "[16, 28, 28]",
            "[16, 14, 14]",
            "[32, 14, 14]",
            "[32, 14, 14]",
            "[32, 7, 7]",
            "[1568]",
            "[10]"
        ]
    );
    let Op::Conv2d { dims, weight, bias } = plans[0].op else {
        panic!("layer 0 is a conv")
    };
    assert_eq!((weight, bias, dims.weight_len()), (0, 16 * 25, 16 * 25));
    let Op::Conv2d { weight, bias, .. } = plans[3].op else {
        panic!("layer 3 is a conv")
    };
    assert_eq!((weight, bias), (16 * 25 + 16, 16 * 25 + 16 + 32 * 16 * 25));
    let Op::Dense(d) = plans[7].op else {
        panic!("layer 7 is dense")
    };
    assert_eq!((d.inputs, d.outputs, d.weight), (1568, 10, bias + 32));
    assert_eq!(spec.param_count(), 416 + 12_832 + 15_690);
    assert_eq!(
        plans.iter().map(|p| p.len).sum::<usize>(),
        spec.param_count()
    );
    assert_eq!(
        spec.forward_macs_per_row(),
        (16 * 28 * 28 * 25 + 32 * 14 * 14 * 400 + 15_680) as u64
    );
}

#[test]
fn init_is_deterministic_he_normal() {
    let spec = ModelSpec::mnist_mlp();
    let a = spec.init_params(7);
    assert_eq!(a, spec.init_params(7));
    assert_ne!(a, spec.init_params(8));
    let l0 = spec.dense_layout().unwrap()[0];
    let w = &a[l0.weight..l0.bias];
    let var = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64;
    assert!(
        (var - 2.0 / 784.0).abs() < 0.1 * 2.0 / 784.0,
        "variance {var}"
    );
    assert!(a[l0.bias..l0.bias + 128].iter().all(|b| *b == 0.0));
    // Conv weights: N(0, 2 / (in_c·k²)); norms: γ = 1, β = 0.
    let cnn = ModelSpec::from_json(
        r#"{"input": [3, 8, 8], "layers": [{"type": "conv2d", "out_channels": 64, "kernel": 3, "padding": 1},
            {"type": "group_norm", "groups": 4}, {"type": "flatten"}, {"type": "layer_norm"},
            {"type": "dense", "units": 2}]}"#,
    )
    .unwrap();
    let p = cnn.init_params(1);
    let plans = cnn.plan();
    let Op::Conv2d { weight, bias, .. } = plans[0].op else {
        panic!("conv")
    };
    let w = &p[weight..bias];
    let var = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64;
    assert!(
        (var - 2.0 / 27.0).abs() < 0.1 * 2.0 / 27.0,
        "conv variance {var}"
    );
    for plan in &plans[1..4] {
        if let Op::GroupNorm { gamma, beta, .. } | Op::LayerNorm { gamma, beta, .. } = plan.op {
            assert!(p[gamma..beta].iter().all(|g| *g == 1.0));
            assert!(p[beta..beta + (beta - gamma)].iter().all(|b| *b == 0.0));
        }
    }
    assert_eq!(plans[1].len, 2 * 64);
    assert_eq!(plans[3].len, 2 * 64 * 64);
}

#[test]
fn invalid_specs_are_rejected_with_reasons() {
    let bad = |json: &str| ModelSpec::from_json(json).unwrap_err();
    let msg = |json: &str| bad(json).to_string();
    assert_eq!(
        bad(r#"{"input":0,"layers":[{"units":2,"activation":"none"}]}"#),
        SpecError::Input("0".into())
    );
    assert_eq!(bad(r#"{"input":4,"layers":[]}"#), SpecError::LayerCount(0));
    assert_eq!(
        bad(
            r#"{"input":4,"layers":[{"units":0,"activation":"relu"},{"units":2,"activation":"none"}]}"#
        ),
        SpecError::Units { layer: 0, units: 0 }
    );
    assert_eq!(
        bad(r#"{"input":4,"layers":[{"units":3,"activation":"relu"}]}"#),
        SpecError::LastActivation
    );
    assert_eq!(
        bad(r#"{"input":4,"layers":[{"units":3},{"type":"relu"}]}"#),
        SpecError::LastActivation
    );
    assert!(
        matches!(bad(r#"{"input":4,"layers":[{"units":3,"activation":"tanh"}]}"#), SpecError::Json(m) if m.contains("tanh") && m.contains("layer 0"))
    );
    assert_eq!(
        bad(
            r#"{"input":65536,"layers":[{"units":65536,"activation":"relu"},{"units":2,"activation":"none"}]}"#
        ),
        SpecError::TooManyParams(65536 * 65536 + 65536 + 65536 * 2 + 2)
    );
    assert!(msg(r#"{"input":[1,2],"layers":[{"units":2}]}"#).contains("[channels, height, width]"));
    assert!(msg(r#"{"input":[1,28,0],"layers":[{"units":2}]}"#).contains("got [1,28,0]"));
    let cnn = |layers: &str| {
        format!(
            r#"{{"input":[3,7,7],"layers":[{layers},{{"type":"flatten"}},{{"type":"dense","units":2}}]}}"#
        )
    };
    assert!(
        msg(&cnn(r#"{"type":"conv2d","out_channels":4,"kernel":9}"#)).contains(
            "layer 0 (conv2d): the input [3, 7, 7] padded by 0 is smaller than the 9×9 kernel"
        )
    );
    assert!(
        msg(&cnn(
            r#"{"type":"conv2d","out_channels":4,"kernel":3,"padding":3}"#
        ))
        .contains("padding 3 must be smaller than the kernel 3")
    );
    assert!(
        msg(&cnn(r#"{"type":"conv2d","out_channels":0,"kernel":3}"#))
            .contains("out_channels must be between 1")
    );
    assert!(
        msg(&cnn(
            r#"{"type":"conv2d","out_channels":4,"kernel":3,"stride":0}"#
        ))
        .contains("stride must be between 1")
    );
    assert!(
        msg(&cnn(r#"{"type":"max_pool2d","kernel":8}"#))
            .contains("layer 0 (max_pool2d): the input [3, 7, 7] is smaller than the 8×8 window")
    );
    assert!(
        msg(&cnn(r#"{"type":"group_norm","groups":2}"#))
            .contains("groups must divide the 3 channels, got 2")
    );
    assert!(msg(&cnn(r#"{"type":"layer_norm"}"#)).contains("use group_norm"));
    assert!(
        msg(&cnn(r#"{"type":"group_norm","groups":1,"eps":0}"#)).contains("eps must be in (0, 1]")
    );
    assert!(
        msg(&cnn(
            r#"{"type":"conv2d","out_channels":4,"kernel":3,"dilation":2}"#
        ))
        .contains("dilation")
    );
    assert!(msg(&cnn(r#"{"type":"batch_norm"}"#)).contains("unknown variant `batch_norm`"));
    assert!(msg(r#"{"input":[1,4,4],"layers":[{"type":"dense","units":2}]}"#)
        .contains("layer 0 (dense): dense needs a flat input, got the image [1, 4, 4]: add {\"type\": \"flatten\"} before it"));
    assert!(
        msg(r#"{"input":4,"layers":[{"type":"conv2d","out_channels":1,"kernel":1},{"units":2}]}"#)
            .contains("conv2d needs a [channels, height, width] input, got [4]")
    );
    // 4096 channels of 4096×4096 would overflow 32-bit sizes: a clear error, not a panic (wasm32 included).
    assert!(msg(r#"{"input":[4096,4096,4096],"layers":[{"units":2}]}"#).contains("input must be"));
    assert!(msg(r#"{"input":[1,1024,1024],"layers":[{"type":"conv2d","out_channels":4096,"kernel":1},{"type":"flatten"},{"units":2}]}"#)
        .contains("more than 4194304 values per row"));
}
