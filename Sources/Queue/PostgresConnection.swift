import CPostgres
#if canImport(Glibc)
import Glibc
#endif

/// A bound parameter: text (the server infers the type from the statement) or binary bytes (bytea).
public enum PostgresValue: Sendable, Equatable {
    case text(String)
    case bytes([UInt8])
}

/// Values that can be bound as statement parameters. SQL text is never built from them.
public protocol PostgresBindable {
    var postgresValue: PostgresValue { get }
}

extension String: PostgresBindable { public var postgresValue: PostgresValue { .text(self) } }
extension Int: PostgresBindable { public var postgresValue: PostgresValue { .text(String(self)) } }
extension Int64: PostgresBindable { public var postgresValue: PostgresValue { .text(String(self)) } }
extension Int32: PostgresBindable { public var postgresValue: PostgresValue { .text(String(self)) } }
extension Double: PostgresBindable { public var postgresValue: PostgresValue { .text(String(self)) } }
extension Bool: PostgresBindable { public var postgresValue: PostgresValue { .text(self ? "true" : "false") } }
extension Array: PostgresBindable where Element == String {
    /// A text[] literal: every element double-quoted, backslash and quote escaped.
    public var postgresValue: PostgresValue {
        let items = map { "\"" + $0.replacingAll("\\", with: "\\\\").replacingAll("\"", with: "\\\"") + "\"" }
        return .text("{" + items.joined(separator: ",") + "}")
    }
}
extension PostgresValue: PostgresBindable { public var postgresValue: PostgresValue { self } }

extension String {
    func replacingAll(_ target: Character, with replacement: String) -> String {
        var out = ""
        out.reserveCapacity(count)
        for c in self { if c == target { out += replacement } else { out.append(c) } }
        return out
    }
}

/// The rows of a result, copied out of libpq (text format).
public struct PostgresRows: Sendable {
    public let columns: [String]
    public let values: [[String?]]
    /// Rows changed by INSERT/UPDATE/DELETE (0 for other statements).
    public let affected: Int

    public var count: Int { values.count }
    public var isEmpty: Bool { values.isEmpty }
    public subscript(row: Int) -> PostgresRow { PostgresRow(columns: columns, values: values[row]) }
    public var rows: [PostgresRow] { values.map { PostgresRow(columns: columns, values: $0) } }
}

/// One row; typed getters throw `unexpectedResult` naming the column when a value does not fit.
public struct PostgresRow: Sendable {
    public let columns: [String]
    public let values: [String?]

    public func optionalString(_ column: String) throws -> String? {
        guard let i = columns.firstIndex(of: column) else {
            throw DatabaseError(.unexpectedResult, "result has no column \"\(column)\"")
        }
        return values[i]
    }
    public func string(_ column: String) throws -> String {
        guard let v = try optionalString(column) else {
            throw DatabaseError(.unexpectedResult, "column \"\(column)\" is NULL")
        }
        return v
    }
    public func optionalInt(_ column: String) throws -> Int? {
        guard let v = try optionalString(column) else { return nil }
        guard let i = Int(v) else { throw DatabaseError(.unexpectedResult, "column \"\(column)\" is not an integer: \(v)") }
        return i
    }
    public func int(_ column: String) throws -> Int {
        guard let v = try optionalInt(column) else { throw DatabaseError(.unexpectedResult, "column \"\(column)\" is NULL") }
        return v
    }
    public func optionalDouble(_ column: String) throws -> Double? {
        guard let v = try optionalString(column) else { return nil }
        guard let d = Double(v) else { throw DatabaseError(.unexpectedResult, "column \"\(column)\" is not a number: \(v)") }
        return d
    }
    public func double(_ column: String) throws -> Double {
        guard let v = try optionalDouble(column) else { throw DatabaseError(.unexpectedResult, "column \"\(column)\" is NULL") }
        return v
    }
    public func bool(_ column: String) throws -> Bool {
        let v = try string(column)
        return v == "t" || v == "true"
    }
    /// A bytea column (text format: `\x` followed by hex digits).
    public func bytes(_ column: String) throws -> [UInt8] {
        let v = try string(column)
        guard v.hasPrefix("\\x"), let bytes = decodeHex(v.dropFirst(2)) else {
            throw DatabaseError(.unexpectedResult, "column \"\(column)\" is not bytea in hex format")
        }
        return bytes
    }
    /// A one-dimensional text[] column.
    public func stringArray(_ column: String) throws -> [String] {
        let v = try string(column)
        guard let items = parseTextArray(v) else {
            throw DatabaseError(.unexpectedResult, "column \"\(column)\" is not a text array: \(v)")
        }
        return items
    }
}

func decodeHex<S: StringProtocol>(_ hex: S) -> [UInt8]? {
    var out: [UInt8] = []
    out.reserveCapacity(hex.utf8.count / 2)
    var high: UInt8? = nil
    for c in hex.utf8 {
        let v: UInt8
        switch c {
        case 48...57: v = c - 48
        case 97...102: v = c - 87
        case 65...70: v = c - 55
        default: return nil
        }
        if let h = high { out.append(h << 4 | v); high = nil } else { high = v }
    }
    return high == nil ? out : nil
}

/// Parses PostgreSQL's text form of a one-dimensional text[] (`{a,"b c","d\"e"}`).
func parseTextArray(_ text: String) -> [String]? {
    let chars = Array(text)
    guard chars.first == "{", chars.last == "}" else { return nil }
    var items: [String] = []
    var i = 1
    if chars.count == 2 { return [] }
    while i < chars.count - 1 {
        var item = ""
        if chars[i] == "\"" {
            i += 1
            while i < chars.count - 1, chars[i] != "\"" {
                if chars[i] == "\\" { i += 1 }
                item.append(chars[i])
                i += 1
            }
            i += 1 // closing quote
        } else {
            while i < chars.count - 1, chars[i] != "," { item.append(chars[i]); i += 1 }
        }
        items.append(item)
        if i < chars.count - 1 {
            guard chars[i] == "," else { return nil }
            i += 1
        }
    }
    return items
}

/// A NOTIFY received on a LISTENed channel.
public struct PostgresNotification: Sendable, Equatable {
    public let channel: String
    public let payload: String
}

/// One libpq connection. Not thread-safe: use it from one thread at a time.
///
/// Every wait on the network goes through poll(2) with a deadline: with `limits`, connecting gives up
/// after `connectSeconds` and a statement after `silenceSeconds` without a byte moving (the connection is
/// then closed and `connectionLost` thrown), so a silent partition cannot block the caller for ever.
/// Without `limits` it connects with libpq's blocking PQconnectdb (honouring a connect_timeout in
/// `conninfo`) and waits for replies as long as it takes.
public final class PostgresConnection {
    private var conn: OpaquePointer?
    public let limits: ConnectionLimits?

    /// Opens a connection; `conninfo` is a libpq connection string or URI.
    public init(conninfo: String, limits: ConnectionLimits? = nil) throws {
        self.limits = limits
        guard let limits else {
            guard let c = PQconnectdb(conninfo) else {
                throw DatabaseError(.connectionFailed, "libpq could not allocate a connection")
            }
            guard PQstatus(c) == CONNECTION_OK else {
                let message = String(cString: PQerrorMessage(c)).trimmingNewlines()
                PQfinish(c)
                throw DatabaseError(.connectionFailed, message)
            }
            conn = c
            configure(c)
            return
        }
        let given = try Self.parse(conninfo)
        let parameters = Self.adding(limits, to: given)
        // A connect_timeout of the user's own wins over database_timeout (libpq's minimum of 2 s applies).
        var seconds = limits.connectSeconds
        if let text = given.first(where: { $0.0 == "connect_timeout" })?.1, let value = Double(text), value > 0 {
            seconds = max(2, value)
        }
        let c = try Self.start(parameters)
        let deadline = monotonicNow() + seconds
        do {
            try Self.finishConnecting(c, deadline: deadline, seconds: seconds)
        } catch {
            PQfinish(c)
            throw error
        }
        conn = c
        configure(c)
        // The session settings are part of connecting: their reply is awaited for what is left of the bound.
        let settings = limits.sessionSettings(options: parameters.first { $0.0 == "options" }?.1)
        if !settings.isEmpty {
            let sql = settings.map { "SET \($0.0) = \($0.1)" }.joined(separator: "; ")
            do {
                _ = try roundTrip(silence: max(0.001, deadline - monotonicNow())) { PQsendQuery($0, sql) }
            } catch let error as DatabaseError where error.code == .connectionLost {
                let silent = error.message.hasPrefix("no reply")
                throw DatabaseError(.connectionFailed, silent ? "no connection within \(formatLimit(seconds)) (database_timeout)" : error.message)
            }
        }
    }

    private func configure(_ c: OpaquePointer) {
        // Notices (e.g. "relation already exists, skipping") go nowhere instead of stderr.
        PQsetNoticeProcessor(c, { _, _ in }, nil)
        // Sending never blocks either: a full socket buffer is waited out with poll, under the deadline.
        _ = PQsetnonblocking(c, 1)
    }

    /// The user's connection string parsed by libpq (URI or key=value), plus the parameters of `limits`
    /// it does not set itself.
    public static func parameters(conninfo: String, adding limits: ConnectionLimits) throws -> [(String, String)] {
        adding(limits, to: try parse(conninfo))
    }

    /// The parameters a connection string sets, in libpq's order.
    static func parse(_ conninfo: String) throws -> [(String, String)] {
        var error: UnsafeMutablePointer<CChar>? = nil
        guard let parsed = PQconninfoParse(conninfo, &error) else {
            let message = error.map { String(cString: $0).trimmingNewlines() } ?? "libpq could not parse the connection string"
            if let error { PQfreemem(error) }
            throw DatabaseError(.connectionFailed, "invalid connection string: \(message)")
        }
        defer { PQconninfoFree(parsed) }
        var out: [(String, String)] = []
        var i = 0
        while let keyword = parsed[i].keyword {
            if let value = parsed[i].val { out.append((String(cString: keyword), String(cString: value))) }
            i += 1
        }
        return out
    }

    static func adding(_ limits: ConnectionLimits, to given: [(String, String)]) -> [(String, String)] {
        var out = given
        for (key, value) in limits.connectionParameters where !given.contains(where: { $0.0 == key }) {
            out.append((key, value))
        }
        return out
    }

    private static func start(_ parameters: [(String, String)]) throws -> OpaquePointer {
        let keys = parameters.map { strdup($0.0) } + [nil]
        let values = parameters.map { strdup($0.1) } + [nil]
        defer { for p in keys + values { free(p) } }
        let c: OpaquePointer? = keys.map { UnsafePointer($0) }.withUnsafeBufferPointer { k in
            values.map { UnsafePointer($0) }.withUnsafeBufferPointer { v in
                PQconnectStartParams(k.baseAddress, v.baseAddress, 0)
            }
        }
        guard let c else { throw DatabaseError(.connectionFailed, "libpq could not allocate a connection") }
        return c
    }

    /// Drives PQconnectPoll until the connection is made, fails, or the deadline passes.
    private static func finishConnecting(_ c: OpaquePointer, deadline: Double?, seconds: Double?) throws {
        func failure() -> DatabaseError {
            DatabaseError(.connectionFailed, String(cString: PQerrorMessage(c)).trimmingNewlines())
        }
        if PQstatus(c) == CONNECTION_BAD { throw failure() }
        var state = PGRES_POLLING_WRITING
        while true {
            switch state {
            case PGRES_POLLING_OK:
                return
            case PGRES_POLLING_FAILED:
                throw failure()
            default:
                let events = state == PGRES_POLLING_READING ? Int16(POLLIN) : Int16(POLLOUT)
                guard waitSocket(PQsocket(c), events: events, deadline: deadline) else {
                    throw DatabaseError(.connectionFailed, "no connection within \(formatLimit(seconds ?? 0)) (database_timeout)")
                }
            }
            state = PQconnectPoll(c)
        }
    }

    deinit { close() }

    public func close() {
        if let c = conn { PQfinish(c) }
        conn = nil
    }

    /// True while libpq considers the connection usable.
    public var isOpen: Bool {
        guard let c = conn else { return false }
        return PQstatus(c) == CONNECTION_OK
    }

    /// The socket to poll for notifications, or -1 when closed.
    public var socket: Int32 {
        guard let c = conn else { return -1 }
        return PQsocket(c)
    }

    /// Runs one statement with bound parameters (`$1`, `$2`, ...; nil binds NULL).
    @discardableResult
    public func query(_ sql: String, _ parameters: [PostgresBindable?] = []) throws -> PostgresRows {
        guard conn != nil else { throw DatabaseError(.connectionLost, "the connection is closed") }
        let values = parameters.map { $0?.postgresValue }
        let n = values.count
        var buffers: [UnsafeMutablePointer<CChar>?] = []
        var lengths: [Int32] = []
        var formats: [Int32] = []
        var types: [UInt32] = []
        buffers.reserveCapacity(n)
        for v in values {
            switch v {
            case nil:
                buffers.append(nil); lengths.append(0); formats.append(0); types.append(0)
            case .text(let s)?:
                buffers.append(strdup(s)); lengths.append(0); formats.append(0); types.append(0)
            case .bytes(let b)?:
                let p = UnsafeMutablePointer<CChar>.allocate(capacity: max(b.count, 1))
                b.withUnsafeBytes { raw in
                    if let base = raw.baseAddress { UnsafeMutableRawPointer(p).copyMemory(from: base, byteCount: b.count) }
                }
                buffers.append(p); lengths.append(Int32(b.count)); formats.append(1); types.append(17) // bytea
            }
        }
        defer {
            for (i, p) in buffers.enumerated() {
                guard let p else { continue }
                if formats[i] == 1 { p.deallocate() } else { free(p) }
            }
        }
        return try roundTrip { c in
            buffers.withUnsafeBufferPointer { bufs in
                bufs.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: max(n, 1)) { ptrs in
                    PQsendQueryParams(c, sql, Int32(n), n == 0 ? nil : types, n == 0 ? nil : ptrs,
                                      n == 0 ? nil : lengths, n == 0 ? nil : formats, 0)
                }
            }
        }
    }

    /// Runs a script of several statements without parameters. Only for trusted text (migration files).
    public func executeScript(_ sql: String) throws {
        _ = try roundTrip { PQsendQuery($0, sql) }
    }

    /// Sends with `send`, flushes and collects the results, each wait under the silence deadline.
    /// Returns the last result, or the first error (the server stops a script at its first error).
    private func roundTrip(silence override: Double? = nil, _ send: (OpaquePointer) -> Int32) throws -> PostgresRows {
        guard let c = conn else { throw DatabaseError(.connectionLost, "the connection is closed") }
        guard send(c) == 1 else { return try consume(nil) }
        let silence = override ?? limits?.silenceSeconds
        var deadline = silence.map { monotonicNow() + $0 }
        func givenUp() -> DatabaseError {
            close()
            return DatabaseError(.connectionLost, "no reply from the server for \(formatLimit(silence ?? 0)); the connection is given up (database_timeout)")
        }
        func lost() -> DatabaseError {
            DatabaseError(.connectionLost, String(cString: PQerrorMessage(c)).trimmingNewlines())
        }
        while true {
            let flushed = PQflush(c)
            if flushed == 0 { break }
            if flushed < 0 { throw lost() }
            guard waitSocket(PQsocket(c), events: Int16(POLLIN) | Int16(POLLOUT), deadline: deadline) else { throw givenUp() }
            if PQconsumeInput(c) == 0 { throw lost() }
            deadline = silence.map { monotonicNow() + $0 }
        }
        var kept: OpaquePointer? = nil
        var keptIsError = false
        defer { if let kept { PQclear(kept) } }
        while true {
            while PQisBusy(c) != 0 {
                guard waitSocket(PQsocket(c), events: Int16(POLLIN), deadline: deadline) else { throw givenUp() }
                if PQconsumeInput(c) == 0 { throw lost() }
                deadline = silence.map { monotonicNow() + $0 }
            }
            guard let r = PQgetResult(c) else { break }
            let isError = PQresultStatus(r) == PGRES_FATAL_ERROR
            if keptIsError {
                PQclear(r)
            } else {
                if let k = kept { PQclear(k) }
                kept = r
                keptIsError = isError
            }
        }
        let result = kept
        kept = nil
        return try consume(result)
    }

    /// Runs `body` inside BEGIN/COMMIT; rolls back when it throws.
    public func transaction<T>(_ body: () throws -> T) throws -> T {
        try query("BEGIN")
        do {
            let value = try body()
            try query("COMMIT")
            return value
        } catch {
            if isOpen { _ = try? query("ROLLBACK") }
            throw error
        }
    }

    /// LISTEN on a channel; `channel` must be one of the code's own lowercase identifiers.
    public func listen(_ channel: String) throws {
        precondition(channel.allSatisfy { $0 == "_" || ($0.isLetter && $0.isLowercase) }, "bad channel name \(channel)")
        try query("LISTEN " + channel)
    }

    /// Reads what has arrived on the socket and returns the pending notifications (never blocks).
    public func readNotifications() throws -> [PostgresNotification] {
        guard let c = conn else { throw DatabaseError(.connectionLost, "the connection is closed") }
        if PQconsumeInput(c) == 0 {
            throw DatabaseError(.connectionLost, String(cString: PQerrorMessage(c)).trimmingNewlines())
        }
        var out: [PostgresNotification] = []
        while let n = PQnotifies(c) {
            out.append(PostgresNotification(channel: String(cString: n.pointee.relname),
                                            payload: String(cString: n.pointee.extra)))
            PQfreemem(n)
        }
        return out
    }

    private func consume(_ result: OpaquePointer?) throws -> PostgresRows {
        guard let c = conn else { throw DatabaseError(.connectionLost, "the connection is closed") }
        guard let r = result else {
            throw DatabaseError(PQstatus(c) == CONNECTION_OK ? .statementFailed : .connectionLost,
                                String(cString: PQerrorMessage(c)).trimmingNewlines())
        }
        defer { PQclear(r) }
        switch PQresultStatus(r) {
        case PGRES_COMMAND_OK, PGRES_TUPLES_OK, PGRES_EMPTY_QUERY:
            let nf = Int(PQnfields(r)), nt = Int(PQntuples(r))
            let columns = (0..<nf).map { String(cString: PQfname(r, Int32($0))) }
            var values: [[String?]] = []
            values.reserveCapacity(nt)
            for t in 0..<nt {
                values.append((0..<nf).map { f in
                    PQgetisnull(r, Int32(t), Int32(f)) != 0 ? nil : String(cString: PQgetvalue(r, Int32(t), Int32(f)))
                })
            }
            let affected = Int(String(cString: PQcmdTuples(r))) ?? 0
            return PostgresRows(columns: columns, values: values, affected: affected)
        default:
            func field(_ code: UInt8) -> String? {
                guard let p = PQresultErrorField(r, Int32(code)) else { return nil }
                return String(cString: p)
            }
            let state = field(UInt8(ascii: "C"))
            let primary = field(UInt8(ascii: "M")) ?? String(cString: PQresultErrorMessage(r)).trimmingNewlines()
            let lost = PQstatus(c) != CONNECTION_OK
            return try { throw DatabaseError(lost && state == nil ? .connectionLost : .statementFailed, primary,
                                             sqlState: state, constraint: field(UInt8(ascii: "n"))) }()
        }
    }
}

/// Seconds on a monotonic clock.
func monotonicNow() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

/// "0.5 s", "5 s".
func formatLimit(_ seconds: Double) -> String {
    let rounded = (seconds * 1000).rounded() / 1000
    return rounded == rounded.rounded() ? "\(Int(rounded)) s" : "\(rounded) s"
}

/// Waits until `fd` is ready for `events` (or in error, which the caller's next libpq call reports),
/// or until `deadline` (monotonic seconds; nil: no limit). False when the deadline passed.
func waitSocket(_ fd: Int32, events: Int16, deadline: Double?) -> Bool {
    guard fd >= 0 else { return true } // libpq reports the closed socket itself
    var p = pollfd(fd: fd, events: events, revents: 0)
    while true {
        var ms: Int32 = -1
        if let deadline {
            let left = deadline - monotonicNow()
            if left <= 0 { return false }
            ms = Int32(min(left * 1000, 3_600_000).rounded(.up))
        }
        let n = poll(&p, 1, ms)
        if n > 0 { return true }
        if n < 0 && errno != EINTR { return true }
        if n == 0 && deadline == nil { continue }
    }
}

extension String {
    func trimmingNewlines() -> String {
        var s = Substring(self)
        while let last = s.last, last.isNewline || last == " " { s = s.dropLast() }
        return String(s)
    }
}
