import Foundation
import Logging
import Queue

/// A kind of work any worker can do for a running job, whoever owns it: a shard of the encode or label
/// stage, a gradient unit of prompt tuning, ... The main loop's help step asks each kind in turn for one
/// unit (`claim`), runs it on its own thread (`HelpUnit.run`), and gives it back unfinished (`release`)
/// when it stops early. A job's owner runs its own units through the same code.
public protocol HelpWork: Sendable {
    /// For logs ("encode shards").
    var name: String { get }
    /// Claims one unit (under a lease, `FOR UPDATE SKIP LOCKED`) of a running job this worker can serve,
    /// skipping `skipJobs` (jobs this worker gave up helping); nil when there is none.
    func claim(_ c: PostgresConnection, worker: String, config: NoladConfig, skipJobs: [Int64]) throws -> (any HelpUnit)?
}

/// One claimed unit of work.
public protocol HelpUnit: Sendable, CustomStringConvertible {
    var jobID: Int64 { get }
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

/// What a unit gets: its own connection, the configuration, a logger, the collection roots, the stop flag
/// and the lease keeper.
public final class HelpContext: @unchecked Sendable {
    public let config: NoladConfig
    public let logger: Logger
    /// The collection roots, resolved.
    public let roots: [String]
    public let unit: any HelpUnit
    private let database: Database
    private let lock = NSLock()
    private var stop: HelpStop?
    private var lastRenewal = Date()

    init(unit: any HelpUnit, config: NoladConfig, logger: Logger, roots: [String], database: Database) {
        self.unit = unit
        self.config = config
        self.logger = logger
        self.roots = roots
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
        guard Date().timeIntervalSince(lock.withLock { lastRenewal }) >= config.heartbeatSeconds else { return }
        switch try withDatabase({ try unit.renew($0, leaseSeconds: config.leaseSeconds) }) {
        case .lost: requestStop(.leaseLost)
        case .renewed(let unwanted): if unwanted { requestStop(.unwanted) }
        }
        lock.withLock { lastRenewal = Date() }
        if let stop = stopReason { throw stop }
    }

    public var stopReason: HelpStop? { lock.withLock { stop } }

    func requestStop(_ reason: HelpStop) {
        lock.withLock {
            // A lost lease overrides everything (nothing may be written any more).
            if stop == nil || reason == .leaseLost { stop = reason }
        }
    }
}

extension Worker {
    /// A help unit running on its own thread.
    final class RunningHelp: @unchecked Sendable {
        let unit: any HelpUnit
        var context: HelpContext?
        var ended = false
        init(_ unit: any HelpUnit) { self.unit = unit }
    }

    /// The help step: one unit of the first kind that has one, started on its own thread; false when none.
    func help(_ control: Database, roots: [String]) throws -> Bool {
        let skip = skippedJobs()
        for kind in helpWork {
            guard let unit = try control.run({ try kind.claim($0, worker: id, config: config, skipJobs: skip) }) else { continue }
            startHelp(unit, roots: roots)
            return true
        }
        return false
    }

    /// Jobs this worker gave up helping within the last ten minutes (it cannot serve them).
    func skippedJobs() -> [Int64] {
        lock.withLock {
            let now = Date()
            cannotHelp = cannotHelp.filter { now.timeIntervalSince($0.value) < 600 }
            return Array(cannotHelp.keys)
        }
    }

    private func startHelp(_ unit: any HelpUnit, roots: [String]) {
        let help = RunningHelp(unit)
        let key = ObjectIdentifier(help)
        lock.withLock { helping[key] = help }
        var unitLogger = logger
        unitLogger[metadataKey: "job"] = "\(unit.jobID)"
        unitLogger[metadataKey: "unit"] = "\(unit)"
        unitLogger.info("helping: claimed a unit of another worker's job")
        let threadLogger = unitLogger
        let thread = Thread { [self] in
            runHelp(help, roots: roots, logger: threadLogger)
            lock.withLock { help.ended = true }
            wake.wake()
        }
        thread.name = "help-\(unit.jobID)"
        thread.stackSize = 8 << 20
        thread.start()
    }

    private func runHelp(_ help: RunningHelp, roots: [String], logger: Logger) {
        let database = Database(conninfo: config.conninfo, logger: logger, limits: config.jobConnectionLimits)
        defer { database.close() }
        let context = HelpContext(unit: help.unit, config: config, logger: logger, roots: roots, database: database)
        lock.withLock { help.context = context }
        // After the context is visible: a shutdown from now on reaches it through stopHelping().
        if isShuttingDown { context.requestStop(.shutdown) }
        let start = Date()
        do {
            try help.unit.run(context)
            logger.info("helping: unit done", metadata: ["seconds": "\(formatSeconds(Date().timeIntervalSince(start)))"])
            return
        } catch let stop as HelpStop {
            if case .cannotHelp = stop { lock.withLock { cannotHelp[help.unit.jobID] = Date() } }
            if stop == .leaseLost {
                logger.warning("helping: lease lost; the unit is another worker's now, nothing more is written")
                return
            }
            logger.info("helping: unit given back", metadata: ["reason": "\(stop)"])
            release(help.unit, database: database, error: stop == .shutdown ? nil : "\(stop)", logger: logger)
        } catch {
            // Anything else (an unreadable image, a database error): give the unit back with the reason, and
            // leave the job alone for a while; its owner meets the same error on the same unit and reports it
            // in the job's row.
            lock.withLock { cannotHelp[help.unit.jobID] = Date() }
            logger.warning("helping: unit failed; given back to its job", metadata: ["error": "\(error)"])
            release(help.unit, database: database, error: "worker \(id): \(error)", logger: logger)
        }
    }

    private func release(_ unit: any HelpUnit, database: Database, error: String?, logger: Logger) {
        do {
            try database.run(retryFor: 5) { try unit.release($0, error: error) }
        } catch {
            logger.warning("helping: could not give the unit back; its lease will expire and another worker takes it",
                           metadata: ["error": "\(error)"])
        }
    }

    /// Stops every help unit (SIGTERM).
    func stopHelping() {
        for help in lock.withLock({ Array(helping.values) }) { help.context?.requestStop(.shutdown) }
    }

    /// Forgets help units whose threads ended; true when any did.
    func reapEndedHelp() -> Bool {
        lock.withLock {
            let ended = helping.filter { $0.value.ended }.map(\.key)
            for key in ended { helping[key] = nil }
            return !ended.isEmpty
        }
    }

    var helpingCount: Int { lock.withLock { helping.count } }
}
