import Foundation
import Logging
import Queue

/// A kind of work any worker can do for a running job, whoever owns it: a gradient unit of prompt tuning
/// (TuningUnitsWork.swift), a shard of the encode or label stage (ShardWork.swift). The main loop's help
/// step asks each kind in turn (in the order given to the worker) for one
/// unit (`claim`), runs it on its own thread (`HelpUnit.run`), and gives it back unfinished (`release`)
/// when it stops early (the service's side: Sources/Daemon/WorkerHelp.swift). A job's owner runs its own
/// units through the same code.
public protocol HelpWork: Sendable {
    /// For logs ("encode shards").
    var name: String { get }
    /// Claims one unit (under a lease, `FOR UPDATE SKIP LOCKED`) of a running job this worker can serve,
    /// skipping `skipJobs` (jobs this worker gave up helping); nil when there is none.
    func claim(_ c: PostgresConnection, worker: String, settings: StageSettings, skipJobs: [Int64]) throws -> (any HelpUnit)?
}

/// One claimed unit of work.
public protocol HelpUnit: Sendable, CustomStringConvertible {
    var jobID: Int64 { get }
    /// What kind of unit it is, for metrics and nola.workers: "encode", "label" (shards), "tune".
    var kind: String { get }
    /// Units that take well under a second and come by the hundred (tuning units): their claimed / done
    /// lines are logged at debug level.
    var quiet: Bool { get }
    /// Does the work and writes its result, every write guarded by the unit's claim. Calls
    /// `context.keepAlive()` at every checkpoint (at least once per batch): it renews the lease and
    /// throws `HelpStop` once the unit must stop.
    func run(_ context: HelpContext) throws
    /// Renews the unit's lease; `.renewed(cancelRequested: true)` when its job no longer wants it
    /// (cancelled, no longer running, moved on), `.lost` when it is no longer ours.
    func renew(_ c: PostgresConnection, leaseSeconds: Double) throws -> LeaseRenewal
    /// Gives the unit back unfinished (guarded: nothing when it is no longer ours); `error` says why.
    func release(_ c: PostgresConnection, error: String?) throws
}

public extension HelpUnit {
    var quiet: Bool { false }
}

/// Why a unit stopped before its end.
public enum HelpStop: Error, Sendable, Equatable, CustomStringConvertible {
    /// The daemon is shutting down.
    case shutdown
    /// The job no longer wants the unit (cancelled, or it ended).
    case unwanted
    /// The lease is gone (another worker took the unit): write nothing more.
    case leaseLost
    /// This worker cannot do the job's units (say, its model folder holds other weights); the sentence says why.
    case cannotHelp(String)

    public var description: String {
        switch self {
        case .shutdown: return "the daemon is shutting down"
        case .unwanted: return "its job was cancelled or no longer needs it"
        case .leaseLost: return "its lease was lost to another worker"
        case .cannotHelp(let why): return why
        }
    }
}

/// What a unit gets: its own connection, the settings, a logger, the collection roots, the stop flag
/// and the lease keeper.
public final class HelpContext: @unchecked Sendable {
    public let settings: StageSettings
    public let logger: Logger
    /// The collection roots as configured (a unit resolves its job's collection under them).
    public let collectionRoots: [String]
    public let unit: any HelpUnit
    private let database: Database
    private let lock = NSLock()
    private var stop: HelpStop?
    private var lastRenewal = Date()

    public init(unit: any HelpUnit, settings: StageSettings, logger: Logger, collectionRoots: [String], database: Database) {
        self.unit = unit
        self.settings = settings
        self.logger = logger
        self.collectionRoots = collectionRoots
        self.database = database
    }

    /// Runs `body` on the unit's connection (reconnecting with backoff for up to 60 s: `body` must be idempotent).
    public func withDatabase<T>(_ body: (PostgresConnection) throws -> T) throws -> T {
        try database.run(retryFor: 60, body)
    }

    /// A guarded write: when `body` returns false the unit is no longer ours and stops.
    public func write(_ body: (PostgresConnection) throws -> Bool) throws {
        guard try withDatabase(body) else {
            requestStop(.leaseLost)
            throw HelpStop.leaseLost
        }
    }

    /// A checkpoint: throws when the unit must stop; renews the lease when a heartbeat interval passed.
    public func keepAlive() throws {
        if let stop = stopReason { throw stop }
        guard Date().timeIntervalSince(lock.withLock { lastRenewal }) >= settings.heartbeatSeconds else { return }
        switch try withDatabase({ try unit.renew($0, leaseSeconds: settings.leaseSeconds) }) {
        case .lost: requestStop(.leaseLost)
        case .renewed(let unwanted): if unwanted { requestStop(.unwanted) }
        }
        lock.withLock { lastRenewal = Date() }
        if let stop = stopReason { throw stop }
    }

    public var stopReason: HelpStop? { lock.withLock { stop } }

    public func requestStop(_ reason: HelpStop) {
        lock.withLock {
            // A lost lease overrides everything (nothing may be written any more).
            if stop == nil || reason == .leaseLost { stop = reason }
        }
    }
}

