// DatabaseTests support: a real PostgreSQL 15 started in a temporary folder on a Unix socket (one per
// test run, each test in a fresh database), the `nolad` executable built next to the test bundle, and
// small image collections. A missing server binary or executable is a test failure, never a skip.
import Foundation
import Logging
import Queue
import XCTest

struct TestSetupError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Runs a program to completion; returns (status, stdout+stderr). posix_spawn + waitpid, output through a
/// temporary file: `pg_ctl start` leaves a server running that inherits the child's descriptors, which
/// makes Foundation's Process wait forever.
@discardableResult
func runProgram(_ path: String, _ args: [String], environment: [String: String]? = nil) throws -> (Int32, String) {
    let outPath = NSTemporaryDirectory() + "nolad-test-output-\(UUID().uuidString)"
    defer { try? FileManager.default.removeItem(atPath: outPath) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    let argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
    let env = (environment ?? ProcessInfo.processInfo.environment).map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer { for p in argv + env { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, path, &actions, nil, argv, env)
    guard rc == 0 else { throw TestSetupError("cannot start \(path): \(String(cString: strerror(rc)))") }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let output = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
    let exited = (status & 0x7f) == 0
    return (exited ? (status >> 8) & 0xff : 128 + (status & 0x7f), output)
}

final class PostgresCluster {
    static let binDir = ProcessInfo.processInfo.environment["NOLAD_PG_BIN"] ?? "/usr/lib/postgresql/15/bin"
    let folder: String
    let port: Int
    var dataDir: String { folder + "/data" }
    var socketDir: String { folder }
    private var databases = 0

    /// The cluster shared by every test of this run, started on first use and stopped at exit.
    nonisolated(unsafe) static var sharedCluster: PostgresCluster?
    static func shared() throws -> PostgresCluster {
        if let c = sharedCluster { return c }
        let c = try PostgresCluster()
        sharedCluster = c
        atexit { PostgresCluster.sharedCluster?.stop() }
        return c
    }

    init() throws {
        for tool in ["initdb", "pg_ctl", "postgres"] {
            guard FileManager.default.isExecutableFile(atPath: Self.binDir + "/" + tool) else {
                throw TestSetupError("PostgreSQL server binary \(Self.binDir)/\(tool) is missing: install postgresql-15 (scripts/deps.sh does)")
            }
        }
        var template = Array("/tmp/nolad-pg-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw TestSetupError("mkdtemp failed") }
        folder = String(cString: made)
        port = Int.random(in: 20000...60000)
        if getuid() == 0 {
            guard let pw = getpwnam("postgres") else {
                throw TestSetupError("running as root but there is no `postgres` system user to run the server as")
            }
            chown(folder, pw.pointee.pw_uid, pw.pointee.pw_gid)
        }
        try serverTool("initdb", ["-D", dataDir, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
        try start()
    }

    /// Runs a server binary, as the `postgres` user when we are root (initdb and postgres refuse root).
    func serverTool(_ tool: String, _ args: [String]) throws {
        let path = Self.binDir + "/" + tool
        let (status, output) = getuid() == 0
            ? try runProgram("/usr/sbin/runuser", ["-u", "postgres", "--", path] + args)
            : try runProgram(path, args)
        guard status == 0 else { throw TestSetupError("\(tool) failed (\(status)): \(output)") }
    }

    func start() throws {
        try serverTool("pg_ctl", ["-D", dataDir, "-l", folder + "/server.log", "-w", "-t", "30",
                                  "-o", "-k \(socketDir) -c listen_addresses='' -p \(port) -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                                  "start"])
    }

    func restart() throws {
        try serverTool("pg_ctl", ["-D", dataDir, "-m", "fast", "-w", "-t", "30", "stop"])
        try start()
    }

    func stop() {
        _ = try? serverTool("pg_ctl", ["-D", dataDir, "-m", "immediate", "-w", "stop"])
        try? FileManager.default.removeItem(atPath: folder)
    }

    func conninfo(_ dbname: String) -> String {
        "host=\(socketDir) port=\(port) user=postgres dbname=\(dbname)"
    }

    /// A fresh, empty database.
    func createDatabase(prefix: String) throws -> String {
        databases += 1
        let name = "\(prefix.lowercased().filter { $0.isLetter || $0.isNumber })_\(databases)"
        let admin = try PostgresConnection(conninfo: conninfo("postgres"))
        try admin.query("DROP DATABASE IF EXISTS \(name)")
        try admin.query("CREATE DATABASE \(name)")
        return name
    }
}

/// The migration files of this checkout.
let migrationsDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("../../Migrations").standardizedFileURL

/// The `nolad` executable built next to the test bundle.
func noladExecutable() throws -> String {
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var dir = exe.deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("nolad").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    throw TestSetupError("the nolad executable is not next to the test bundle (\(exe.path)); build with `swift build --build-tests`")
}

/// A running `nolad serve` process with its log.
final class DaemonProcess {
    let process = Process()
    let logPath: String
    let name: String

    init(name: String, conninfo: String, roots: [String], folder: String, settings: [String: String] = [:],
         environment: [String: String] = [:]) throws {
        self.name = name
        logPath = folder + "/\(name).log"
        FileManager.default.createFile(atPath: logPath, contents: nil)
        var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("NOLAD_") && $0.key != "NOTIFY_SOCKET" && $0.key != "JOURNAL_STREAM" }
        env["NOLAD_DATABASE"] = conninfo
        env["NOLAD_COLLECTION_ROOTS"] = roots.joined(separator: ":")
        env["NOLAD_WORKER_NAME"] = name
        env["NOLAD_LEASE_SECONDS"] = "2"
        env["NOLAD_HEARTBEAT_SECONDS"] = "0.5"
        env["NOLAD_POLL_SECONDS"] = "1"
        env["NOLAD_SHUTDOWN_TIMEOUT_SECONDS"] = "5"
        env["NOLAD_RETRY_BASE_SECONDS"] = "0.2"
        env["NOLAD_LOG_LEVEL"] = "debug"
        env["NOLAD_PIPELINE"] = "discover"
        for (k, v) in settings { env["NOLAD_" + k.uppercased()] = v }
        for (k, v) in environment { env[k] = v }
        process.executableURL = URL(fileURLWithPath: try noladExecutable())
        process.arguments = ["serve"]
        process.environment = env
        let log = FileHandle(forWritingAtPath: logPath)!
        process.standardOutput = log
        process.standardError = log
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }
    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Waits for the "ready" log line (connected, schema checked, LISTENing).
    func waitReady(timeout: Double = 20) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if log.contains("info ready ") || log.contains(">ready ") { return }
            if !process.isRunning { throw TestSetupError("daemon \(name) exited early:\n\(log)") }
            Thread.sleep(forTimeInterval: 0.02)
        }
        throw TestSetupError("daemon \(name) not ready after \(timeout) s:\n\(log)")
    }

    func signal(_ s: Int32) { kill(pid, s) }

    /// Waits for exit; returns the status, or nil on timeout.
    func waitExit(timeout: Double) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        return process.isRunning ? nil : process.terminationStatus
    }

    func stop() {
        if process.isRunning {
            signal(SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// Base class: a fresh migrated database per test, a temporary collection root, daemons stopped afterwards.
class DatabaseTestCase: XCTestCase {
    var cluster: PostgresCluster!
    var dbname = ""
    var conninfo: String { cluster.conninfo(dbname) }
    var db: PostgresConnection!
    var root = ""
    var daemons: [DaemonProcess] = []

    override func setUpWithError() throws {
        cluster = try PostgresCluster.shared()
        dbname = try cluster.createDatabase(prefix: String(name.split(separator: " ").last ?? "t"))
        db = try PostgresConnection(conninfo: conninfo)
        try Migrator.migrate(db, migrations: try Migrator.load(from: migrationsDirectory))
        var template = Array("/tmp/nolad-root-XXXXXX".utf8CString)
        root = String(cString: mkdtemp(&template)!)
    }

    override func tearDownWithError() throws {
        for d in daemons {
            d.stop()
            if (testRun?.totalFailureCount ?? 0) > 0 { print("---- log of daemon \(d.name) ----\n\(d.log)") }
        }
        daemons = []
        db?.close()
        try? FileManager.default.removeItem(atPath: root)
    }

    /// Daemons log in as a role that has nothing but nola_worker, as the README's setup does.
    static let workerRole = "nolad_test_worker"

    func startDaemon(_ name: String, settings: [String: String] = [:], environment: [String: String] = [:],
                     waitReady: Bool = true) throws -> DaemonProcess {
        if try db.query("SELECT 1 FROM pg_roles WHERE rolname = $1", [Self.workerRole]).isEmpty {
            try db.query("CREATE ROLE \(Self.workerRole) LOGIN IN ROLE nola_worker")
        }
        let workerConninfo = conninfo.replacingOccurrences(of: "user=postgres", with: "user=\(Self.workerRole)")
        let d = try DaemonProcess(name: name, conninfo: workerConninfo, roots: [root], folder: root, settings: settings,
                                  environment: environment)
        daemons.append(d)
        if waitReady { try d.waitReady() }
        return d
    }

    /// A folder under the root with `count` small files that start like JPEGs (discovery reads magic bytes only).
    @discardableResult
    func makeCollection(_ name: String, images count: Int) throws -> String {
        let path = root + "/" + name
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        for i in 0..<count {
            var bytes: [UInt8] = [0xFF, 0xD8, 0xFF, 0xE0]
            bytes += Array("image \(name) \(i)".utf8)
            FileManager.default.createFile(atPath: path + "/img\(String(format: "%03d", i)).jpg", contents: Data(bytes))
        }
        return path
    }

    @discardableResult
    func submit(_ collection: String, classes: [String] = ["cat", "dog"], timeout: String = "1 hour", maxAttempts: Int = 3) throws -> Int64 {
        let rows = try db.query("INSERT INTO nola.jobs (collection, classes, timeout, max_attempts) VALUES ($1, $2, $3::interval, $4) RETURNING id",
                                [collection, classes, timeout, maxAttempts])
        return Int64(try rows[0].int("id"))
    }

    func job(_ id: Int64) throws -> PostgresRow {
        let rows = try db.query("""
            SELECT state::text, attempt, attempts_used, worker, error, stage_done, stage_total, cancel_requested
            FROM nola.jobs WHERE id = $1
            """, [id])
        return rows[0]
    }

    /// Polls until `condition` holds; fails the test with `message` after `timeout` seconds.
    @discardableResult
    func waitUntil(_ message: String, timeout: Double, poll: Double = 0.02, _ condition: () throws -> Bool) throws -> Double {
        let start = Date()
        while Date().timeIntervalSince(start) < timeout {
            if try condition() { return Date().timeIntervalSince(start) }
            Thread.sleep(forTimeInterval: poll)
        }
        throw TestSetupError("timed out after \(timeout) s waiting until \(message)")
    }

    func waitState(_ id: Int64, _ states: Set<String>, timeout: Double) throws -> PostgresRow {
        try waitUntil("job \(id) is \(states.sorted())", timeout: timeout, poll: 0.05) { states.contains(try job(id).string("state")) }
        return try job(id)
    }
}
