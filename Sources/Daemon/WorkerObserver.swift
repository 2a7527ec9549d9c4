import Foundation
import Queue

/// Hooks the worker calls at the points metrics need (jobs running, stage and progress, attempts by
/// outcome, readiness, database outages and reconnects, failed lease renewals, main-loop turns). Every method has
/// a no-op default; calls come from the main loop and from job threads, so implementations must be
/// thread-safe and quick (no I/O).
public protocol WorkerObserver: AnyObject, Sendable {
    /// A job was claimed and its thread is starting.
    func jobStarted(_ job: JobRef)
    /// A job's stage or its counters changed.
    func jobProgress(_ job: JobRef, stage: String, done: Int, total: Int)
    /// A job's thread ended; `outcome` is what was written (nil: nothing, the job was no longer ours).
    func jobEnded(_ job: JobRef, outcome: AttemptOutcome?)
    /// The main loop connected, checked the schema and registered the worker: it is ready to claim.
    func databaseReady()
    /// The main loop lost the database (once per outage).
    func databaseUnavailable()
    /// The main loop is connected again after an outage of `seconds` and `tries` failed tries.
    func databaseReconnected(tries: Int, seconds: Double)
    /// A lease renewal found the job no longer ours while it was still running.
    func leaseRenewalFailed(_ job: JobRef)
    /// The main loop turned (for a liveness check).
    func loopTurned()
    /// A help unit (a shard or tuning unit of another worker's job) was claimed; `kind`: encode, label, tune.
    func helpUnitStarted(kind: String)
    /// A help unit's thread ended: `outcome` is done, given_back (shutdown, cancel, the owner moved on),
    /// lease_lost or failed (an error, or this worker cannot serve the job).
    func helpUnitEnded(kind: String, outcome: String)
}

public extension WorkerObserver {
    func jobStarted(_ job: JobRef) {}
    func jobProgress(_ job: JobRef, stage: String, done: Int, total: Int) {}
    func jobEnded(_ job: JobRef, outcome: AttemptOutcome?) {}
    func databaseReady() {}
    func databaseUnavailable() {}
    func databaseReconnected(tries: Int, seconds: Double) {}
    func leaseRenewalFailed(_ job: JobRef) {}
    func loopTurned() {}
    func helpUnitStarted(kind: String) {}
    func helpUnitEnded(kind: String, outcome: String) {}
}

/// The default observer: does nothing.
public final class NoWorkerObserver: WorkerObserver {
    public init() {}
}
