import Foundation
import Logging
import Queue

/// The `serve` service: one main loop (claims, leases, rescue, notifications, systemd) on a control
/// connection, and one thread with its own connection per running job.
public final class Worker: @unchecked Sendable {
    public let config: NoladConfig
    public let stages: [JobStage]
    public let id: String
    let logger: Logger

    private let wake = WakePipe()
    private let lock = NSLock()
    private var shutdownRequested = false
    private var running: [Int64: RunningJob] = [:]

    final class RunningJob: @unchecked Sendable {
        let claimed: ClaimedJob
        let started = Date()
        var lifecycle: JobLifecycle
        var context: JobContext?
        var finished = false
        var stage = "starting"
        var done = 0, total = 0
        init(_ claimed: ClaimedJob, lifecycle: JobLifecycle) {
            self.claimed = claimed
            self.lifecycle = lifecycle
        }
    }

    public init(config: NoladConfig, stages: [JobStage], logger: Logger) {
        self.config = config
        self.stages = stages
        self.logger = logger
        let host = ProcessInfo.processInfo.hostName
        let name = config.workerName.isEmpty ? host : config.workerName
        let boot = String(UInt32.random(in: 0...UInt32.max), radix: 16)
        self.id = "\(name)-\(getpid())-\(boot)"
    }

    /// Asks the service to stop (what SIGTERM/SIGINT do).
    public func requestShutdown() {
        lock.withLock { shutdownRequested = true }
        wake.wake()
    }

    var isShuttingDown: Bool { lock.withLock { shutdownRequested } }

    /// Runs until shutdown; throws when the schema does not match (serve refuses to start).
    public func run() throws {
        let control = Database(conninfo: config.conninfo, logger: logger)
        control.shouldStopRetrying = { [weak self] in self?.isShuttingDown ?? true }
        let roots = CollectionAccess.resolveRoots(config.collectionRoots)
        logger.info("starting", metadata: ["worker": "\(id)", "version": "\(noladVersion)", "roots": "\(roots)",
                                           "concurrency": "\(config.concurrency)"])
        Systemd.status("connecting to the database")

        // Connect (retrying while the server is unavailable), then check the schema.
        while true {
            do {
                try control.run(retryFor: .infinity) { c in
                    try Migrator.checkSchema(c)
                    try JobStore.registerWorker(c, id: id, name: config.workerName.isEmpty ? ProcessInfo.processInfo.hostName : config.workerName,
                                                host: ProcessInfo.processInfo.hostName, pid: Int(getpid()), version: noladVersion)
                }
                break
            } catch let error as DatabaseError where error.code == .schemaMismatch {
                throw NoladError(.schema, error.message)
            } catch {
                if isShuttingDown { return }
                throw error
            }
        }
        try control.listen("nola_jobs")
        try control.listen("nola_cancel")
        Systemd.ready(status: "idle, waiting for jobs")
        logger.info("ready", metadata: ["worker": "\(id)"])

        let watchdog = Systemd.watchdogInterval
        var lastWatchdog = Date.distantPast
        var lastHeartbeat = Date()
        var draining = false
        var drainDeadline = Date.distantFuture
        var claimWanted = true
        var cancelCheckWanted = false
        var lastStatus = ""
        var failures = 0

        while true {
            let now = Date()
            if let watchdog, now.timeIntervalSince(lastWatchdog) >= watchdog {
                Systemd.watchdog()
                lastWatchdog = now
            }
            if isShuttingDown && !draining {
                draining = true
                drainDeadline = now.addingTimeInterval(config.shutdownTimeoutSeconds)
                Systemd.stopping(status: "stopping: releasing running jobs")
                logger.info("shutting down: no more claims; running jobs stop at their next checkpoint")
                for job in snapshot() { interrupt(job) { $0.shutdownRequested() } }
            }
            reapFinished()
            let jobs = snapshot()
            if draining && jobs.isEmpty { break }
            if draining && now >= drainDeadline {
                logger.warning("shutdown timeout reached; releasing jobs that did not stop in time")
                for job in jobs {
                    _ = try? control.run(retryFor: 1) { try JobStore.finish($0, job.claimed.ref, .release) }
                }
                break
            }

            do {
                // Leases, cancellations, timeouts and the worker row, every heartbeat.
                if now.timeIntervalSince(lastHeartbeat) >= config.heartbeatSeconds || control.connectCount == 0 || !control.isConnected {
                    try heartbeat(control, jobs)
                    try control.run { try JobStore.rescueExpired($0, rescuer: id) }
                    lastHeartbeat = now
                    claimWanted = true
                }
                // Claims.
                while !draining && claimWanted && snapshot().count < config.concurrency {
                    guard let claimed = try control.run({ try JobStore.claim($0, worker: id, leaseSeconds: config.leaseSeconds) }) else {
                        claimWanted = false
                        break
                    }
                    start(claimed, roots: roots)
                }
                failures = 0
            } catch {
                failures += 1
                if failures == 1 || failures % 20 == 0 {
                    logger.warning("database unavailable in the main loop", metadata: ["error": "\(error)"])
                }
                Systemd.status("database unavailable, retrying: \(error)")
                lastStatus = ""
                control.close()
            }

            let status = statusLine()
            if status != lastStatus {
                Systemd.status(status)
                lastStatus = status
            }

            // Sleep until a notification, a wake-up, the next heartbeat or the poll interval.
            var timeout = min(config.pollSeconds, max(0.01, config.heartbeatSeconds - Date().timeIntervalSince(lastHeartbeat)))
            if let watchdog { timeout = min(timeout, watchdog) }
            if failures > 0 { timeout = min(timeout, min(2, 0.1 * pow(2, Double(min(failures, 5))))) }
            if draining { timeout = min(timeout, 0.1) }
            waitReadable(control.isConnected ? control.socket : -1, wake: wake, timeout: timeout)
            if control.isConnected {
                do {
                    for n in try control.readNotifications() {
                        switch n.channel {
                        case "nola_jobs": claimWanted = true
                        case "nola_cancel":
                            // Anyone who can connect may NOTIFY any channel, so the payload is never
                            // trusted: the notification only makes the loop read the jobs' own flags.
                            cancelCheckWanted = true
                        default: break
                        }
                    }
                } catch {
                    logger.warning("lost the database connection", metadata: ["error": "\(error)"])
                }
            }
            if cancelCheckWanted && control.isConnected {
                cancelCheckWanted = false
                checkCancelRequests(control)
            }
            if Date().timeIntervalSince(lastHeartbeat) >= config.pollSeconds { claimWanted = true }
        }

        _ = try? control.run(retryFor: 1) { try JobStore.workerStopped($0, id: id) }
        control.close()
        Systemd.status("stopped")
        logger.info("stopped", metadata: ["worker": "\(id)"])
    }

    // MARK: main-loop helpers

    private func snapshot() -> [RunningJob] {
        lock.withLock { Array(running.values) }
    }

    private func interrupt(_ job: RunningJob, _ event: (inout JobLifecycle) -> JobLifecycle.Action) {
        let action: JobLifecycle.Action = lock.withLock { job.finished ? .none : event(&job.lifecycle) }
        if case .interrupt(let reason) = action {
            job.context?.requestStop(reason)
            logger.info("stopping job at its next checkpoint", metadata: ["job": "\(job.claimed.ref.id)", "reason": "\(reason)"])
        }
    }

    private func heartbeat(_ control: Database, _ jobs: [RunningJob]) throws {
        for job in jobs where !lock.withLock({ job.finished }) {
            let renewal = try control.run { try JobStore.renewLease($0, job.claimed.ref, leaseSeconds: config.leaseSeconds) }
            switch renewal {
            case .lost:
                logger.warning("lease lost: another worker or the rescuer took the job", metadata: ["job": "\(job.claimed.ref.id)"])
                interrupt(job) { $0.leaseLost() }
            case .renewed(let cancel):
                if cancel { interrupt(job) { $0.cancelRequested() } }
            }
            let elapsed = Date().timeIntervalSince(job.started)
            if elapsed > job.claimed.timeoutSeconds {
                interrupt(job) { $0.timeoutReached(seconds: job.claimed.timeoutSeconds) }
            }
        }
        try control.run { try JobStore.workerHeartbeat($0, id: id, currentJobs: jobs.map(\.claimed.ref.id)) }
    }

    /// Interrupts every running job of ours whose `cancel_requested` flag is set. The flag is set only
    /// by `nola.cancel` (or by a role allowed to update jobs), never by a notification.
    private func checkCancelRequests(_ control: Database) {
        let refs = snapshot().filter { job in !lock.withLock { job.finished } }.map(\.claimed.ref)
        guard !refs.isEmpty else { return }
        do {
            let ids = try control.run { try JobStore.cancelRequested($0, refs) }
            for id in ids {
                guard let job = lock.withLock({ running[id] }) else { continue }
                logger.info("cancel requested", metadata: ["job": "\(id)"])
                interrupt(job) { $0.cancelRequested() }
            }
        } catch {
            logger.warning("could not read cancel requests; the next heartbeat reads them", metadata: ["error": "\(error)"])
        }
    }

    private func reapFinished() {
        lock.withLock {
            for (id, job) in running where job.finished { running[id] = nil }
        }
    }

    private func statusLine() -> String {
        let jobs = snapshot()
        if isShuttingDown { return "stopping: \(jobs.count) job(s) still running" }
        if jobs.isEmpty { return "idle, waiting for jobs" }
        return jobs.sorted { $0.claimed.ref.id < $1.claimed.ref.id }.map { job in
            lock.withLock { "job \(job.claimed.ref.id) attempt \(job.claimed.ref.attempt): \(job.stage) \(job.done)/\(job.total)" }
        }.joined(separator: "; ")
    }

    // MARK: job threads

    private func start(_ claimed: ClaimedJob, roots: [String]) {
        let retry = RetryPolicy(base: config.retryBaseSeconds, maximum: 600, jitter: 0.2)
        let job = RunningJob(claimed, lifecycle: JobLifecycle(attemptsUsed: claimed.attemptsUsed, maxAttempts: claimed.maxAttempts, retry: retry))
        lock.withLock { running[claimed.ref.id] = job }
        logger.info("claimed job", metadata: ["job": "\(claimed.ref.id)", "attempt": "\(claimed.ref.attempt)",
                                              "collection": "\(claimed.collection)"])
        let thread = Thread { [self] in
            execute(job, roots: roots)
            lock.withLock { job.finished = true }
            wake.wake()
        }
        thread.name = "job-\(claimed.ref.id)"
        thread.stackSize = 8 << 20
        thread.start()
    }

    private func execute(_ job: RunningJob, roots: [String]) {
        let ref = job.claimed.ref
        var jobLogger = logger
        jobLogger[metadataKey: "job"] = "\(ref.id)"
        let database = Database(conninfo: config.conninfo, logger: jobLogger)
        defer { database.close() }
        let result = runStages(job, roots: roots, database: database, logger: jobLogger)

        let unit = Double.random(in: 0..<1)
        let action: JobLifecycle.Action = lock.withLock {
            if case .stopped(let reason) = result.stoppedBy, job.lifecycle.stopReason == nil {
                // A stage saw the job was no longer ours before the main loop did.
                _ = reason == .leaseLost ? job.lifecycle.leaseLost() : job.lifecycle.cancelRequested()
            }
            return job.lifecycle.executionFinished(result.result, unit: unit)
        }
        do {
            let written = try database.run(retryFor: max(10, config.leaseSeconds)) { try JobStore.finish($0, ref, action) }
            switch action {
            case .abandon:
                jobLogger.warning("job abandoned: it is no longer ours")
            default:
                if written {
                    jobLogger.info("job finished", metadata: ["action": "\(action)"])
                } else {
                    jobLogger.warning("job was no longer ours; outcome not written", metadata: ["action": "\(action)"])
                }
            }
        } catch {
            jobLogger.error("could not record the job's outcome; its lease will expire and it will be rescued",
                            metadata: ["action": "\(action)", "error": "\(error)"])
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
                descriptionsJSON: claimed.descriptionsJSON, parametersJSON: claimed.parametersJSON, config: config,
                database: database, logger: logger,
                onProgress: { [weak self, job] stage, done, total in
                    self?.lock.withLock { job.stage = stage; job.done = done; job.total = total }
                })
            let pending: StopReason? = lock.withLock {
                job.context = context
                return job.lifecycle.stopReason
            }
            if let pending { context.requestStop(pending) }
            for (index, stage) in stages.enumerated() {
                try context.checkCancelled()
                lock.withLock { job.stage = stage.name; job.done = 0; job.total = 0 }
                try context.write { try JobStore.startStage($0, ref, stage: stage.name, index: index, count: self.stages.count) }
                logger.info("stage started", metadata: ["stage": "\(stage.name)"])
                try stage.run(context)
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
