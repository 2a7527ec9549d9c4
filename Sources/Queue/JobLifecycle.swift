/// Why a running job is asked to stop at its next checkpoint.
public enum StopReason: Sendable, Equatable {
    /// `nola.cancel(id)` was called.
    case cancelled
    /// The daemon is shutting down (SIGTERM): release the job without burning an attempt.
    case shutdown
    /// The job ran longer than its `timeout`.
    case timedOut(seconds: Double)
    /// The lease was taken away (renewal found the job no longer ours): write nothing more.
    case leaseLost
}

/// How the job's stages ended, as the executor saw it.
public enum ExecutionResult: Sendable, Equatable {
    case succeeded
    /// Bad input or another error that retrying cannot fix.
    case permanentFailure(String)
    /// An error that may pass (database restarted, disk busy, ...).
    case transientFailure(String)
    /// A stage saw the stop flag at a checkpoint and returned early.
    case stopped
}

/// How one attempt ended, as recorded in `nola.attempts.outcome` (the raw values are the SQL ones).
public enum AttemptOutcome: String, Sendable, Equatable, CaseIterable {
    case succeeded
    case failed
    /// Failed because the job ran past its `timeout`.
    case timedOut = "timed_out"
    /// Failed transiently; the job is queued again after a backoff.
    case retry
    case cancelled
    /// Given back at shutdown without burning the attempt.
    case released
    /// The lease expired (written by the rescuer, never by the worker that ran it).
    case lost
}

/// Why a job is marked failed.
public enum FailureKind: Sendable, Equatable {
    /// Bad input, or a transient error on the last attempt.
    case error
    /// The job ran past its `timeout`.
    case timedOut
}

/// Exponential backoff with jitter (retried jobs; the main loop's reconnects).
public struct RetryPolicy: Sendable, Equatable {
    public var base: Double
    public var maximum: Double
    /// Fraction of the delay that is random (0.2: the delay is scaled by a factor in [0.8, 1]).
    public var jitter: Double

    public init(base: Double = 5, maximum: Double = 600, jitter: Double = 0.2) {
        self.base = base
        self.maximum = maximum
        self.jitter = jitter
    }

    /// Delay before the next try after `failures` failed attempts; `unit` is a random sample in [0, 1).
    public func delay(failures: Int, unit: Double) -> Double {
        precondition(failures >= 1 && unit >= 0 && unit < 1)
        let raw = min(maximum, base * Double(1 << min(failures - 1, 30)))
        return raw * (1 - jitter * unit)
    }
}

/// The life of one claimed job inside a worker, from claim to its final guarded write.
/// Feed it events; it answers with the one action the worker must take. No database needed.
public struct JobLifecycle: Sendable {
    /// What the worker must do.
    public enum Action: Sendable, Equatable {
        /// Nothing to do now.
        case none
        /// Set the job's stop flag so its stages return at the next checkpoint.
        case interrupt(StopReason)
        /// Guarded update to `succeeded`.
        case markSucceeded
        /// Guarded update to `failed` with this message (no retry); `kind` says which attempt outcome.
        case markFailed(String, kind: FailureKind = .error)
        /// Guarded update back to `queued`, to run again after `delay` seconds.
        case scheduleRetry(delay: Double, error: String)
        /// Guarded update to `cancelled`.
        case markCancelled
        /// Guarded update back to `queued` at once, giving back the attempt it used.
        case release
        /// The job is no longer ours; forget it without writing.
        case abandon

        /// The attempt outcome this action writes; nil for actions that write nothing.
        public var outcome: AttemptOutcome? {
            switch self {
            case .none, .interrupt, .abandon: return nil
            case .markSucceeded: return .succeeded
            case .markFailed(_, let kind): return kind == .timedOut ? .timedOut : .failed
            case .scheduleRetry: return .retry
            case .markCancelled: return .cancelled
            case .release: return .released
            }
        }
    }

    private enum State: Sendable, Equatable {
        case running
        case stopping(StopReason)
        case finished
    }

    private var state: State = .running
    public let attemptsUsed: Int
    public let maxAttempts: Int
    public let retry: RetryPolicy

    /// `attemptsUsed` counts this claim.
    public init(attemptsUsed: Int, maxAttempts: Int, retry: RetryPolicy = RetryPolicy()) {
        precondition(attemptsUsed >= 1 && maxAttempts >= 1)
        self.attemptsUsed = attemptsUsed
        self.maxAttempts = maxAttempts
        self.retry = retry
    }

    public var isFinished: Bool { state == .finished }

    /// The reason the job is stopping, if any.
    public var stopReason: StopReason? {
        if case .stopping(let r) = state { return r }
        return nil
    }

    public mutating func cancelRequested() -> Action { requestStop(.cancelled) }
    public mutating func shutdownRequested() -> Action { requestStop(.shutdown) }
    public mutating func timeoutReached(seconds: Double) -> Action { requestStop(.timedOut(seconds: seconds)) }
    public mutating func leaseLost() -> Action { requestStop(.leaseLost) }

    /// Whether the lease still needs renewing: false once the stages returned (the final write is
    /// under way or done, so a renewal finding the job gone is expected, not a loss).
    public var wantsLeaseRenewal: Bool { state != .finished }

    /// What a lease renewal found. A renewal that finds the job gone after the stages returned is the
    /// heartbeat racing the job's own final write: `.none`, and the worker logs nothing.
    public mutating func renewal(_ result: LeaseRenewal) -> Action {
        switch result {
        case .lost: return leaseLost()
        case .renewed(let cancel): return cancel ? cancelRequested() : .none
        }
    }

    /// The heartbeat saw the job running for `elapsed` seconds.
    public mutating func elapsed(_ elapsed: Double, timeout: Double) -> Action {
        elapsed > timeout ? timeoutReached(seconds: timeout) : .none
    }

    private mutating func requestStop(_ reason: StopReason) -> Action {
        switch state {
        case .running:
            state = .stopping(reason)
            return .interrupt(reason)
        case .stopping(let current):
            // A lost lease overrides everything (we may no longer write); a cancel overrides a shutdown
            // or timeout (the user asked for it explicitly). Otherwise the first reason stands.
            if reason == .leaseLost && current != .leaseLost || reason == .cancelled && current != .leaseLost && current != .cancelled {
                state = .stopping(reason)
                return .interrupt(reason)
            }
            return .none
        case .finished:
            return .none
        }
    }

    /// The stages returned; `unit` is a random sample in [0, 1) for the retry jitter; `stoppedWhile` is what
    /// a stopped stage was doing (it ends a timed-out job's message).
    public mutating func executionFinished(_ result: ExecutionResult, unit: Double = 0, stoppedWhile: String? = nil) -> Action {
        let reason = stopReason
        switch state {
        case .finished:
            preconditionFailure("executionFinished called twice")
        case .running, .stopping:
            state = .finished
        }
        if reason == .leaseLost { return .abandon }
        switch result {
        case .succeeded:
            return .markSucceeded
        case .permanentFailure(let message):
            if reason == .cancelled { return .markCancelled }
            return .markFailed(message)
        case .transientFailure(let message):
            switch reason {
            case .cancelled?: return .markCancelled
            case .shutdown?: return .release
            case .timedOut(let s)?: return .markFailed(Self.timeoutMessage(s), kind: .timedOut)
            case .leaseLost?, nil: break
            }
            if attemptsUsed >= maxAttempts {
                return .markFailed("gave up after \(attemptsUsed) attempt\(attemptsUsed == 1 ? "" : "s"): \(message)")
            }
            return .scheduleRetry(delay: retry.delay(failures: attemptsUsed, unit: unit), error: message)
        case .stopped:
            switch reason {
            case .cancelled?: return .markCancelled
            case .shutdown?: return .release
            case .timedOut(let s)?: return .markFailed(Self.timeoutMessage(s, while: stoppedWhile), kind: .timedOut)
            case .leaseLost?: return .abandon
            case nil: preconditionFailure("a stage stopped although no stop was requested")
            }
        }
    }

    public static func timeoutMessage(_ seconds: Double, while activity: String? = nil) -> String {
        "timed out after \(formatSeconds(seconds)) (the job's timeout)" + (activity.map { " while \($0)" } ?? "")
    }
}

/// "90 s", "2.5 s", "1 h 30 min": short human durations for messages.
public func formatSeconds(_ s: Double) -> String {
    if s < 120 {
        return s == s.rounded() ? "\(Int(s)) s" : "\((s * 10).rounded() / 10) s"
    }
    let total = Int(s.rounded())
    let h = total / 3600, m = (total % 3600) / 60, sec = total % 60
    if h > 0 { return m > 0 ? "\(h) h \(m) min" : "\(h) h" }
    return sec > 0 ? "\(m) min \(sec) s" : "\(m) min"
}
