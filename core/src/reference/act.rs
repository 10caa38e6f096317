//! Plain-loop elementwise activations (the `relu` and `gelu` layers), forward and backward, in f64.
//!
//! GELU is the **tanh form** on every backend: `gelu(x) = ½·x·(1 + tanh(u))`, `u = √(2/π)·(x + 0.044715·x³)`;
//! `gelu'(x) = ½·(1 + tanh(u)) + ½·x·(1 − tanh²(u))·√(2/π)·(1 + 3·0.044715·x²)`.

/// `√(2/π)`.
pub const GELU_C: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh form.
pub const GELU_A: f64 = 0.044_715;

/// `y = max(x, 0)`.
pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = v.max(0.0);
    }
}

/// `dx = dy · [x > 0]` (the gradient at 0 is 0).
pub fn relu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, v), g) in dx.iter_mut().zip(x).zip(dy) {
        *o = if *v > 0.0 { *g } else { 0.0 };
    }
}

/// GELU (tanh form) of one value, in f64.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_C * (x + GELU_A * x * x * x)).tanh())
}

/// The derivative of [`gelu`].
pub fn gelu_grad(x: f64) -> f64 {
    let t = (GELU_C * (x + GELU_A * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)
}

/// `y = gelu(x)`.
pub fn gelu_forward(x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = gelu(*v as f64) as f32;
    }
}

/// `dx = dy · gelu'(x)`.
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, v), g) in dx.iter_mut().zip(x).zip(dy) {
        *o = (*g as f64 * gelu_grad(*v as f64)) as f32;
    }
}
