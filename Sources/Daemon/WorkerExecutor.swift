import Foundation
import Kernels
import Logging
import Method
import Pipeline
import Queue

/// The executor: one thread with its own connection per claimed job. The job's `JobLifecycle` decides
/// the final write; the outcome travels to `JobStore.finish` as the action's `AttemptOutcome`.
extension Worker {
    final class RunningJob: @unchecked Sendable {
        let claimed: ClaimedJob
        let started = Date()
        var lifecycle: JobLifecycle
        var context: JobContext?
        /// The thread ended (the final write is done or given up).
        var ended = false
        var stage = "starting"
        var done = 0, total = 0
        init(_ claimed: ClaimedJob, lifecycle: JobLifecycle) {
            self.claimed = claimed
            self.lifecycle = lifecycle
        }
    }

    func start(_ claimed: ClaimedJob, roots: [String]) {
        let retry = RetryPolicy(base: config.retryBaseSeconds, maximum: 600, jitter: 0.2)
        let job = RunningJob(claimed, lifecycle: JobLifecycle(attemptsUsed: claimed.attemptsUsed, maxAttempts: claimed.maxAttempts, retry: retry))
        lock.withLock { running[claimed.ref.id] = job }
        logger.info("claimed job", metadata: ["job": "\(claimed.ref.id)", "attempt": "\(claimed.ref.attempt)",
                                              "collection": "\(claimed.collection)"])
        let thread = Thread { [self] in
            let outcome = execute(job, roots: roots)
            lock.withLock { job.ended = true }
            observer.jobEnded(claimed.ref, outcome: outcome)
            wake.wake()
        }
        thread.name = "job-\(claimed.ref.id)"
        thread.stackSize = 8 << 20
        observer.jobStarted(claimed.ref)
        thread.start()
    }

    /// Runs the stages and writes the outcome; returns the outcome written (nil: nothing written).
    private func execute(_ job: RunningJob, roots: [String]) -> AttemptOutcome? {
        let ref = job.claimed.ref
        var jobLogger = logger
        jobLogger[metadataKey: "job"] = "\(ref.id)"
        let database = Database(conninfo: config.conninfo, logger: jobLogger, limits: config.jobConnectionLimits)
        defer { database.close() }
        let result = runStages(job, roots: roots, database: database, logger: jobLogger)

        let unit = Double.random(in: 0..<1)
        let action: JobLifecycle.Action = lock.withLock {
            if case .stopped(let reason) = result.stoppedBy, job.lifecycle.stopReason == nil {
                // A stage saw the job was no longer ours before the main loop did.
                _ = reason == .leaseLost ? job.lifecycle.leaseLost() : job.lifecycle.cancelRequested()
            }
            return job.lifecycle.executionFinished(result.result, unit: unit, stoppedWhile: job.context?.stoppedWhile)
        }
        do {
            let written = try database.run(retryFor: max(10, config.leaseSeconds)) { try JobStore.finish($0, ref, action) }
            switch action {
            case .abandon:
                jobLogger.warning("job abandoned: it is no longer ours")
            default:
                if written {
                    var meta: Logger.Metadata = ["outcome": "\(action.outcome?.rawValue ?? "none")"]
                    switch action {
                    case .markFailed(let message, _): meta["error"] = "\(message)"
                    case .scheduleRetry(let delay, let message):
                        meta["error"] = "\(message)"
                        meta["retry_in_s"] = "\((delay * 10).rounded() / 10)"
                    default: break
                    }
                    jobLogger.info("job finished", metadata: meta)
                } else {
                    jobLogger.warning("job was no longer ours; outcome not written", metadata: ["outcome": "\(action.outcome?.rawValue ?? "none")"])
                }
            }
            return written ? action.outcome : nil
        } catch {
            jobLogger.error("could not record the job's outcome; its lease will expire and it will be rescued",
                            metadata: ["outcome": "\(action.outcome?.rawValue ?? "none")", "error": "\(error)"])
            return nil
        }
    }

    private func runStages(_ job: RunningJob, roots: [String], database: Database, logger: Logger)
        -> (result: ExecutionResult, stoppedBy: JobError?) {
        let claimed = job.claimed
        let ref = claimed.ref
        do {
            let collection = try CollectionAccess.resolve(claimed.collection, roots: config.collectionRoots)
            let context = JobContext(
                job: ref, collection: collection, roots: roots.map { URL(fileURLWithPath: $0) }, classes: claimed.classes,
                descriptionsJSON: claimed.descriptionsJSON, parametersJSON: claimed.parametersJSON, settings: config.stageSettings,
                database: database, logger: logger,
                onProgress: { [weak self, job] stage, done, total in
                    self?.lock.withLock { job.stage = stage; job.done = done; job.total = total }
                    self?.observer.jobProgress(ref, stage: stage, done: done, total: total)
                })
            let pending: StopReason? = lock.withLock {
                job.context = context
                return job.lifecycle.stopReason
            }
            if let pending { context.requestStop(pending) }
            logger.info("job threads", metadata: ["threads": "\(context.threads)",
                                                  "requested": "\(context.threadsRequested.map(String.init) ?? "none")",
                                                  "daemon_threads": "\(config.threads)"])
            // Every kernel of every stage runs with the job's own thread count (docs/threading.md).
            try withThreads(context.threads) {
                for (index, stage) in stages.enumerated() {
                    try context.checkCancelled()
                    lock.withLock { job.stage = stage.name; job.done = 0; job.total = 0 }
                    observer.jobProgress(ref, stage: stage.name, done: 0, total: 0)
                    try context.write { try JobStore.startStage($0, ref, stage: stage.name, index: index, count: self.stages.count) }
                    logger.info("stage started", metadata: ["stage": "\(stage.name)"])
                    try stage.run(context)
                }
                // What the kernels ran with, read after the last stage: the job's threads on this thread,
                // and OpenBLAS still at one thread (no job ever changes it).
                try context.recordEvent(stage: stages.last?.name ?? "none", kind: "threads", metrics: [
                    "threads": .number(Double(KernelThreads.current)), "blas_threads": .number(Double(KernelThreads.blas)),
                ])
            }
            return (.succeeded, nil)
        } catch let error as JobError {
            switch error {
            case .badInput(let message): return (.permanentFailure(message), nil)
            case .transient(let message): return (.transientFailure(message), nil)
            case .stopped: return (.stopped, error)
            }
        } catch let error as DatabaseError {
            return (error.isTransient ? .transientFailure("\(error)") : .permanentFailure("\(error)"), nil)
        } catch {
            return (.transientFailure("\(error)"), nil)
        }
    }
}
