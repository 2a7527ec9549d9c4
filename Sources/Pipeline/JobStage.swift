import Foundation
import Logging
import Method
import Queue

/// How a stage ends a job early. Throw `.badInput` for anything retrying cannot fix (the job fails
/// at once with exactly this message); `.transient` for what may pass (the job is retried with backoff).
/// Any other error thrown by a stage counts as transient. `.stopped` is what `checkCancelled()` throws.
public enum JobError: Error, CustomStringConvertible, Sendable, Equatable {
    case badInput(String)
    case transient(String)
    case stopped(StopReason)

    public var description: String {
        switch self {
        case .badInput(let m), .transient(let m): return m
        case .stopped(let r): return "stopped (\(r))"
        }
    }
}

/// One step of a job. Stages run in order on the job's own thread; each should call
/// `context.checkCancelled()` often (at least once per image or batch) and report progress in images.
/// A stage must be safe to run again from the start on a later attempt (upserts, or clear-then-write).
public protocol JobStage: Sendable {
    /// Shown in nola.jobs.stage, nola.events.stage and systemd's STATUS line ("discover", "encode", ...).
    var name: String { get }
    func run(_ context: JobContext) throws
}

/// What the stages take from the daemon's configuration (the `NoladConfig` keys of the same names):
/// the service builds it (`NoladConfig.stageSettings`), the stages never see the rest.
public struct StageSettings: Equatable, Sendable {
    /// The daemon's `threads`: the most a job's `threads` parameter may ask for.
    public var threads: Int = 1
    /// Folder holding the model folders that job parameters `clip_model` / `dino_model` name.
    public var modelRoot: String? = nil
    public var clipModel: String? = nil
    public var dinoModel: String? = nil
    /// OpenAI-compatible chat-completions endpoint for class descriptions (none: templates only).
    public var llmURL: String? = nil
    public var llmModel: String = "gpt-3.5-turbo"
    public var llmAPIKey: String? = nil
    /// Memory for prompt-tuning activations per job; sizes the micro-batches.
    public var memoryBudgetMB: Int = 4096
    /// How often prompt tuning saves a checkpoint between epochs (always at the end of an epoch).
    public var checkpointSeconds: Double = 120
    /// Testing aid: pause this long per image in the discovery stage (0 in production).
    public var imageDelaySeconds: Double = 0
    /// The stages a job runs: "nola" (discover + the NoLA method) or "discover" (image discovery only).
    public var pipeline: String = "nola"
    /// Images per shard of the encode and label stages (rounded up to a multiple of 8; docs/scale-out.md).
    public var shardSize: Int = 256
    /// The lease of a shard (or other help unit), renewed every `heartbeatSeconds` while it is worked on.
    public var leaseSeconds: Double = 60
    public var heartbeatSeconds: Double = 10

    public init() {}
}

/// The stages every job runs, in order. The labelling pipeline appends its stages here.
public enum JobStages {
    public static func standard(settings: StageSettings) -> [JobStage] {
        let discover = DiscoverImagesStage(delayPerImage: settings.imageDelaySeconds)
        return settings.pipeline == "discover" ? [discover] : NolaPipeline.stages(discover: discover)
    }

    /// The work this daemon does for running jobs when a slot has none of its own (`help_other_jobs`), in
    /// the order the help step asks for it: prompt-tuning units first (the owner waits on each step's last
    /// unit), then the encode / label shards.
    public static func help(settings: StageSettings) -> [HelpWork] {
        settings.pipeline == "discover" ? [] : [TuningHelpWork(), ShardHelpWork()]
    }
}

/// What a stage gets: the job's inputs, a database handle scoped to the job, progress and event
/// reporting, the stop flag, the configuration and a logger.
public final class JobContext: @unchecked Sendable {
    /// Job id, attempt and worker: pass it to the `Queue.Results` writers, which are guarded by it.
    public let job: JobRef
    public var jobID: Int64 { job.id }
    public var attempt: Int { job.attempt }
    /// The collection folder, symlinks resolved, checked to lie under a configured root.
    public let collection: URL
    /// The collection roots, resolved.
    public let roots: [URL]
    public let classes: [String]
    /// `{"class": ["sentence", ...]}` as given with the job, or nil.
    public let descriptionsJSON: String?
    /// The job's parameters object as JSON text (validated at INSERT; see nola.parameter_type).
    public let parametersJSON: String
    /// What the stages take from the daemon's configuration.
    public let settings: StageSettings
    public let logger: Logger
    /// The threads the job's numeric work runs with (bound by the executor around every stage, see
    /// docs/threading.md): the job's `threads` parameter, at most the daemon's `threads`; the daemon's
    /// `threads` when the job names none.
    public let threads: Int
    /// The job's `threads` parameter, nil when not given.
    public let threadsRequested: Int?

    private let database: Database
    private let lock = NSLock()
    private var stop: StopReason?
    private var activityAtStop: String?
    private var stageName: String?
    private var lastProgressWrite = Date.distantPast
    private let onProgress: @Sendable (String, Int, Int) -> Void

    /// The value the last NoLA stage handed to the next (`NolaStep`); one per attempt, gone with it.
    private var handedOver: Any?

    public init(job: JobRef, collection: URL, roots: [URL], classes: [String], descriptionsJSON: String?, parametersJSON: String,
                settings: StageSettings, database: Database, logger: Logger, onProgress: @escaping @Sendable (String, Int, Int) -> Void) {
        self.job = job
        self.collection = collection
        self.roots = roots
        self.classes = classes
        self.descriptionsJSON = descriptionsJSON
        self.parametersJSON = parametersJSON
        self.settings = settings
        let requested = (try? JobParameters(json: Data(parametersJSON.utf8)))?.threads
        threadsRequested = requested
        threads = min(requested ?? settings.threads, settings.threads)
        self.database = database
        self.logger = logger
        self.onProgress = onProgress
    }

    /// The descriptions decoded, or nil when the job gives none.
    public var descriptions: [String: [String]]? {
        guard let descriptionsJSON else { return nil }
        return try? JSONDecoder().decode([String: [String]].self, from: Data(descriptionsJSON.utf8))
    }

    /// The parameters decoded.
    public var parameters: [String: JSONValue] {
        (try? JSONDecoder().decode([String: JSONValue].self, from: Data(parametersJSON.utf8))) ?? [:]
    }

    /// Runs `body` on the job's own connection; on a lost connection it reconnects with backoff and
    /// runs `body` again for up to 60 s, so `body` must be idempotent (the `Results` writers are).
    /// Throws `stopped(.leaseLost)` when `body` returns false (a guarded write found the job not ours).
    public func withDatabase<T>(_ body: (PostgresConnection) throws -> T) throws -> T {
        try database.run(retryFor: 60, body)
    }

    /// Runs a guarded write (one of the `Results` functions); if the job is no longer ours the stage stops.
    public func write(_ body: (PostgresConnection) throws -> Bool) throws {
        guard try withDatabase(body) else {
            requestStop(.leaseLost)
            throw JobError.stopped(.leaseLost)
        }
    }

    /// Sets the current stage's counters; written to the database at most four times a second
    /// (always when done == total). Throws when the job must stop.
    public func reportProgress(stage: String, done: Int, total: Int) throws {
        try checkCancelled()
        let now = Date()
        let due: Bool = lock.withLock {
            if done < total && now.timeIntervalSince(lastProgressWrite) < 0.25 { return false }
            lastProgressWrite = now
            return true
        }
        onProgress(stage, done, total)
        if due {
            try write { try JobStore.setProgress($0, self.job, done: done, total: total) }
        }
    }

    /// Appends a row to nola.events (e.g. kind "metrics" with per-stage figures).
    public func recordEvent(stage: String, kind: String, metrics: [String: JSONValue]) throws {
        try write { try JobStore.recordEvent($0, self.job, stage: stage, kind: kind, metrics: metrics) }
    }

    /// Throws `JobError.stopped` once the job was cancelled, timed out, lost its lease or the daemon
    /// is shutting down. Call it at every checkpoint.
    public func checkCancelled() throws {
        if let reason = stopReason { throw JobError.stopped(reason) }
    }

    public var stopReason: StopReason? { lock.withLock { stop } }

    /// What the stage was doing when it saw the stop flag, when it says (e.g. "waiting for the LLM
    /// endpoint http://llm:8000/v1 to describe class 'cat'"); a timed-out job's error names it.
    public var stoppedWhile: String? { lock.withLock { activityAtStop } }

    /// The error a stage throws when it stops in the middle of `activity` (a wait that took long).
    public func stopped(_ reason: StopReason, while activity: String) -> JobError {
        lock.withLock { activityAtStop = activity }
        return JobError.stopped(reason)
    }

    /// Stops the job at its next `checkCancelled()` (the worker calls it on a cancel, timeout, lost lease or shutdown).
    public func requestStop(_ reason: StopReason) {
        lock.withLock { stop = reason }
    }

    /// Hands `value` to the next NoLA stage of this attempt (replacing what was handed over before).
    func handOver<T>(_ value: T) {
        lock.withLock { handedOver = value }
    }

    /// Takes what the previous NoLA stage handed over; a stage that finds nothing of its input's type
    /// (a bug: stages out of order) fails the attempt, to be retried.
    func takeHandedOver<T>(_ type: T.Type, stage: String) throws -> T {
        let value: Any? = lock.withLock {
            defer { handedOver = nil }
            return handedOver
        }
        guard let typed = value as? T else {
            throw JobError.transient("pipeline stage \(stage) of job \(jobID) attempt \(attempt) found no \(T.self) from the stage before it")
        }
        return typed
    }
}
