/// The one error type of the database domain. `description` never contains the connection string.
public struct DatabaseError: Error, CustomStringConvertible, Sendable {
    public enum Code: Sendable, Equatable {
        /// Could not open a connection (server down, bad host, authentication).
        case connectionFailed
        /// The connection broke during or between statements.
        case connectionLost
        /// The server rejected a statement; `sqlState` says why.
        case statementFailed
        /// A result did not have the shape the code asked for (missing column, bad number).
        case unexpectedResult
        /// The schema is not the version this build knows.
        case schemaMismatch
        /// A migration file is missing, malformed or out of order.
        case badMigration
    }

    public let code: Code
    /// Five-character SQLSTATE from the server (`23514` check violation, `57P01` admin shutdown, ...).
    public let sqlState: String?
    public let message: String
    /// The constraint named by the server, if any.
    public let constraint: String?

    public init(_ code: Code, _ message: String, sqlState: String? = nil, constraint: String? = nil) {
        self.code = code
        self.message = message
        self.sqlState = sqlState
        self.constraint = constraint
    }

    /// The statement was cancelled by `lock_timeout` (55P03) or `statement_timeout` (57014, also a
    /// cancel request): worth running again, on the same connection.
    public var isTimeout: Bool {
        code == .statementFailed && (sqlState == "55P03" || sqlState == "57014")
    }

    /// Errors worth retrying on a fresh connection: lost connections, server shutdown and restarts,
    /// serialisation failures, deadlocks, lack of resources, lock and statement timeouts.
    public var isTransient: Bool {
        if isTimeout { return true }
        switch code {
        case .connectionFailed, .connectionLost:
            return true
        case .statementFailed:
            guard let state = sqlState else { return false }
            return state.hasPrefix("08") || state.hasPrefix("53") || state.hasPrefix("57P")
                || state == "40001" || state == "40P01"
        case .unexpectedResult, .schemaMismatch, .badMigration:
            return false
        }
    }

    public var description: String {
        if let sqlState { return "database error \(sqlState): \(message)" }
        return "database error (\(code)): \(message)"
    }
}
