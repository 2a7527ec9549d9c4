import Foundation
import Logging

/// A connection string plus one lazily opened connection that is reopened, with exponential backoff
/// and jitter, when the server goes away. Not thread-safe: each thread owns its own `Database`.
public final class Database {
    public let conninfo: String
    /// Bounds on every wait of the connection (nil: wait as long as libpq would).
    public let limits: ConnectionLimits?
    private var connection: PostgresConnection?
    private let logger: Logger
    /// Channels to LISTEN on again after every reconnect.
    public private(set) var channels: [String] = []
    /// Asked between reconnection attempts; returning true makes `run` give up at once.
    public var shouldStopRetrying: () -> Bool = { false }
    public var maxBackoff: Double = 2.0
    /// Set after each successful (re)connect; the owner may, e.g., re-check state it could have missed.
    public private(set) var connectCount = 0

    public init(conninfo: String, logger: Logger, limits: ConnectionLimits? = nil) {
        self.conninfo = conninfo
        self.logger = logger
        self.limits = limits
    }

    public var isConnected: Bool { connection?.isOpen ?? false }
    public var socket: Int32 { connection?.socket ?? -1 }

    public func close() {
        connection?.close()
        connection = nil
    }

    /// LISTENs now (if connected) and after every reconnect.
    public func listen(_ channel: String) throws {
        if !channels.contains(channel) { channels.append(channel) }
        if let c = connection, c.isOpen { try c.listen(channel) }
    }

    /// Pending notifications; throws `connectionLost` when the socket is dead.
    public func readNotifications() throws -> [PostgresNotification] {
        guard let c = connection else { throw DatabaseError(.connectionLost, "not connected") }
        do {
            return try c.readNotifications()
        } catch {
            close()
            throw error
        }
    }

    /// Runs `body` on a live connection. When the connection fails (before or during `body`), it is
    /// reopened with backoff and `body` runs again, for up to `retryFor` seconds — so `body` must be
    /// idempotent (guarded updates, upserts, or one transaction). A statement cancelled by lock_timeout
    /// or statement_timeout is run again the same way, on the same connection. Other errors are thrown at once.
    @discardableResult
    public func run<T>(retryFor: Double = 0, _ body: (PostgresConnection) throws -> T) throws -> T {
        let start = Date()
        var failures = 0
        while true {
            do {
                let c = try open()
                return try body(c)
            } catch let error as DatabaseError where error.isConnectionProblem || error.isTimeout || !(connection?.isOpen ?? false) {
                let timedOut = error.isTimeout && (connection?.isOpen ?? false)
                if !timedOut { close() }
                failures += 1
                let elapsed = Date().timeIntervalSince(start)
                if elapsed >= retryFor || shouldStopRetrying() { throw error }
                let delay = min(maxBackoff, 0.05 * pow(2, Double(min(failures, 16)))) * Double.random(in: 0.5...1)
                if failures == 1 || failures % 10 == 0 {
                    logger.warning(timedOut ? "database statement timed out, retrying" : "database unavailable, retrying",
                                   metadata: ["error": "\(error)", "retry_in_s": "\(delay)"])
                }
                Thread.sleep(forTimeInterval: min(delay, max(0.01, retryFor - elapsed)))
            }
        }
    }

    private func open() throws -> PostgresConnection {
        if let c = connection, c.isOpen { return c }
        close()
        let c = try PostgresConnection(conninfo: conninfo, limits: limits)
        for channel in channels { try c.listen(channel) }
        connection = c
        connectCount += 1
        if connectCount > 1 { logger.info("reconnected to the database") }
        return c
    }
}

extension DatabaseError {
    /// The connection itself failed (as opposed to a statement being rejected).
    var isConnectionProblem: Bool {
        if code == .connectionFailed || code == .connectionLost { return true }
        guard let s = sqlState else { return false }
        return s.hasPrefix("08") || s == "57P01" || s == "57P02" || s == "57P03"
    }
}
