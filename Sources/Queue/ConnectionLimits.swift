import Foundation

/// How long one connection may wait on the network and on the server before it is given up, so that a
/// silent partition (packets dropped, no RST) cannot block its thread for ever. All of nolad's values are
/// derived from one setting, `database_timeout` (T): see `control(timeout:)`, `job(timeout:)` and
/// docs/operations.md, "Network partitions".
public struct ConnectionLimits: Sendable, Equatable {
    /// Connecting (TCP, TLS, authentication, the startup packet and the session settings below) must
    /// finish within this many seconds, across every host of the connection string.
    public var connectSeconds: Double
    /// Waiting for the server, a reply is given up (and the connection closed) once no byte has arrived
    /// or left for this many seconds.
    public var silenceSeconds: Double
    /// The session's statement_timeout, lock_timeout and idle_in_transaction_session_timeout (server side),
    /// in seconds; nil leaves the server's setting.
    public var statementSeconds: Double?
    public var lockSeconds: Double?
    public var idleInTransactionSeconds: Double?
    /// TCP keepalives (client and server side) and tcp_user_timeout (client side). Ignored on Unix sockets.
    public var keepalivesIdle: Int
    public var keepalivesInterval: Int
    public var keepalivesCount: Int
    public var tcpUserTimeoutMilliseconds: Int

    public init(connectSeconds: Double, silenceSeconds: Double, statementSeconds: Double?, lockSeconds: Double?,
                idleInTransactionSeconds: Double?, keepalivesIdle: Int, keepalivesInterval: Int, keepalivesCount: Int,
                tcpUserTimeoutMilliseconds: Int) {
        self.connectSeconds = connectSeconds
        self.silenceSeconds = silenceSeconds
        self.statementSeconds = statementSeconds
        self.lockSeconds = lockSeconds
        self.idleInTransactionSeconds = idleInTransactionSeconds
        self.keepalivesIdle = keepalivesIdle
        self.keepalivesInterval = keepalivesInterval
        self.keepalivesCount = keepalivesCount
        self.tcpUserTimeoutMilliseconds = tcpUserTimeoutMilliseconds
    }

    /// Job connections may run statements this many times longer than the main loop's (bulk writes of
    /// images, labels, features and checkpoints).
    public static let jobStatementFactor = 12.0

    /// The main loop's connection: every statement is short (lease renewal, rescue, claim, worker row),
    /// so the server cancels one after T and nolad gives the connection up after 2T without a byte:
    /// no statement blocks the main loop for more than 2T, no connection attempt for more than T.
    public static func control(timeout t: Double) -> ConnectionLimits {
        ConnectionLimits(connectSeconds: t, silenceSeconds: 2 * t, statementSeconds: t, lockSeconds: t,
                         idleInTransactionSeconds: 2 * t, keepalivesIdle: Self.seconds(t),
                         keepalivesInterval: Self.seconds(t / 3), keepalivesCount: 3,
                         tcpUserTimeoutMilliseconds: Int((2 * t * 1000).rounded(.up)))
    }

    /// A job's connection: locks are still short (T), statements may take 12T (bulk writes), and the
    /// connection is given up after 13T without a byte (on TCP, tcp_user_timeout and keepalives notice
    /// a dead peer after about 2T already).
    public static func job(timeout t: Double) -> ConnectionLimits {
        var limits = control(timeout: t)
        limits.statementSeconds = jobStatementFactor * t
        limits.idleInTransactionSeconds = (jobStatementFactor + 1) * t
        limits.silenceSeconds = (jobStatementFactor + 1) * t
        return limits
    }

    /// Whole seconds, at least 1 (libpq's and the server's keepalive settings are integers).
    static func seconds(_ s: Double) -> Int { max(1, Int(s.rounded(.up))) }

    /// The libpq connection parameters these limits add to a connection string, in order. Each is added
    /// only where the user's string does not set it. connect_timeout is given for completeness (libpq
    /// ignores it in the non-blocking connect nolad uses, which enforces `connectSeconds` itself).
    public var connectionParameters: [(String, String)] {
        [("connect_timeout", String(Self.seconds(connectSeconds))),
         ("keepalives", "1"),
         ("keepalives_idle", String(keepalivesIdle)),
         ("keepalives_interval", String(keepalivesInterval)),
         ("keepalives_count", String(keepalivesCount)),
         ("tcp_user_timeout", String(tcpUserTimeoutMilliseconds))]
    }

    /// The session settings (name, value) nolad SETs after connecting, skipping any named in the
    /// connection's `options` (`-c statement_timeout=...`), which then win.
    public func sessionSettings(options: String?) -> [(String, String)] {
        func ms(_ s: Double) -> String { String(max(1, Int((s * 1000).rounded()))) }
        var all: [(String, String)] = []
        if let statementSeconds { all.append(("statement_timeout", ms(statementSeconds))) }
        if let lockSeconds { all.append(("lock_timeout", ms(lockSeconds))) }
        if let idleInTransactionSeconds { all.append(("idle_in_transaction_session_timeout", ms(idleInTransactionSeconds))) }
        // The server probes a silent client too, so a partitioned daemon's sessions end and free their locks.
        all.append(("tcp_keepalives_idle", String(keepalivesIdle)))
        all.append(("tcp_keepalives_interval", String(keepalivesInterval)))
        all.append(("tcp_keepalives_count", String(keepalivesCount)))
        let given = options ?? ""
        return all.filter { !given.contains($0.0) }
    }
}
