//! The webhook poster: drains the store's `events` outbox and POSTs each event, in order,
//! to `[api] webhook_url`.
//!
//! Events are written to the outbox by the same store transaction that changes a job or
//! run, so none is lost if the connector stops; one is marked delivered only after the
//! webhook answered 2xx, so delivery is at least once (the `X-Rehost-Event-Id` header lets
//! a receiver drop duplicates). A webhook that is down delays only this task: runs never
//! wait for it.

use std::time::Duration;

use tokio::sync::watch;

use super::service::on_store;
use crate::store::SharedStore;

/// Events read from the outbox at a time.
const BATCH: usize = 50;
/// How often an empty outbox is looked at again; events are not urgent to the second.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// One POST may take this long: a receiver that hangs must not stall the queue forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay, doubled per failure up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Five minutes: a webhook down for hours is retried a dozen times an hour, not thousands.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The delay before retry number `failures` (1 for the first retry).
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY_DELAY
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_DELAY)
}

/// Starts the poster on the current runtime; it ends when `shutdown` turns true.
pub fn spawn(
    url: String,
    store: SharedStore,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("rehost/", env!("CARGO_PKG_VERSION")))
        .build()?;
    Ok(tokio::spawn(run(http, url, store, shutdown)))
}

async fn run(
    http: reqwest::Client,
    url: String,
    store: SharedStore,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    loop {
        let wait = match deliver_batch(&http, &url, &store).await {
            Ok(0) => {
                failures = 0;
                POLL_INTERVAL
            }
            // More may be waiting: go on at once.
            Ok(_) => {
                failures = 0;
                Duration::ZERO
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(failures);
                tracing::warn!(
                    error = format!("{err:#}"),
                    failures,
                    retry_in_secs = delay.as_secs(),
                    "webhook delivery failed"
                );
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

/// POSTs waiting events in order, stopping at the first that fails (the next attempt
/// starts from it, keeping the order); returns how many were delivered.
async fn deliver_batch(
    http: &reqwest::Client,
    url: &str,
    store: &SharedStore,
) -> anyhow::Result<usize> {
    let events = on_store(store, |s| Ok(s.undelivered_events(BATCH)?)).await?;
    let mut delivered = 0;
    for (id, event) in events {
        let response = http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Rehost-Event-Id", id.to_string())
            .body(serde_json::to_vec(&event)?)
            .send()
            .await
            // Without the URL: it may carry a secret in its query string.
            .map_err(|e| anyhow::anyhow!("POST event {id}: {}", e.without_url()))?;
        if !response.status().is_success() {
            anyhow::bail!(
                "POST event {id}: the webhook answered {}",
                response.status()
            );
        }
        on_store(store, move |s| Ok(s.event_delivered(id)?)).await?;
        tracing::debug!(event = id, "event delivered");
        delivered += 1;
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_a_cap() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(2), Duration::from_secs(2));
        assert_eq!(retry_delay(5), Duration::from_secs(16));
        assert_eq!(retry_delay(9), Duration::from_secs(256));
        assert_eq!(retry_delay(10), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);
    }
}
