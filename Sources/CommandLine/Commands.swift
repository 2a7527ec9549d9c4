import ArgumentParser
import Daemon
import Foundation
import Logging
import Pipeline
import Queue

/// Options every subcommand shares: where the configuration is, and a database override.
public struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: "YAML configuration file (default: $NOLAD_CONFIG; NOLAD_* variables override its keys).")
    public var config: String?

    @Option(name: .long, help: "libpq connection string or URI; overrides the configuration's `database`.")
    public var database: String?

    public init() {}

    func load() throws -> NoladConfig {
        var c = try NoladConfig.load(path: config, environment: ProcessInfo.processInfo.environment)
        if let database { c.database = database }
        return c
    }

    func connect(_ c: NoladConfig) throws -> PostgresConnection {
        try PostgresConnection(conninfo: c.conninfo)
    }
}

/// Prints a message on stderr and exits with status 1 (no stack trace for environment failures).
func fail(_ message: String) -> ExitCode {
    FileHandle.standardError.write(Data("nolad: \(message)\n".utf8))
    return ExitCode(1)
}

public struct ServeCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the worker: claim jobs from nola.jobs and run them (systemd Type=notify).")

    @OptionGroup public var options: GlobalOptions

    public init() {}

    public func run() throws {
        let config: NoladConfig
        do { config = try options.load() } catch { throw fail("\(error)") }
        let logger = makeLogger(level: config.logLevel)
        // The optional /metrics, /healthz, /readyz listener (docs/operations.md); off unless metrics_listen is set.
        var metrics: DaemonMetrics?
        var listener: MetricsListener?
        let address: ListenAddress?
        do { address = try config.metricsAddress() } catch { throw fail("\(error)") }
        if let address {
            let m = DaemonMetrics(version: noladVersion, concurrency: config.concurrency, livenessBound: config.leaseSeconds)
            do {
                listener = try MetricsListener.start(address: address, metrics: m, sampler: QueueSampler(conninfo: config.conninfo), logger: logger)
            } catch {
                logger.error("serve stopped", metadata: ["error": "\(error)"])
                throw fail("\(error)")
            }
            metrics = m
        }
        defer { listener?.stop() }
        let worker = Worker(config: config, stages: JobStages.standard(settings: config.stageSettings),
                            help: JobStages.help(settings: config.stageSettings), logger: logger,
                            observer: metrics ?? NoWorkerObserver())
        metrics?.setWorkerID(worker.id)
        let signals = SignalWatcher(signals: [SIGTERM, SIGINT]) { [worker] signal in
            logger.info("received signal", metadata: ["signal": "\(signal == SIGTERM ? "SIGTERM" : "SIGINT")"])
            worker.requestShutdown()
        }
        defer { signals.cancel() }
        do {
            try worker.run()
        } catch {
            logger.error("serve stopped", metadata: ["error": "\(error)"])
            throw fail("\(error)")
        }
    }
}

public struct MigrateCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Apply the SQL migrations the database lacks (each in one transaction, under an advisory lock).")

    @OptionGroup public var options: GlobalOptions

    @Option(name: .long, help: "Folder of the migration files (default: the installed or source-tree Migrations/).")
    public var migrations: String?

    public init() {}

    public func run() throws {
        do {
            let config = try options.load()
            guard let dir = Migrator.findDirectory(explicit: migrations ?? config.migrations) else {
                throw NoladError(.config, "cannot find the migrations folder; pass --migrations or set NOLAD_MIGRATIONS")
            }
            let files = try Migrator.load(from: dir)
            let c = try options.connect(config)
            let applied = try Migrator.migrate(c, migrations: files)
            let version = try Migrator.currentVersion(c)
            if applied.isEmpty {
                print("schema is up to date (version \(version))")
            } else {
                print("applied migration\(applied.count == 1 ? "" : "s") \(applied.map(String.init).joined(separator: ", ")); schema is at version \(version)")
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail("\(error)")
        }
    }
}

public struct SubmitCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "submit",
        abstract: "Insert a job (the same as an INSERT INTO nola.jobs) and print its id.")

    @OptionGroup public var options: GlobalOptions

    @Argument(help: "The collection folder (absolute path, under a configured collection root).")
    public var collection: String

    @Option(name: .customLong("class"), help: "A class name (repeat the option for each class).")
    public var classes: [String] = []

    @Option(name: .long, help: "Class descriptions: a JSON file {\"class\": [\"sentence\", ...]}.")
    public var descriptions: String?

    @Option(name: .long, help: "Parameters as a JSON object, e.g. '{\"seed\": 1}'.")
    public var parameters: String = "{}"

    @Option(name: .long, help: "Label with the tuned prompts of this earlier job (no training): sets the parameter prompts_from_job.")
    public var promptsFrom: Int64?

    @Flag(name: .long, help: "With --prompts-from: label only the images (by content) not labelled with those prompts yet, and copy the earlier labels of the rest (parameter only_new).")
    public var onlyNew = false

    @Option(name: .long, help: "Higher runs first.")
    public var priority: Int = 0

    @Option(name: .long, help: "Attempts before the job fails for good.")
    public var maxAttempts: Int = 3

    @Option(name: .long, help: "PostgreSQL interval, e.g. '2 hours'.")
    public var timeout: String = "24 hours"

    public init() {}

    public func run() throws {
        do {
            let config = try options.load()
            var descriptionsJSON: String? = nil
            if let descriptions {
                guard let text = try? String(contentsOfFile: descriptions, encoding: .utf8) else {
                    throw NoladError(.usage, "cannot read the descriptions file \(descriptions)")
                }
                descriptionsJSON = text
            }
            let parameters = try Self.parameters(self.parameters, promptsFrom: promptsFrom, onlyNew: onlyNew)
            let path = collection.hasPrefix("/") ? collection : FileManager.default.currentDirectoryPath + "/" + collection
            let c = try options.connect(config)
            let rows = try c.query("""
                INSERT INTO nola.jobs (collection, classes, descriptions, parameters, priority, max_attempts, timeout)
                VALUES ($1, $2::text[], $3::jsonb, $4::jsonb, $5, $6, $7::interval) RETURNING id
                """, [URL(fileURLWithPath: path).standardizedFileURL.path, classes, descriptionsJSON, parameters,
                      priority, maxAttempts, timeout])
            print(try rows[0].int("id"))
        } catch let e as DatabaseError {
            throw fail(e.sqlState == "23514" ? "job rejected: \(e.message)" : "\(e)")
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail("\(error)")
        }
    }

    /// The --parameters object with --prompts-from and --only-new merged in (unchanged without them).
    static func parameters(_ json: String, promptsFrom: Int64?, onlyNew: Bool) throws -> String {
        guard promptsFrom != nil || onlyNew else { return json }
        guard var object = (try? JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any] else {
            throw NoladError(.usage, "--parameters must be a JSON object to combine with --prompts-from or --only-new")
        }
        if let promptsFrom {
            if let given = object["prompts_from_job"] as? NSNumber, given.int64Value != promptsFrom {
                throw NoladError(.usage, "--prompts-from \(promptsFrom) contradicts prompts_from_job \(given) in --parameters")
            }
            object["prompts_from_job"] = NSNumber(value: promptsFrom)
        }
        if onlyNew {
            guard let given = object["prompts_from_job"], !(given is NSNull) else {
                throw NoladError(.usage, "--only-new needs --prompts-from JOB: the earlier job whose tuned prompts and labels it reuses")
            }
            object["only_new"] = true
        }
        return String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
    }
}

public struct StatusCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show nola.job_status (all jobs, or one), and the workers.")

    @OptionGroup public var options: GlobalOptions

    @Argument(help: "A job id; all jobs when omitted.")
    public var job: Int64?

    @Flag(name: .long, help: "Also list the job's events.")
    public var events = false

    @Flag(name: .long, help: "Follow the job (or every queued and running job) until it ends: one line per job, redrawn in place on a terminal, a plain line per change otherwise.")
    public var watch = false

    @Option(name: .long, help: "Seconds between polls with --watch.")
    public var interval: Double = 1

    public init() {}

    public func run() throws {
        do {
            let config = try options.load()
            let c = try options.connect(config)
            if watch {
                guard interval > 0 else { throw NoladError(.usage, "--interval must be a positive number of seconds") }
                try StatusWatch.watch(c, job: job, interval: interval)
                return
            }
            let sql = """
                SELECT id, state, coalesce(stage, '') AS stage, progress, images_done AS done, images_total AS total,
                       rate, date_trunc('second', eta)::text AS eta, coalesce(worker, '') AS worker,
                       attempt, coalesce(error, '') AS error
                FROM nola.job_status
                """
            let rows = job == nil ? try c.query(sql + " ORDER BY id") : try c.query(sql + " WHERE id = $1", [job])
            if let job, rows.isEmpty { throw NoladError(.usage, "no job \(job)") }
            printTable(rows)
            if events, let job {
                print("")
                printTable(try c.query("""
                    SELECT id, attempt, to_char(at, 'HH24:MI:SS.MS') AS at, coalesce(stage, '') AS stage, kind, metrics::text AS metrics
                    FROM nola.events WHERE job_id = $1 ORDER BY id
                    """, [job]))
            }
            if job == nil {
                print("")
                printTable(try c.query("""
                    SELECT id AS worker, host, pid, version, to_char(heartbeat_at, 'YYYY-MM-DD HH24:MI:SS') AS heartbeat,
                           CASE WHEN stopped_at IS NULL THEN 'running' ELSE 'stopped' END AS state, current_jobs::text AS jobs,
                           helping_jobs::text AS helping
                    FROM nola.workers WHERE stopped_at IS NULL OR stopped_at > now() - interval '1 day' ORDER BY started_at
                    """))
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail("\(error)")
        }
    }
}

/// Prints rows as an aligned text table.
func printTable(_ rows: PostgresRows) {
    let cells = rows.values.map { $0.map { $0 ?? "" } }
    var widths = rows.columns.map(\.count)
    for row in cells { for (i, v) in row.enumerated() { widths[i] = max(widths[i], v.count) } }
    func line(_ values: [String]) -> String {
        values.enumerated().map { $1.padding(toLength: widths[$0], withPad: " ", startingAt: 0) }.joined(separator: "  ")
    }
    print(line(rows.columns))
    print(line(widths.map { String(repeating: "-", count: $0) }))
    for row in cells { print(line(row)) }
}

public struct CancelCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "cancel",
        abstract: "Cancel a job (SELECT nola.cancel(id)): a queued job at once, a running one within seconds.")

    @OptionGroup public var options: GlobalOptions

    @Argument(help: "The job id.")
    public var job: Int64

    public init() {}

    public func run() throws {
        do {
            let config = try options.load()
            let c = try options.connect(config)
            let rows = try c.query("SELECT nola.cancel($1) AS state", [job])
            guard let state = try rows[0].optionalString("state") else { throw NoladError(.usage, "no job \(job)") }
            switch state {
            case "cancelled": print("job \(job) is cancelled")
            case "running": print("job \(job) is running; its worker was told to stop")
            default: print("job \(job) already ended (\(state)); nothing to cancel")
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail("\(error)")
        }
    }
}

public struct RequeueCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "requeue",
        abstract: "Queue a failed or cancelled job again (SELECT nola.requeue(id)); it resumes from its checkpoint when one is kept.")

    @OptionGroup public var options: GlobalOptions

    @Argument(help: "The job id.")
    public var job: Int64

    public init() {}

    public func run() throws {
        do {
            let config = try options.load()
            let c = try options.connect(config)
            let rows = try c.query("SELECT nola.requeue($1) AS state", [job])
            guard try rows[0].optionalString("state") != nil else { throw NoladError(.usage, "no job \(job)") }
            print("job \(job) is queued again")
        } catch let e as ExitCode {
            throw e
        } catch let e as DatabaseError {
            throw fail(e.message)
        } catch {
            throw fail("\(error)")
        }
    }
}

public struct LabelsCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "labels",
        abstract: "Export a job's labels (nola.labels) as CSV or JSON Lines, or list them most doubtful first (--review).")

    public enum Format: String, ExpressibleByArgument, CaseIterable {
        case csv, jsonl
    }

    @OptionGroup public var options: GlobalOptions

    @Argument(help: "The job id.")
    public var job: Int64

    @Option(name: .long, help: "csv or jsonl.")
    public var format: Format = .csv

    @Option(name: .shortAndLong, help: "Write to this file instead of standard output.")
    public var output: String?

    @Flag(name: .long, help: "The review queue (nola.review_queue): the images the job abstained on, then by rising margin, as a table.")
    public var review = false

    @Option(name: .long, help: "With --review: at most this many images.")
    public var limit: Int?

    public init() {}

    public func run() throws {
        do {
            let config = try options.load()
            let c = try options.connect(config)
            let exists = try c.query("SELECT state::text FROM nola.jobs WHERE id = $1", [job])
            if exists.isEmpty { throw NoladError(.usage, "no job \(job)") }
            if let limit, limit < 1 { throw NoladError(.usage, "--limit must be at least 1") }
            if limit != nil && !review { throw NoladError(.usage, "--limit goes with --review") }
            let text: String
            if review {
                let rows = try c.query("""
                    SELECT review_rank AS rank, path, coalesce(label, '-') AS label, round(confidence::numeric, 4) AS confidence,
                           round(margin::numeric, 4) AS margin, array_to_string(top_labels, ' > ') AS top,
                           zero_shot_label AS zero_shot, coalesce(teacher_label, '-') AS teacher,
                           CASE WHEN agreement THEN 'yes' ELSE 'no' END AS agree, coalesce(abstained, '') AS abstained
                    FROM nola.review_queue WHERE job_id = $1 ORDER BY review_rank LIMIT $2
                    """, [job, limit.map(String.init)])
                text = Self.table(rows)
            } else {
                let rows = try c.query("""
                    SELECT i.path, l.label, l.confidence, l.zero_shot_label, l.zero_shot_confidence, l.unreadable,
                           l.abstained, l.margin, l.teacher_label, l.agreement::text AS agreement,
                           to_jsonb(l.top_labels)::text AS top_labels, to_jsonb(l.top_probabilities)::text AS top_probabilities
                    FROM nola.images i LEFT JOIN nola.labels l ON l.job_id = i.job_id AND l.path = i.path
                    WHERE i.job_id = $1 ORDER BY i.path
                    """, [job])
                text = format == .csv ? Self.csv(rows) : Self.jsonLines(rows)
            }
            if let output {
                guard FileManager.default.createFile(atPath: output, contents: Data(text.utf8)) else {
                    throw NoladError(.usage, "cannot write \(output)")
                }
            } else {
                FileHandle.standardOutput.write(Data(text.utf8))
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail("\(error)")
        }
    }

    /// RFC 4180 CSV with a header row.
    static func csv(_ rows: PostgresRows) -> String {
        func field(_ v: String?) -> String {
            guard let v else { return "" }
            if v.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) {
                return "\"" + v.replacingOccurrences(of: "\"", with: "\"\"") + "\""
            }
            return v
        }
        var out = rows.columns.joined(separator: ",") + "\n"
        for row in rows.values { out += row.map(field).joined(separator: ",") + "\n" }
        return out
    }

    /// An aligned text table, as `printTable`.
    static func table(_ rows: PostgresRows) -> String {
        let cells = rows.values.map { $0.map { $0 ?? "" } }
        var widths = rows.columns.map(\.count)
        for row in cells { for (i, v) in row.enumerated() { widths[i] = max(widths[i], v.count) } }
        func line(_ values: [String]) -> String {
            values.enumerated().map { $1.padding(toLength: widths[$0], withPad: " ", startingAt: 0) }.joined(separator: "  ")
                .trimmingCharacters(in: .whitespaces) + "\n"
        }
        return line(rows.columns) + line(widths.map { String(repeating: "-", count: $0) }) + cells.map(line).joined()
    }

    static func jsonLines(_ rows: PostgresRows) -> String {
        var out = ""
        for row in rows.values {
            var object: [String: JSONValue] = [:]
            for (i, column) in rows.columns.enumerated() {
                guard let v = row[i] else { object[column] = .null; continue }
                if column.hasSuffix("confidence") || column == "margin", let d = Double(v) {
                    object[column] = .number(d)
                } else if column == "agreement" {
                    object[column] = .bool(v == "true")
                } else if column.hasPrefix("top_"), let list = try? JSONDecoder().decode(JSONValue.self, from: Data(v.utf8)) {
                    object[column] = list
                } else {
                    object[column] = .string(v)
                }
            }
            out += JSONValue.object(object).jsonText + "\n"
        }
        return out
    }
}
