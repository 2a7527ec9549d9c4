import Foundation
import Logging

/// Log lines on stderr. Under journald (JOURNAL_STREAM set) each line starts with the syslog priority
/// (`<6>` info, `<4>` warning, ...) so the journal keeps levels, and carries no timestamp of its own.
/// Otherwise: `2026-01-01T12:00:00Z info message key=value`.
public struct NoladLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level
    private let label: String
    private let journald: Bool

    public init(label: String, level: Logger.Level, journald: Bool = ProcessInfo.processInfo.environment["JOURNAL_STREAM"] != nil) {
        self.label = label
        self.logLevel = level
        self.journald = journald
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { _, b in b } }
        let fields = all.sorted { $0.key < $1.key }.map { key, value -> String in
            let v = "\(value)"
            return v.contains(" ") || v.isEmpty ? "\(key)=\"\(v)\"" : "\(key)=\(v)"
        }
        // One event, one line: libpq messages carry newlines and tabs.
        let text = ([event.message.description] + fields).joined(separator: " ")
            .split(whereSeparator: { $0 == "\n" || $0 == "\t" || $0 == "\r" }).joined(separator: " ")
        let line: String
        if journald {
            line = "<\(Self.priority(event.level))>\(text)\n"
        } else {
            let stamp = ISO8601DateFormatter().string(from: Date())
            line = "\(stamp) \(event.level) \(text)\n"
        }
        FileHandle.standardError.write(Data(line.utf8))
    }

    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }
}

private let loggingBootstrap: Void = {
    let level = Logger.Level(rawValue: ProcessInfo.processInfo.environment["NOLAD_LOG_LEVEL"] ?? "info") ?? .info
    LoggingSystem.bootstrap { NoladLogHandler(label: $0, level: level) }
}()

/// The process-wide logger (bootstrapped once).
public func makeLogger(level: String) -> Logger {
    _ = loggingBootstrap
    var logger = Logger(label: "nolad")
    logger.logLevel = Logger.Level(rawValue: level) ?? .info
    return logger
}
