import Foundation
import Logging
import Pipeline
import Queue

/// The `serve` service. The main loop, on one control connection, feeds events to `WorkerLoop` (the
/// loop's decisions, tested without a database) and performs the steps it answers: the heartbeat
/// (lease renewal, cancel flags, timeouts, worker row), the rescuer (expired leases of any worker),
/// the producer (claims on notification or poll) and systemd. The executor (WorkerExecutor.swift) runs
/// each job on its own thread with its own connection.
public final class Worker: @unchecked Sendable {
    public let config: NoladConfig
    public let stages: [JobStage]
    /// The kinds of work this worker does for running jobs when a slot has no job of its own (HelpWork.swift).
    public let helpWork: [HelpWork]
    public let id: String
    let logger: Logger
    /// Called at the points metrics need; no-op by default.
    public let observer: WorkerObserver

    let wake = WakePipe()
    let lock = NSLock()
    private var shutdownRequested = false
    /// `shutdownRequested`, read while `lock` is held.
    var isShuttingDownLocked: Bool { shutdownRequested }
    /// Connections of help units that ended, for the next units (WorkerHelp.swift).
    var idleHelpConnections: [Database] = []
    var running: [Int64: RunningJob] = [:]
    var helping: [ObjectIdentifier: RunningHelp] = [:]
    /// Jobs whose units this worker could not do, and when it gave up (skipped for a while).
    var cannotHelp: [Int64: Date] = [:]
    /// Jobs of which this worker held a help unit since the last heartbeat (nola.workers.helping_jobs).
    var helped: Set<Int64> = []

    public init(config: NoladConfig, stages: [JobStage], help: [HelpWork] = [], logger: Logger, observer: WorkerObserver = NoWorkerObserver()) {
        self.config = config
        self.stages = stages
        self.helpWork = help
        self.logger = logger
        self.observer = observer
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
        let control = Database(conninfo: config.conninfo, logger: logger, limits: config.controlConnectionLimits)
        control.shouldStopRetrying = { [weak self] in self?.isShuttingDown ?? true }
        let roots = CollectionAccess.resolveRoots(config.collectionRoots)
        logger.info("starting", metadata: ["worker": "\(id)", "version": "\(noladVersion)", "roots": "\(roots)",
                                           "concurrency": "\(config.concurrency)",
                                           "help_other_jobs": "\(config.helpOtherJobs && !helpWork.isEmpty)",
                                           "database_timeout_s": "\(formatSeconds(config.databaseTimeout))"])
        if let interval = Systemd.watchdogInterval, 2 * config.databaseTimeout >= interval {
            logger.warning("database_timeout is too long for systemd's watchdog: a dead database connection can hold the main loop for 2 × database_timeout, longer than the watchdog interval (half of WatchdogSec), so systemd may restart nolad during a network partition; lower database_timeout or raise WatchdogSec",
                           metadata: ["database_timeout_s": "\(formatSeconds(config.databaseTimeout))",
                                      "watchdog_interval_s": "\(formatSeconds(interval))"])
        }
        Systemd.status("connecting to the database")

        // Connect (retrying while the server is unavailable), then check the schema.
        do {
            try control.run(retryFor: .infinity) { c in
                try Migrator.checkSchema(c)
                try JobStore.registerWorker(c, id: id, name: config.workerName.isEmpty ? ProcessInfo.processInfo.hostName : config.workerName,
                                            host: ProcessInfo.processInfo.hostName, pid: Int(getpid()), version: noladVersion)
            }
        } catch let error as DatabaseError where error.code == .schemaMismatch {
            throw NoladError(.schema, error.message)
        } catch {
            if isShuttingDown { return }
            throw error
        }
        try control.listen("nola_jobs")
        try control.listen("nola_cancel")
        try control.listen("nola_work")
        observer.databaseReady()
        Systemd.ready(status: "idle, waiting for jobs")
        logger.info("ready", metadata: ["worker": "\(id)"])

        var loop = WorkerLoop(settings: .init(
            heartbeatSeconds: config.heartbeatSeconds, pollSeconds: config.pollSeconds,
            watchdogSeconds: Systemd.watchdogInterval, concurrency: config.concurrency,
            shutdownTimeoutSeconds: config.shutdownTimeoutSeconds, helpOtherJobs: config.helpOtherJobs && !helpWork.isEmpty), now: Date())
        var lastStatus = ""

        while true {
            observer.loopTurned()
            if isShuttingDown { loop.shutdown() }
            if reapEnded() { loop.jobEnded() }
            if reapEndedHelp() { loop.jobEnded() }
            var done = false
            while let step = loop.next(now: Date(), runningJobs: snapshot().count + helpingCount) {
                if perform(step, &loop, control, roots: roots) { done = true; break }
            }
            if done { break }

            let status = loop.isDatabaseDown ? "database unavailable, retrying" : statusLine()
            if status != lastStatus {
                Systemd.status(status)
                lastStatus = status
            }

            // Sleep until a notification, a wake-up (signal, job end) or the loop's next deadline.
            waitReadable(control.isConnected ? control.socket : -1, wake: wake, timeout: loop.sleepTimeout(now: Date()))
            if control.isConnected {
                do {
                    // Only the channel is passed on: a payload is never trusted (anyone who can
                    // connect may NOTIFY any channel), a notification only makes the loop look.
                    for n in try control.readNotifications() { loop.notified(channel: n.channel) }
                } catch {
                    report(loop.databaseFailed(now: Date(), unit: Double.random(in: 0..<1)), error: error)
                }
            }
        }

        do {
            try control.run(retryFor: 1) { try JobStore.workerStopped($0, id: id) }
        } catch {
            logger.warning("could not mark this worker stopped in nola.workers; its row keeps its last heartbeat",
                           metadata: ["worker": "\(id)", "error": "\(error)"])
        }
        control.close()
        closeHelpConnections()
        Systemd.status("stopped")
        logger.info("stopped", metadata: ["worker": "\(id)"])
    }

    /// Performs one step of the loop and reports its outcome; returns true when the loop must end.
    private func perform(_ step: WorkerLoop.Step, _ loop: inout WorkerLoop, _ control: Database, roots: [String]) -> Bool {
        switch step {
        case .pingWatchdog:
            Systemd.watchdog()
            return false
        case .beginDrain:
            Systemd.stopping(status: "stopping: releasing running jobs")
            logger.info("shutting down: no more claims; running jobs stop at their next checkpoint")
            for job in snapshot() { interrupt(job) { $0.shutdownRequested() } }
            stopHelping()
            return false
        case .stop:
            return true
        case .releaseRemainingAndStop:
            logger.warning("shutdown timeout reached; releasing jobs that did not stop in time")
            for job in snapshot() {
                do {
                    try control.run(retryFor: 1) { try JobStore.finish($0, job.claimed.ref, .release) }
                } catch {
                    logger.error("could not release the job; its lease will expire and it will be rescued",
                                 metadata: ["job": "\(job.claimed.ref.id)", "error": "\(error)"])
                }
            }
            for help in lock.withLock({ Array(helping.values) }) where !help.ended {
                do {
                    try control.run(retryFor: 1) { try help.unit.release($0, error: nil) }
                } catch {
                    logger.error("could not give a help unit back; its lease will expire and another worker takes it",
                                 metadata: ["unit": "\(help.unit)", "error": "\(error)"])
                }
            }
            return true
        case .heartbeat, .checkCancelRequests, .claim, .help:
            do {
                var found = true
                switch step {
                case .heartbeat:
                    try heartbeat(control, snapshot())
                    try rescue(control)
                case .checkCancelRequests:
                    try checkCancelRequests(control)
                case .help:
                    found = try help(control, roots: roots)
                default:
                    found = try produce(control, roots: roots)
                }
                report(loop.succeeded(step, now: Date(), found: found), error: nil)
            } catch {
                control.close()
                report(loop.databaseFailed(now: Date(), unit: Double.random(in: 0..<1)), error: error)
            }
            return false
        }
    }

    private func report(_ report: WorkerLoop.Report?, error: Error?) {
        switch report {
        case .outageBegan?:
            logger.warning("database unavailable; retrying with backoff (logged again on recovery)",
                           metadata: ["error": "\(error.map { "\($0)" } ?? "")"])
            Systemd.status("database unavailable, retrying")
            observer.databaseUnavailable()
        case .recovered(let tries, let seconds)?:
            logger.info("database available again", metadata: ["failed_tries": "\(tries)", "outage_s": "\(formatSeconds(seconds))"])
            observer.databaseReconnected(tries: tries, seconds: seconds)
        case nil:
            break
        }
    }

    // MARK: steps

    func snapshot() -> [RunningJob] {
        lock.withLock { Array(running.values) }
    }

    /// Feeds an event to the job's lifecycle and carries out the action it answers (only
    /// `.interrupt` can come from these events). Logs by the action, so an event that changes nothing
    /// (say, a lease found gone after the job's own final write) logs nothing.
    private func interrupt(_ job: RunningJob, _ event: (inout JobLifecycle) -> JobLifecycle.Action) {
        let action: JobLifecycle.Action = lock.withLock { job.ended ? .none : event(&job.lifecycle) }
        guard case .interrupt(let reason) = action else { return }
        job.context?.requestStop(reason)
        let meta: Logger.Metadata = ["job": "\(job.claimed.ref.id)", "reason": "\(reason)"]
        if reason == .leaseLost {
            logger.warning("lease lost: another worker or the rescuer took the job", metadata: meta)
            observer.leaseRenewalFailed(job.claimed.ref)
        } else {
            logger.info("stopping job at its next checkpoint", metadata: meta)
        }
    }

    /// Renews the leases of the jobs still running (reading their cancel flags), checks timeouts and
    /// updates the worker row.
    private func heartbeat(_ control: Database, _ jobs: [RunningJob]) throws {
        for job in jobs where lock.withLock({ !job.ended && job.lifecycle.wantsLeaseRenewal }) {
            let renewal = try control.run { try JobStore.renewLease($0, job.claimed.ref, leaseSeconds: config.leaseSeconds) }
            interrupt(job) { $0.renewal(renewal) }
            let elapsed = Date().timeIntervalSince(job.started)
            interrupt(job) { $0.elapsed(elapsed, timeout: job.claimed.timeoutSeconds) }
        }
        try control.run { try JobStore.workerHeartbeat($0, id: id, currentJobs: jobs.map(\.claimed.ref.id), helpingJobs: helpedSinceHeartbeat()) }
    }

    /// The rescuer: requeues (or fails, or cancels) running jobs of any worker whose lease expired.
    private func rescue(_ control: Database) throws {
        let ids = try control.run { try JobStore.rescueExpired($0, rescuer: id) }
        if !ids.isEmpty { logger.info("rescued jobs whose lease expired", metadata: ["jobs": "\(ids)"]) }
    }

    /// The producer: claims one job and starts it; false when none was waiting.
    private func produce(_ control: Database, roots: [String]) throws -> Bool {
        guard let claimed = try control.run({ try JobStore.claim($0, worker: id, leaseSeconds: config.leaseSeconds) }) else {
            return false
        }
        start(claimed, roots: roots)
        return true
    }

    /// Interrupts every running job of ours whose `cancel_requested` flag is set. The flag is set only
    /// by `nola.cancel` (or by a role allowed to update jobs), never by a notification.
    private func checkCancelRequests(_ control: Database) throws {
        let refs = snapshot().filter { job in lock.withLock { !job.ended && job.lifecycle.wantsLeaseRenewal } }.map(\.claimed.ref)
        guard !refs.isEmpty else { return }
        let ids = try control.run { try JobStore.cancelRequested($0, refs) }
        for id in ids {
            guard let job = lock.withLock({ running[id] }) else { continue }
            logger.info("cancel requested", metadata: ["job": "\(id)"])
            interrupt(job) { $0.cancelRequested() }
        }
    }

    /// Forgets jobs whose threads ended; true when any did.
    private func reapEnded() -> Bool {
        lock.withLock {
            let ended = running.filter { $0.value.ended }.map(\.key)
            for id in ended { running[id] = nil }
            return !ended.isEmpty
        }
    }

    private func statusLine() -> String {
        let jobs = snapshot()
        let helps = lock.withLock { helping.values.map { "helping: \($0.unit)" }.sorted() }
        if isShuttingDown { return "stopping: \(jobs.count) job(s) still running" + (helps.isEmpty ? "" : ", \(helps.count) help unit(s)") }
        if jobs.isEmpty && helps.isEmpty { return "idle, waiting for jobs" }
        return (jobs.sorted { $0.claimed.ref.id < $1.claimed.ref.id }.map { job in
            lock.withLock { "job \(job.claimed.ref.id) attempt \(job.claimed.ref.attempt): \(job.stage) \(job.done)/\(job.total)" }
        } + helps).joined(separator: "; ")
    }
}
