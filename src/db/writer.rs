//! The single writer: group commit of ingest work, acknowledgement only after commit.
//!
//! Jobs arrive on a bounded queue. The writer takes whatever is waiting (up to
//! `batch_max`), commits it in one transaction, and only then hands each job's
//! acknowledgement on. A failed commit is retried with capped backoff: nothing is dropped
//! and nothing is acknowledged until it is committed. Idempotency lives in the database:
//! a device's readings are stored (packed, one row per device and commit) and counted only
//! beyond its committed cursor, which moves in the same transaction, so a replay after a
//! crash is a no-op.

use super::{Backend, DbError, Store};
use crate::events::Events;
use crate::metrics::Metrics;
use crate::settlement::Ledger;
use mes_actors::counter::{Cursor, RawCounters};
use mes_actors::ledger::{settle, Account, WorkCenterSpec};
use mes_actors::{Delta, OrderStatus};
use sqlx::{AssertSqlSafe, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Backoff bounds for retrying a failed commit.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What one input asks the writer to commit.
#[derive(Debug)]
pub enum Work {
    Counted(Box<Delta>),
    /// Nothing to commit, but the acknowledgement must still wait its turn.
    Duplicate,
    /// `redelivered`: the source flagged it as a redelivery; kept once only.
    DeadLetter {
        topic: String,
        reason: String,
        payload: String,
        redelivered: bool,
    },
}

/// What to do once the job is committed.
#[derive(Debug)]
pub enum Completion {
    None,
    /// Acknowledge this MQTT publish to the broker (in receive order, see `ingest::mqtt`).
    Mqtt(MqttAck),
    /// Tell a waiting task (Modbus poller, tests).
    Notify(oneshot::Sender<()>),
}

#[derive(Debug)]
pub struct Job {
    pub work: Work,
    pub received_ms: i64,
    pub done: Completion,
    /// The input's place in the in-flight bound, freed after completion.
    pub slot: Option<crate::ingest::InFlight>,
    /// Raw counter registers of a polled device, stored with the reading they produced.
    pub raw: Option<(String, RawCounters)>,
    /// The reading's device metrics, stored with its telemetry row (`metrics` column) so
    /// the time series can be rebuilt from the database.
    pub metrics: BTreeMap<String, f64>,
    /// The work center and lease token the job was computed under (see
    /// `ingest::Route`); in cluster mode the commit checks it against the lease table.
    pub lease: Option<(String, i64)>,
}

/// A committed (or abandoned) MQTT publish, tagged with its place in the connection's
/// receive order so that acknowledgements go out in that order, as MQTT requires.
#[derive(Debug)]
pub struct MqttAck {
    /// Connection generation (bumped at every ConnAck).
    pub generation: u64,
    /// Position among the QoS 1 publishes received on that connection.
    pub n: u64,
    /// The publish's packet id; `None`: not committed (abandoned), let later
    /// acknowledgements pass.
    pub pkid: Option<u16>,
    /// A copy the main session passes to a partition session (`ingest::sessions`): its
    /// acknowledgement confirms no commit, so it is not counted as one.
    pub pass: bool,
    /// The acknowledger of the session the publish arrived on (one per MQTT session:
    /// a cluster node holds one session per work center it owns).
    pub acker: AckSender,
}

/// Sends MQTT acknowledgements after commit (one per MQTT session).
pub type AckSender = Arc<crate::ingest::mqtt::Acker>;

pub struct Writer {
    store: Store,
    /// The writer's own connection, held across commits (taken again after an error).
    /// On SQLite this keeps its page cache warm: a connection's cache is dropped whenever
    /// another connection wrote since its last transaction, so a writer taking any pooled
    /// connection re-read the pages it had just written (measured: see BENCHMARKS.md).
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    rx: mpsc::Receiver<Job>,
    /// Cluster mode: this node's id; every commit is fenced by the lease tokens.
    fence: Option<String>,
    metrics: Arc<Metrics>,
    events: Events,
    batch_max: usize,
    ledger: Arc<Ledger>,
    live: Option<Arc<crate::live::Live>>,
    /// Good units between ERP progress documents of an order (0: none).
    progress_every: i64,
    /// The last counted (boot, seq) queued per device: counted readings must arrive in
    /// the order their work center applied them (see [`Writer::check_order`]).
    last_counted: std::collections::HashMap<String, (i64, u64, u64)>,
    /// Committed rows go on to the time-series exporter (never waits).
    tap: Option<crate::influx::Tap>,
    /// The orders as this writer's commits left them (see [`guard_orders`]).
    known_orders: OrderRows,
}

/// Orders remembered between commits; past this many the memory starts afresh.
const KNOWN_ORDERS_MAX: usize = 4_096;

impl Writer {
    /// An ERP progress document each time an order's good output passes `units` more.
    pub fn with_progress_every(mut self, units: i64) -> Self {
        self.progress_every = units.max(0);
        self
    }

    /// Committed balances and order totals go to these live actors.
    /// Committed telemetry rows go to the time-series exporter after each commit.
    pub fn with_tap(mut self, tap: crate::influx::Tap) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Cluster mode: commit a job only while `node_id` holds its work center's lease under
    /// the job's token (checked in the commit's transaction, rows locked `FOR SHARE`).
    pub fn with_fence(mut self, node_id: String) -> Self {
        self.fence = Some(node_id);
        self
    }

    pub fn with_live(mut self, live: Arc<crate::live::Live>) -> Self {
        self.live = Some(live);
        self
    }

    pub fn new(
        store: Store,
        rx: mpsc::Receiver<Job>,
        metrics: Arc<Metrics>,
        events: Events,
        batch_max: usize,
        ledger: Arc<Ledger>,
    ) -> Self {
        Self {
            store,
            conn: None,
            rx,
            fence: None,
            metrics,
            events,
            batch_max,
            ledger,
            live: None,
            progress_every: 0,
            last_counted: Default::default(),
            tap: None,
            known_orders: OrderRows::new(),
        }
    }

    /// Runs until every sender is gone and the queue is drained.
    pub async fn run(mut self) {
        let mut batch: Vec<Job> = Vec::with_capacity(self.batch_max);
        loop {
            batch.clear();
            match self.rx.recv().await {
                Some(j) => batch.push(j),
                None => break,
            }
            while batch.len() < self.batch_max {
                match self.rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.metrics.writer_queue.store(self.rx.len() as i64, Relaxed);
            self.check_order(&batch);
            self.commit_with_retry(&mut batch).await;
        }
        tracing::info!("writer drained and stopped");
    }

    /// Invariant: a device's counted readings reach the writer in apply order. Otherwise
    /// a commit could move the device's cursor past a reading whose delta is not yet
    /// committed, and a crash in between would lose that delta.
    fn check_order(&mut self, batch: &[Job]) {
        for job in batch {
            if let Work::Counted(d) = &job.work {
                // A late reading of the previous boot keeps the current cursor: it is
                // counted out of order on purpose (`WorkCenterState::late_previous_boot`).
                if d.cursor.boot > d.boot {
                    continue;
                }
                // Under a new lease token the work center's state was rebuilt from the
                // database: its order starts afresh (older jobs are fenced at commit).
                let token = job.lease.as_ref().map_or(0, |l| l.1);
                let at = (token, d.boot, d.seq);
                // The device's key is allocated once, not per reading.
                let prev = match self.last_counted.get_mut(d.device.as_str()) {
                    Some(last) => Some(std::mem::replace(last, at)),
                    None => self.last_counted.insert(d.device.clone(), at),
                };
                if let Some(prev) = prev {
                    if prev.0 == token && prev >= at {
                        self.metrics.order_violations.fetch_add(1, Relaxed);
                        tracing::error!(device = %d.device, ?prev, ?at, "counted readings reached the writer out of order");
                        debug_assert!(prev < at, "device {}: {prev:?} queued before {at:?}", d.device);
                    }
                }
            }
        }
    }

    async fn commit_with_retry(&mut self, batch: &mut Vec<Job>) {
        let mut delay = RETRY_MIN;
        let mut careful = false;
        loop {
            let started = Instant::now();
            let what = Batch {
                ledger: &self.ledger,
                progress_every: self.progress_every,
                jobs: batch,
                fence: self.fence.as_deref(),
                careful,
                known_orders: &self.known_orders,
            };
            let result = match connection(&mut self.conn, &self.store).await {
                Ok(conn) => commit(conn, self.store.backend, what).await,
                Err(e) => Err(e),
            };
            if result.is_err() {
                // The connection may be broken: a fresh one for the retry.
                if let Some(mut c) = self.conn.take() {
                    c.close_on_drop();
                }
            }
            match result {
                Ok(None) => {
                    // Some reading of the batch was committed already (a redelivery the
                    // actors could not tell), or an order changed since this writer last
                    // saw it: rolled back; once more, leaving the reading out and reading
                    // the orders.
                    debug_assert!(!careful, "a careful commit always completes");
                    self.metrics.commits_redone.fetch_add(1, Relaxed);
                    careful = true;
                }
                Ok(Some(mut summary)) => {
                    if self.known_orders.len() + summary.order_rows.len() > KNOWN_ORDERS_MAX {
                        self.known_orders.clear();
                    }
                    self.known_orders.extend(std::mem::take(&mut summary.order_rows));
                    self.metrics.commit_latency.observe(started.elapsed().as_secs_f64());
                    self.metrics.commits.fetch_add(1, Relaxed);
                    let now = crate::now_ms();
                    let waited = batch.iter().map(|j| now.saturating_sub(j.received_ms).max(0) as f64 / 1000.0);
                    self.metrics.receive_to_commit.observe_all(waited);
                    self.metrics.committed_jobs.fetch_add(batch.len() as u64, Relaxed);
                    self.metrics.good_units.fetch_add(summary.good, Relaxed);
                    self.metrics.scrap_units.fetch_add(summary.scrap, Relaxed);
                    self.metrics.dead_letters.fetch_add(summary.dead_letters, Relaxed);
                    self.metrics.writer_healthy.store(true, Relaxed);
                    // The sources first: each acknowledgement frees a place in a broker's
                    // window, and the next messages wait for it.
                    self.complete(batch, &summary.inserted, &summary.fenced).await;
                    for e in summary.events {
                        self.events.publish(e);
                    }
                    if let Some(live) = &self.live {
                        for (b, on_hand) in &summary.balances {
                            live.balance(b, *on_hand);
                        }
                        for (o, q, g, s, st) in &summary.orders {
                            live.order(o, *q, *g, *s, *st);
                        }
                    }
                    if !summary.fenced.is_empty() {
                        self.metrics.cluster_fenced.fetch_add(summary.fenced.len() as u64, Relaxed);
                        tracing::warn!(jobs = summary.fenced.len(), "commit refused for work centers this node no longer owns (fenced); their sources are not acknowledged");
                    }
                    return;
                }
                Err(e) => {
                    // Retries take the careful path: a statement at a time, in the driver's
                    // transaction, whatever made the quick one fail.
                    careful = true;
                    self.metrics.commit_errors.fetch_add(1, Relaxed);
                    self.metrics.writer_healthy.store(false, Relaxed);
                    tracing::error!(error = %e, jobs = batch.len(), retry_in_ms = delay.as_millis() as u64, "commit failed; retrying, nothing acknowledged");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Completes a committed batch: its sources first (acknowledgements, notifications),
    /// since each message's broker window waits for them; then what is left of the jobs
    /// (their in-flight places, the exporter's copies) is let go.
    ///
    /// `inserted`: positions in `batch` of the counted jobs whose readings were new
    /// (stored and counted), ascending.
    /// `fenced`: positions of the jobs refused by the lease check, ascending: not committed,
    /// so never acknowledged.
    async fn complete(&mut self, batch: &mut Vec<Job>, inserted: &[usize], fenced: &[usize]) {
        let mut publishes: Vec<(AckSender, Vec<MqttAck>)> = Vec::new();
        let mut refused = fenced.iter().peekable();
        for (i, job) in batch.iter_mut().enumerate() {
            let committed = refused.next_if_eq(&&i).is_none();
            match std::mem::replace(&mut job.done, Completion::None) {
                Completion::None => {}
                Completion::Mqtt(mut p) => {
                    if !committed {
                        p.pkid = None; // lets later acknowledgements of the session pass
                    }
                    push_ack(&mut publishes, p);
                }
                // A refused job's notification is dropped: its receiver learns it failed.
                Completion::Notify(tx) if committed => {
                    let _ = tx.send(());
                }
                Completion::Notify(_) => {}
            }
        }
        for (acker, acks) in publishes {
            // Sent to the session loop at once; a session that has stopped (its work center
            // handed over) drops them: the broker redelivers to the next owner, and
            // deduplication makes that harmless.
            acker.submit(acks);
        }
        let Some(tap) = &self.tap else {
            batch.clear();
            return;
        };
        let mut exported = Vec::with_capacity(inserted.len());
        let mut refused = fenced.iter().peekable();
        let mut next = inserted.iter().peekable();
        for (i, job) in batch.drain(..).enumerate() {
            if refused.next_if_eq(&&i).is_some() {
                continue;
            }
            if next.next_if_eq(&&i).is_some() {
                if let Work::Counted(delta) = job.work {
                    let (metrics, received_ms) = (job.metrics, job.received_ms);
                    exported.push(crate::influx::Committed { delta, metrics, received_ms });
                }
            }
        }
        tap.committed(exported);
    }
}

/// The writer's connection in `slot`, acquired (bounded by the pool's acquire timeout) when
/// there is none.
async fn connection<'a>(
    slot: &'a mut Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    store: &Store,
) -> Result<&'a mut sqlx::AnyConnection, DbError> {
    let c = match slot.take() {
        Some(c) => c,
        None => {
            let mut c = store.pool.acquire().await?;
            if store.backend == Backend::Sqlite {
                // Room for the hot pages of a long run (16 MiB, this connection only).
                sqlx::Executor::execute(&mut *c, "PRAGMA cache_size = -16384").await?;
            }
            c
        }
    };
    Ok(&mut **slot.insert(c))
}

/// Groups acknowledgements by session, keeping each session's order.
fn push_ack(groups: &mut Vec<(AckSender, Vec<MqttAck>)>, a: MqttAck) {
    match groups.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &a.acker)) {
        Some((_, v)) => v.push(a),
        None => groups.push((a.acker.clone(), vec![a])),
    }
}

#[derive(Default)]
struct Summary {
    /// Positions in the batch of jobs refused by the lease check (cluster fencing).
    fenced: Vec<usize>,
    /// Committed buffer balances, for the buffer actors.
    balances: Vec<(String, i64)>,
    /// Committed order totals (id, quantity, good, scrap, status), for the order actors.
    orders: Vec<(String, i64, i64, i64, OrderStatus)>,
    dead_letters: u64,
    good: u64,
    scrap: u64,
    events: Vec<serde_json::Value>,
    /// Positions in the batch of the counted jobs whose readings were new (stored, counted).
    inserted: Vec<usize>,
    /// The batch's orders as the commit left them, for the next commits ([`guard_orders`]).
    order_rows: Vec<(String, OrderRead)>,
}

/// Where a batch-aggregated row came from: the device and its first and last reading.
#[derive(Clone)]
struct Source {
    device: String,
    first: (u64, u64),
    last: (u64, u64),
}

impl Source {
    fn new(d: &Delta) -> Self {
        Self { device: d.device.clone(), first: (d.boot, d.seq), last: (d.boot, d.seq) }
    }
    fn extend(&mut self, d: &Delta) {
        self.first = self.first.min((d.boot, d.seq));
        self.last = self.last.max((d.boot, d.seq));
    }
    fn id(&self) -> String {
        format!("{}:{}:{}..{}:{}", self.device, self.first.0, self.first.1, self.last.0, self.last.1)
    }
}

type MoveKey = (String, String, &'static str, Option<String>, String);
type PostKey = (&'static str, Account, Account, Option<String>, String);

/// A batch's counted output of one device for one order (or none), settled once: stock
/// movements, material and standard postings are linear in good and scrap, so settling
/// the sum books what settling each reading would. Running time is priced as each reading
/// would be: per order from its cumulative running time (in [`Books::write`]), and without
/// an order reading by reading (summed here).
struct Output<'a> {
    spec: &'a WorkCenterSpec,
    good: i64,
    scrap: i64,
    /// Running time of readings that name an order.
    running_ms: i64,
    /// Conversion of readings without an order, priced one by one.
    conversion: i64,
    src: Source,
}

/// A batch's stock movements, postings and order costs, grouped per buffer, order and
/// device, so batching never changes the books.
#[derive(Default)]
struct Books<'a> {
    outputs: BTreeMap<(&'a str, Option<&'a str>), Output<'a>>,
    moves: BTreeMap<MoveKey, (i64, Source)>,
    posts: BTreeMap<PostKey, (i64, Source)>,
    costs: BTreeMap<String, (i64, i64, i64)>,
    buffers: BTreeMap<String, i64>,
    /// Running time per (order, device), priced from the order's cumulative running time.
    running: BTreeMap<(String, String), (i64, i64, Source)>,
}

impl<'a> Books<'a> {
    /// Counts one reading's output (settled with the rest of its group in [`Books::settle`]).
    fn count(&mut self, d: &'a Delta, spec: &'a WorkCenterSpec) {
        let key = (d.device.as_str(), d.order.as_deref());
        let o = self.outputs.entry(key).or_insert_with(|| Output {
            spec,
            good: 0,
            scrap: 0,
            running_ms: 0,
            conversion: 0,
            src: Source::new(d),
        });
        o.good += d.good as i64;
        o.scrap += d.scrap as i64;
        if d.order.is_some() {
            o.running_ms += d.running_ms;
        } else {
            o.conversion += mes_actors::ledger::conversion(spec.conversion_per_hour, d.running_ms);
        }
        o.src.extend(d);
    }

    /// Settles each device's and order's output of the batch into movements and postings.
    fn settle(&mut self) {
        for ((device, order), o) in std::mem::take(&mut self.outputs) {
            let s = settle(o.spec, o.good, o.scrap, 0);
            let order = order.map(str::to_string);
            for m in s.movements {
                *self.buffers.entry(m.buffer.clone()).or_default() += m.qty;
                let key = (m.buffer, m.sku, m.kind, order.clone(), device.to_string());
                self.moves.entry(key).or_insert_with(|| (0, o.src.clone())).0 += m.qty;
            }
            for p in s.postings {
                let key = (p.kind, p.debit, p.credit, order.clone(), device.to_string());
                self.posts.entry(key).or_insert_with(|| (0, o.src.clone())).0 += p.amount;
            }
            match &order {
                Some(id) => {
                    self.costs.entry(id.clone()).or_default().0 += s.material;
                    if o.running_ms > 0 {
                        let e = self
                            .running
                            .entry((id.clone(), device.to_string()))
                            .or_insert_with(|| (0, o.spec.conversion_per_hour, o.src.clone()));
                        e.0 += o.running_ms;
                    }
                }
                None if o.conversion != 0 => {
                    let key = ("conversion", Account::Wip, Account::AppliedConversion, None, device.to_string());
                    self.posts.entry(key).or_insert_with(|| (0, o.src.clone())).0 += o.conversion;
                }
                None => {}
            }
        }
    }

    /// Queues the writes on `link`'s tail; `orders` holds what pricing needs (each order's
    /// cumulative running time before the commit). Returns each order's cumulative running
    /// time after it, where the batch added some.
    async fn write(
        &mut self,
        link: &mut Link<'_>,
        now: i64,
        orders: &OrderRows,
    ) -> Result<BTreeMap<String, i64>, DbError> {
        self.settle();
        // Conversion for running time, from each order's cumulative running time.
        let running = std::mem::take(&mut self.running);
        let mut order_ms: BTreeMap<String, i64> = BTreeMap::new();
        for ((order, device), (ms, rate, src)) in running {
            let before = match order_ms.get(&order) {
                Some(v) => *v,
                None => orders.get(&order).map_or(0, |o| o.running_ms),
            };
            order_ms.insert(order.clone(), before + ms);
            let amount = mes_actors::ledger::conversion_between(rate, before, before + ms);
            let c = self.costs.entry(order.clone()).or_default();
            c.1 += amount;
            c.2 += ms;
            let key = ("conversion", Account::Wip, Account::AppliedConversion, Some(order), device);
            self.posts.entry(key).or_insert((0, src)).0 += amount;
        }
        let buffers: Vec<(&String, &i64)> = self.buffers.iter().filter(|(_, q)| **q != 0).collect();
        if !buffers.is_empty() {
            // Its returned rows are the only ones of the commit's tail: the new balances,
            // for the buffer actors (which raise alerts once the commit is done).
            let sql = format!(
                "UPDATE buffers SET on_hand = buffers.on_hand + v.column2 FROM ({}) AS v
                 WHERE buffers.id = v.column1 RETURNING buffers.id AS id, buffers.on_hand AS on_hand",
                link.rows(2)
            );
            let mut binds = Vec::with_capacity(buffers.len() * 2);
            for (b, qty) in &buffers {
                binds.extend([V::Text(b.to_string()), V::Int(**qty)]);
            }
            link.pending.push_rows(sql, binds, 2, true);
        }
        let moves: Vec<_> = self.moves.iter().filter(|(_, (q, _))| *q != 0).collect();
        // Several rows per device: a batch spanning many devices is split so that no
        // statement takes more values than SQLite (32,766) or PostgreSQL (65,535) allow.
        for moves in moves.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO stock_movements (ts_ms, buffer, sku, qty, kind, order_id, source_kind, source_id) {}",
                link.rows(8)
            );
            let mut binds = Vec::with_capacity(moves.len() * 8);
            for ((buffer, sku, kind, order, _), (qty, src)) in moves {
                binds.extend([
                    V::Int(now),
                    V::Text(buffer.clone()),
                    V::Text(sku.clone()),
                    V::Int(*qty),
                    V::Static(kind),
                    V::OptText(order.clone()),
                    V::Static("telemetry"),
                    V::Text(src.id()),
                ]);
            }
            link.pending.push_rows(sql, binds, 8, false);
        }
        let posts: Vec<_> = self.posts.iter().filter(|(_, (a, _))| *a != 0).collect();
        for posts in posts.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO journal (ts_ms, kind, debit, credit, amount, order_id, source_kind, source_id) {}",
                link.rows(8)
            );
            let mut binds = Vec::with_capacity(posts.len() * 8);
            for ((kind, debit, credit, order, _), (amount, src)) in posts {
                binds.extend([
                    V::Int(now),
                    V::Static(kind),
                    V::Static(debit.code()),
                    V::Static(credit.code()),
                    V::Int(*amount),
                    V::OptText(order.clone()),
                    V::Static("telemetry"),
                    V::Text(src.id()),
                ]);
            }
            link.pending.push_rows(sql, binds, 8, false);
        }
        let costs: Vec<_> = self.costs.iter().collect();
        for costs in costs.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO order_costs (order_id, material, conversion, running_ms) {}
                 ON CONFLICT (order_id) DO UPDATE SET material = order_costs.material + excluded.material,
                   conversion = order_costs.conversion + excluded.conversion,
                   running_ms = order_costs.running_ms + excluded.running_ms",
                link.rows(4)
            );
            let mut binds = Vec::with_capacity(costs.len() * 4);
            for (order, (material, conversion, running)) in costs {
                binds.extend([V::Text(order.to_string()), V::Int(*material), V::Int(*conversion), V::Int(*running)]);
            }
            link.pending.push_rows(sql, binds, 4, false);
        }
        Ok(order_ms)
    }
}

/// A value bound to a statement of the commit's [`Tail`].
#[derive(Clone)]
enum V {
    Int(i64),
    OptInt(Option<i64>),
    Text(String),
    OptText(Option<String>),
    Static(&'static str),
}

/// The writes of one commit that need no answer but the new balances, sent as one query:
/// one round trip instead of one per statement, which under a flood (both cores busy, each
/// trip a wait to be scheduled) is most of a statement's cost. On SQLite the statements run
/// as one multi-statement query; PostgreSQL takes no parameters in those, so there they are
/// data-modifying CTEs of one statement. They write distinct tables; the checks that read
/// what a later part writes (cursors, orders) come first, and PostgreSQL's parts all see
/// the snapshot of the statement's start, so both forms mean the same as running them one
/// by one.
struct Tail {
    backend: Backend,
    /// (SQL, values, whether its rows are the tail's answer)
    parts: Vec<(String, Vec<V>, bool)>,
    binds: usize,
}

impl Tail {
    fn new(backend: Backend) -> Self {
        Self { backend, parts: Vec::new(), binds: 0 }
    }

    /// The number of the next statement's first placeholder (PostgreSQL numbers them
    /// across the whole query).
    fn next(&self) -> usize {
        self.binds + 1
    }

    /// Pushes a statement over [`row_source`] rows: `binds` row by row, `cols` a row.
    fn push_rows(&mut self, sql: String, binds: Vec<V>, cols: usize, returns: bool) {
        let sql = self.typed(sql, &binds, cols);
        let binds = row_binds(binds, cols);
        self.push(sql, binds, returns);
    }

    /// On PostgreSQL, the statement's rows typed by their values ([`pg_source`]) in place of
    /// [`PG_ROWS`]; on SQLite the statement as it is.
    fn typed(&self, sql: String, binds: &[V], cols: usize) -> String {
        match self.backend {
            Backend::Sqlite => sql,
            Backend::Postgres => sql.replacen(PG_ROWS, &pg_source(binds, cols, self.next()), 1),
        }
    }

    fn push(&mut self, sql: String, binds: Vec<V>, returns: bool) {
        debug_assert!(!returns || !self.parts.iter().any(|p| p.2), "one part returns the answer");
        self.binds += binds.len();
        self.parts.push((sql, binds, returns));
    }

    /// A statement without values before every other (a SQLite transaction's opening).
    fn push_front(&mut self, sql: &str) {
        self.parts.insert(0, (sql.to_string(), Vec::new(), false));
    }

    fn bind(mut q: AnyQuery, binds: Vec<V>) -> AnyQuery {
        for v in binds {
            q = match v {
                V::Int(i) => q.bind(i),
                V::OptInt(i) => q.bind(i),
                V::Text(t) => q.bind(t),
                V::OptText(t) => q.bind(t),
                V::Static(t) => q.bind(t),
            };
        }
        q
    }

    /// Runs every part; returns the rows of the part that returns rows.
    async fn run(self, conn: &mut sqlx::AnyConnection) -> Result<Vec<sqlx::any::AnyRow>, DbError> {
        let answer = self.parts.iter().position(|p| p.2);
        let (sqls, binds): (Vec<String>, Vec<Vec<V>>) = self.parts.into_iter().map(|(s, b, _)| (s, b)).unzip();
        let sql = match (self.backend, sqls.len()) {
            (_, 0) => return Ok(Vec::new()),
            (_, 1) => sqls.concat(),
            // `?` placeholders take their values in order across the statements.
            (Backend::Sqlite, _) => sqls.join(";\n"),
            (Backend::Postgres, _) => {
                let ctes: Vec<String> = sqls.iter().enumerate().map(|(i, s)| format!("w{i} AS ({s})")).collect();
                let last = match answer {
                    Some(i) => format!("SELECT * FROM w{i}"),
                    None => "SELECT 1 AS done".to_string(),
                };
                format!("WITH {} {last}", ctes.join(",\n"))
            }
        };
        // The text is the same from batch to batch whatever the row counts (see
        // [`row_source`]): kept in the connection's statement cache, prepared (and on
        // PostgreSQL planned) once; the driver resets a statement an error left mid-query.
        let mut q = sqlx::query(AssertSqlSafe(sql)).persistent(true);
        for b in binds {
            q = Self::bind(q, b);
        }
        match answer {
            Some(_) => Ok(q.fetch_all(&mut *conn).await?),
            None => {
                q.execute(&mut *conn).await?;
                Ok(Vec::new())
            }
        }
    }
}

type AnyQuery = sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>;

#[derive(Default)]
struct WcAgg<'a> {
    good: i64,
    scrap: i64,
    last: Option<&'a Delta>,
}

/// `(?,?),(?,?)` on SQLite, `($1,$2),($3,$4)` on PostgreSQL: placeholders for a multi-row
/// statement whose values are bound in order. (SQLite resolves `$n` names by a linear
/// scan per parameter, which makes large statements quadratic there.)
pub(crate) fn rows_sql(backend: Backend, rows: usize, cols: usize) -> String {
    let mut sql = String::with_capacity(rows * cols * 4);
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push(',');
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    sql.push('$');
                    sql.push_str(&(1 + r * cols + c).to_string());
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// The rows of a multi-row statement, to follow `INSERT INTO t (cols)` or to stand in
/// `FROM (…) AS v` (columns `column1`, `column2`, …), their values bound as one JSON array
/// of rows ([`row_binds`]), so that the statement's text depends on the column count only:
/// the same from batch to batch, prepared once and kept in the connection's statement cache
/// (with a placeholder per value, parsing each commit's statements had been two fifths of
/// the SQLite thread's time under a flood; on PostgreSQL, parsing and planning them each
/// commit, a third of the commit, session 13).
///
/// On SQLite: `SELECT value->>0 AS column1, … FROM jsonb_each(?) WHERE true` (the `WHERE`
/// lets an upsert follow). On PostgreSQL the columns need a type, which the values give:
/// [`PG_ROWS`] stands in until the statement is pushed with them ([`Tail::typed`]).
fn row_source(backend: Backend, cols: usize) -> String {
    match backend {
        Backend::Postgres => PG_ROWS.to_string(),
        Backend::Sqlite => {
            let mut sql = String::from("SELECT ");
            for c in 0..cols {
                if c > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("value->>{c} AS column{}", c + 1));
            }
            sql.push_str(" FROM jsonb_each(?) WHERE true");
            sql
        }
    }
}

/// Marks where a PostgreSQL statement's rows go until its values are known.
const PG_ROWS: &str = "\u{1}rows\u{1}";

/// The rows of a PostgreSQL statement from one JSON parameter, `$first`:
/// `SELECT (e.value->>0)::bigint AS column1, e.value->>1 AS column2, … FROM
/// jsonb_array_elements($first::jsonb) AS e`, a column `bigint` where its values are
/// integers and `text` where they are texts (as the first row's are: a column's values are
/// all of one kind). `jsonb`, not `json`: the text is parsed once, and each `->>` is a
/// lookup; on `json` every `->>` lexed its row's text again (an eighth of a PostgreSQL
/// flood's samples, session 14).
fn pg_source(binds: &[V], cols: usize, first: usize) -> String {
    let mut sql = String::from("SELECT ");
    for c in 0..cols {
        if c > 0 {
            sql.push_str(", ");
        }
        match binds.get(c) {
            Some(V::Int(_) | V::OptInt(_)) => sql.push_str(&format!("(e.value->>{c})::bigint AS column{}", c + 1)),
            _ => sql.push_str(&format!("e.value->>{c} AS column{}", c + 1)),
        }
    }
    sql.push_str(&format!(" FROM jsonb_array_elements(${first}::jsonb) AS e"));
    sql
}

/// The values of [`row_source`] rows: one JSON text, an array of rows, each an array of
/// its `cols` values.
fn row_binds(binds: Vec<V>, cols: usize) -> Vec<V> {
    debug_assert!(cols > 0 && binds.len().is_multiple_of(cols), "whole rows");
    let rows: Vec<&[V]> = binds.chunks(cols).collect();
    // Writing to memory cannot fail, nor can these values fail to serialize.
    let json = serde_json::to_string(&rows).unwrap_or_default();
    vec![V::Text(json)]
}

/// A value as JSON: integers as numbers, texts as strings, an absent value as `null`.
impl serde::Serialize for V {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            V::Int(n) | V::OptInt(Some(n)) => s.serialize_i64(*n),
            V::OptInt(None) | V::OptText(None) => s.serialize_none(),
            V::Text(t) | V::OptText(Some(t)) => s.serialize_str(t),
            V::Static(t) => s.serialize_str(t),
        }
    }
}

/// An order as the commit found it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct OrderRow {
    status: OrderStatus,
    quantity: i64,
    good: i64,
    scrap: i64,
}

impl OrderRow {
    /// The order once a batch's output is added: its counts, and the status that output
    /// implies.
    fn after(self, good: i64, scrap: i64) -> OrderRow {
        let status = match good > 0 || scrap > 0 {
            true => self.status.after_output((self.good + good).max(0) as u64, self.quantity.max(0) as u64),
            false => self.status,
        };
        OrderRow { status, good: self.good + good, scrap: self.scrap + scrap, ..self }
    }
}

/// What the commit reads of one order named by its readings: its row (`None`: no such
/// order) and its cumulative running time so far (`order_costs`, 0 if none).
#[derive(Clone, Copy, Debug, PartialEq)]
struct OrderRead {
    order: Option<OrderRow>,
    running_ms: i64,
}

type OrderRows = std::collections::HashMap<String, OrderRead>;

/// Reads the named orders and their running time in one statement, which travels with
/// whatever is pending on the link (the telemetry packs): one trip however many orders the
/// batch touches (was three trips per order).
async fn read_orders<'o>(link: &mut Link<'_>, ids: impl Iterator<Item = &'o str>) -> Result<OrderRows, DbError> {
    let ids: Vec<&str> = ids.collect();
    let mut out = OrderRows::with_capacity(ids.len());
    for ids in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT v.column1 AS id, o.status AS status, o.quantity AS quantity, o.good AS good, o.scrap AS scrap,
               c.running_ms AS running_ms
             FROM ({}) AS v
             LEFT JOIN orders o ON o.id = v.column1
             LEFT JOIN order_costs c ON c.order_id = v.column1",
            link.rows(1)
        );
        let binds = ids.iter().map(|id| V::Text(id.to_string())).collect();
        for r in link.read(sql, binds, 1).await? {
            let status: Option<String> = r.try_get("status")?;
            let order = match status {
                Some(s) => Some(OrderRow {
                    status: s.parse().map_err(DbError::Other)?,
                    quantity: r.try_get("quantity")?,
                    good: r.try_get("good")?,
                    scrap: r.try_get("scrap")?,
                }),
                None => None,
            };
            let running_ms = r.try_get::<Option<i64>, _>("running_ms")?.unwrap_or(0);
            out.insert(r.try_get("id")?, OrderRead { order, running_ms });
        }
    }
    Ok(out)
}

/// Checks in SQL, travelling with the rest of the commit, that the orders are as `rows`
/// say (as this writer's earlier commits left them): status, quantity, counts, running
/// time, or absent. A planner's change (or another node's commit) since makes the check
/// fail the query like a reading stored already ([`guard_cursors`]): the commit is rolled
/// back and redone carefully, reading the orders.
fn guard_orders(link: &mut Link<'_>, rows: &OrderRows) {
    let mut binds = Vec::with_capacity(rows.len() * 6);
    for (id, read) in rows {
        let row = read.order.as_ref();
        binds.extend([
            V::Text(id.to_string()),
            V::OptText(row.map(|r| r.status.as_str().to_string())),
            V::OptInt(row.map(|r| r.quantity)),
            V::OptInt(row.map(|r| r.good)),
            V::OptInt(row.map(|r| r.scrap)),
            V::Int(read.running_ms),
        ]);
    }
    push_check(
        link,
        "LEFT JOIN orders o ON o.id = v.column1
         LEFT JOIN order_costs c ON c.order_id = v.column1
         WHERE CASE WHEN v.column2 IS NULL THEN o.id IS NOT NULL
                    ELSE o.id IS NULL OR o.status <> v.column2 OR o.quantity <> v.column3
                      OR o.good <> v.column4 OR o.scrap <> v.column5 END
            OR COALESCE(c.running_ms, 0) <> v.column6",
        binds,
        6,
    );
}

/// Queues a check on `binds`' rows (`cols` values each, the columns `v.column1`, …):
/// `INSERT INTO commit_checks (ok) SELECT false FROM (rows) AS v {joins_where} LIMIT 1`,
/// one statement per [`ROWS_PER_STATEMENT`] rows. A row meeting `joins_where` inserts a row
/// that the `commit_checks` constraint refuses, failing the whole query, and the commit is
/// rolled back and redone carefully ([`is_short_insert`]).
fn push_check(link: &mut Link<'_>, joins_where: &str, mut binds: Vec<V>, cols: usize) {
    let refuse = match link.backend {
        Backend::Sqlite => "0",
        Backend::Postgres => "false",
    };
    while !binds.is_empty() {
        let rest = binds.split_off(binds.len().min(ROWS_PER_STATEMENT * cols));
        let sql = format!(
            "INSERT INTO commit_checks (ok) SELECT {refuse} FROM ({}) AS v {joins_where} LIMIT 1",
            link.rows(cols)
        );
        link.pending.push_rows(sql, std::mem::replace(&mut binds, rest), cols, false);
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64, DbError> {
    i64::try_from(v).map_err(|_| DbError::Other(format!("{what} {v} exceeds the storable range")))
}

/// Commits one batch in one transaction.
///
/// Unless `careful` (or fenced), the commit opens and closes its transaction itself, so that
/// its statements travel in as few trips to the database as the steps allow (see [`Link`]):
/// with no step that must read an answer first (orders this writer has not seen yet, ERP
/// documents, dead letters), the whole batch, telemetry packs and the checks that they are
/// new and that the orders are as this writer left them included, is one trip. Under a
/// flood each trip is a wait to be scheduled on a busy core, so trips, not statements, set
/// the pace.
async fn commit(conn: &mut sqlx::AnyConnection, backend: Backend, what: Batch<'_>) -> Result<Option<Summary>, DbError> {
    if !what.careful && what.fence.is_none() {
        let mut link = Link::new(conn, backend);
        link.own_tx = true;
        let done = match steps(&mut link, what).await {
            Ok(summary) => link.finish().await.map(|()| summary),
            Err(e) => Err(e),
        };
        let mut summary = match done {
            Ok(summary) => summary,
            Err(e) => {
                // Whatever ran of the batch goes back; the connection stays usable.
                link.rollback().await;
                return match is_short_insert(&e) {
                    // A reading was committed already: redo the batch carefully.
                    true => Ok(None),
                    false => Err(e),
                };
            }
        };
        summary.balances = link.balances();
        return Ok(Some(summary));
    }
    let mut tx = sqlx::Connection::begin(conn).await?;
    let summary = {
        let mut link = Link::new(&mut tx, backend);
        let mut summary = steps(&mut link, what).await?;
        link.flush().await?;
        summary.balances = link.balances();
        summary
    };
    tx.commit().await?;
    Ok(Some(summary))
}

/// What one commit is asked to do: the batch and the writer's settings for it.
#[derive(Clone, Copy)]
struct Batch<'a> {
    ledger: &'a Ledger,
    /// Good units between ERP progress documents of an order (0: none).
    progress_every: i64,
    jobs: &'a [Job],
    /// Cluster mode: this node's id, for the lease check.
    fence: Option<&'a str>,
    /// Redo: the committed cursors are read, to leave out readings they cover.
    careful: bool,
    /// The orders as the writer's earlier commits left them.
    known_orders: &'a OrderRows,
}

/// The steps of one commit, in order, on `link` (which [`commit`] chose and which decides
/// when they travel). In the commit's own transaction a reading committed already fails
/// the query (see [`guard_cursors`]); otherwise such readings are found and left out.
async fn steps(link: &mut Link<'_>, what: Batch<'_>) -> Result<Summary, DbError> {
    let Batch { ledger, progress_every, jobs: batch, fence, careful, known_orders } = what;
    let mut summary = Summary::default();
    // 0. Fencing (cluster mode): the jobs of a work center commit only while this node
    // holds its lease under the token their state was built with. The lease rows stay
    // locked until the commit, so a takeover waits for it and then sees what it wrote.
    if let Some(node) = fence {
        summary.fenced = fenced_jobs(link.conn().await?, node, batch).await?;
    }
    let refused: HashSet<usize> = summary.fenced.iter().copied().collect();
    let live: Vec<(usize, &Job)> = batch.iter().enumerate().filter(|(i, _)| !refused.contains(i)).collect();

    // 1. Telemetry, packed per device; only readings beyond the committed device cursors
    // count (database idempotency).
    // (delta, received, position in the batch, device metrics)
    let counted: Vec<CountedRow> = live
        .iter()
        .filter_map(|&(i, j)| match &j.work {
            Work::Counted(d) => Some((d.as_ref(), j.received_ms, i, &j.metrics)),
            _ => None,
        })
        .collect();
    let mut inserted = vec![true; counted.len()];
    if link.own_tx && !careful && in_cursor_order(&counted) {
        // Checked in SQL, travelling with the rest of the commit.
        guard_cursors(link, &counted)?;
    } else {
        beyond_cursors(link, &counted, &mut inserted).await?;
    }
    insert_packs(link, &counted, &inserted)?;

    // 2. Aggregate what was inserted.
    let mut cursors: BTreeMap<&str, &Delta> = BTreeMap::new();
    // Per device, the device time of its newest reading of the batch that moved the cursor
    // and carried one (the actor's `last_ts_ms`, stored with the cursor): a late reading of
    // the previous boot leaves it.
    let mut last_ts: BTreeMap<&str, i64> = BTreeMap::new();
    let mut wcs: BTreeMap<&str, WcAgg> = BTreeMap::new();
    let mut orders: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    let mut state_changes: Vec<(&Delta, i64)> = Vec::new();
    let mut books = Books::default();
    for ((d, received, i, _), _) in counted.iter().zip(&inserted).filter(|(_, new)| **new) {
        summary.inserted.push(*i);
        let c = cursors.entry(d.device.as_str()).or_insert(d);
        if stored_cursor_key(d) > stored_cursor_key(c) {
            *c = d;
        }
        if let Some(ts) = d.ts_ms.filter(|_| (d.cursor.boot, d.cursor.seq) == (d.boot, d.seq)) {
            // Readings of a device come in apply order: the last one wins.
            last_ts.insert(d.device.as_str(), ts);
        }
        let w = wcs.entry(d.work_center.as_str()).or_default();
        w.good += d.good as i64;
        w.scrap += d.scrap as i64;
        // The newest reading of the batch sets the stored state, whatever order the batch is in.
        if w.last.is_none_or(|l| (d.boot, d.seq) > (l.boot, l.seq)) {
            w.last = Some(d);
        }
        if let Some(o) = d.order.as_deref() {
            let e = orders.entry(o).or_default();
            e.0 += d.good as i64;
            e.1 += d.scrap as i64;
        }
        if d.state_changed {
            state_changes.push((d, d.ts_ms.unwrap_or(*received)));
        }
        summary.good += d.good;
        summary.scrap += d.scrap;
        if let Some(spec) = ledger.by_wc.get(&d.work_center) {
            books.count(d, spec);
        }
    }
    let now = crate::now_ms();
    // What the batch's orders hold so far (counts, status, running time): one read for all
    // of them, travelling with the telemetry packs.
    // In the commit's own transaction, orders this writer's commits have seen are taken as
    // they left them, checked in SQL with the rest of the commit (no trip of their own).
    let remembered = link.own_tx && !careful && orders.keys().all(|o| known_orders.contains_key(*o));
    let order_rows = match remembered {
        true => {
            let rows: OrderRows =
                orders.keys().filter_map(|o| known_orders.get_key_value(*o)).map(|(k, v)| (k.clone(), *v)).collect();
            guard_orders(link, &rows);
            rows
        }
        false => read_orders(link, orders.keys().copied()).await?,
    };
    // The commit's writes that need no answer but the new balances wait on the link (see
    // [`Link`]): stock, books and costs, cursors, work centers, raw registers, orders.
    let order_ms = books.write(link, now, &order_rows).await?;
    // What the orders will hold once this commit is in (the status as this writer moves it:
    // a planner's change committed meanwhile wins in the database, and the next commit's
    // check then finds the difference and reads the orders again).
    for (order, read) in &order_rows {
        let running_ms = order_ms.get(order).copied().unwrap_or(read.running_ms);
        let row = read.order.map(|row| {
            let (good, scrap) = orders.get(order.as_str()).copied().unwrap_or_default();
            row.after(good, scrap)
        });
        summary.order_rows.push((order.clone(), OrderRead { order: row, running_ms }));
    }

    // 3. Device cursors, with where the previous boot stopped, move only forward (in the
    // order of `stored_cursor_key`; one statement per 2,000 devices).
    let cursors: Vec<&Delta> = cursors.into_values().collect();
    for cursors in cursors.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO device_cursors (device, boot, seq, good, scrap, updated_ms, prev_boot, prev_seq, prev_good, prev_scrap, last_ts_ms)
             {}
             ON CONFLICT (device) DO UPDATE SET boot = excluded.boot, seq = excluded.seq, good = excluded.good,
               scrap = excluded.scrap, updated_ms = excluded.updated_ms, prev_boot = excluded.prev_boot,
               prev_seq = excluded.prev_seq, prev_good = excluded.prev_good, prev_scrap = excluded.prev_scrap,
               last_ts_ms = COALESCE(excluded.last_ts_ms, device_cursors.last_ts_ms)
             WHERE (excluded.boot, excluded.seq, COALESCE(excluded.prev_boot, -1), COALESCE(excluded.prev_seq, -1))
                 > (device_cursors.boot, device_cursors.seq, COALESCE(device_cursors.prev_boot, -1),
                    COALESCE(device_cursors.prev_seq, -1))",
            link.rows(11)
        );
        let mut binds = Vec::with_capacity(cursors.len() * 11);
        for d in cursors {
            let prev = |v: fn(&Cursor) -> u64, what| d.prev_boot.as_ref().map(|p| to_i64(v(p), what)).transpose();
            binds.extend([
                V::Text(d.device.clone()),
                V::Int(to_i64(d.cursor.boot, "boot")?),
                V::Int(to_i64(d.cursor.seq, "seq")?),
                V::Int(to_i64(d.cursor.good, "good")?),
                V::Int(to_i64(d.cursor.scrap, "scrap")?),
                V::Int(now),
                V::OptInt(prev(|p| p.boot, "previous boot")?),
                V::OptInt(prev(|p| p.seq, "previous boot's seq")?),
                V::OptInt(prev(|p| p.good, "previous boot's good")?),
                V::OptInt(prev(|p| p.scrap, "previous boot's scrap")?),
                V::OptInt(last_ts.get(d.device.as_str()).copied()),
            ]);
        }
        link.pending.push_rows(sql, binds, 11, false);
    }

    // 4. Work center totals and last state (one statement per 2,000 work centers).
    let wc_rows: Vec<(&str, &WcAgg, &Delta)> = wcs.iter().filter_map(|(w, a)| a.last.map(|l| (*w, a, l))).collect();
    for wc_rows in wc_rows.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE work_centers SET good_total = work_centers.good_total + v.column2,
               scrap_total = work_centers.scrap_total + v.column3, state = v.column4, reason = v.column5,
               current_order = COALESCE(v.column6, work_centers.current_order), last_seen_ms = v.column7,
               updated_ms = v.column7
             FROM ({}) AS v WHERE work_centers.id = v.column1",
            link.rows(7)
        );
        let mut binds = Vec::with_capacity(wc_rows.len() * 7);
        for (wc, agg, last) in wc_rows {
            binds.extend([
                V::Text(wc.to_string()),
                V::Int(agg.good),
                V::Int(agg.scrap),
                V::Static(last.state.as_str()),
                V::OptText(last.reason.clone()),
                V::OptText(last.order.clone()),
                V::Int(now),
            ]);
            if agg.good > 0 || agg.scrap > 0 {
                summary.events.push(serde_json::json!({
                    "type": "counts", "work_center": wc, "good": agg.good, "scrap": agg.scrap,
                    "order": last.order, "state": last.state.as_str()
                }));
            }
        }
        link.pending.push_rows(sql, binds, 7, false);
    }

    // 4b. Raw registers of polled devices (the next baseline): a device's newest poll in the
    // batch (PostgreSQL refuses an upsert that touches one row twice).
    let mut newest: BTreeMap<&str, &RawCounters> = BTreeMap::new();
    for (device, r) in live.iter().filter_map(|(_, j)| j.raw.as_ref()) {
        newest.insert(device.as_str(), r);
    }
    let raws: Vec<(&str, &RawCounters)> = newest.into_iter().collect();
    for raws in raws.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO modbus_raw (device, good, scrap, boot, updated_ms) {}
             ON CONFLICT (device) DO UPDATE SET good = excluded.good, scrap = excluded.scrap, boot = excluded.boot,
               updated_ms = excluded.updated_ms",
            link.rows(5)
        );
        let mut binds = Vec::with_capacity(raws.len() * 5);
        for (device, r) in raws {
            binds.extend([
                V::Text(device.to_string()),
                V::Int(to_i64(r.good, "raw good")?),
                V::Int(to_i64(r.scrap, "raw scrap")?),
                V::OptInt(r.boot.map(|b| to_i64(b, "raw boot")).transpose()?),
                V::Int(now),
            ]);
        }
        link.pending.push_rows(sql, binds, 5, false);
    }

    // 5. Orders: counts and the status that output implies, from the rows read at the start
    // of the commit. Only this writer changes an order's counts, and the counts are added,
    // not set; a planner's status change committed since the read wins (the guard).
    let mut updates: Vec<(&str, i64, i64, OrderStatus, OrderStatus)> = Vec::new();
    let mut documents: Vec<(String, &str)> = Vec::new();
    for (order, (good, scrap)) in &orders {
        let Some(row) = order_rows.get(*order).and_then(|o| o.order.as_ref()) else { continue };
        let OrderRow { status: from, quantity, good: prev_good, scrap: prev_scrap } = *row;
        let to = row.after(*good, *scrap).status;
        updates.push((order, *good, *scrap, from, to));
        // A progress document for each multiple of `progress_every` good units passed below
        // the quantity (one per multiple, however the readings were batched).
        if progress_every > 0 {
            let mut mark = (prev_good / progress_every + 1) * progress_every;
            while mark <= prev_good + good && mark < quantity {
                documents.push((format!("progress-{mark}"), *order));
                mark += progress_every;
            }
        }
        if to == OrderStatus::Completed && from != OrderStatus::Completed {
            documents.push(("completion".to_string(), *order));
        }
        // Status events come from the order actors once this commit is done.
        summary.orders.push((order.to_string(), quantity, prev_good + good, prev_scrap + scrap, to));
    }
    for updates in updates.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE orders SET good = orders.good + v.column2, scrap = orders.scrap + v.column3,
               status = CASE WHEN orders.status = v.column4 THEN v.column5 ELSE orders.status END,
               updated_ms = v.column6
             FROM ({}) AS v WHERE orders.id = v.column1",
            link.rows(6)
        );
        let mut binds = Vec::with_capacity(updates.len() * 6);
        for (order, good, scrap, from, to) in updates {
            binds.extend([
                V::Text(order.to_string()),
                V::Int(*good),
                V::Int(*scrap),
                V::Static(from.as_str()),
                V::Static(to.as_str()),
                V::Int(now),
            ]);
        }
        link.pending.push_rows(sql, binds, 6, false);
    }
    // ERP documents, read from the updated orders (rare: a trip each).
    for (kind, order) in &documents {
        crate::db::outbox::enqueue(link.conn().await?, kind, order, now).await?;
    }

    // 6. State changes, for availability and the six big losses.
    for changes in state_changes.chunks(ROWS_PER_STATEMENT) {
        let sql = format!("INSERT INTO state_changes (work_center, state, reason, ts_ms) {}", link.rows(4));
        let mut binds = Vec::with_capacity(changes.len() * 4);
        for (d, ts) in changes {
            binds.extend([
                V::Text(d.work_center.clone()),
                V::Static(d.state.as_str()),
                V::OptText(d.reason.clone()),
                V::Int(*ts),
            ]);
        }
        link.pending.push_rows(sql, binds, 4, false);
    }
    for (d, _) in &state_changes {
        summary.events.push(serde_json::json!({"type": "state", "work_center": d.work_center, "state": d.state.as_str(), "reason": d.reason}));
    }

    // 7. Dead letters.
    for (_, j) in &live {
        if let Work::DeadLetter { topic, reason, payload, redelivered } = &j.work {
            // A redelivery of a dead letter already kept is not kept twice.
            let sql = if *redelivered {
                "INSERT INTO dead_letters (received_ms, topic, reason, payload) SELECT $1, $2, $3, $4
                 WHERE NOT EXISTS (SELECT 1 FROM dead_letters WHERE topic = $2 AND payload = $4)"
            } else {
                "INSERT INTO dead_letters (received_ms, topic, reason, payload) VALUES ($1, $2, $3, $4)"
            };
            let r = sqlx::query(sql)
                .bind(j.received_ms)
                .bind(topic.as_str())
                .bind(reason.as_str())
                .bind(payload.as_str())
                .execute(link.conn().await?)
                .await?;
            summary.dead_letters += r.rows_affected();
        }
    }

    Ok(summary)
}

/// A counted reading on its way into a telemetry pack: delta, receive time, position in
/// the batch, device metrics.
type CountedRow<'a> = (&'a Delta, i64, usize, &'a BTreeMap<String, f64>);

type CursorKey = (u64, u64, Option<(u64, u64)>);

/// Whether each device's readings come in strictly growing cursor order, as the actors
/// send them: then a device's first reading in the batch is its lowest, and checking it
/// against the committed cursor ([`guard_cursors`]) checks them all.
fn in_cursor_order(counted: &[CountedRow<'_>]) -> bool {
    let mut last: HashMap<&str, CursorKey> = HashMap::new();
    counted.iter().all(|(d, ..)| {
        let k = stored_cursor_key(d);
        last.insert(d.device.as_str(), k).is_none_or(|prev| prev < k)
    })
}

/// Queues the check that each device's first reading in the batch lies beyond the
/// device's committed cursor, i.e. that no reading of the batch was committed before (a
/// redelivery the actors could not tell, a batch whose acknowledgements were lost).
///
/// The check travels with the rest of the commit, before the cursors move: a reading
/// committed already makes it insert a row that `commit_checks` refuses, failing the whole
/// query; the commit then rolls back and is redone carefully ([`beyond_cursors`]).
fn guard_cursors(link: &mut Link<'_>, counted: &[CountedRow<'_>]) -> Result<(), DbError> {
    let mut firsts: BTreeMap<&str, &Delta> = BTreeMap::new();
    for (d, ..) in counted {
        firsts.entry(d.device.as_str()).or_insert(d);
    }
    let mut binds = Vec::with_capacity(firsts.len() * 5);
    for d in firsts.into_values() {
        let (boot, seq, prev) = stored_cursor_key(d);
        binds.extend([
            V::Text(d.device.clone()),
            V::Int(to_i64(boot, "boot")?),
            V::Int(to_i64(seq, "seq")?),
            V::OptInt(prev.map(|p| to_i64(p.0, "previous boot")).transpose()?),
            V::OptInt(prev.map(|p| to_i64(p.1, "previous boot's seq")).transpose()?),
        ]);
    }
    push_check(
        link,
        "JOIN device_cursors c ON c.device = v.column1
         WHERE (v.column2, v.column3, COALESCE(v.column4, -1), COALESCE(v.column5, -1))
            <= (c.boot, c.seq, COALESCE(c.prev_boot, -1), COALESCE(c.prev_seq, -1))",
        binds,
        5,
    );
    Ok(())
}

/// Marks in `inserted` the readings beyond their device's committed cursor and beyond the
/// batch's earlier readings of the device; the others were counted already and count
/// nothing now. Reads the cursors in the commit's transaction (the careful way, and the
/// fenced one).
async fn beyond_cursors(link: &mut Link<'_>, counted: &[CountedRow<'_>], inserted: &mut [bool]) -> Result<(), DbError> {
    debug_assert_eq!(counted.len(), inserted.len());
    let devices: Vec<&str> = counted
        .iter()
        .map(|(d, ..)| d.device.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut stored: HashMap<String, CursorKey> = HashMap::with_capacity(devices.len());
    for devices in devices.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT c.device AS device, {} FROM ({}) AS v JOIN device_cursors c ON c.device = v.column1",
            super::queries::CURSOR_COLS,
            link.rows(1)
        );
        let binds = devices.iter().map(|d| V::Text(d.to_string())).collect();
        for r in link.read(sql, binds, 1).await? {
            let (cursor, prev) = super::queries::stored_cursor(&r)?;
            stored.insert(r.try_get("device")?, cursor_key(&cursor, prev.as_ref()));
        }
    }
    for ((d, ..), slot) in counted.iter().zip(inserted.iter_mut()) {
        let k = stored_cursor_key(d);
        *slot = stored.get(&d.device).is_none_or(|s| k > *s);
        if *slot {
            stored.insert(d.device.clone(), k);
        }
    }
    Ok(())
}

/// A device's new readings of the batch, packed into one `telemetry_packs` row.
struct Pack {
    t_min: i64,
    t_max: i64,
    last: (u64, u64),
    n: i64,
    /// The readings' good and scrap units (migration 0013).
    good: i64,
    scrap: i64,
    /// The readings as a JSON array (see migration 0012).
    readings: String,
}

/// Queues the packs of the batch's new readings: one row per device (and work center),
/// its readings in batch order, each `[boot, seq, order_id, ts_ms, received_ms, good,
/// scrap, state, metrics]`.
fn insert_packs(link: &mut Link<'_>, counted: &[CountedRow<'_>], inserted: &[bool]) -> Result<(), DbError> {
    let sum = |a: i64, b: i64, what: &str| {
        a.checked_add(b).ok_or_else(|| DbError::Other(format!("a pack's {what} exceeds the storable range")))
    };
    let mut packs: BTreeMap<(&str, &str), Pack> = BTreeMap::new();
    for ((d, received, _, metrics), _) in counted.iter().zip(inserted).filter(|(_, new)| **new) {
        let t = d.ts_ms.unwrap_or(*received);
        let p = packs.entry((d.device.as_str(), d.work_center.as_str())).or_insert_with(|| Pack {
            t_min: t,
            t_max: t,
            last: (d.boot, d.seq),
            n: 0,
            good: 0,
            scrap: 0,
            readings: String::from("["),
        });
        if p.n > 0 {
            p.readings.push(',');
        }
        let (good, scrap) = (to_i64(d.good, "good")?, to_i64(d.scrap, "scrap")?);
        let reading = (
            to_i64(d.boot, "boot")?,
            to_i64(d.seq, "seq")?,
            &d.order,
            d.ts_ms,
            *received,
            good,
            scrap,
            d.state.as_str(),
            (!metrics.is_empty()).then_some(*metrics),
        );
        // Writing to memory cannot fail; these values always serialize.
        p.readings.push_str(&serde_json::to_string(&reading).unwrap_or_default());
        p.t_min = p.t_min.min(t);
        p.t_max = p.t_max.max(t);
        p.last = p.last.max((d.boot, d.seq));
        p.n += 1;
        p.good = sum(p.good, good, "good units")?;
        p.scrap = sum(p.scrap, scrap, "scrap units")?;
    }
    let packs: Vec<_> = packs.into_iter().collect();
    for packs in packs.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO telemetry_packs (device, work_center, t_min, t_max, last_boot, last_seq, n, good, scrap, readings) {}",
            link.rows(10)
        );
        let mut binds = Vec::with_capacity(packs.len() * 10);
        for ((device, wc), p) in packs {
            binds.extend([
                V::Text(device.to_string()),
                V::Text(wc.to_string()),
                V::Int(p.t_min),
                V::Int(p.t_max),
                V::Int(to_i64(p.last.0, "boot")?),
                V::Int(to_i64(p.last.1, "seq")?),
                V::Int(p.n),
                V::Int(p.good),
                V::Int(p.scrap),
                V::Text(format!("{}]", p.readings)),
            ]);
        }
        link.pending.push_rows(sql, binds, 10, false);
    }
    Ok(())
}

/// Whether a commit failed on its check that every reading is new ([`guard_cursors`]).
fn is_short_insert(e: &DbError) -> bool {
    match e {
        DbError::Sqlx(sqlx::Error::Database(d)) => d.message().contains("telemetry_rows_all_new"),
        _ => false,
    }
}

/// Rows of a multi-row statement of the commit (stock movements and journal lines per
/// device and kind, cursors, work centers, raw registers, order costs, packs): each
/// statement's rows travel as one JSON parameter ([`row_binds`]), kept to 2,000 rows
/// whatever `ingest.batch_max`.
const ROWS_PER_STATEMENT: usize = 2_000;

/// Where a commit's statements go: its connection, and the statements that need no answer
/// yet ([`Tail`]), which travel together the next time something must reach the database
/// (a read, a statement whose result counts, the end of the commit). Statements keep their
/// order; only how many go per trip changes.
///
/// In a transaction of its own (`own_tx`) the link opens it only when something must
/// travel before the end: SQLite takes `BEGIN IMMEDIATE` as the first statement of that
/// trip, PostgreSQL a `BEGIN` of its own. If nothing must, the end sends everything at
/// once: on SQLite `BEGIN IMMEDIATE; …; COMMIT` as one multi-statement query, on
/// PostgreSQL one statement of CTEs, which commits alone and atomically.
struct Link<'c> {
    conn: &'c mut sqlx::AnyConnection,
    backend: Backend,
    /// The commit opens and ends its transaction itself (not careful, not fenced): the
    /// check that the readings are new travels with the rest ([`guard_cursors`]).
    own_tx: bool,
    /// `own_tx`: the transaction has been opened (or its opening statement sent).
    open: bool,
    pending: Tail,
    /// Rows of the part that returns rows (the new buffer balances), once it ran.
    answer: Vec<sqlx::any::AnyRow>,
}

impl<'c> Link<'c> {
    fn new(conn: &'c mut sqlx::AnyConnection, backend: Backend) -> Self {
        Self { conn, backend, own_tx: false, open: false, pending: Tail::new(backend), answer: Vec::new() }
    }

    /// The rows of a multi-row statement about to be pushed, `cols` values a row (see
    /// [`row_source`]).
    fn rows(&self, cols: usize) -> String {
        row_source(self.backend, cols)
    }

    /// Runs a statement over [`row_source`] rows that returns rows, in the same trip as
    /// what is pending (inside the transaction, opened first if need be); its rows.
    async fn read(&mut self, sql: String, binds: Vec<V>, cols: usize) -> Result<Vec<sqlx::any::AnyRow>, DbError> {
        debug_assert!(self.answer.is_empty() && !self.pending.parts.iter().any(|p| p.2), "one answer at a time");
        self.pending.push_rows(sql, binds, cols, true);
        self.flush().await?;
        Ok(std::mem::take(&mut self.answer))
    }

    /// The connection, once everything pending has run (inside the transaction).
    async fn conn(&mut self) -> Result<&mut sqlx::AnyConnection, DbError> {
        self.flush().await?;
        Ok(&mut *self.conn)
    }

    /// Sends what is pending (nothing: no trip), opening the own transaction first.
    async fn flush(&mut self) -> Result<(), DbError> {
        if self.own_tx && !self.open {
            self.open = true;
            match self.backend {
                Backend::Sqlite => self.pending.push_front("BEGIN IMMEDIATE"),
                Backend::Postgres => {
                    sqlx::Executor::execute(&mut *self.conn, "BEGIN").await?;
                }
            }
        }
        self.run().await
    }

    async fn run(&mut self) -> Result<(), DbError> {
        let pending = std::mem::replace(&mut self.pending, Tail::new(self.backend));
        self.answer.extend(pending.run(&mut *self.conn).await?);
        Ok(())
    }

    /// Ends the own transaction: everything pending, then the commit.
    async fn finish(&mut self) -> Result<(), DbError> {
        debug_assert!(self.own_tx);
        match (self.backend, self.open) {
            // Nothing was sent and nothing is pending: nothing to commit.
            (_, false) if self.pending.parts.is_empty() => Ok(()),
            // `BEGIN IMMEDIATE` first if not sent yet (see `flush`), `COMMIT` last.
            (Backend::Sqlite, _) => {
                self.pending.push("COMMIT".into(), Vec::new(), false);
                self.flush().await
            }
            // One statement, committed on its own (all or nothing).
            (Backend::Postgres, false) => self.run().await,
            (Backend::Postgres, true) => {
                self.run().await?;
                sqlx::Executor::execute(&mut *self.conn, "COMMIT").await?;
                Ok(())
            }
        }
    }

    /// Undoes what ran of the own transaction (best effort: a connection that fails here is
    /// closed by the writer, which ends the transaction too).
    async fn rollback(&mut self) {
        if self.open {
            let _ = sqlx::Executor::execute(&mut *self.conn, "ROLLBACK").await;
        }
    }

    /// The committed buffer balances (for the buffer actors' alerts). Read after the
    /// commit on SQLite, so a row that cannot be read is logged, not retried.
    fn balances(&mut self) -> Vec<(String, i64)> {
        std::mem::take(&mut self.answer)
            .iter()
            .filter_map(|r| match (r.try_get("id"), r.try_get("on_hand")) {
                (Ok(id), Ok(on_hand)) => Some((id, on_hand)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "committed buffer balance unreadable; its alert check waits for the next");
                    None
                }
            })
            .collect()
    }
}

/// Positions of the jobs whose lease this node does not hold under the job's token.
async fn fenced_jobs(conn: &mut sqlx::AnyConnection, node: &str, batch: &[Job]) -> Result<Vec<usize>, DbError> {
    let wcs: std::collections::BTreeSet<&str> =
        batch.iter().filter_map(|j| j.lease.as_ref()).map(|l| l.0.as_str()).collect();
    if wcs.is_empty() {
        return Ok(Vec::new());
    }
    let marks: Vec<String> = (1..=wcs.len()).map(|i| format!("${}", i + 1)).collect();
    let sql = format!(
        "SELECT work_center, token FROM leases WHERE node_id = $1 AND work_center IN ({})
         ORDER BY work_center FOR SHARE",
        marks.join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(sql)).bind(node);
    for w in &wcs {
        q = q.bind(*w);
    }
    let mut held: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for row in q.fetch_all(&mut *conn).await? {
        held.insert(row.try_get("work_center")?, row.try_get("token")?);
    }
    Ok(batch
        .iter()
        .enumerate()
        .filter(|(_, j)| j.lease.as_ref().is_some_and(|(wc, token)| held.get(wc) != Some(token)))
        .map(|(i, _)| i)
        .collect())
}

/// The order in which a device's stored cursor moves: its cursor, then where its previous
/// boot stopped (a late reading of that boot leaves the cursor and moves only this). The
/// upsert of `device_cursors` compares the same four numbers (an absent previous boot as -1,
/// below any: `None` sorts first here).
fn stored_cursor_key(d: &Delta) -> CursorKey {
    cursor_key(&d.cursor, d.prev_boot.as_ref())
}

/// The order key of a cursor and where its device's previous boot stopped, as
/// [`stored_cursor_key`] orders them.
fn cursor_key(cursor: &Cursor, prev_boot: Option<&Cursor>) -> CursorKey {
    (cursor.boot, cursor.seq, prev_boot.map(|p| (p.boot, p.seq)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's output settled per device and order books exactly what settling it
    /// reading by reading did (the writer's way before session 12): every movement,
    /// posting, balance, order cost and running time, over readings of two devices with
    /// and without orders, zero output, scrap only and odd running times (whose
    /// per-reading conversion rounds down one by one).
    #[test]
    fn output_settled_per_device_and_order_books_what_each_reading_would() {
        use mes_actors::ledger::Input;
        let spec = WorkCenterSpec::new(
            "WIDGET".into(),
            "FG".into(),
            vec![
                Input {
                    sku: "SHEET".into(),
                    per_unit: 2,
                    buffer: "RM".into(),
                    account: Account::RawMaterials,
                    unit_cost: 12_345,
                },
                Input {
                    sku: "BOLT".into(),
                    per_unit: 3,
                    buffer: "RM2".into(),
                    account: Account::RawMaterials,
                    unit_cost: 7,
                },
            ],
            600_001,
            1_000,
        );
        let mut seed = 7u64;
        let mut next = move |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        let deltas: Vec<Delta> = (0..400u64)
            .map(|i| Delta {
                work_center: "WC".into(),
                device: format!("d{}", i % 2),
                boot: 1,
                seq: i,
                ts_ms: None,
                good: next(5),
                scrap: next(3) / 2,
                order: match next(3) {
                    0 => None,
                    1 => Some("PO-1".into()),
                    _ => Some("PO-2".into()),
                },
                state: mes_actors::MachineState::Running,
                state_changed: false,
                reason: None,
                restarted: false,
                running_ms: next(2_000) as i64,
                cursor: mes_actors::counter::Cursor { boot: 1, seq: i, good: 0, scrap: 0 },
                prev_boot: None,
            })
            .collect();
        let mut books = Books::default();
        for d in &deltas {
            books.count(d, &spec);
        }
        books.settle();
        // Reading by reading, as the writer booked before.
        let (mut moves, mut posts) = (BTreeMap::new(), BTreeMap::new());
        let (mut costs, mut buffers, mut running) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for d in &deltas {
            let s = settle(&spec, d.good as i64, d.scrap as i64, d.running_ms);
            for m in &s.movements {
                let key = (m.buffer.clone(), m.sku.clone(), m.kind, d.order.clone(), d.device.clone());
                *moves.entry(key).or_insert(0) += m.qty;
                *buffers.entry(m.buffer.clone()).or_insert(0) += m.qty;
            }
            for p in &s.postings {
                if p.kind == "conversion" && d.order.is_some() {
                    continue;
                }
                *posts.entry((p.kind, p.debit, p.credit, d.order.clone(), d.device.clone())).or_insert(0) += p.amount;
            }
            if let Some(o) = &d.order {
                *costs.entry(o.clone()).or_insert(0) += s.material;
                if d.running_ms > 0 {
                    *running.entry((o.clone(), d.device.clone())).or_insert(0) += d.running_ms;
                }
            }
        }
        let sums =
            |m: &BTreeMap<MoveKey, (i64, Source)>| m.iter().map(|(k, v)| (k.clone(), v.0)).collect::<BTreeMap<_, _>>();
        assert_eq!(sums(&books.moves), moves);
        let got_posts: BTreeMap<PostKey, i64> = books.posts.iter().map(|(k, v)| (k.clone(), v.0)).collect();
        let want_posts: BTreeMap<PostKey, i64> = posts.into_iter().collect();
        assert_eq!(got_posts.values().filter(|a| **a != 0).count(), want_posts.values().filter(|a| **a != 0).count());
        for (k, v) in &want_posts {
            assert_eq!(got_posts.get(k).copied().unwrap_or(0), *v, "{k:?}");
        }
        assert!(want_posts.keys().any(|k| k.0 == "conversion"), "order-less running time was priced");
        assert_eq!(books.buffers, buffers);
        assert_eq!(books.costs.iter().map(|(k, v)| (k.clone(), v.0)).collect::<BTreeMap<_, _>>(), costs);
        assert_eq!(books.running.iter().map(|(k, v)| (k.clone(), v.0)).collect::<BTreeMap<_, _>>(), running);
        // Each line names the first and last reading of its device and order in the batch.
        let mut ranges: BTreeMap<(String, Option<String>), (u64, u64)> = BTreeMap::new();
        for d in &deltas {
            let r = ranges.entry((d.device.clone(), d.order.clone())).or_insert((d.seq, d.seq));
            *r = (r.0.min(d.seq), r.1.max(d.seq));
        }
        for ((_, _, _, order, device), (_, src)) in &books.moves {
            let (first, last) = ranges[&(device.clone(), order.clone())];
            assert_eq!((src.device.as_str(), src.first, src.last), (device.as_str(), (1, first), (1, last)));
        }
    }

    /// Rows packed as JSON come back out of SQLite's `jsonb_each` exactly as bound: texts
    /// with quotes, backslashes, control characters and non-ASCII, nulls, and the extreme
    /// integers.
    #[tokio::test]
    async fn rows_packed_as_json_read_back_exactly_in_sqlite() {
        let dir = std::env::temp_dir().join(format!("mes-rows-{}", std::process::id()));
        let store = Store::connect(&format!("sqlite://{}/rows.db", dir.display()), 1).await.expect("connect");
        let texts = ["plain", "quote \" and \\ backslash", "line\nfeed\ttab\u{1}", "Präge-Linie 冲压", ""];
        let mut binds = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let n = [i64::MIN, -1, 0, 42, i64::MAX][i];
            binds.extend([V::Text(t.to_string()), V::Int(n), V::OptInt(None), V::OptText(None), V::Static("idle")]);
        }
        let json = row_binds(binds.clone(), 5);
        assert_eq!(json.len(), 1, "one parameter");
        let sql = format!("SELECT * FROM ({}) AS v", row_source(Backend::Sqlite, 5));
        let rows = Tail::bind(sqlx::query(AssertSqlSafe(sql)), json).fetch_all(&store.pool).await.expect("query");
        assert_eq!(rows.len(), texts.len());
        for (i, r) in rows.iter().enumerate() {
            let got: (String, i64, Option<i64>, Option<String>, String) = (
                r.try_get("column1").expect("c1"),
                r.try_get("column2").expect("c2"),
                r.try_get("column3").expect("c3"),
                r.try_get("column4").expect("c4"),
                r.try_get("column5").expect("c5"),
            );
            let n = [i64::MIN, -1, 0, 42, i64::MAX][i];
            assert_eq!(got, (texts[i].to_string(), n, None, None, "idle".to_string()));
        }
        // No rows: an empty array, no row out.
        let empty = row_binds(Vec::new(), 5);
        let sql = format!("SELECT * FROM ({}) AS v", row_source(Backend::Sqlite, 5));
        let rows = Tail::bind(sqlx::query(AssertSqlSafe(sql)), empty).fetch_all(&store.pool).await.expect("query");
        assert!(rows.is_empty());
        // PostgreSQL types each column by its values, the one parameter numbered from where
        // the statement starts in its query.
        assert_eq!(
            pg_source(&binds, 5, 3),
            "SELECT e.value->>0 AS column1, (e.value->>1)::bigint AS column2, (e.value->>2)::bigint AS column3, \
             e.value->>3 AS column4, e.value->>4 AS column5 FROM jsonb_array_elements($3::jsonb) AS e"
        );
        let mut tail = Tail::new(Backend::Postgres);
        tail.push_rows(format!("SELECT * FROM ({}) AS v", row_source(Backend::Postgres, 5)), binds.clone(), 5, false);
        tail.push_rows(format!("SELECT * FROM ({}) AS v", row_source(Backend::Postgres, 5)), binds, 5, false);
        assert!(tail.parts[1].0.contains("jsonb_array_elements($2::jsonb)"), "{}", tail.parts[1].0);
        assert_eq!((tail.parts[1].1.len(), tail.binds), (1, 2));
        let _ = std::fs::remove_dir_all(dir);
    }
}
