// `nolad status --watch`: one line per job, redrawn in place on a terminal, plain lines on a pipe.
// The rendering is pure (rows in, text out) so tests need no terminal; StatusCommand does the polling.
import Daemon
import Foundation
import Queue

/// One job as `status --watch` shows it (a row of nola.job_status).
public struct WatchRow: Equatable, Sendable {
    public var id: Int64
    public var state: String
    public var stage: String
    public var progress: Double        // whole job, 0…1
    public var done: Int?              // images done in the stage
    public var total: Int?             // images in the stage
    public var rate: Double?           // images per second in the stage
    public var etaSeconds: Double?     // until the stage ends
    public var error: String

    public init(id: Int64, state: String, stage: String = "", progress: Double = 0, done: Int? = nil, total: Int? = nil,
                rate: Double? = nil, etaSeconds: Double? = nil, error: String = "") {
        self.id = id; self.state = state; self.stage = stage; self.progress = progress; self.done = done
        self.total = total; self.rate = rate; self.etaSeconds = etaSeconds; self.error = error
    }

    public var isFinished: Bool { ["succeeded", "failed", "cancelled"].contains(state) }

    /// What a change must alter for a plain (non-terminal) line to be printed: state, stage, whole tenths of progress.
    var plainKey: String { "\(state) \(stage) \(Int((progress * 10).rounded(.down)))" }
}

public enum StatusWatch {
    static let escape = "\u{1B}["

    /// `[########------------]` for a progress of 0…1.
    static func bar(_ progress: Double, width: Int) -> String {
        let filled = max(0, min(width, Int((progress * Double(width)).rounded(.down))))
        return "[" + String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled) + "]"
    }

    /// `1h02m`, `3m07s`, `12s`.
    static func duration(_ seconds: Double) -> String {
        let s = max(0, Int(seconds.rounded()))
        if s >= 3600 { return String(format: "%dh%02dm", s / 3600, s % 3600 / 60) }
        if s >= 60 { return String(format: "%dm%02ds", s / 60, s % 60) }
        return "\(s)s"
    }

    static func percent(_ p: Double) -> String { String(format: "%3d%%", Int((p * 100).rounded(.down))) }

    /// The terminal line of one job: id, state, stage, bar, percent, images, rate, ETA (or the error when failed).
    public static func terminalLine(_ r: WatchRow, barWidth: Int = 24) -> String {
        var parts = ["job \(r.id)", r.state.padding(toLength: 9, withPad: " ", startingAt: 0),
                     r.stage.padding(toLength: 10, withPad: " ", startingAt: 0),
                     bar(r.progress, width: barWidth), percent(r.progress)]
        if let done = r.done, let total = r.total, !r.isFinished { parts.append("\(done)/\(total)") }
        if let rate = r.rate { parts.append(String(format: "%.1f img/s", rate)) }
        if let eta = r.etaSeconds { parts.append("ETA " + duration(eta)) }
        if !r.error.isEmpty { parts.append("error: " + r.error) }
        return parts.joined(separator: "  ")
    }

    /// The plain line of one job (no bar, no rate: those change every poll).
    public static func plainLine(_ r: WatchRow) -> String {
        var parts = ["job \(r.id)", r.state]
        if !r.stage.isEmpty { parts.append(r.stage) }
        parts.append(percent(r.progress).trimmingCharacters(in: .whitespaces))
        if let done = r.done, let total = r.total, !r.isFinished { parts.append("\(done)/\(total) images") }
        if !r.error.isEmpty { parts.append("error: " + r.error) }
        return parts.joined(separator: " ")
    }

    /// A terminal frame: moves the cursor up over the `previousLines` lines of the last frame, then rewrites
    /// each job's line (clearing what was there). `width` cuts lines so they never wrap (which would break the move).
    public static func frame(_ rows: [WatchRow], previousLines: Int, width: Int = 120) -> String {
        var out = previousLines > 0 ? "\(escape)\(previousLines)A" : ""
        for r in rows {
            out += "\r\(escape)2K" + String(terminalLine(r).prefix(max(1, width - 1))) + "\n"
        }
        return out
    }

    /// The plain lines to print for `rows`, given the keys printed before (updated): only jobs whose state,
    /// stage or tenth of progress changed.
    public static func plainUpdate(_ rows: [WatchRow], printed: inout [Int64: String]) -> [String] {
        var lines: [String] = []
        for r in rows where printed[r.id] != r.plainKey {
            printed[r.id] = r.plainKey
            lines.append(plainLine(r))
        }
        return lines
    }

    static let query = """
        SELECT id, state::text AS state, coalesce(stage, '') AS stage, progress::float8 AS progress,
               images_done AS done, images_total AS total, rate::float8 AS rate,
               extract(epoch FROM eta)::float8 AS eta, coalesce(error, '') AS error
        FROM nola.job_status
        """

    static func rows(_ c: PostgresConnection, ids: [Int64]) throws -> [WatchRow] {
        try c.query(query + " WHERE id = ANY($1::bigint[]) ORDER BY id", ["{" + ids.map(String.init).joined(separator: ",") + "}"])
            .rows.map { row in
                WatchRow(id: Int64(try row.int("id")), state: try row.string("state"), stage: try row.string("stage"),
                         progress: try row.optionalDouble("progress") ?? 0, done: try row.optionalInt("done"),
                         total: try row.optionalInt("total"), rate: try row.optionalDouble("rate"),
                         etaSeconds: try row.optionalDouble("eta"), error: try row.string("error"))
            }
    }

    /// Polls until every watched job is finished: one job, or every job queued or running when the watch began.
    static func watch(_ c: PostgresConnection, job: Int64?, interval: Double) throws {
        let ids: [Int64]
        if let job {
            ids = [job]
        } else {
            ids = try c.query("SELECT id FROM nola.jobs WHERE state IN ('queued', 'running') ORDER BY id")
                .rows.map { Int64(try $0.int("id")) }
        }
        var rows = try rows(c, ids: ids)
        if let job, rows.isEmpty { throw NoladError(.usage, "no job \(job)") }
        if rows.isEmpty { write("no queued or running jobs\n"); return }
        let terminal = isatty(STDOUT_FILENO) == 1
        var printed: [Int64: String] = [:]
        var previousLines = 0
        while true {
            if terminal {
                write(frame(rows, previousLines: previousLines, width: terminalWidth()))
                previousLines = rows.count
            } else {
                for line in plainUpdate(rows, printed: &printed) { write(line + "\n") }
            }
            if rows.allSatisfy(\.isFinished) { return }
            Thread.sleep(forTimeInterval: interval)
            rows = try Self.rows(c, ids: ids)
        }
    }

    static func write(_ s: String) { FileHandle.standardOutput.write(Data(s.utf8)) }

    static func terminalWidth() -> Int {
        var size = winsize()
        return ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &size) == 0 && size.ws_col > 0 ? Int(size.ws_col) : 120
    }
}
