import ArgumentParser
import Foundation
import Queue

/// One whole NoLA job run by 1 `nolad serve` process and then by 2 (each at `--threads`), on a
/// PostgreSQL cluster of its own in a temporary folder: the wall-clock speed-up, the owner's
/// coordination overhead per optimizer step, the serial part, and the speed-up those figures predict
/// at 8 and 32 workers (docs/scale-out-tuning.md). Not a test: run it on an idle machine.
struct BenchScale: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-scale",
        abstract: "Time one whole job with 1 worker process and then with 2 (data-parallel prompt tuning), on a PostgreSQL of its own.")

    static let checkout = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..").standardizedFileURL

    @Option(help: "Collection (one sub-folder per class; default: the demo's).") var collection = checkout.appendingPathComponent("Demo/collection").path
    @Option(help: "Model root holding tiny-clip/ and tiny-dino/ (default: the demo's).") var models = checkout.appendingPathComponent("Demo/models").path
    @Option(help: "CLIP folder under the model root.") var clipModel = "tiny-clip"
    @Option(help: "DINO folder under the model root.") var dinoModel = "tiny-dino"
    @Option(help: "Class descriptions JSON (default: the demo's, when present).") var descriptions: String?
    @Option(help: "The job's parameters (JSON).")
    var parameters = #"{"min_k": 4, "k_fraction": 0.05, "colour_jitter": false, "prompt_epochs": 10}"#
    @Option(help: "Worker processes per run, comma-separated.") var workers = "1,2"
    @Option(help: "Threads of each worker process.") var threads = 1
    @Option(help: "PostgreSQL server binaries.") var pgBin = ProcessInfo.processInfo.environment["NOLAD_PG_BIN"] ?? "/usr/lib/postgresql/15/bin"
    @Flag(help: "Keep the temporary folder (cluster, daemon logs) for inspection.") var keep = false

    struct Figures {
        var workers = 0
        var wall = 0.0
        var stageSeconds: [(String, Double)] = []
        var tune: [String: Any] = [:]
        func number(_ key: String) -> Double { (tune[key] as? NSNumber)?.doubleValue ?? 0 }
        func stage(_ name: String) -> Double { stageSeconds.first { $0.0 == name }?.1 ?? 0 }
    }

    func run() throws {
        setvbuf(stdout, nil, _IOLBF, 0)
        let counts = workers.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !counts.isEmpty, counts.allSatisfy({ $0 >= 1 }) else { throw ValidationError("--workers: positive counts, e.g. 1,2") }
        guard let data = parameters.data(using: .utf8), (try? JSONSerialization.jsonObject(with: data)) is [String: Any] else {
            throw ValidationError("--parameters must be a JSON object")
        }
        let classFolders = try FileManager.default.contentsOfDirectory(atPath: collection).filter { name in
            var dir: ObjCBool = false
            return FileManager.default.fileExists(atPath: collection + "/" + name, isDirectory: &dir) && dir.boolValue && !name.hasPrefix(".")
        }.sorted()
        guard !classFolders.isEmpty else { throw ValidationError("\(collection) has no class sub-folders") }
        let classes = classFolders.map { $0.replacingOccurrences(of: "_", with: " ") }
        var descriptionsJSON: String?
        let descriptionsPath = descriptions ?? (collection == Self.checkout.appendingPathComponent("Demo/collection").path
            ? Self.checkout.appendingPathComponent("Demo/descriptions.json").path : nil)
        if let descriptionsPath, FileManager.default.fileExists(atPath: descriptionsPath) {
            descriptionsJSON = try String(contentsOfFile: descriptionsPath, encoding: .utf8)
        }
        let server = try BenchCluster(binDir: pgBin)
        defer { if !keep { server.stop() } else { print("kept \(server.folder)") } }
        print("nolad bench-scale: \(collection) (\(classes.count) classes), parameters \(parameters), \(threads) thread(s) per worker; workers \(counts)")
        var all: [Figures] = []
        for n in counts {
            let f = try runJob(server: server, workers: n, classes: classes, descriptionsJSON: descriptionsJSON)
            all.append(f)
            let stages = f.stageSeconds.map { "\($0.0) \(String(format: "%.1f", $0.1))" }.joined(separator: ", ")
            print(String(format: "%d worker(s): %.1f s wall-clock; stages (s): %@", n, f.wall, stages))
            print(String(format: "    tune: %d steps, units here %d, by helpers %d; owner: units %.1f s (strong views %.1f s), database %.2f s, waiting %.1f s, optimizer steps %.2f s",
                         Int(f.number("steps_this_attempt")), Int(f.number("units_here")), Int(f.number("units_helped")),
                         f.number("unit_seconds"), f.number("unit_view_seconds"), f.number("coordination_seconds"), f.number("wait_seconds"),
                         f.number("step_seconds")))
            let here = max(1, f.number("units_here"))
            print(String(format: "    per unit on the owner: %.1f ms, of which strong views (decode + augment) %.1f ms and gradient %.1f ms; %d of %d views computed ahead",
                         1000 * f.number("unit_seconds") / here, 1000 * f.number("unit_view_seconds") / here,
                         1000 * (f.number("unit_seconds") - f.number("unit_view_seconds")) / here,
                         Int(f.number("views_computed_ahead")), Int(f.number("views"))))
        }
        guard let one = all.first(where: { $0.workers == 1 }) ?? all.first else { return }
        // The serial part S: what no helper shares — discover, describe, pseudo-labels, and the owner's
        // optimizer steps and reductions (sum in unit order + AdamW). The per-image stages (encode,
        // label) divide among workers only where their shards are spread; both predictions are printed.
        // c: the owner's database time per step with the most workers (publishing, claims, writes,
        // reading results; waiting for helpers is not counted).
        let steps = max(1, one.number("steps_this_attempt"))
        let most = all.max { $0.workers < $1.workers }!
        let perStep = most.number("coordination_seconds") / max(1, most.number("steps_this_attempt"))
        let serial = one.stage("discover") + one.stage("validate") + one.stage("describe") + one.stage("pseudolabel") + one.number("step_seconds")
        let perImage = one.stage("encode") + one.stage("label")
        let rest = max(0, one.wall - serial - perImage - one.number("coordination_seconds"))
        print(String(format: "serial part S: %.2f s (discover %.2f, describe %.2f, pseudo-labels %.2f, optimizer steps and reductions %.2f); encode + label %.2f s",
                     serial, one.stage("discover"), one.stage("describe"), one.stage("pseudolabel"), one.number("step_seconds"), perImage))
        print(String(format: "coordination overhead per optimizer step c: %.1f ms (owner's database time with %d workers over %d steps)",
                     1000 * perStep, most.workers, Int(most.number("steps_this_attempt"))))
        for f in all where f.workers > 1 {
            print(String(format: "speed-up with %d workers: %.2f× (goal for 2: ≥ 1.8×)", f.workers, one.wall / max(1e-9, f.wall)))
        }
        for n in [8, 32] {
            let sharded = one.wall / (serial + (rest + perImage) / Double(n) + steps * perStep)
            let unsharded = one.wall / (serial + perImage + rest / Double(n) + steps * perStep)
            print(String(format: "expected speed-up at %d workers: %.1f× with encode/label sharded, %.1f× without (T1 %.1f s, S %.2f s, P %.1f s + encode/label %.1f s, %d steps, c %.1f ms)",
                         n, sharded, unsharded, one.wall, serial, rest, perImage, Int(steps), 1000 * perStep))
        }
    }

    func runJob(server: BenchCluster, workers n: Int, classes: [String], descriptionsJSON: String?) throws -> Figures {
        let dbname = "bench_scale_\(n)"
        let admin = try PostgresConnection(conninfo: server.conninfo("postgres"))
        try admin.query("DROP DATABASE IF EXISTS \(dbname)")
        try admin.query("CREATE DATABASE \(dbname)")
        admin.close()
        let conninfo = server.conninfo(dbname)
        let db = try PostgresConnection(conninfo: conninfo)
        defer { db.close() }
        guard let migrations = Migrator.findDirectory() else { throw ValidationError("no migrations folder found") }
        try Migrator.migrate(db, migrations: try Migrator.load(from: migrations))
        var daemons: [Process] = []
        defer {
            for d in daemons where d.isRunning { kill(d.processIdentifier, SIGTERM) }
            for d in daemons { d.waitUntilExit() }
        }
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        let root = URL(fileURLWithPath: collection).deletingLastPathComponent().path
        for w in 0..<n {
            let p = Process()
            p.executableURL = exe
            p.arguments = ["serve"]
            var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("NOLAD_") && $0.key != "NOTIFY_SOCKET" }
            env["NOLAD_DATABASE"] = conninfo
            env["NOLAD_COLLECTION_ROOTS"] = root
            env["NOLAD_WORKER_NAME"] = "bench-\(n)-\(w)"
            env["NOLAD_PIPELINE"] = "nola"
            env["NOLAD_MODEL_ROOT"] = models
            env["NOLAD_CLIP_MODEL"] = clipModel
            env["NOLAD_DINO_MODEL"] = dinoModel
            env["NOLAD_THREADS"] = String(threads)
            env["NOLAD_CONCURRENCY"] = "1"
            env["NOLAD_POLL_SECONDS"] = "0.5"
            env["NOLAD_LOG_LEVEL"] = "info"
            p.environment = env
            let log = server.folder + "/nolad-\(n)-\(w).log"
            FileManager.default.createFile(atPath: log, contents: nil)
            p.standardOutput = FileHandle(forWritingAtPath: log)
            p.standardError = FileHandle(forWritingAtPath: log)
            try p.run()
            daemons.append(p)
        }
        // Every worker ready (registered in nola.workers) before the job is submitted.
        let deadline = Date().addingTimeInterval(120)
        while try db.query("SELECT count(*) AS n FROM nola.workers WHERE stopped_at IS NULL")[0].int("n") < n {
            if Date() > deadline || daemons.contains(where: { !$0.isRunning }) {
                throw ValidationError("the worker processes did not start; logs in \(server.folder)")
            }
            Thread.sleep(forTimeInterval: 0.1)
        }
        Thread.sleep(forTimeInterval: 1)
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, descriptions) VALUES ($1, $2, $3::jsonb, $4::jsonb) RETURNING id
            """, [collection, classes, parameters, descriptionsJSON])
        let id = try rows[0].int("id")
        while true {
            let state = try db.query("SELECT state::text AS s, coalesce(error, '') AS e FROM nola.jobs WHERE id = $1", [id])[0]
            let s = try state.string("s")
            if s == "succeeded" { break }
            if s == "failed" || s == "cancelled" { throw ValidationError("job \(id) \(s): \(try state.string("e"))") }
            if daemons.allSatisfy({ !$0.isRunning }) { throw ValidationError("every worker exited; logs in \(server.folder)") }
            Thread.sleep(forTimeInterval: 0.2)
        }
        var f = Figures()
        f.workers = n
        f.wall = try db.query("SELECT extract(epoch FROM finished_at - started_at)::float8 AS s FROM nola.jobs WHERE id = $1", [id])[0].double("s")
        for row in try db.query("""
            SELECT stage, metrics::text AS m FROM nola.events WHERE job_id = $1 AND kind = 'metrics' AND stage IS NOT NULL ORDER BY id
            """, [id]).rows {
            let metrics = (try JSONSerialization.jsonObject(with: Data(try row.string("m").utf8)) as? [String: Any]) ?? [:]
            let stage = try row.string("stage")
            f.stageSeconds.append((stage, (metrics["seconds"] as? NSNumber)?.doubleValue ?? 0))
            if stage == "tune" { f.tune = metrics }
        }
        return f
    }
}

/// A throw-away PostgreSQL cluster (initdb + pg_ctl, as the `postgres` user when run as root).
final class BenchCluster {
    let binDir: String
    let folder: String
    let port = Int.random(in: 20000...60000)

    init(binDir: String) throws {
        self.binDir = binDir
        for tool in ["initdb", "pg_ctl", "postgres"] where !FileManager.default.isExecutableFile(atPath: binDir + "/" + tool) {
            throw ValidationError("PostgreSQL server binary \(binDir)/\(tool) is missing (install postgresql-15, or give --pg-bin)")
        }
        var template = Array("/tmp/nolad-bench-scale-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw ValidationError("cannot create a temporary folder") }
        folder = String(cString: made)
        if getuid() == 0 {
            guard let pw = getpwnam("postgres") else { throw ValidationError("running as root but there is no `postgres` user to run the server as") }
            chown(folder, pw.pointee.pw_uid, pw.pointee.pw_gid)
            chmod(folder, 0o755)
        }
        try tool("initdb", ["-D", folder + "/data", "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
        try tool("pg_ctl", ["-D", folder + "/data", "-l", folder + "/server.log", "-w", "-t", "60",
                            "-o", "-k \(folder) -c listen_addresses='' -p \(port) -c fsync=off -c synchronous_commit=off -c max_connections=100",
                            "start"])
    }

    func conninfo(_ dbname: String) -> String { "host=\(folder) port=\(port) user=postgres dbname=\(dbname)" }

    /// Runs a server binary to completion. posix_spawn + waitpid with the output in a file: the server
    /// `pg_ctl start` leaves running inherits the child's descriptors, and Foundation's Process then
    /// never sees the child end.
    func tool(_ name: String, _ args: [String]) throws {
        let path = getuid() == 0 ? "/usr/sbin/runuser" : binDir + "/" + name
        let arguments = getuid() == 0 ? ["-u", "postgres", "--", binDir + "/" + name] + args : args
        let outPath = NSTemporaryDirectory() + "/nolad-bench-scale-\(getpid())-\(name).out"
        defer { try? FileManager.default.removeItem(atPath: outPath) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        let env: [UnsafeMutablePointer<CChar>?] = ProcessInfo.processInfo.environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in argv + env { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, argv, env)
        guard rc == 0 else { throw ValidationError("cannot start \(path): \(String(cString: strerror(rc)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let text = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
        guard status == 0 else { throw ValidationError("\(name) failed (status \(status)): \(text)") }
    }

    func stop() {
        try? tool("pg_ctl", ["-D", folder + "/data", "-m", "immediate", "-w", "stop"])
        try? FileManager.default.removeItem(atPath: folder)
    }
}
