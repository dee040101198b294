//! Process metrics in Prometheus text format. Every queue has a gauge, every stage a
//! counter; plain atomics keep the hot path free of locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the commit-latency histogram buckets.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Sum of the observed values, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Relaxed)
    }

    pub fn observe(&self, secs: f64) {
        self.observe_all([secs]);
    }

    /// Observes many values with one atomic update per bucket (a commit's inputs at once).
    pub fn observe_all(&self, secs: impl IntoIterator<Item = f64>) {
        let (mut counts, mut n, mut sum_us) = ([0u64; BUCKETS.len()], 0u64, 0u64);
        for s in secs {
            for (c, b) in counts.iter_mut().zip(BUCKETS) {
                *c += u64::from(s <= b);
            }
            n += 1;
            sum_us += (s * 1e6) as u64;
        }
        for (c, add) in self.counts.iter().zip(counts).filter(|(_, add)| *add > 0) {
            c.fetch_add(add, Relaxed);
        }
        self.count.fetch_add(n, Relaxed);
        self.sum_us.fetch_add(sum_us, Relaxed);
    }

    /// The upper bound of the bucket holding quantile `q` (0..1); `None` with no samples.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count.load(Relaxed);
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil() as u64;
        for (i, b) in BUCKETS.iter().enumerate() {
            if self.counts[i].load(Relaxed) >= want {
                return Some(*b);
            }
        }
        Some(f64::INFINITY)
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i].load(Relaxed));
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

#[derive(Default)]
pub struct Metrics {
    pub telemetry_messages: AtomicU64,
    pub telemetry_counted: AtomicU64,
    pub telemetry_duplicates: AtomicU64,
    pub dead_letters: AtomicU64,
    pub good_units: AtomicU64,
    pub scrap_units: AtomicU64,
    pub commits: AtomicU64,
    pub committed_jobs: AtomicU64,
    pub commit_errors: AtomicU64,
    /// Commits rolled back and redone because a reading of the batch was committed
    /// already (`db::writer::guard_cursors`).
    pub commits_redone: AtomicU64,
    pub commit_latency: Histogram,
    pub modbus_poll_to_commit: Histogram,
    /// From the MES's receipt of an input (an MQTT or Sparkplug message, a Modbus reading)
    /// to the commit of its effect (observed by the writer, a commit's inputs at once).
    pub receive_to_commit: Histogram,
    pub acks_sent: AtomicU64,
    /// Messages the main session passed to their partition session (`ingest::sessions`).
    pub mqtt_main_skipped: AtomicU64,
    /// Counted readings that reached the writer out of apply order (must stay 0).
    pub order_violations: AtomicU64,
    /// Readings a work center held for review (an implausible step).
    pub readings_held: AtomicU64,
    /// Readings whose device time is more than an hour ahead or a week behind ours.
    pub clock_skew: AtomicU64,
    /// Cluster: jobs refused at commit because this node no longer held their work
    /// center's lease under the token they were computed with (fencing).
    pub cluster_fenced: AtomicU64,
    /// Cluster: work centers this node owns now, took over, and handed back or lost.
    pub cluster_owned: AtomicI64,
    pub cluster_acquired: AtomicU64,
    pub cluster_released: AtomicU64,
    pub cluster_lost: AtomicU64,
    pub in_flight: AtomicI64,
    pub writer_queue: AtomicI64,
    pub mqtt_connected: AtomicBool,
    pub mqtt_reconnects: AtomicU64,
    /// Partition sessions reading the embedded broker through an in-process link right now.
    pub mqtt_in_process_links: AtomicI64,
    pub writer_healthy: AtomicBool,
    pub http_requests: AtomicU64,
    pub modbus_polls: AtomicU64,
    pub alerts: AtomicU64,
    pub live_dropped: AtomicU64,
    /// Cluster: events relayed to the other nodes, dropped on the way out, received.
    pub events_relayed: AtomicU64,
    pub events_relay_dropped: AtomicU64,
    pub events_remote: AtomicU64,
    pub modbus_errors: AtomicU64,
    /// The time-series exporter's counters (`src/influx`).
    pub influx: crate::influx::InfluxMetrics,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "mes_telemetry_messages_total",
            "Telemetry messages received.",
            self.telemetry_messages.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_telemetry_counted_total",
            "Telemetry readings that changed a count.",
            self.telemetry_counted.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_telemetry_duplicates_total",
            "Duplicate, replayed or out-of-order readings (counted nothing).",
            self.telemetry_duplicates.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_dead_letters_total",
            "Invalid inputs kept as dead letters.",
            self.dead_letters.load(Relaxed),
        );
        counter(&mut out, "mes_good_units_total", "Good units committed.", self.good_units.load(Relaxed));
        counter(&mut out, "mes_scrap_units_total", "Scrap units committed.", self.scrap_units.load(Relaxed));
        counter(&mut out, "mes_commits_total", "Group commits of the ingest writer.", self.commits.load(Relaxed));
        counter(
            &mut out,
            "mes_committed_jobs_total",
            "Inputs committed by the ingest writer.",
            self.committed_jobs.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_commits_redone_total",
            "Group commits redone because a reading of the batch was already committed (a redelivery).",
            self.commits_redone.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_commit_errors_total",
            "Failed commit attempts (retried).",
            self.commit_errors.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_mqtt_acks_total",
            "MQTT acknowledgements sent after commit.",
            self.acks_sent.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_mqtt_passed_total",
            "Copies the main MQTT session acknowledged without work because a partition session commits them.",
            self.mqtt_main_skipped.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_writer_order_violations_total",
            "Counted readings that reached the writer out of apply order (an invariant: 0).",
            self.order_violations.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_readings_held_total",
            "Readings held for review: more units in one step than the work center's limit.",
            self.readings_held.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_actor_panics_total",
            "Readings whose application panicked (a defect): held for review, the work center restored.",
            mes_actors::actor::PANICS.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_cluster_fenced_total",
            "Jobs refused at commit: this node no longer held the work center's lease (fencing).",
            self.cluster_fenced.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_cluster_leases_acquired_total",
            "Work centers this node took ownership of.",
            self.cluster_acquired.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_cluster_leases_released_total",
            "Work centers this node handed back (rebalancing, shutdown).",
            self.cluster_released.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_cluster_leases_lost_total",
            "Work centers this node lost to another node (its lease had expired).",
            self.cluster_lost.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_clock_skew_total",
            "Readings whose device time is over an hour ahead of, or a week behind, the MES clock.",
            self.clock_skew.load(Relaxed),
        );
        counter(&mut out, "mes_mqtt_reconnects_total", "MQTT connection losses.", self.mqtt_reconnects.load(Relaxed));
        counter(&mut out, "mes_http_requests_total", "HTTP requests served.", self.http_requests.load(Relaxed));
        counter(&mut out, "mes_modbus_polls_total", "Successful Modbus polls.", self.modbus_polls.load(Relaxed));
        counter(&mut out, "mes_alerts_total", "Buffer alerts raised (shortage, full).", self.alerts.load(Relaxed));
        counter(
            &mut out,
            "mes_live_dropped_total",
            "Live-state notifications dropped on a full mailbox.",
            self.live_dropped.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_events_relayed_total",
            "Cluster: live events relayed to the other nodes.",
            self.events_relayed.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_events_relay_dropped_total",
            "Cluster: live events not relayed (relay queue full, or the notification failed).",
            self.events_relay_dropped.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_events_remote_total",
            "Cluster: live events received from the other nodes.",
            self.events_remote.load(Relaxed),
        );
        counter(
            &mut out,
            "mes_modbus_errors_total",
            "Modbus connect and read failures.",
            self.modbus_errors.load(Relaxed),
        );
        gauge(
            &mut out,
            "mes_ingest_in_flight",
            "Inputs received but not yet committed and acknowledged.",
            self.in_flight.load(Relaxed),
        );
        gauge(
            &mut out,
            "mes_cluster_owned_work_centers",
            "Work centers whose lease this node holds (cluster mode).",
            self.cluster_owned.load(Relaxed),
        );
        gauge(&mut out, "mes_writer_queue_depth", "Jobs waiting in the writer queue.", self.writer_queue.load(Relaxed));
        gauge(
            &mut out,
            "mes_mqtt_in_process_links",
            "MQTT partition sessions reading the embedded broker through an in-process link (the rest use TCP).",
            self.mqtt_in_process_links.load(Relaxed),
        );
        gauge(
            &mut out,
            "mes_mqtt_connected",
            "1 when connected to the broker.",
            i64::from(self.mqtt_connected.load(Relaxed)),
        );
        gauge(
            &mut out,
            "mes_writer_healthy",
            "1 when the last commit succeeded.",
            i64::from(self.writer_healthy.load(Relaxed)),
        );
        self.commit_latency.render(&mut out, "mes_commit_seconds", "Group commit latency.");
        self.modbus_poll_to_commit.render(
            &mut out,
            "mes_modbus_poll_to_commit_seconds",
            "From the start of a Modbus poll to the commit of the reading it produced.",
        );
        self.receive_to_commit.render(
            &mut out,
            "mes_receive_to_commit_seconds",
            "From the receipt of an input (MQTT or Sparkplug message, Modbus reading) to the commit of its effect.",
        );
        self.influx.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_required_names() {
        let m = Metrics::default();
        Metrics::inc(&m.telemetry_messages);
        m.commit_latency.observe(0.002);
        let t = m.render();
        assert!(t.contains("mes_telemetry_messages_total 1\n"));
        assert!(t.contains("mes_telemetry_duplicates_total 0\n"));
        assert!(t.contains("mes_dead_letters_total 0\n"));
        assert!(t.contains("mes_commit_seconds_bucket{le=\"0.0025\"} 1\n"));
        assert!(t.contains("mes_commit_seconds_bucket{le=\"0.001\"} 0\n"));
    }

    /// A commit's inputs observed at once count exactly as observed one by one.
    #[test]
    fn observing_many_at_once_equals_one_by_one() {
        let values = [0.0001, 0.0025, 0.003, 0.7, 9.0];
        let (one, all) = (Histogram::default(), Histogram::default());
        for v in values {
            one.observe(v);
        }
        all.observe_all(values);
        let (mut a, mut b) = (String::new(), String::new());
        one.render(&mut a, "h", "h");
        all.render(&mut b, "h", "h");
        assert_eq!(a, b);
        assert!(b.contains("h_bucket{le=\"0.0025\"} 2\nh_bucket{le=\"0.005\"} 3\n"), "{b}");
        assert!(b.contains("h_bucket{le=\"5\"} 4\nh_bucket{le=\"+Inf\"} 5\n"), "{b}");
        assert_eq!((all.count(), all.sum_us()), (5, 9_705_600));
    }
}
