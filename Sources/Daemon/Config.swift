import Foundation
import Pipeline
import Queue
import Yams

/// The daemon domain's error: configuration, command-line use and collection problems.
public struct NoladError: Error, CustomStringConvertible, Sendable {
    public enum Code: Sendable, Equatable {
        case config
        case usage
        case schema
    }
    public let code: Code
    public let message: String
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { message }
}

/// nolad's configuration: a YAML file (Config/nolad.example.yaml) whose every key can be overridden by
/// an environment variable named NOLAD_ + the key in upper case (`lease_seconds` ↔ NOLAD_LEASE_SECONDS;
/// `collection_roots` takes a colon-separated list). The file is NOLAD_CONFIG or `--config`.
public struct NoladConfig: Equatable, Sendable {
    /// libpq connection string or URI; when empty, built from the database_* keys (and libpq's PG* variables).
    public var database: String = ""
    public var databaseHost: String? = nil
    public var databasePort: Int? = nil
    public var databaseName: String? = nil
    public var databaseUser: String? = nil
    /// Shown in nola.jobs.worker with a per-boot suffix; the host name when empty.
    public var workerName: String = ""
    /// Folders under which collections may lie (real paths after resolving symlinks).
    public var collectionRoots: [String] = []
    public var clipModel: String? = nil
    public var dinoModel: String? = nil
    public var threads: Int = 1
    /// Jobs run at the same time by one daemon.
    public var concurrency: Int = 1
    public var leaseSeconds: Double = 60
    public var heartbeatSeconds: Double = 10
    /// T: the bound on every wait for the database (docs/operations.md, "Network partitions"). nil: 5 s,
    /// or (lease_seconds - heartbeat_seconds) / 3 when that is shorter; see `databaseTimeout`.
    public var databaseTimeoutSeconds: Double? = nil
    /// Fallback polling for new jobs when a NOTIFY is missed.
    public var pollSeconds: Double = 5
    /// After SIGTERM, how long running jobs get to reach a checkpoint before they are released anyway.
    public var shutdownTimeoutSeconds: Double = 20
    /// First retry delay after a transient failure (doubles per attempt, with jitter).
    public var retryBaseSeconds: Double = 5
    /// trace, debug, info, notice, warning, error, critical.
    public var logLevel: String = "info"
    /// Folder of the migration files (default: see `Migrator.findDirectory`).
    public var migrations: String? = nil
    /// Testing aid: pause this long per image in the discovery stage (0 in production).
    public var imageDelaySeconds: Double = 0
    /// The stages a job runs: "nola" (discover + the NoLA method) or "discover" (image discovery only).
    public var pipeline: String = "nola"
    /// Folder holding the model folders that job parameters `clip_model` / `dino_model` name.
    public var modelRoot: String? = nil
    /// OpenAI-compatible chat-completions endpoint for class descriptions (none: templates only).
    public var llmURL: String? = nil
    public var llmModel: String = "gpt-3.5-turbo"
    /// Sent as a bearer token; prefer NOLAD_LLM_API_KEY over the file.
    public var llmAPIKey: String? = nil
    /// Images per shard of the encode and label stages (docs/scale-out.md), rounded up to a multiple of 8
    /// (the stages' batch): the owner's setting cuts a job's shards; results do not depend on it.
    public var shardSize: Int = 256
    /// Whether a free slot with no job of its own to claim helps running jobs of other workers (their
    /// shards), as long as it has their model folders.
    public var helpOtherJobs: Bool = true
    /// Memory for prompt-tuning activations per job; sizes the micro-batches.
    public var memoryBudgetMB: Int = 4096
    /// How often prompt tuning saves a checkpoint between epochs (always at the end of an epoch).
    public var checkpointSeconds: Double = 120
    /// `host:port` of the optional HTTP listener for /metrics, /healthz and /readyz (docs/operations.md);
    /// nil (the default): no listener. Loopback addresses only unless `metricsAllowRemote`.
    public var metricsListen: String? = nil
    /// Lets `metrics_listen` name a non-loopback address (the listener has no authentication or TLS).
    public var metricsAllowRemote: Bool = false

    public init() {}

    /// What the pipeline's stages read of the configuration.
    public var stageSettings: StageSettings {
        var s = StageSettings()
        s.threads = threads
        s.modelRoot = modelRoot
        s.clipModel = clipModel
        s.dinoModel = dinoModel
        s.llmURL = llmURL
        s.llmModel = llmModel
        s.llmAPIKey = llmAPIKey
        s.memoryBudgetMB = memoryBudgetMB
        s.checkpointSeconds = checkpointSeconds
        s.imageDelaySeconds = imageDelaySeconds
        s.pipeline = pipeline
        s.shardSize = shardSize
        s.leaseSeconds = leaseSeconds
        s.heartbeatSeconds = heartbeatSeconds
        return s
    }

    /// Every key of the YAML file, in the order of the example file.
    public static let keys = [
        "database", "database_host", "database_port", "database_name", "database_user", "worker_name",
        "collection_roots", "clip_model", "dino_model", "threads", "concurrency", "lease_seconds",
        "heartbeat_seconds", "database_timeout", "poll_seconds", "shutdown_timeout_seconds", "retry_base_seconds", "log_level",
        "migrations", "image_delay_seconds", "pipeline", "model_root", "llm_url", "llm_model", "llm_api_key",
        "memory_budget_mb", "checkpoint_seconds", "metrics_listen", "metrics_allow_remote", "shard_size", "help_other_jobs",
    ]

    /// Reads the YAML file at `path` (if any), then applies NOLAD_* variables from `environment`.
    public static func load(path: String?, environment: [String: String]) throws -> NoladConfig {
        var config = NoladConfig()
        let file = path ?? environment["NOLAD_CONFIG"]
        if let file, !file.isEmpty {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
                throw NoladError(.config, "cannot read the configuration file \(file)")
            }
            try config.apply(yaml: text, source: file)
        }
        for key in keys {
            let variable = "NOLAD_" + key.uppercased()
            if let value = environment[variable] {
                try config.set(key, value: value, source: variable)
            }
        }
        try config.validate()
        return config
    }

    /// Applies a YAML document of `key: value` pairs; unknown keys are errors (typos must not pass silently).
    public mutating func apply(yaml text: String, source: String) throws {
        let node: Any?
        do {
            node = try Yams.load(yaml: text)
        } catch {
            throw NoladError(.config, "\(source) is not valid YAML: \(error)")
        }
        guard let node else { return }
        guard let map = node as? [String: Any] else {
            throw NoladError(.config, "\(source) must be a mapping of keys to values")
        }
        for (key, value) in map.sorted(by: { $0.key < $1.key }) {
            guard Self.keys.contains(key) else {
                throw NoladError(.config, "\(source): unknown key \"\(key)\" (known: \(Self.keys.joined(separator: ", ")))")
            }
            if value is NSNull { continue }
            if key == "collection_roots" {
                if let list = value as? [Any] {
                    collectionRoots = try list.map {
                        guard let s = $0 as? String else { throw NoladError(.config, "\(source): collection_roots must be a list of paths") }
                        return s
                    }
                    continue
                }
            }
            let text: String
            switch value {
            case let s as String: text = s
            case let i as Int: text = String(i)
            case let d as Double: text = String(d)
            case let b as Bool: text = String(b)
            default: throw NoladError(.config, "\(source): \(key) must be a single value")
            }
            try set(key, value: text, source: source)
        }
    }

    /// Sets one key from its text form.
    public mutating func set(_ key: String, value: String, source: String) throws {
        func number() throws -> Double {
            guard let d = Double(value.trimmingCharacters(in: .whitespaces)), d.isFinite else {
                throw NoladError(.config, "\(source): \(key) must be a number of seconds, got \"\(value)\"")
            }
            return d
        }
        func integer() throws -> Int {
            guard let i = Int(value.trimmingCharacters(in: .whitespaces)) else {
                throw NoladError(.config, "\(source): \(key) must be an integer, got \"\(value)\"")
            }
            return i
        }
        func boolean() throws -> Bool {
            switch value.trimmingCharacters(in: .whitespaces).lowercased() {
            case "true", "yes", "on", "1": return true
            case "false", "no", "off", "0", "": return false
            default: throw NoladError(.config, "\(source): \(key) must be true or false, got \"\(value)\"")
            }
        }
        let optional: String? = value.isEmpty ? nil : value
        switch key {
        case "database": database = value
        case "database_host": databaseHost = optional
        case "database_port": databasePort = value.isEmpty ? nil : try integer()
        case "database_name": databaseName = optional
        case "database_user": databaseUser = optional
        case "worker_name": workerName = value
        case "collection_roots": collectionRoots = value.split(separator: ":").map(String.init)
        case "clip_model": clipModel = optional
        case "dino_model": dinoModel = optional
        case "threads": threads = try integer()
        case "concurrency": concurrency = try integer()
        case "lease_seconds": leaseSeconds = try number()
        case "heartbeat_seconds": heartbeatSeconds = try number()
        case "database_timeout": databaseTimeoutSeconds = value.isEmpty ? nil : try number()
        case "poll_seconds": pollSeconds = try number()
        case "shutdown_timeout_seconds": shutdownTimeoutSeconds = try number()
        case "retry_base_seconds": retryBaseSeconds = try number()
        case "log_level": logLevel = value
        case "migrations": migrations = optional
        case "image_delay_seconds": imageDelaySeconds = try number()
        case "pipeline": pipeline = value
        case "model_root": modelRoot = optional
        case "llm_url": llmURL = optional
        case "llm_model": llmModel = value
        case "llm_api_key": llmAPIKey = optional
        case "memory_budget_mb": memoryBudgetMB = try integer()
        case "checkpoint_seconds": checkpointSeconds = try number()
        case "metrics_listen": metricsListen = optional
        case "metrics_allow_remote": metricsAllowRemote = try boolean()
        case "shard_size": shardSize = try integer()
        case "help_other_jobs": helpOtherJobs = try boolean()
        default: throw NoladError(.config, "\(source): unknown key \"\(key)\"")
        }
    }

    public func validate() throws {
        if threads < 1 { throw NoladError(.config, "threads must be at least 1") }
        if concurrency < 1 { throw NoladError(.config, "concurrency must be at least 1") }
        if leaseSeconds <= 0 { throw NoladError(.config, "lease_seconds must be positive") }
        if heartbeatSeconds <= 0 || heartbeatSeconds >= leaseSeconds {
            throw NoladError(.config, "heartbeat_seconds must be positive and shorter than lease_seconds (\(leaseSeconds))")
        }
        if let t = databaseTimeoutSeconds {
            if t <= 0 { throw NoladError(.config, "database_timeout must be a positive number of seconds") }
            if heartbeatSeconds + 2 * t >= leaseSeconds {
                throw NoladError(.config, "database_timeout (\(t) s) is too long for lease_seconds (\(leaseSeconds)) and heartbeat_seconds (\(heartbeatSeconds)): a dead connection is noticed within 2 × database_timeout, which must end before the lease does (heartbeat_seconds + 2 × database_timeout < lease_seconds)")
            }
        }
        if pollSeconds <= 0 { throw NoladError(.config, "poll_seconds must be positive") }
        if shutdownTimeoutSeconds < 0 { throw NoladError(.config, "shutdown_timeout_seconds must not be negative") }
        if retryBaseSeconds < 0 { throw NoladError(.config, "retry_base_seconds must not be negative") }
        if !["nola", "discover"].contains(pipeline) { throw NoladError(.config, "pipeline must be nola or discover, got \"\(pipeline)\"") }
        if memoryBudgetMB < 64 { throw NoladError(.config, "memory_budget_mb must be at least 64") }
        if shardSize < 1 || shardSize > 1_000_000 { throw NoladError(.config, "shard_size must be an integer from 1 to 1000000 (images per shard)") }
        if checkpointSeconds <= 0 { throw NoladError(.config, "checkpoint_seconds must be positive") }
        if let llmURL, URL(string: llmURL)?.scheme == nil { throw NoladError(.config, "llm_url must be a URL (http://host:port/v1)") }
        if imageDelaySeconds < 0 { throw NoladError(.config, "image_delay_seconds must not be negative") }
        for root in collectionRoots where !root.hasPrefix("/") {
            throw NoladError(.config, "collection root \(root) must be an absolute path")
        }
        let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
        if !levels.contains(logLevel) { throw NoladError(.config, "log_level must be one of \(levels.joined(separator: ", "))") }
        _ = try metricsAddress()
    }

    /// The listener's address parsed from `metrics_listen`, nil when the listener is off; throws a
    /// sentence for a malformed address, and for a non-loopback one unless `metrics_allow_remote` is set.
    public func metricsAddress() throws -> ListenAddress? {
        guard let metricsListen else { return nil }
        let address = try ListenAddress(parsing: metricsListen, key: "metrics_listen")
        if !address.isLoopback && !metricsAllowRemote {
            throw NoladError(.config, """
                metrics_listen \(metricsListen) is not a loopback address: the listener has no authentication or TLS, \
                so nolad listens on 127.0.0.1 or [::1] only. Set metrics_allow_remote: true to listen on \(address.host) anyway \
                (then restrict it with a firewall), or put a proxy in front of a loopback listener
                """)
        }
        return address
    }

    /// T in seconds: `database_timeout` if set, else 5 s, or (lease_seconds - heartbeat_seconds) / 3 when
    /// that is shorter (so that a dead connection is always noticed before the lease runs out).
    public var databaseTimeout: Double {
        databaseTimeoutSeconds ?? min(5, (leaseSeconds - heartbeatSeconds) / 3)
    }

    /// The main loop's connection: statements cancelled after T, given up after 2T without a reply.
    public var controlConnectionLimits: ConnectionLimits { .control(timeout: databaseTimeout) }
    /// A job's connection: locks T, statements 12T, given up after 13T without a reply.
    public var jobConnectionLimits: ConnectionLimits { .job(timeout: databaseTimeout) }

    /// The libpq connection string: `database` if given, else built from the database_* keys
    /// (values quoted as libpq requires), else empty (libpq's PG* environment variables and defaults).
    public var conninfo: String {
        if !database.isEmpty { return database }
        func quote(_ s: String) -> String {
            "'" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "'", with: "\\'") + "'"
        }
        var parts: [String] = []
        if let databaseHost { parts.append("host=" + quote(databaseHost)) }
        if let databasePort { parts.append("port=\(databasePort)") }
        if let databaseName { parts.append("dbname=" + quote(databaseName)) }
        if let databaseUser { parts.append("user=" + quote(databaseUser)) }
        parts.append("application_name=nolad")
        return parts.joined(separator: " ")
    }
}
