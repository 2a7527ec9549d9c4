import Foundation
import Prometheus
import Queue

/// The daemon's metrics and health, fed by the worker through `WorkerObserver` and read by the HTTP
/// listener (MetricsListener.swift). Counters and histograms live in a long-lived Prometheus registry;
/// what describes the present (running jobs, their stage and progress, the main loop's age, the queue)
/// is put in a fresh registry at each scrape, so a job that ended leaves no stale series.
/// Every hook takes one lock for a few assignments: no I/O, safe from the main loop and job threads.
public final class DaemonMetrics: WorkerObserver, @unchecked Sendable {
    /// Stage durations, seconds: from a tenth of a second (discovery of a small collection) to 4 hours (tuning).
    public static let stageDurationBuckets: [Double] = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400]

    /// The outcome label of an attempt whose end wrote nothing (the job was no longer ours, or the write failed).
    public static let notWritten = "not_written"

    let registry = PrometheusCollectorRegistry()
    /// The main loop counts as stuck when it has not turned for this long (`lease_seconds`: by then its
    /// jobs' leases have expired unrenewed).
    public let livenessBound: Double
    let concurrency: Int

    private let lock = NSLock()
    private struct Running {
        var ref: JobRef
        var stage: String
        var done = 0, total = 0
        var stageStarted: Date
        /// Progress already counted in the counters for this stage.
        var counted = 0
    }
    private var jobs: [Int64: Running] = [:]
    private var lastTurn: Date?
    private var schemaChecked = false
    private var databaseDown = false
    private var workerID = ""
    /// Help units running now, by kind.
    private var helpRunning: [String: Int] = [:]

    private let attempts: [String: Counter]
    private let reconnects: Counter
    private let outages: Counter
    private let reconnectTries: Counter
    private let leaseRenewalsFailed: Counter
    private let imagesProcessed: Counter

    public init(version: String, concurrency: Int, livenessBound: Double) {
        self.livenessBound = livenessBound
        self.concurrency = concurrency
        let r = registry
        var attempts: [String: Counter] = [:]
        for outcome in AttemptOutcome.allCases.map(\.rawValue) + [Self.notWritten] {
            attempts[outcome] = r.makeCounter(descriptor: Self.name("attempts", "total",
                "Attempts this daemon ended, by the outcome it wrote (lost: written by a rescuer; not_written: the job was no longer ours)."),
                labels: [("outcome", outcome)])
        }
        self.attempts = attempts
        reconnects = r.makeCounter(descriptor: Self.name("database_reconnects", "total",
            "Times the main loop connected to PostgreSQL again after an outage."))
        outages = r.makeCounter(descriptor: Self.name("database_outages", "total",
            "Times the main loop lost PostgreSQL (once per outage)."))
        reconnectTries = r.makeCounter(descriptor: Self.name("database_reconnect_failures", "total",
            "Failed tries to reach PostgreSQL during outages that have ended."))
        leaseRenewalsFailed = r.makeCounter(descriptor: Self.name("lease_renewals_failed", "total",
            "Lease renewals that found a running job no longer ours (another worker or the rescuer took it)."))
        imagesProcessed = r.makeCounter(descriptor: Self.name("images_processed", "total",
            "Collection files examined by the discover stage, which every job runs (one per file per attempt)."))
        r.makeGauge(descriptor: Self.name("build_info", "", "The running nolad's version (the value is always 1)."),
                    labels: [("version", version)]).set(to: 1)
    }

    static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "nolad", metricName: metric, unitName: unit, helpText: help)
    }

    /// Progress of `stage` in its own units: images for discover, encode and label; classes for describe;
    /// epochs for pseudolabel; image-steps for tune.
    private func stageProgress(_ stage: String) -> Counter {
        registry.makeCounter(descriptor: Self.name("stage_progress", "total",
            "Progress completed per stage, in the units the stage reports (docs/operations.md)."), labels: [("stage", stage)])
    }

    private func stageDuration(_ stage: String) -> ValueHistogram {
        registry.makeValueHistogram(descriptor: Self.name("stage_duration", "seconds",
            "Wall-clock time of stages that completed (the next stage began, or the job succeeded)."),
            labels: [("stage", stage)], buckets: Self.stageDurationBuckets)
    }

    /// The worker's id (nola.jobs.worker), shown in `nolad_worker_info`.
    public func setWorkerID(_ id: String) { lock.withLock { workerID = id } }

    // MARK: WorkerObserver

    public func jobStarted(_ job: JobRef) {
        lock.withLock { jobs[job.id] = Running(ref: job, stage: "starting", stageStarted: Date()) }
    }

    public func jobProgress(_ job: JobRef, stage: String, done: Int, total: Int) {
        let now = Date()
        var finishedStage: (String, Double)?
        var delta = 0
        lock.withLock {
            guard var j = jobs[job.id] else { return }
            if j.stage != stage {
                if j.stage != "starting" { finishedStage = (j.stage, now.timeIntervalSince(j.stageStarted)) }
                j.stage = stage
                j.stageStarted = now
                j.counted = 0
            }
            // A stage that resumes from a checkpoint starts above 0: that part was counted by an earlier attempt.
            if j.counted == 0 && j.done == 0 && done > 0 && total > 0 && j.total == 0 { j.counted = done }
            if done > j.counted { delta = done - j.counted; j.counted = done }
            j.done = done
            j.total = total
            jobs[job.id] = j
        }
        if let (name, seconds) = finishedStage { stageDuration(name).record(seconds) }
        if delta > 0 {
            stageProgress(stage).increment(by: Int64(delta))
            if stage == "discover" { imagesProcessed.increment(by: Int64(delta)) }
        }
    }

    public func jobEnded(_ job: JobRef, outcome: AttemptOutcome?) {
        let now = Date()
        let ended: Running? = lock.withLock { jobs.removeValue(forKey: job.id) }
        if outcome == .succeeded, let j = ended, j.stage != "starting" {
            stageDuration(j.stage).record(now.timeIntervalSince(j.stageStarted))
        }
        attempts[outcome?.rawValue ?? Self.notWritten]?.increment()
    }

    public func databaseUnavailable() {
        lock.withLock { databaseDown = true }
        outages.increment()
    }

    public func databaseReconnected(tries: Int, seconds: Double) {
        lock.withLock { databaseDown = false }
        reconnects.increment()
        reconnectTries.increment(by: Int64(tries))
    }

    public func leaseRenewalFailed(_ job: JobRef) {
        leaseRenewalsFailed.increment()
    }

    public func loopTurned() {
        let now = Date()
        lock.withLock { lastTurn = now }
    }

    /// The kinds of help unit (HelpUnit.kind) and the outcomes of `helpUnitEnded`.
    public static let helpKinds = ["encode", "label", "tune"]
    public static let helpOutcomes = ["done", "given_back", "lease_lost", "failed"]

    public func helpUnitStarted(kind: String) {
        lock.withLock { helpRunning[kind, default: 0] += 1 }
    }

    public func helpUnitEnded(kind: String, outcome: String) {
        lock.withLock { helpRunning[kind] = max(0, (helpRunning[kind] ?? 1) - 1) }
        registry.makeCounter(descriptor: Self.name("help_units", "total",
            "Units of other workers' jobs this daemon worked on (shards of encode / label, prompt-tuning units), by kind and by how they ended."),
            labels: [("kind", kind), ("outcome", outcome)]).increment()
    }

    public func databaseReady() {
        lock.withLock { schemaChecked = true; databaseDown = false }
    }

    // MARK: health

    /// `/healthz`: 200 while the main loop has turned within `livenessBound` seconds (or has not
    /// started turning yet: the daemon is still connecting, which it retries with backoff).
    public func liveness(now: Date = Date()) -> (ok: Bool, text: String) {
        guard let last = lock.withLock({ lastTurn }) else { return (true, "starting: connecting to the database") }
        let age = now.timeIntervalSince(last)
        if age <= livenessBound { return (true, "ok: main loop turned \(formatSeconds(age)) ago") }
        return (false, "main loop has not turned for \(formatSeconds(age)) (bound: \(formatSeconds(livenessBound)))")
    }

    /// `/readyz`: 200 once the schema was checked and while the main loop has the database.
    public func readiness() -> (ok: Bool, text: String) {
        let (checked, down) = lock.withLock { (schemaChecked, databaseDown) }
        if !checked { return (false, "not ready: the schema has not been checked yet (connecting to the database)") }
        if down { return (false, "not ready: the database is unavailable (retrying)") }
        return (true, "ready: database connected, schema checked")
    }

    // MARK: exposition

    /// What the queue held at the last look (nil when the look failed).
    public struct QueueSample: Sendable, Equatable {
        public var jobsByState: [String: Int]
        /// Queued jobs whose run_after is still in the future (waiting for a retry's backoff).
        public var notYetDue: Int
        /// Seconds since the run_after of the oldest queued job that is due (0 when none is).
        public var oldestDueSeconds: Double
        public init(jobsByState: [String: Int], notYetDue: Int, oldestDueSeconds: Double) {
            self.jobsByState = jobsByState
            self.notYetDue = notYetDue
            self.oldestDueSeconds = oldestDueSeconds
        }
    }

    /// The Prometheus text exposition of everything: the long-lived counters and histograms, then
    /// the gauges of this moment (and the queue, when `queue` is given; `queueFailed` says a look failed).
    public func exposition(queue: QueueSample?, queueFailed: Bool, now: Date = Date()) -> [UInt8] {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)

        let (running, turn, checked, down, worker, helps) = lock.withLock {
            (Array(jobs.values), lastTurn, schemaChecked, databaseDown, workerID, helpRunning)
        }
        let r = PrometheusCollectorRegistry()
        if !worker.isEmpty {
            r.makeGauge(descriptor: Self.name("worker_info", "", "This daemon's worker id as in nola.jobs.worker (the value is always 1)."),
                        labels: [("worker", worker)]).set(to: 1)
        }
        r.makeGauge(descriptor: Self.name("worker_concurrency", "", "Jobs this daemon may run at once (configuration `concurrency`)."))
            .set(Double(concurrency))
        r.makeGauge(descriptor: Self.name("worker_jobs_running", "", "Jobs this daemon is running now."))
            .set(Double(running.count))
        for j in running.sorted(by: { $0.ref.id < $1.ref.id }) {
            let labels = [("job", String(j.ref.id)), ("attempt", String(j.ref.attempt)), ("stage", j.stage)]
            r.makeGauge(descriptor: Self.name("job_stage_done", "", "Progress of a running job's current stage, in the stage's units."),
                        labels: labels).set(Double(j.done))
            r.makeGauge(descriptor: Self.name("job_stage_total", "", "Size of a running job's current stage, in the stage's units (0: not known yet)."),
                        labels: labels).set(Double(j.total))
            r.makeGauge(descriptor: Self.name("job_stage_progress", "ratio", "done / total of a running job's current stage (0 while total is 0)."),
                        labels: labels).set(j.total > 0 ? Double(j.done) / Double(j.total) : 0)
            r.makeGauge(descriptor: Self.name("job_stage_elapsed", "seconds", "Time since a running job's current stage began."),
                        labels: labels).set(now.timeIntervalSince(j.stageStarted))
        }
        for kind in Set(Self.helpKinds).union(helps.keys).sorted() {
            r.makeGauge(descriptor: Self.name("help_units_running", "", "Units of other workers' jobs this daemon is working on now, by kind (they share the `concurrency` slots with its own jobs)."),
                        labels: [("kind", kind)]).set(Double(helps[kind] ?? 0))
        }
        r.makeGauge(descriptor: Self.name("database_connected", "", "1 while the main loop has PostgreSQL and the schema was checked, else 0."))
            .set(to: checked && !down ? 1 : 0)
        if let turn {
            r.makeGauge(descriptor: Self.name("main_loop_last_turn_age", "seconds", "Time since the worker's main loop last turned."))
                .set(now.timeIntervalSince(turn))
        }
        r.makeGauge(descriptor: Self.name("queue_sample_ok", "", "1 when this scrape read the queue from PostgreSQL, 0 when that failed."))
            .set(to: queueFailed ? 0 : 1)
        if let queue {
            for (state, n) in queue.jobsByState.sorted(by: { $0.key < $1.key }) {
                r.makeGauge(descriptor: Self.name("queue_jobs", "", "Jobs in nola.jobs by state (the whole queue: the same on every daemon)."),
                            labels: [("state", state)]).set(Double(n))
            }
            r.makeGauge(descriptor: Self.name("queue_not_yet_due_jobs", "", "Queued jobs whose run_after lies in the future (retries in backoff)."))
                .set(Double(queue.notYetDue))
            r.makeGauge(descriptor: Self.name("queue_oldest_due_age", "seconds",
                "How long the oldest due queued job has waited since its run_after (0 when none waits)."))
                .set(queue.oldestDueSeconds)
        }
        r.emit(into: &buffer)
        return buffer
    }
}
