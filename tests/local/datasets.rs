//! The `dataset` frame of a `local` job: compact and lossless for workers that list `accept` (palette + DEFLATE for
//! the MNIST split), raw SDS1 for v2 workers from before the field, and kept on disk by the native worker so a
//! returning volunteer fetches nothing (a damaged cache entry is fetched again).

use starling_core::protocol::{
    Backend, CoordinatorMsg, DatasetEncoding, PROTOCOL_V2, Platform, Quant, WorkerMsg,
    decode_dataset, decode_dataset_bytes,
};
use starling_tests::*;
use starling_worker::engine::BackendChoice;
use starling_worker::native::{WorkerOptions, WorkerReport};

use super::local_hyper;

/// A native CPU worker with a dataset cache in `cache`, stopping after `leases` leases.
fn cached_worker(
    url: String,
    name: &str,
    cache: &std::path::Path,
    leases: u64,
) -> anyhow::Result<WorkerReport> {
    let (name, cache) = (name.to_string(), cache.to_path_buf());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(starling_worker::native::run(
                WorkerOptions {
                    coordinator: url,
                    backend: BackendChoice::Cpu,
                    name: Some(name),
                    token: None,
                    max_leases: Some(leases),
                    dataset_cache: Some(cache),
                },
                None,
            ))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("worker thread panicked"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_travel_compact_to_new_workers_raw_to_old_ones_and_are_cached_on_disk()
-> anyhow::Result<()> {
    init_tracing();
    let cluster = Cluster::builder("local-datasets")
        .hyper(local_hyper(2, 50, Quant::Int8))
        .start()
        .await?;
    // A raw v2 client: its first `dataset_request` lists no `accept` (as v2 workers from before the field), the
    // second lists every encoding.
    // The raw frame (25 MB) is above tungstenite's default 16 MiB frame limit, as in the native worker.
    let limit = Some(starling_core::data::MAX_UPLOAD_BYTES + 64 * 1024);
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_frame_size(limit)
        .max_message_size(limit);
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(cluster.server.ws_url(), Some(config), false)
            .await?;
    let mut raw = RawClient { ws };
    raw.send(
        &WorkerMsg::Hello {
            protocol: PROTOCOL_V2,
            token: None,
            name: Some("old-v2".into()),
            backend: Backend::Cpu,
            adapter: "test".into(),
            platform: Platform::Native,
        },
        &[],
    )
    .await?;
    raw.send(&WorkerMsg::Ready, &[]).await?;
    let (job, sha) = raw
        .recv_until(|m, _| match m {
            CoordinatorMsg::LocalLease {
                job,
                dataset: Some(sha),
                ..
            } => Some((*job, sha.clone())),
            _ => None,
        })
        .await?;
    let mut got = Vec::new();
    for accept in [vec![], DatasetEncoding::all()] {
        raw.send(
            &WorkerMsg::DatasetRequest {
                job,
                sha256: sha.clone(),
                accept,
            },
            &[],
        )
        .await?;
        got.push(
            raw.recv_until(|m, p| match m {
                CoordinatorMsg::Dataset {
                    sha256, encoding, ..
                } if *sha256 == sha => Some((*encoding, p.to_vec())),
                _ => None,
            })
            .await?,
        );
    }
    let (old, new) = (&got[0], &got[1]);
    assert_eq!(old.0, DatasetEncoding::Raw, "no `accept`: raw");
    assert_eq!(
        starling_core::digest::sha256_hex(&old.1),
        sha,
        "raw: the SDS1 bytes named by the lease"
    );
    assert_eq!(
        new.0,
        DatasetEncoding::PaletteDeflate,
        "MNIST has 256 distinct pixel values"
    );
    assert_eq!(decode_dataset_bytes(new.0, &new.1)?, old.1, "lossless");
    let started = std::time::Instant::now();
    let ds = decode_dataset(new.0, &new.1, &sha)?;
    let decode_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(ds.rows(), 8_000);
    let started = std::time::Instant::now();
    let (_, again) = starling_core::protocol::encode_dataset(&ds, &DatasetEncoding::all());
    let encode_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(again, new.1, "the encoding is deterministic");
    println!(
        "dataset: raw {} B, {} {} B ({:.1}× smaller); encode {encode_ms:.0} ms, decode + SHA-256 {decode_ms:.0} ms",
        old.1.len(),
        new.0.as_str(),
        new.1.len(),
        old.1.len() as f64 / new.1.len() as f64
    );
    assert!(
        new.1.len() * 10 < old.1.len(),
        "compact frame is {} of {} bytes",
        new.1.len(),
        old.1.len()
    );
    drop(raw);

    // A native worker fetches the compact frame once and keeps it; the next run with the same cache fetches nothing.
    let cache = TempDir::new("dataset-cache");
    let url = cluster.server.ws_url();
    let first = cached_worker(url.clone(), "first", &cache.0, 2)?;
    assert_eq!(
        (first.stats.datasets, first.stats.datasets_cached),
        (1, 0),
        "{:?}",
        first.stats
    );
    assert_eq!(
        first.stats.dataset_bytes,
        new.1.len() as u64,
        "the compact frame travelled"
    );
    // The session's byte counters (shown on the volunteer page) hold the dataset frame and the rest.
    assert!(
        first.stats.bytes_received > first.stats.dataset_bytes && first.stats.bytes_sent > 0,
        "{:?}",
        first.stats
    );
    let entry = cache.0.join(format!("{sha}.dataset"));
    assert!(entry.exists(), "cached at {}", entry.display());
    let second = cached_worker(url.clone(), "second", &cache.0, 2)?;
    assert_eq!(
        (
            second.stats.datasets,
            second.stats.dataset_bytes,
            second.stats.datasets_cached
        ),
        (0, 0, 1),
        "{:?}",
        second.stats
    );
    for r in [&first, &second] {
        assert_eq!(r.stats.failed, 0, "{:?}", r.stats);
        assert!(r.stats.results_sent >= 1, "{:?}", r.stats);
    }
    // A damaged entry fails its SHA-256 check, is fetched again and replaced.
    let mut bytes = std::fs::read(&entry)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&entry, &bytes)?;
    let third = cached_worker(url, "third", &cache.0, 2)?;
    assert_eq!(
        (third.stats.datasets, third.stats.datasets_cached),
        (1, 0),
        "{:?}",
        third.stats
    );
    assert_ne!(
        std::fs::read(&entry)?,
        bytes,
        "the damaged entry was replaced"
    );
    assert_eq!(third.stats.failed, 0, "{:?}", third.stats);
    cluster.finish().await?;
    Ok(())
}
