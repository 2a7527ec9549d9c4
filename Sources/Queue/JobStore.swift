import Foundation

/// A JSON value for event metrics and other small documents written to jsonb columns.
public enum JSONValue: Sendable, Equatable, Codable, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByStringLiteral, ExpressibleByBooleanLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(integerLiteral value: Int) { self = .number(Double(value)) }
    public init(floatLiteral value: Double) { self = .number(value) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(Dictionary(elements, uniquingKeysWith: { _, b in b }))
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let d = try? c.decode(Double.self) { self = .number(d) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .number(let d):
            if d.isFinite && d == d.rounded() && abs(d) < 1e15 { try c.encode(Int64(d)) } else if d.isFinite { try c.encode(d) } else { try c.encodeNil() }
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    /// Compact JSON text with sorted keys.
    public var jsonText: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: (try? encoder.encode(self)) ?? Data("null".utf8), as: UTF8.self)
    }
}

/// The identity of a running job: every write is guarded by all three
/// (`state = 'running' AND worker = $worker AND attempt = $attempt`).
public struct JobRef: Sendable, Equatable, Hashable {
    public let id: Int64
    public let attempt: Int
    public let worker: String

    public init(id: Int64, attempt: Int, worker: String) {
        self.id = id
        self.attempt = attempt
        self.worker = worker
    }
}

/// A job as claimed by a worker.
public struct ClaimedJob: Sendable {
    public let ref: JobRef
    public let attemptsUsed: Int
    public let maxAttempts: Int
    public let collection: String
    public let classes: [String]
    /// `{"class": ["sentence", ...]}` as JSON text, or nil when the job gives none.
    public let descriptionsJSON: String?
    /// The job's `parameters` object as JSON text.
    public let parametersJSON: String
    public let timeoutSeconds: Double
}

/// What a lease renewal found.
public enum LeaseRenewal: Sendable, Equatable {
    case renewed(cancelRequested: Bool)
    /// The job is no longer running under this worker and attempt.
    case lost
}

/// The daemon's SQL: claiming, leases, progress, events, final states, rescue. Bind parameters only.
public enum JobStore {
    static let guardClause = "id = $1 AND state = 'running' AND worker = $2 AND attempt = $3"

    // MARK: workers

    public static func registerWorker(_ c: PostgresConnection, id: String, name: String, host: String, pid: Int, version: String) throws {
        try c.query("""
            INSERT INTO nola.workers (id, name, host, pid, version) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL
            """, [id, name, host, pid, version])
    }

    /// `currentJobs`: the jobs this worker owns and runs; `helpingJobs`: other workers' jobs it held a help
    /// unit of (shard, tuning unit) since its previous heartbeat.
    public static func workerHeartbeat(_ c: PostgresConnection, id: String, currentJobs: [Int64], helpingJobs: [Int64] = []) throws {
        try c.query("UPDATE nola.workers SET heartbeat_at = now(), current_jobs = $2::bigint[], helping_jobs = $3::bigint[] WHERE id = $1",
                    [id, currentJobs.map(String.init), helpingJobs.sorted().map(String.init)])
    }

    public static func workerStopped(_ c: PostgresConnection, id: String) throws {
        try c.query("UPDATE nola.workers SET stopped_at = now(), heartbeat_at = now(), current_jobs = '{}', helping_jobs = '{}' WHERE id = $1", [id])
    }

    // MARK: claiming and leases

    /// Claims the most urgent runnable job, if any, in one transaction: the job row (state, worker,
    /// attempt, lease), a new `nola.attempts` row and a `claimed` event.
    public static func claim(_ c: PostgresConnection, worker: String, leaseSeconds: Double) throws -> ClaimedJob? {
        try c.transaction {
            let rows = try c.query("""
                WITH next AS (
                    SELECT id FROM nola.jobs
                    WHERE state = 'queued' AND run_after <= now()
                    ORDER BY priority DESC, run_after, id
                    LIMIT 1
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE nola.jobs j
                SET state = 'running', worker = $1, attempt = j.attempt + 1, attempts_used = j.attempts_used + 1,
                    lease_expires_at = now() + make_interval(secs => $2::double precision), heartbeat_at = now(),
                    started_at = now(), finished_at = NULL, stage = NULL, stage_index = NULL, stage_count = NULL,
                    stage_started_at = NULL, stage_done = NULL, stage_total = NULL, error = NULL
                FROM next WHERE j.id = next.id
                RETURNING j.id, j.attempt, j.attempts_used, j.max_attempts, j.collection, j.classes,
                          j.descriptions::text AS descriptions, j.parameters::text AS parameters,
                          extract(epoch FROM j.timeout)::double precision AS timeout_s
                """, [worker, leaseSeconds])
            guard !rows.isEmpty else { return nil }
            let r = rows[0]
            let ref = JobRef(id: Int64(try r.int("id")), attempt: try r.int("attempt"), worker: worker)
            try c.query("INSERT INTO nola.attempts (job_id, attempt, worker) VALUES ($1, $2, $3)", [ref.id, ref.attempt, worker])
            try c.query("INSERT INTO nola.events (job_id, attempt, worker, kind) VALUES ($1, $2, $3, 'claimed')",
                        [ref.id, ref.attempt, worker])
            return ClaimedJob(ref: ref, attemptsUsed: try r.int("attempts_used"), maxAttempts: try r.int("max_attempts"),
                              collection: try r.string("collection"), classes: try r.stringArray("classes"),
                              descriptionsJSON: try r.optionalString("descriptions"),
                              parametersJSON: try r.string("parameters"), timeoutSeconds: try r.double("timeout_s"))
        }
    }

    /// Extends the lease of a job this worker runs; tells whether a cancel was requested meanwhile.
    public static func renewLease(_ c: PostgresConnection, _ job: JobRef, leaseSeconds: Double) throws -> LeaseRenewal {
        let rows = try c.query("""
            UPDATE nola.jobs SET lease_expires_at = now() + make_interval(secs => $4::double precision), heartbeat_at = now()
            WHERE \(guardClause)
            RETURNING cancel_requested
            """, [job.id, job.worker, job.attempt, leaseSeconds])
        guard !rows.isEmpty else { return .lost }
        return .renewed(cancelRequested: try rows[0].bool("cancel_requested"))
    }

    /// The ids among `jobs` (all of one worker) that are still ours and whose cancel was requested.
    public static func cancelRequested(_ c: PostgresConnection, _ jobs: [JobRef]) throws -> [Int64] {
        guard let worker = jobs.first?.worker else { return [] }
        let rows = try c.query("""
            SELECT j.id FROM nola.jobs j
            JOIN unnest($2::bigint[], $3::int[]) AS mine (id, attempt) ON mine.id = j.id AND mine.attempt = j.attempt
            WHERE j.state = 'running' AND j.worker = $1 AND j.cancel_requested
            """, [worker, jobs.map { String($0.id) }, jobs.map { String($0.attempt) }])
        return try rows.rows.map { Int64(try $0.int("id")) }
    }

    /// Requeues (or fails, when out of attempts; or cancels, when a cancel was pending) every running
    /// job whose lease expired, closing its attempt as `lost`. Returns the ids handled.
    @discardableResult
    public static func rescueExpired(_ c: PostgresConnection, rescuer: String) throws -> [Int64] {
        let rows = try c.query("""
            WITH expired AS (
                SELECT id, attempt, worker, attempts_used, max_attempts, cancel_requested
                FROM nola.jobs
                WHERE state = 'running' AND lease_expires_at < now()
                FOR UPDATE SKIP LOCKED
            ), moved AS (
                UPDATE nola.jobs j
                SET state = CASE WHEN e.cancel_requested THEN 'cancelled'::nola.job_state
                                 WHEN e.attempts_used >= e.max_attempts THEN 'failed'::nola.job_state
                                 ELSE 'queued'::nola.job_state END,
                    error = CASE WHEN e.cancel_requested THEN 'cancelled (its worker stopped renewing the lease)'
                                 WHEN e.attempts_used >= e.max_attempts THEN
                                    format('gave up after %s attempts: the lease of worker %s expired', e.attempts_used, e.worker)
                                 ELSE format('attempt %s lost: the lease of worker %s expired; requeued', e.attempt, e.worker) END,
                    finished_at = CASE WHEN e.cancel_requested OR e.attempts_used >= e.max_attempts THEN now() END,
                    worker = CASE WHEN e.cancel_requested OR e.attempts_used >= e.max_attempts THEN e.worker END,
                    lease_expires_at = NULL, run_after = now()
                FROM expired e
                WHERE j.id = e.id AND j.state = 'running' AND j.attempt = e.attempt AND j.worker = e.worker
                RETURNING j.id, e.attempt, e.worker AS lost_worker, j.state
            ), closed AS (
                UPDATE nola.attempts a
                SET finished_at = now(), outcome = 'lost',
                    error = format('lease expired: worker %s stopped renewing it', m.lost_worker)
                FROM moved m WHERE a.job_id = m.id AND a.attempt = m.attempt
            ), logged AS (
                INSERT INTO nola.events (job_id, attempt, worker, kind, metrics)
                SELECT m.id, m.attempt, $1, 'lease_expired', jsonb_build_object('lost_worker', m.lost_worker, 'state', m.state)
                FROM moved m
            )
            SELECT id FROM moved
            """, [rescuer])
        return try rows.rows.map { Int64(try $0.int("id")) }
    }

    // MARK: progress and events

    /// Starts stage `index` (0-based) of `count`; resets the stage counters and logs a `stage_started` event.
    @discardableResult
    public static func startStage(_ c: PostgresConnection, _ job: JobRef, stage: String, index: Int, count: Int) throws -> Bool {
        try c.transaction {
            let rows = try c.query("""
                UPDATE nola.jobs SET stage = $4, stage_index = $5, stage_count = $6, stage_started_at = now(),
                    stage_done = NULL, stage_total = NULL
                WHERE \(guardClause)
                """, [job.id, job.worker, job.attempt, stage, index, count])
            guard rows.affected == 1 else { return false }
            try c.query("INSERT INTO nola.events (job_id, attempt, worker, stage, kind) VALUES ($1, $2, $3, $4, 'stage_started')",
                        [job.id, job.attempt, job.worker, stage])
            return true
        }
    }

    /// Sets the current stage's counters (units of the stage, normally images).
    @discardableResult
    public static func setProgress(_ c: PostgresConnection, _ job: JobRef, done: Int, total: Int) throws -> Bool {
        let rows = try c.query("UPDATE nola.jobs SET stage_done = $4, stage_total = $5 WHERE \(guardClause)",
                               [job.id, job.worker, job.attempt, done, total])
        return rows.affected == 1
    }

    /// Appends an event (guarded: nothing is written once the job is no longer ours).
    @discardableResult
    public static func recordEvent(_ c: PostgresConnection, _ job: JobRef, stage: String?, kind: String, metrics: [String: JSONValue]) throws -> Bool {
        let rows = try c.query("""
            INSERT INTO nola.events (job_id, attempt, worker, stage, kind, metrics)
            SELECT $1, $3, $2, $4, $5, $6::jsonb
            WHERE EXISTS (SELECT 1 FROM nola.jobs WHERE \(guardClause))
            """, [job.id, job.worker, job.attempt, stage, kind, JSONValue.object(metrics).jsonText])
        return rows.affected == 1
    }

    // MARK: final states

    /// Applies a lifecycle action in one transaction, guarded. Returns false when the job was no longer
    /// ours (nothing written). `.none`, `.interrupt` and `.abandon` write nothing.
    @discardableResult
    public static func finish(_ c: PostgresConnection, _ job: JobRef, _ action: JobLifecycle.Action) throws -> Bool {
        let p: [PostgresBindable?] = [job.id, job.worker, job.attempt]
        guard let outcome = action.outcome else { return false }
        let update: String, extra: [PostgresBindable?], attemptError: String?, kind: String
        switch action {
        case .none, .interrupt, .abandon:
            return false
        case .markSucceeded:
            update = "state = 'succeeded', finished_at = now(), lease_expires_at = NULL, error = NULL"
            extra = []; attemptError = nil; kind = "succeeded"
        case .markFailed(let message, _):
            update = "state = 'failed', finished_at = now(), lease_expires_at = NULL, error = $4"
            extra = [message]; attemptError = message; kind = "failed"
        case .scheduleRetry(let delay, let message):
            update = """
                state = 'queued', worker = NULL, lease_expires_at = NULL,
                run_after = now() + make_interval(secs => $5::double precision),
                error = format('attempt %s failed, retrying in %s s: %s', attempt, round($5::numeric, 1), $4::text)
                """
            extra = [message, delay]; attemptError = message; kind = "retry_scheduled"
        case .markCancelled:
            update = "state = 'cancelled', finished_at = now(), lease_expires_at = NULL, error = 'cancelled while running' || coalesce(' (stage ' || stage || ')', '')"
            extra = []; attemptError = nil; kind = "cancelled"
        case .release:
            update = """
                state = 'queued', worker = NULL, lease_expires_at = NULL, run_after = now(),
                attempts_used = attempts_used - 1, error = NULL
                """
            extra = []; attemptError = "released: the worker shut down"; kind = "released"
        }
        return try c.transaction {
            let rows = try c.query("UPDATE nola.jobs SET \(update) WHERE \(guardClause)", p + extra)
            guard rows.affected == 1 else { return false }
            try c.query("UPDATE nola.attempts SET finished_at = now(), outcome = $3, error = $4 WHERE job_id = $1 AND attempt = $2",
                        [job.id, job.attempt, outcome.rawValue, attemptError])
            var metrics: [String: JSONValue] = [:]
            if let attemptError { metrics["error"] = .string(attemptError) }
            if case .scheduleRetry(let delay, _) = action { metrics["retry_in_s"] = .number(delay) }
            try c.query("INSERT INTO nola.events (job_id, attempt, worker, kind, metrics) VALUES ($1, $2, $3, $4, $5::jsonb)",
                        [job.id, job.attempt, job.worker, kind, JSONValue.object(metrics).jsonText])
            return true
        }
    }

    /// Whether the job is still running under this worker and attempt.
    public static func isOwned(_ c: PostgresConnection, _ job: JobRef) throws -> Bool {
        try !c.query("SELECT 1 FROM nola.jobs WHERE \(guardClause)", [job.id, job.worker, job.attempt]).isEmpty
    }
}
