import Foundation
import Logging
import Pipeline
import Queue

/// The service's side of helping (HelpWork in Sources/Pipeline): the help step and the units' threads.
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
            guard let unit = try control.run({ try kind.claim($0, worker: id, settings: config.stageSettings, skipJobs: skip) }) else { continue }
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

    /// The jobs helped since the last call (the heartbeat's), with those still helped now.
    func helpedSinceHeartbeat() -> [Int64] {
        lock.withLock {
            let jobs = helped.union(helping.values.filter { !$0.ended }.map(\.unit.jobID))
            helped = []
            return Array(jobs)
        }
    }

    private func startHelp(_ unit: any HelpUnit, roots: [String]) {
        let help = RunningHelp(unit)
        let key = ObjectIdentifier(help)
        lock.withLock {
            helping[key] = help
            helped.insert(unit.jobID)
        }
        observer.helpUnitStarted(kind: unit.kind)
        var unitLogger = logger
        unitLogger[metadataKey: "job"] = "\(unit.jobID)"
        unitLogger[metadataKey: "unit"] = "\(unit)"
        unitLogger.log(level: unit.quiet ? .debug : .info, "helping: claimed a unit of another worker's job")
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

    /// A connection for a help unit: one an earlier unit gave back, or a new one. Tuning units come by the
    /// hundred and take a fraction of a second each, so connecting for each would cost a good part of it.
    private func takeHelpConnection() -> Database {
        lock.withLock { idleHelpConnections.popLast() }
            ?? Database(conninfo: config.conninfo, logger: logger, limits: config.jobConnectionLimits)
    }

    private func giveBackHelpConnection(_ database: Database) {
        let keep = lock.withLock { () -> Bool in
            guard !isShuttingDownLocked, idleHelpConnections.count < max(1, config.concurrency) else { return false }
            idleHelpConnections.append(database)
            return true
        }
        if !keep { database.close() }
    }

    /// Closes the connections kept for help units (the service is stopping).
    func closeHelpConnections() {
        for database in lock.withLock({ () -> [Database] in defer { idleHelpConnections = [] }; return idleHelpConnections }) {
            database.close()
        }
    }

    private func runHelp(_ help: RunningHelp, roots: [String], logger: Logger) {
        let database = takeHelpConnection()
        defer { giveBackHelpConnection(database) }
        let context = HelpContext(unit: help.unit, settings: config.stageSettings, logger: logger, collectionRoots: config.collectionRoots, database: database)
        lock.withLock { help.context = context }
        // After the context is visible: a shutdown from now on reaches it through stopHelping().
        if isShuttingDown { context.requestStop(.shutdown) }
        let start = Date()
        var outcome = "failed"
        defer { observer.helpUnitEnded(kind: help.unit.kind, outcome: outcome) }
        do {
            try help.unit.run(context)
            outcome = "done"
            logger.log(level: help.unit.quiet ? .debug : .info, "helping: unit done",
                       metadata: ["seconds": "\(formatSeconds(Date().timeIntervalSince(start)))"])
            return
        } catch let stop as HelpStop {
            if case .cannotHelp = stop { lock.withLock { cannotHelp[help.unit.jobID] = Date() } }
            if stop == .leaseLost {
                outcome = "lease_lost"
                logger.warning("helping: lease lost; the unit is another worker's now, nothing more is written")
                return
            }
            if case .cannotHelp(let why) = stop {
                logger.warning("helping: unit given back; this worker cannot help with the job and leaves it to others for ten minutes",
                               metadata: ["reason": "\(why)"])
            } else {
                outcome = "given_back"
                logger.log(level: help.unit.quiet && stop == .unwanted ? .debug : .info, "helping: unit given back", metadata: ["reason": "\(stop)"])
            }
            // A reason only where this worker could not do the unit: shutting down or an unwanted unit is none.
            release(help.unit, database: database, error: stop == .shutdown || stop == .unwanted ? nil : "worker \(id): \(stop)", logger: logger)
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
