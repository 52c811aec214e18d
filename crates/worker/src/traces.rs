//! Spans of the traced sequences a worker holds. A sequence's span lives from its prefill until it
//! finishes or is released, as a child of the scheduler's span for the same request; each batched
//! call adds a short `prefill` or `decode` child under every traced sequence it advances, so one
//! request's trace shows the steps that served it and the batch they ran in.

use std::collections::HashMap;
use std::sync::Mutex;

use kiln_telemetry::trace::TRACED;
use kiln_telemetry::TraceContext;
use tracing::{info_span, Span};

/// The open sequence spans, by sequence id. Empty (and nearly free) while nothing is traced.
#[derive(Default)]
pub(crate) struct SequenceTraces {
    open: Mutex<HashMap<u64, Span>>,
}

impl SequenceTraces {
    /// Opens the span of a sequence joining the batch, when its trace is sampled.
    pub fn join(&self, worker: &str, id: u64, request_id: &str, trace: &TraceContext) {
        if !trace.sampled() {
            return;
        }
        let span = info_span!(
            target: TRACED,
            "sequence",
            worker,
            request_id,
            sequence = id,
            trace_id = tracing::field::Empty
        );
        trace.adopt(&span);
        self.lock().insert(id, span);
    }

    /// One child span per traced sequence in `ids` for the duration of a batched call; drop the
    /// result when the call returns.
    pub fn step(&self, phase: &'static str, ids: &[u64], steps: u32) -> Vec<Span> {
        let open = self.lock();
        if open.is_empty() {
            return Vec::new();
        }
        let batch_size = ids.len();
        ids.iter()
            .filter_map(|id| open.get(id))
            .map(|parent| info_span!(target: TRACED, parent: parent, "step", phase, batch_size, steps))
            .collect()
    }

    /// Closes the spans of sequences that finished or left.
    pub fn close(&self, ids: impl IntoIterator<Item = u64>) {
        let mut open = self.lock();
        if open.is_empty() {
            return;
        }
        for id in ids {
            open.remove(&id);
        }
    }

    /// Closes every span (the scheduler released everything).
    pub fn close_all(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Span>> {
        // A panic while holding the map loses spans, never requests.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}
