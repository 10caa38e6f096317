//! Connection scale: N idle workers (hello, welcome, then silence), each from its own 127.x.y.z address, held by one
//! coordinator; its resident memory per connection and the time to accept them all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use starling_core::protocol::{Backend, PROTOCOL_VERSION, Platform, WireFrame, WorkerMsg, encode};

use crate::coordinator::{Coordinator, Launch};
use crate::volunteer::{connect_from, source_addr};

/// The idle run's figures (the JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct IdleFigures {
    pub idle_connections: usize,
    pub welcomed: u64,
    pub kib_per_conn: f64,
    pub accept_s: f64,
    #[serde(skip)]
    pub rss_before_mib: f64,
    #[serde(skip)]
    pub rss_after_mib: f64,
    #[serde(skip)]
    pub failed: u64,
    #[serde(skip)]
    pub first_error: Option<String>,
}

/// Opens `n` idle connections (`concurrency` handshakes at a time), measures, closes them all.
pub fn run(n: usize, concurrency: usize, launch: &Launch) -> anyhow::Result<IdleFigures> {
    let coord = Coordinator::start(launch, "idle")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Let the coordinator finish starting up (demo job, first allocations) before the baseline.
    std::thread::sleep(Duration::from_secs(2));
    let before = coord.usage()?;
    let addr = coord.addr;
    let welcomed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let hello = match encode(
        &WorkerMsg::Hello {
            protocol: PROTOCOL_VERSION,
            token: None,
            name: None,
            backend: Backend::Cpu,
            adapter: "idle".into(),
            platform: Platform::Native,
        },
        &[],
    ) {
        WireFrame::Text(t) => t,
        WireFrame::Binary(_) => anyhow::bail!("a hello is a text frame"),
    };
    let t0 = Instant::now();
    let (held, accept_s) = rt.block_on(async {
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut tasks = Vec::with_capacity(n);
        for k in 0..n {
            let (gate, welcomed, failed, first_error, hello) = (
                gate.clone(),
                welcomed.clone(),
                failed.clone(),
                first_error.clone(),
                hello.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await.ok()?;
                let r = tokio::time::timeout(Duration::from_secs(60), async {
                    let tcp = connect_from(source_addr(k as u64), addr).await?;
                    // Small client buffers: this process holds as many sockets as the coordinator.
                    let cfg = WebSocketConfig::default()
                        .read_buffer_size(1024)
                        .write_buffer_size(0);
                    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
                        format!("ws://{addr}/ws"),
                        tcp,
                        Some(cfg),
                    )
                    .await?;
                    ws.send(Message::text(hello)).await?;
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.as_str().contains("\"welcome\"") => {
                            anyhow::Ok(ws)
                        }
                        other => anyhow::bail!("expected welcome, got {other:?}"),
                    }
                })
                .await;
                drop(permit);
                match r {
                    Ok(Ok(ws)) => {
                        welcomed.fetch_add(1, Ordering::Relaxed);
                        Some(ws)
                    }
                    Ok(Err(e)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                        slot.get_or_insert_with(|| format!("{e:#}"));
                        None
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }));
        }
        let mut held = Vec::with_capacity(n);
        for t in tasks {
            if let Ok(Some(ws)) = t.await {
                held.push(ws);
            }
        }
        let accept_s = t0.elapsed().as_secs_f64();
        // Let allocations settle (writer tasks park, logs flush) before measuring.
        tokio::time::sleep(Duration::from_secs(3)).await;
        (held, accept_s)
    });
    let after = coord.usage()?;
    let ok = welcomed.load(Ordering::Relaxed);
    let figures = IdleFigures {
        idle_connections: n,
        welcomed: ok,
        kib_per_conn: after.rss_kib.saturating_sub(before.rss_kib) as f64 / ok.max(1) as f64,
        accept_s,
        rss_before_mib: before.rss_kib as f64 / 1024.0,
        rss_after_mib: after.rss_kib as f64 / 1024.0,
        failed: failed.load(Ordering::Relaxed),
        first_error: first_error.lock().ok().and_then(|e| e.clone()),
    };
    drop(coord);
    drop(held);
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(figures)
}
