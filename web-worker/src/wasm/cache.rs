//! The browser's dataset cache: the Cache API, keyed by each dataset's SHA-256 (the [`DatasetCache`] the browser
//! [`Session`](crate::session::Session) uses).

use wasm_bindgen::JsCast as _;

use crate::session::{CacheFuture, DatasetCache};

use super::{js_error, scope};

/// The browser's [`DatasetCache`]: the Cache API (`caches`, cache `starling-datasets`), one entry per dataset
/// under the key `/starling-datasets/<sha256>`, so a returning volunteer downloads nothing. Where the page has no
/// Cache API (not a secure context) or it fails (quota), the dataset is simply fetched again.
pub(super) struct BrowserCache;

const CACHE_NAME: &str = "starling-datasets";

impl BrowserCache {
    async fn open() -> Option<web_sys::Cache> {
        let storage = scope().caches().ok()?;
        let cache = wasm_bindgen_futures::JsFuture::from(storage.open(CACHE_NAME))
            .await
            .ok()?;
        cache.dyn_into().ok()
    }

    fn key(sha256: &str) -> String {
        format!("/{CACHE_NAME}/{sha256}")
    }
}

impl DatasetCache for BrowserCache {
    fn load<'a>(&'a self, sha256: &'a str) -> CacheFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let cache = Self::open().await?;
            let found =
                wasm_bindgen_futures::JsFuture::from(cache.match_with_str(&Self::key(sha256)))
                    .await
                    .ok()?;
            let response: web_sys::Response = found.dyn_into().ok()?;
            let body = wasm_bindgen_futures::JsFuture::from(response.array_buffer().ok()?)
                .await
                .ok()?;
            Some(js_sys::Uint8Array::new(&body).to_vec())
        })
    }

    fn store<'a>(&'a self, sha256: &'a str, mut entry: Vec<u8>) -> CacheFuture<'a, ()> {
        Box::pin(async move {
            let Some(cache) = Self::open().await else {
                web_sys::console::warn_1(&"no Cache API here: the dataset is not kept".into());
                return;
            };
            let Ok(response) = web_sys::Response::new_with_opt_u8_array(Some(&mut entry)) else {
                return;
            };
            if let Err(e) = wasm_bindgen_futures::JsFuture::from(
                cache.put_with_str(&Self::key(sha256), &response),
            )
            .await
            {
                web_sys::console::warn_1(
                    &format!("cannot cache the dataset: {}", js_error(&e)).into(),
                );
            }
        })
    }
}
