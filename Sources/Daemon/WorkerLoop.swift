import Foundation
import Queue

/// The decisions of the worker's main loop, without a database, clock or threads: feed it events
/// (time passing, notifications, the outcome of each step) and it answers with the next step to
/// perform, or nil when the loop should sleep for `sleepTimeout(now:)`. `Worker` performs the steps:
/// the producer claims, the heartbeat renews leases, the rescuer requeues expired leases, the
/// executor runs the jobs' threads.
///
/// A notification carries only its channel here: its payload never reaches a decision, so a forged
/// NOTIFY can at most make the loop look at state that only permitted roles can change.
public struct WorkerLoop: Sendable {
    public struct Settings: Sendable, Equatable {
        public var heartbeatSeconds: Double
        public var pollSeconds: Double
        /// Interval for WATCHDOG=1, nil when systemd's watchdog is off.
        public var watchdogSeconds: Double?
        public var concurrency: Int
        public var shutdownTimeoutSeconds: Double
        /// Delay between tries while the database is unavailable.
        public var reconnect: RetryPolicy
        /// Whether a free slot with no job of its own to claim helps other jobs (`help_other_jobs`).
        public var helpOtherJobs: Bool

        public init(heartbeatSeconds: Double, pollSeconds: Double, watchdogSeconds: Double?, concurrency: Int,
                    shutdownTimeoutSeconds: Double, reconnect: RetryPolicy = WorkerLoop.reconnectPolicy, helpOtherJobs: Bool = false) {
            self.heartbeatSeconds = heartbeatSeconds
            self.pollSeconds = pollSeconds
            self.watchdogSeconds = watchdogSeconds
            self.concurrency = concurrency
            self.shutdownTimeoutSeconds = shutdownTimeoutSeconds
            self.reconnect = reconnect
            self.helpOtherJobs = helpOtherJobs
        }
    }

    /// 0.1 s, doubling per failed try, capped at 5 s; each delay scaled by a random factor in [0.5, 1].
    public static let reconnectPolicy = RetryPolicy(base: 0.1, maximum: 5, jitter: 0.5)

    public enum Step: Sendable, Equatable {
        /// Send WATCHDOG=1.
        case pingWatchdog
        /// SIGTERM arrived: ask every running job to stop (release), claim nothing more.
        case beginDrain
        /// Renew our leases (reading cancel flags and timeouts), update the worker row, then rescue
        /// expired leases of any worker. While the database is down this is also the reconnect try.
        case heartbeat
        /// Read `cancel_requested` of our running jobs (a `nola_cancel` notification arrived).
        case checkCancelRequests
        /// Claim one job (the producer).
        case claim
        /// Claim one unit of work of a running job (a shard, ...) and run it: a free slot found no job to claim.
        case help
        /// The drain deadline passed: release the jobs that did not stop, then stop.
        case releaseRemainingAndStop
        /// Every job stopped after the drain: stop.
        case stop
    }

    /// A line to log about the database, once per outage and once on recovery.
    public enum Report: Sendable, Equatable {
        case outageBegan
        case recovered(tries: Int, seconds: Double)
    }

    public let settings: Settings
    private var lastWatchdog: Date?
    private var lastHeartbeat: Date?
    private var lastPoll: Date
    private var claimWanted = true
    private var helpWanted = true
    private var cancelCheckWanted = false
    private var shutdownRequested = false
    private(set) var drainDeadline: Date?
    private(set) var stopped = false
    private var outage: (since: Date, failures: Int, nextTry: Date)?

    public init(settings: Settings, now: Date) {
        self.settings = settings
        self.lastPoll = now
    }

    public var isDraining: Bool { drainDeadline != nil }
    public var isDatabaseDown: Bool { outage != nil }
    public var failedTries: Int { outage?.failures ?? 0 }

    // MARK: events

    public mutating func shutdown() { shutdownRequested = true }

    /// A notification on `channel` arrived (its payload is deliberately not an input).
    public mutating func notified(channel: String) {
        switch channel {
        case "nola_jobs": claimWanted = true
        case "nola_work": helpWanted = true
        case "nola_cancel": cancelCheckWanted = true
        default: break
        }
    }

    /// A running job's (or help unit's) thread ended: its slot is free.
    public mutating func jobEnded() {
        claimWanted = true
        helpWanted = true
    }

    /// The step succeeded (for `.claim`: `found` says whether a job was claimed).
    public mutating func succeeded(_ step: Step, now: Date, found: Bool = true) -> Report? {
        switch step {
        case .heartbeat:
            lastHeartbeat = now
            claimWanted = true
            helpWanted = true
        case .claim:
            if !found { claimWanted = false }
        case .help:
            if !found { helpWanted = false }
        case .checkCancelRequests:
            cancelCheckWanted = false
        case .pingWatchdog, .beginDrain, .releaseRemainingAndStop, .stop:
            break
        }
        guard let o = outage else { return nil }
        outage = nil
        return .recovered(tries: o.failures, seconds: now.timeIntervalSince(o.since))
    }

    /// A database step failed (or the connection was found dead): wait before the next try.
    /// `unit` is a random sample in [0, 1) for the jitter.
    public mutating func databaseFailed(now: Date, unit: Double) -> Report? {
        cancelCheckWanted = false // the heartbeat after the reconnect reads the cancel flags
        let failures = (outage?.failures ?? 0) + 1
        let delay = settings.reconnect.delay(failures: failures, unit: unit)
        let report: Report? = outage == nil ? .outageBegan : nil
        outage = (outage?.since ?? now, failures, now.addingTimeInterval(delay))
        return report
    }

    // MARK: decisions

    /// The next step to perform now, or nil to sleep. Call again after reporting each step's outcome.
    /// `runningJobs` counts the threads that hold a slot: our jobs and the help units we run.
    public mutating func next(now: Date, runningJobs: Int) -> Step? {
        if stopped { return nil }
        if let w = settings.watchdogSeconds, lastWatchdog.map({ now.timeIntervalSince($0) >= w }) ?? true {
            lastWatchdog = now
            return .pingWatchdog
        }
        if shutdownRequested && drainDeadline == nil {
            drainDeadline = now.addingTimeInterval(settings.shutdownTimeoutSeconds)
            return .beginDrain
        }
        if let deadline = drainDeadline {
            if runningJobs == 0 { stopped = true; return .stop }
            if now >= deadline { stopped = true; return .releaseRemainingAndStop }
        }
        if let o = outage {
            return now >= o.nextTry ? .heartbeat : nil
        }
        if lastHeartbeat.map({ now.timeIntervalSince($0) >= settings.heartbeatSeconds }) ?? true {
            return .heartbeat
        }
        if cancelCheckWanted {
            if runningJobs > 0 { return .checkCancelRequests }
            cancelCheckWanted = false
        }
        if now.timeIntervalSince(lastPoll) >= settings.pollSeconds {
            lastPoll = now
            claimWanted = true
            helpWanted = true
        }
        if drainDeadline == nil && claimWanted && runningJobs < settings.concurrency {
            return .claim
        }
        // Only a slot that found no job of its own helps (a job claim is tried first on every wake-up).
        if drainDeadline == nil && settings.helpOtherJobs && !claimWanted && helpWanted && runningJobs < settings.concurrency {
            return .help
        }
        return nil
    }

    /// How long to sleep (waking early on a notification or a job's end) when `next` returned nil.
    public func sleepTimeout(now: Date) -> Double {
        var until: [Date] = []
        if let o = outage {
            // Only the next try: claims and polls wait for the database.
            until.append(o.nextTry)
        } else {
            until.append(lastPoll.addingTimeInterval(settings.pollSeconds))
            if let h = lastHeartbeat { until.append(h.addingTimeInterval(settings.heartbeatSeconds)) }
        }
        if let w = settings.watchdogSeconds, let last = lastWatchdog { until.append(last.addingTimeInterval(w)) }
        var timeout = until.map { $0.timeIntervalSince(now) }.min()!
        if isDraining { timeout = min(timeout, 0.1) }
        return max(0.005, timeout)
    }
}
