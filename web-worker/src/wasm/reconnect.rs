//! Reconnecting in the browser: the socket (its callbacks feed the run loop's events) and where and when the next
//! attempt goes after a lost connection (see the parent module's docs for the policy).

use futures_channel::mpsc;
use wasm_bindgen::JsCast as _;
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

use starling_core::protocol::WireFrame;

use crate::session::now_ms;

use super::{Event, js_error, scope};

/// Keeps the socket's callbacks alive for the run and detaches them at the end.
pub(super) struct Socket {
    pub(super) ws: WebSocket,
    _callbacks: Vec<Closure<dyn FnMut(JsValue)>>,
}

impl Socket {
    pub(super) fn open(url: &str, tx: &mpsc::UnboundedSender<Event>) -> Result<Self, String> {
        let ws = WebSocket::new(url).map_err(|e| format!("cannot open {url}: {}", js_error(&e)))?;
        ws.set_binary_type(BinaryType::Arraybuffer);
        let mut callbacks = Vec::new();
        let t = tx.clone();
        let on_open = Closure::<dyn FnMut(JsValue)>::new(move |_| {
            let _ = t.unbounded_send(Event::Opened);
        });
        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        callbacks.push(on_open);
        let t = tx.clone();
        let on_message = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
            let data = e.unchecked_into::<MessageEvent>().data();
            let event = if let Some(text) = data.as_string() {
                Event::Text(text)
            } else if let Some(buf) = data.dyn_ref::<js_sys::ArrayBuffer>() {
                Event::Binary(js_sys::Uint8Array::new(buf).to_vec())
            } else {
                return;
            };
            let _ = t.unbounded_send(event);
        });
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        callbacks.push(on_message);
        let t = tx.clone();
        let on_close = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
            let e = e.unchecked_into::<CloseEvent>();
            let _ = t.unbounded_send(Event::Closed {
                code: e.code(),
                reason: e.reason(),
            });
        });
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        callbacks.push(on_close);
        Ok(Self {
            ws,
            _callbacks: callbacks,
        })
    }

    /// Sends one frame; `false` if the socket is no longer open.
    pub(super) fn send(&self, frame: &WireFrame) -> bool {
        match frame {
            WireFrame::Text(t) => self.ws.send_with_str(t).is_ok(),
            WireFrame::Binary(b) => self.ws.send_with_u8_array(b).is_ok(),
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        let _ = self.ws.close();
    }
}

/// Queues `ReconnectDue(seq)` after `ms` milliseconds.
fn reconnect_after(ms: f64, seq: u64, tx: &mpsc::UnboundedSender<Event>) {
    let t = tx.clone();
    let cb = Closure::once_into_js(move || {
        let _ = t.unbounded_send(Event::ReconnectDue(seq));
    });
    let _ = scope().set_timeout_with_callback_and_timeout_and_arguments_0(
        cb.unchecked_ref(),
        ms.min(600_000.0) as i32,
    );
}

/// First and largest pause between reconnection attempts, and how long without a connection ends the run.
pub(super) const BACKOFF_MIN_MS: f64 = 200.0;
const BACKOFF_MAX_MS: f64 = 4_000.0;
pub(super) const GIVE_UP_MS: f64 = 600_000.0;

/// Where and when the next reconnection attempt goes (see the module docs).
pub(super) struct Redial {
    pub(super) urls: Vec<String>,
    /// Attempts since the connection was lost (0: none yet, the next goes to the node that was lost).
    pub(super) attempt: u64,
    /// The node that was lost (or redirected to), first in line.
    pub(super) current: String,
    pub(super) backoff_ms: f64,
    pub(super) lost_at: Option<f64>,
}

impl Redial {
    /// Schedules the next attempt; `false` once it is time to give up.
    pub(super) fn schedule(&mut self, tx: &mpsc::UnboundedSender<Event>) -> bool {
        let since = *self.lost_at.get_or_insert_with(now_ms);
        if now_ms() - since > GIVE_UP_MS {
            return false;
        }
        let jitter = js_sys::Math::random() * self.backoff_ms / 2.0;
        reconnect_after(self.backoff_ms + jitter, self.attempt, tx);
        self.backoff_ms = (self.backoff_ms * 2.0).min(BACKOFF_MAX_MS);
        true
    }

    /// The URL of attempt `attempt`: the lost node first, then the list in turn.
    pub(super) fn url(&self) -> String {
        if self.attempt == 0 {
            self.current.clone()
        } else {
            self.urls[(self.attempt as usize - 1) % self.urls.len()].clone()
        }
    }

    pub(super) fn connected(&mut self) {
        self.attempt = 0;
        self.backoff_ms = BACKOFF_MIN_MS;
        self.lost_at = None;
    }
}
