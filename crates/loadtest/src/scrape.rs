//! Cluster saturation while a rehearsal runs: the scheduler's `/metrics` page, read once a second
//! (`kiln_scheduler_saturation_ratio`, and the waiting jobs of every tier), so the report shows how
//! full the GPUs were next to what was offered and shed.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds from the rehearsal's start.
    pub at: f64,
    /// Batch slots in use over all workers' slots, in [0, 1].
    pub saturation: f64,
    /// Jobs waiting in the scheduler, all tiers.
    pub waiting: f64,
}

/// The sum of a metric's samples on a Prometheus text page.
pub fn metric_sum(page: &str, metric: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if series.split('{').next() == Some(metric) {
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// `GET /metrics` from `host:port`.
async fn fetch(address: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut page = String::new();
    stream.read_to_string(&mut page).await?;
    Ok(page)
}

/// Reads `address` (the scheduler's metrics `host:port`) every second from `start` until the task is
/// aborted; readings that fail are skipped.
pub async fn follow(
    address: String,
    start: Instant,
    samples: tokio::sync::mpsc::UnboundedSender<Sample>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(Ok(page)) = tokio::time::timeout(Duration::from_millis(900), fetch(&address)).await
        else {
            continue;
        };
        let sample = Sample {
            at: start.elapsed().as_secs_f64(),
            saturation: metric_sum(&page, "kiln_scheduler_saturation_ratio").unwrap_or(0.0),
            waiting: metric_sum(&page, "kiln_scheduler_queue_depth").unwrap_or(0.0),
        };
        if samples.send(sample).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_series_of_a_metric() {
        let page = "# HELP kiln_scheduler_queue_depth Jobs\n\
                    kiln_scheduler_queue_depth{tier=\"free\"} 3\n\
                    kiln_scheduler_queue_depth{tier=\"pro\"} 1\n\
                    kiln_scheduler_saturation_ratio 0.75\n\
                    kiln_scheduler_queue_depth_other 9\n";
        assert_eq!(metric_sum(page, "kiln_scheduler_queue_depth"), Some(4.0));
        assert_eq!(
            metric_sum(page, "kiln_scheduler_saturation_ratio"),
            Some(0.75)
        );
        assert_eq!(metric_sum(page, "kiln_missing"), None);
    }
}
