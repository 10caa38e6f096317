//! The owner's path end to end with the real `starling` binary: token → serve → `job submit` → native workers →
//! `job watch` → `job download` → the safetensors file reloaded in numpy gives the accuracy the coordinator reported.

mod common;
use common::{BIN, Kill, temp_dir};
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use starling_core::data::{TensorData, encode_safetensors};

fn starling(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()?;
    if !out.status.success() {
        bail!(
            "starling {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Three overlapping Gaussian-ish blobs in 6-D: learnable, but not perfectly.
fn blobs(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = starling_core::rng::SplitMix64::new(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        let c = (i % 3) as u32;
        for d in 0..6 {
            let centre = if d % 3 == c as usize { 1.0 } else { 0.0 };
            x.push(centre + 0.8 * rng.normal() as f32);
        }
        y.push(c);
    }
    (x, y)
}

fn start_server(dir: &Path, kill: &mut Kill) -> anyhow::Result<String> {
    let www = Path::new(env!("CARGO_MANIFEST_DIR")).join("../www");
    let mut child = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--db"])
        .arg(dir.join("starling.db"))
        .arg("--www")
        .arg(&www)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    kill.0.push(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("volunteer page http://").nth(1) {
                let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .context("coordinator did not report its address")?;
    Ok(format!("http://{addr}"))
}

#[test]
fn owner_submits_watches_downloads_and_numpy_reproduces_the_accuracy() -> anyhow::Result<()> {
    let dir = temp_dir("cli");
    let db = dir.join("starling.db");
    let token = starling(
        &[
            "token",
            "create",
            "--name",
            "alice",
            "--db",
            db.to_str().unwrap(),
        ],
        &[],
    )?
    .trim()
    .to_string();
    assert!(token.starts_with("stk_"), "{token}");
    assert!(
        starling(
            &[
                "token",
                "create",
                "--name",
                "alice",
                "--db",
                db.to_str().unwrap()
            ],
            &[]
        )
        .is_err(),
        "owner names are unique"
    );

    let mut kill = Kill(Vec::new());
    let url = start_server(&dir, &mut kill)?;
    let (x, y) = blobs(900, 1);
    let (tx, ty) = blobs(300, 2);
    let data = encode_safetensors(
        &[
            ("features", vec![900, 6], TensorData::F32(&x)),
            ("labels", vec![900], TensorData::U32(&y)),
            ("test_features", vec![300, 6], TensorData::F32(&tx)),
            ("test_labels", vec![300], TensorData::U32(&ty)),
        ],
        &Default::default(),
    )?;
    std::fs::write(dir.join("blobs.safetensors"), data)?;
    std::fs::write(
        dir.join("job.toml"),
        r#"name = "blobs"
dataset = "blobs.safetensors"

[spec]
input = 6
layers = [ { units = 16, activation = "relu" }, { units = 3, activation = "none" } ]

[hyper]
global_batch = 64
micro_batch = 16
steps = 120
eval_every = 20
optimizer = { kind = "adam", lr = 0.01 }
"#,
    )?;
    let env = [
        ("STARLING_URL", url.as_str()),
        ("STARLING_TOKEN", token.as_str()),
    ];
    assert!(
        starling(
            &["job", "submit", dir.join("job.toml").to_str().unwrap()],
            &[
                ("STARLING_URL", url.as_str()),
                ("STARLING_TOKEN", "stk_wrong")
            ]
        )
        .is_err()
    );
    let id = starling(
        &["job", "submit", dir.join("job.toml").to_str().unwrap()],
        &env,
    )?
    .trim()
    .to_string();
    assert_eq!(id, "1");

    let ws = format!("{}/ws", url.replace("http://", "ws://"));
    for i in 0..2 {
        kill.0.push(
            Command::new(BIN)
                .args([
                    "worker",
                    "--coordinator",
                    &ws,
                    "--backend",
                    "cpu",
                    "--name",
                    &format!("w{i}"),
                ])
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let started = Instant::now();
    let watch = starling(&["job", "watch", &id], &env)?;
    println!(
        "watch output (last lines):\n{}",
        watch.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
    assert!(watch.contains("[completed]"), "{watch}");
    assert!(started.elapsed() < Duration::from_secs(120));

    // The final evaluation lands just after the last step; wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s: serde_json::Value =
            serde_json::from_str(&starling(&["job", "status", &id, "--json"], &env)?)?;
        if s["last_eval"]["step"] == 120 {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "no final evaluation: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let reported = status["last_eval"]["accuracy"].as_f64().unwrap();
    let model = dir.join("model.safetensors");
    starling(
        &["job", "download", &id, "-o", model.to_str().unwrap()],
        &env,
    )?;

    let script = r#"
import json, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
model, data = sys.argv[1], sys.argv[2]
with safe_open(model, framework="np") as f:
    meta = f.metadata()
w = load_file(model)
d = load_file(data)
spec = json.loads(meta["starling.spec"])
a = d["test_features"]
for i, layer in enumerate(spec["layers"]):
    a = a @ w[f"layers.{i}.weight"] + w[f"layers.{i}.bias"]
    if layer["activation"] == "relu":
        a = np.maximum(a, 0)
acc = float((a.argmax(axis=1) == d["test_labels"]).mean())
print(json.dumps({"accuracy": acc, "step": int(meta["starling.step"]), "meta_accuracy": float(meta["starling.test_accuracy"])}))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&model)
        .arg(dir.join("blobs.safetensors"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "numpy check failed (cargo xtask setup installs numpy and safetensors): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let numpy: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!(
        "coordinator reported {reported:.4}, numpy computed {}",
        numpy["accuracy"]
    );
    assert_eq!(numpy["step"], 120);
    assert!(
        (numpy["accuracy"].as_f64().unwrap() - reported).abs() <= 1.0 / 300.0 + 1e-9,
        "numpy {numpy} vs coordinator {reported}"
    );
    assert!((numpy["meta_accuracy"].as_f64().unwrap() - reported).abs() < 1e-6);
    assert!(reported > 0.6, "the model learned something: {reported}");
    drop(kill);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `starling job sample --checkpoint`: a tiny LM trained here on "abcd" repeated continues a prompt with the
/// pattern at temperature 0 (so the binary loaded every tensor and the vocabulary), and a prompt character outside
/// the vocabulary is refused with a message naming it.
#[test]
fn job_sample_continues_a_prompt_from_an_lm_checkpoint() -> anyhow::Result<()> {
    use starling_core::optim::{Optimizer, OptimizerSpec};
    use starling_core::transformer::export::{LmCheckpoint, to_safetensors};
    use starling_core::transformer::{LmSpec, fast::Fast, forward_backward};
    let spec = LmSpec {
        vocab: 4,
        context: 8,
        width: 16,
        heads: 2,
        layers: 1,
        tied: false,
    };
    let mut params = spec.init_params(3);
    let mut opt = Optimizer::new(OptimizerSpec::default(), params.len());
    // Windows at every phase of the pattern, so the model continues it once the window slides past the prompt.
    let stream: Vec<u32> = (0..40).map(|i| i % 4).collect();
    let ids: Vec<u32> = (0..4).flat_map(|s| stream[s..s + 8].to_vec()).collect();
    let targets: Vec<u32> = (0..4).flat_map(|s| stream[s + 1..s + 9].to_vec()).collect();
    for _ in 0..150 {
        let out = forward_backward(&Fast, &spec, &params, &ids, &targets, 4, 8)?;
        opt.step(&mut params, &out.grad);
    }
    let dir = temp_dir("lm-sample");
    let file = dir.join("lm.safetensors");
    let ck = LmCheckpoint {
        spec,
        params,
        vocab: Some(["a", "b", "c", "d"].map(String::from).to_vec()),
        step: 150,
    };
    std::fs::write(&file, to_safetensors(&ck)?)?;
    let path = file.to_string_lossy().to_string();
    let text = starling(
        &[
            "job",
            "sample",
            "--checkpoint",
            &path,
            "--prompt",
            "ab",
            "--tokens",
            "10",
            "--temperature",
            "0",
        ],
        &[],
    )?;
    assert_eq!(text.trim_end(), "abcdabcdabcd");
    let bad = Command::new(BIN)
        .args(["job", "sample", "--checkpoint", &path, "--prompt", "abx"])
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("'x' is not in the vocabulary"));
    Ok(())
}

/// An LM checkpoint is loadable elsewhere: numpy, following only the names, shapes and math in docs/PROTOCOL.md
/// ("Transformer language models"), computes the same loss as our reference on the same windows, tied and untied.
#[test]
fn lm_checkpoint_reloaded_in_numpy_gives_the_same_loss() -> anyhow::Result<()> {
    use starling_core::transformer::export::{LmCheckpoint, to_safetensors};
    use starling_core::transformer::{LmSpec, evaluate, reference::Reference};
    let script = r#"
import json, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
path, ids, tg = sys.argv[1], np.array(json.loads(sys.argv[2])), np.array(json.loads(sys.argv[3]))
with safe_open(path, "np") as f:
    spec = json.loads(f.metadata()["starling.lm_spec"])
t = {k: v.astype(np.float64) for k, v in load_file(path).items()}
B, T = ids.shape
C, H = spec["width"], spec["heads"]
D = C // H
def ln(x, g, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return g * (x - m) / np.sqrt(v + 1e-5) + b
def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
heads = lambda a: a.reshape(B, T, H, D).transpose(0, 2, 1, 3)
x = t["tok_emb"][ids] + t["pos_emb"][:T]
for i in range(spec["layers"]):
    p = lambda n: t[f"blocks.{i}.{n}"]
    qkv = ln(x, p("ln1.gamma"), p("ln1.beta")) @ p("attn.qkv.weight") + p("attn.qkv.bias")
    q, k, v = (heads(a) for a in np.split(qkv, 3, axis=-1))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    y = (pr @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    x = x + y @ p("attn.out.weight") + p("attn.out.bias")
    h = ln(x, p("ln2.gamma"), p("ln2.beta"))
    x = x + gelu(h @ p("mlp.fc.weight") + p("mlp.fc.bias")) @ p("mlp.proj.weight") + p("mlp.proj.bias")
h = ln(x, t["ln_f.gamma"], t["ln_f.beta"])
z = h @ t["tok_emb"].T if spec["tied"] else h @ t["head.weight"] + t["head.bias"]
z = z - z.max(-1, keepdims=True)
lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
print(-np.take_along_axis(lp, tg[..., None], -1).mean())
"#;
    let dir = temp_dir("lm-numpy");
    for tied in [true, false] {
        let spec = LmSpec {
            vocab: 7,
            context: 6,
            width: 12,
            heads: 3,
            layers: 2,
            tied,
        };
        let mut rng = starling_core::rng::SplitMix64::new(5);
        let mut params = spec.init_params(9);
        params
            .iter_mut()
            .for_each(|v| *v += (0.2 * rng.normal()) as f32);
        let (batch, seq) = (2, 5);
        let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(7) as u32).collect();
        let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(7) as u32).collect();
        let want = evaluate(&Reference, &spec, &params, &ids, &targets, batch, seq)?.loss;
        let file = dir.join(format!("lm-{tied}.safetensors"));
        let ck = LmCheckpoint {
            spec,
            params,
            vocab: None,
            step: 0,
        };
        std::fs::write(&file, to_safetensors(&ck)?)?;
        let rows = |v: &[u32]| serde_json::to_string(&v.chunks(seq).collect::<Vec<_>>());
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&file)
            .arg(rows(&ids)?)
            .arg(rows(&targets)?)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "numpy check failed (cargo xtask setup installs numpy and safetensors): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let numpy: f64 = String::from_utf8(out.stdout)?.trim().parse()?;
        assert!(
            (numpy - want as f64).abs() < 1e-5,
            "tied {tied}: numpy {numpy}, ours {want}"
        );
        assert!(
            numpy > 1.0,
            "a random model's loss is near ln 7, got {numpy}"
        );
    }
    Ok(())
}
