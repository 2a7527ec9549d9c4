import Foundation
import Models
import Queue
import XCTest

/// One job shared by several real `nolad serve` processes through shards (docs/scale-out.md): the same
/// labels and prompts byte for byte whether one daemon runs it or several share it, also when a helper is
/// killed with `kill -9` mid-stage, when PostgreSQL restarts mid-job, and with two jobs and three daemons.
/// Shards of 8 images (the fixture collection has 19, 18 readable) and a pause per image
/// (`image_delay_seconds`) so that each stage has several shards that take long enough to be shared.
final class ShardJobTests: DatabaseTestCase {
    static let classes = ["red ball", "green leaf", "blue sky"]
    static let parameters = #"{"prompt_epochs": 2, "prompt_batch_size": 6, "alignment_epochs": 2, "min_k": 2}"#
    /// Logged when a worker decodes a job's tuned parameters for its label shards.
    static let decodeLine = "label shards: decoding the job's tuned parameters"

    func copyCollection(_ name: String = "shapes") throws -> String {
        let path = root + "/" + name
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: path)
        return path
    }

    func startShardDaemon(_ name: String, delay: Double = 0.1, extra: [String: String] = [:]) throws -> DaemonProcess {
        var settings = ["pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
                        "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "1", "checkpoint_seconds": "0.5",
                        "shard_size": "8", "image_delay_seconds": "\(delay)"]
        for (k, v) in extra { settings[k] = v }
        return try startDaemon(name, settings: settings)
    }

    func submitJob(_ collection: String) throws -> Int64 {
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, max_attempts) VALUES ($1, $2, $3::jsonb, 3) RETURNING id
            """, [collection, Self.classes, Self.parameters])
        return Int64(try rows[0].int("id"))
    }

    /// Every label row of the job, all columns but job_id, as JSON text in path order.
    func labelRows(_ id: Int64) throws -> [String] {
        // The collection folder (in an unreadable image's reason) differs between the jobs.
        try db.query("""
            SELECT replace((to_jsonb(l) - 'job_id')::text, j.collection, '<collection>') AS r
            FROM nola.labels l JOIN nola.jobs j ON j.id = l.job_id WHERE l.job_id = $1 ORDER BY l.path
            """, [id])
            .rows.map { try $0.string("r") }
    }

    /// The tuned tensors of the job's prompts blob, by name, as bit patterns (the blob's metadata names the job).
    func promptTensors(_ id: Int64) throws -> [String: [UInt32]] {
        let row = try db.query("SELECT safetensors, shapes::text AS shapes FROM nola.prompts WHERE job_id = $1", [id])[0]
        let path = NSTemporaryDirectory() + "nolad-shard-test-\(UUID().uuidString).safetensors"
        FileManager.default.createFile(atPath: path, contents: Data(try row.bytes("safetensors")))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let file = try SafeTensorsFile(path: path)
        let names = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(try row.string("shapes").utf8)) as? [String: Any]).keys
        var out: [String: [UInt32]] = [:]
        for name in names { out[name] = try file.floats(name).map(\.bitPattern) }
        return out
    }

    /// Runs the job on one daemon alone (feature cache empty) and returns its labels and prompts.
    func reference() throws -> (labels: [String], prompts: [String: [UInt32]]) {
        let solo = try startShardDaemon("solo", delay: 0)
        let id = try submitJob(try copyCollection("reference"))
        try waitSucceeded(id, timeout: 180)
        solo.signal(SIGTERM)
        XCTAssertEqual(solo.waitExit(timeout: 20), 0)
        let labels = try labelRows(id)
        XCTAssertEqual(labels.count, 19)
        let workers = try shardWorkers(id)
        XCTAssertEqual(workers["encode"]?.count, 1)
        // Its three label shards decoded the tuned blob once (kept for the later shards).
        XCTAssertEqual(try db.query("SELECT 1 FROM nola.shards WHERE job_id = $1 AND stage = 'label'", [id]).count, 3)
        XCTAssertEqual(solo.log.components(separatedBy: Self.decodeLine).count - 1, 1, solo.log)
        let result = (labels, try promptTensors(id))
        try db.query("DELETE FROM nola.feature_cache")
        return result
    }

    /// Workers that completed the job's shards, per stage.
    func shardWorkers(_ id: Int64) throws -> [String: Set<String>] {
        var out: [String: Set<String>] = [:]
        for r in try db.query("SELECT stage, worker FROM nola.shards WHERE job_id = $1 AND state = 'done'", [id]).rows {
            out[try r.string("stage"), default: []].insert(try r.string("worker"))
        }
        return out
    }

    /// Every shard of the job is done exactly once (a redone shard is completed by one claim only), and
    /// the label stage's shards cover every readable image once.
    func assertNoLostOrDoubledShard(_ id: Int64, file: StaticString = #filePath, line: UInt = #line) throws {
        let rows = try db.query("""
            SELECT s.stage, count(*)::int AS n, (count(*) FILTER (WHERE s.state = 'done'))::int AS done,
                   sum(cardinality(s.paths))::int AS images,
                   (SELECT count(DISTINCT p)::int FROM nola.shards x, unnest(x.paths) AS p
                    WHERE x.job_id = s.job_id AND x.stage = s.stage) AS distinct_images
            FROM nola.shards s WHERE s.job_id = $1 GROUP BY s.job_id, s.stage ORDER BY s.stage
            """, [id])
        var seen: [String: (Int, Int, Int)] = [:]
        for r in rows.rows {
            XCTAssertEqual(try r.int("done"), try r.int("n"), "every shard done", file: file, line: line)
            seen[try r.string("stage")] = (try r.int("n"), try r.int("images"), try r.int("distinct_images"))
        }
        XCTAssertEqual(seen["encode"]?.1, 19, "encode shards cover every image", file: file, line: line)
        XCTAssertEqual(seen["encode"]?.2, 19, "each image in one encode shard", file: file, line: line)
        XCTAssertEqual(seen["label"]?.1, 18, "label shards cover every readable image", file: file, line: line)
        XCTAssertEqual(seen["label"]?.2, 18, file: file, line: line)
        let labelled = try db.query("SELECT count(*)::int AS n, count(DISTINCT path)::int AS d FROM nola.labels WHERE job_id = $1", [id])[0]
        XCTAssertEqual(try labelled.int("n"), 19, file: file, line: line)
        XCTAssertEqual(try labelled.int("d"), 19, file: file, line: line)
    }

    /// Waits until a daemon other than the job's owner holds one of its shards; returns that daemon's name.
    func waitForHelperHoldingAShard(_ id: Int64, among names: [String], timeout: Double = 120) throws -> String {
        var holder = ""
        try waitUntil("a helper holds a shard of job \(id)", timeout: timeout, poll: 0.02) {
            let rows = try db.query("""
                SELECT s.worker FROM nola.shards s JOIN nola.jobs j ON j.id = s.job_id
                WHERE s.job_id = $1 AND s.state = 'running' AND s.worker <> j.worker
                """, [id])
            guard let w = try rows.rows.first?.string("worker") else { return false }
            holder = names.first { w.hasPrefix($0 + "-") } ?? ""
            return !holder.isEmpty
        }
        return holder
    }

    func testSameJob_byOneDaemonAndByTwo_givesByteEqualLabelsAndPrompts() throws {
        let ref = try reference()
        let a = try startShardDaemon("shard-a")
        let b = try startShardDaemon("shard-b")
        let id = try submitJob(try copyCollection())
        try waitSucceeded(id, timeout: 240)
        for d in [a, b] {
            XCTAssertLessThanOrEqual(d.log.components(separatedBy: Self.decodeLine).count - 1, 1, "\(d.name) decodes the tuned blob at most once")
        }
        XCTAssertEqual(try labelRows(id), ref.labels, "labels, confidences and signals byte-equal to one daemon's")
        XCTAssertEqual(try promptTensors(id), ref.prompts, "prompts blob tensors bit-equal to one daemon's")
        try assertNoLostOrDoubledShard(id)
        let workers = try shardWorkers(id)
        print("shard test: shards done by \(workers)")
        XCTAssertEqual(workers.values.reduce(Set<String>()) { $0.union($1) }.count, 2, "both daemons computed shards: \(workers)")
        let metrics = try XCTUnwrap(try events(id, kind: "metrics").first { $0.stage == "encode" }?.metrics)
        XCTAssertEqual(metrics["shards"] as? Int, 3)
        let leftOver = try db.query("""
            SELECT (SELECT count(*) FROM nola.shards WHERE job_id = $1 AND result IS NOT NULL)::int
                 + (SELECT count(*) FROM nola.shard_inputs WHERE job_id = $1 AND blob IS NOT NULL)::int AS n
            """, [id])[0]
        XCTAssertEqual(try leftOver.int("n"), 0, "the probabilities and the tuned blob are dropped once the labels are written")
        XCTAssertNotNil(metrics["shards_by_worker"] as? [String: Any])
    }

    func testHelperKilledMidStage_theOwnerRedoesItsShard_andTheLabelsStayEqual() throws {
        let ref = try reference()
        let a = try startShardDaemon("shard-a", delay: 0.3)
        let id = try submitJob(try copyCollection())
        try waitUntil("job \(id) runs on shard-a", timeout: 60) { (try job(id).optionalString("worker") ?? "").hasPrefix("shard-a-") }
        let b = try startShardDaemon("shard-b", delay: 0.3)
        XCTAssertEqual(try waitForHelperHoldingAShard(id, among: ["shard-b"]), "shard-b")
        b.signal(SIGKILL)
        _ = b.waitExit(timeout: 10)
        try waitSucceeded(id, timeout: 240)
        XCTAssertEqual(try labelRows(id), ref.labels)
        XCTAssertEqual(try promptTensors(id), ref.prompts)
        try assertNoLostOrDoubledShard(id)
        let redone = try db.query("SELECT count(*)::int AS n FROM nola.shards WHERE job_id = $1 AND claims > 1", [id])[0]
        XCTAssertGreaterThanOrEqual(try redone.int("n"), 1, "the killed helper's shard was claimed again after its lease expired")
        XCTAssertTrue(a.log.contains("stage started"), a.log)
    }

    func testPostgresRestartMidJob_bothDaemonsCarryOn_andTheLabelsStayEqual() throws {
        let ref = try reference()
        _ = try startShardDaemon("shard-a", delay: 0.2)
        _ = try startShardDaemon("shard-b", delay: 0.2)
        let id = try submitJob(try copyCollection())
        _ = try waitForHelperHoldingAShard(id, among: ["shard-a", "shard-b"])
        db.close()
        try cluster.restart()
        db = try PostgresConnection(conninfo: conninfo)
        try waitSucceeded(id, timeout: 240)
        XCTAssertEqual(try labelRows(id), ref.labels)
        XCTAssertEqual(try promptTensors(id), ref.prompts)
        try assertNoLostOrDoubledShard(id)
    }

    func testTwoJobsAndThreeDaemons_bothFinish_withNoLostOrDoubledShard() throws {
        let ref = try reference()
        for name in ["shard-a", "shard-b", "shard-c"] { _ = try startShardDaemon(name, delay: 0.1) }
        let first = try submitJob(try copyCollection("one"))
        let second = try submitJob(try copyCollection("two"))
        try waitSucceeded(first, timeout: 300)
        try waitSucceeded(second, timeout: 300)
        for id in [first, second] {
            XCTAssertEqual(try labelRows(id), ref.labels, "job \(id)")
            try assertNoLostOrDoubledShard(id)
        }
        let all = try db.query("SELECT count(DISTINCT worker)::int AS n FROM nola.shards WHERE job_id = ANY ($1::bigint[])",
                               [[String(first), String(second)]])[0]
        XCTAssertEqual(try all.int("n"), 3, "the third daemon, owning no job, helped")
    }

    func testLabels_doNotDependOnTheShardSize() throws {
        let ref = try reference()
        _ = try startShardDaemon("shard-a", delay: 0, extra: ["shard_size": "3"])
        let id = try submitJob(try copyCollection())
        try waitSucceeded(id, timeout: 180)
        let counts = try db.query("SELECT stage, count(*)::int AS n FROM nola.shards WHERE job_id = $1 GROUP BY stage ORDER BY stage", [id])
        XCTAssertEqual(try counts.rows.map { "\(try $0.string("stage")) \(try $0.int("n"))" }, ["encode 3", "label 3"],
                       "shard_size 3 is rounded up to 8: 19 and 18 images make three shards each")
        XCTAssertEqual(try labelRows(id), ref.labels)
        XCTAssertEqual(try promptTensors(id), ref.prompts)
        try db.query("DELETE FROM nola.feature_cache")
        _ = try startShardDaemon("shard-b", delay: 0, extra: ["shard_size": "64"])
        daemons.first { $0.name == "shard-a" }?.signal(SIGTERM)
        _ = daemons.first { $0.name == "shard-a" }?.waitExit(timeout: 20)
        let one = try submitJob(try copyCollection("one-shard"))
        try waitSucceeded(one, timeout: 180)
        XCTAssertEqual(try db.query("SELECT count(*)::int AS n FROM nola.shards WHERE job_id = $1", [one])[0].int("n"), 2, "one shard per stage")
        XCTAssertEqual(try labelRows(one), ref.labels)
        XCTAssertEqual(try promptTensors(one), ref.prompts)
    }

    func testHelperThatCannotSeeTheCollection_givesTheShardBackWithTheReason_andTheOwnerFinishes() throws {
        let ref = try reference()
        // The encode stage must outlast shard-b's start: a helper that first meets the job in its tune stage
        // refuses a tuning unit instead (its reason goes to nola.tuning_workers) and then leaves the job
        // alone, so no shard would carry the reason. 1 s per image makes the owner's first shard of 8 take 8 s.
        _ = try startShardDaemon("shard-a", delay: 1.0)
        let id = try submitJob(try copyCollection())
        try waitUntil("job \(id) runs on shard-a", timeout: 60) { (try job(id).optionalString("worker") ?? "").hasPrefix("shard-a-") }
        var other = Array("/tmp/nolad-other-root-XXXXXX".utf8CString)
        let otherRoot = String(cString: mkdtemp(&other)!)
        defer { try? FileManager.default.removeItem(atPath: otherRoot) }
        let b = try startShardDaemon("shard-b", delay: 0.3, extra: ["collection_roots": otherRoot])
        // The helper logs before it writes the shard back: wait for the row, not for the log line.
        try waitUntil("shard-b gave a shard back with its reason", timeout: 60) {
            try !db.query("SELECT 1 FROM nola.shards WHERE job_id = $1 AND error IS NOT NULL", [id]).rows.isEmpty
        }
        XCTAssertTrue(b.log.contains("helping: unit given back"), b.log)
        let reason = try db.query("SELECT error FROM nola.shards WHERE job_id = $1 AND error IS NOT NULL", [id])
        XCTAssertEqual(reason.count, 1, "one refusal: the job is then left alone")
        let error = try XCTUnwrap(reason.rows.first, "the refused shard's reason").string("error")
        XCTAssertTrue(error.contains("outside the configured collection roots"), error)
        try waitSucceeded(id, timeout: 240)
        XCTAssertEqual(try shardWorkers(id).values.reduce(Set<String>()) { $0.union($1) }.count, 1, "only the owner computed shards")
        XCTAssertEqual(try labelRows(id), ref.labels)
        XCTAssertEqual(try job(id).optionalString("error"), nil)
    }

    func testCancel_reachesTheHelper_whichGivesItsShardBack() throws {
        _ = try startShardDaemon("shard-a", delay: 0.5)
        let id = try submitJob(try copyCollection())
        try waitUntil("job \(id) runs on shard-a", timeout: 60) { (try job(id).optionalString("worker") ?? "").hasPrefix("shard-a-") }
        let b = try startShardDaemon("shard-b", delay: 0.5)
        _ = try waitForHelperHoldingAShard(id, among: ["shard-b"])
        try db.query("SELECT nola.cancel($1)", [id])
        _ = try waitState(id, ["cancelled"], timeout: 30)
        // The helper logs before it writes the shard back: wait for both.
        try waitUntil("the helper gave its shard back", timeout: 30) {
            let held = try db.query("SELECT count(*)::int AS n FROM nola.shards WHERE job_id = $1 AND state = 'running' AND worker LIKE 'shard-b-%'", [id])[0]
            return try b.log.contains("helping: unit given back") && held.int("n") == 0
        }
        XCTAssertTrue(b.log.contains("cancelled or no longer needs it"), b.log)
    }

    func testSigtermOnAHelper_givesItsShardBackAtOnce_andTheJobFinishes() throws {
        let ref = try reference()
        _ = try startShardDaemon("shard-a", delay: 0.3)
        let id = try submitJob(try copyCollection())
        try waitUntil("job \(id) runs on shard-a", timeout: 60) { (try job(id).optionalString("worker") ?? "").hasPrefix("shard-a-") }
        let b = try startShardDaemon("shard-b", delay: 0.3)
        _ = try waitForHelperHoldingAShard(id, among: ["shard-b"])
        b.signal(SIGTERM)
        XCTAssertEqual(b.waitExit(timeout: 15), 0, "the helper exits cleanly")
        XCTAssertTrue(b.log.contains("helping: unit given back"), b.log)
        let held = try db.query("SELECT count(*)::int AS n FROM nola.shards WHERE job_id = $1 AND state = 'running' AND worker LIKE 'shard-b-%'", [id])[0]
        XCTAssertEqual(try held.int("n"), 0, "no shard left under the stopped helper's lease")
        try waitSucceeded(id, timeout: 240)
        XCTAssertEqual(try labelRows(id), ref.labels)
        try assertNoLostOrDoubledShard(id)
    }

    func testOwnerKilledMidLabelStage_theJobResumes_andDoneShardsAreNotRedone() throws {
        let ref = try reference()
        let a = try startShardDaemon("shard-a", delay: 0.3)
        let id = try submitJob(try copyCollection())
        try waitUntil("a label shard of job \(id) is done", timeout: 180, poll: 0.02) {
            try !db.query("SELECT 1 FROM nola.shards WHERE job_id = $1 AND stage = 'label' AND state = 'done'", [id]).isEmpty
        }
        a.signal(SIGKILL)
        _ = a.waitExit(timeout: 10)
        let before = try db.query("""
            SELECT stage, index, worker, claims, finished_at::text AS f FROM nola.shards WHERE job_id = $1 AND state = 'done' ORDER BY stage, index
            """, [id]).rows.map { "\(try $0.string("stage")) \(try $0.int("index")) \(try $0.string("worker")) \(try $0.int("claims")) \(try $0.string("f"))" }
        XCTAssertGreaterThanOrEqual(before.count, 4, "the encode shards and at least one label shard were done")
        _ = try startShardDaemon("shard-b", delay: 0.3)
        try waitSucceeded(id, timeout: 240)
        XCTAssertEqual(try job(id).int("attempt"), 2)
        let after = try db.query("""
            SELECT stage, index, worker, claims, finished_at::text AS f FROM nola.shards WHERE job_id = $1 AND state = 'done' ORDER BY stage, index
            """, [id]).rows.map { "\(try $0.string("stage")) \(try $0.int("index")) \(try $0.string("worker")) \(try $0.int("claims")) \(try $0.string("f"))" }
        for row in before { XCTAssertTrue(after.contains(row), "done shard kept as it was: \(row)") }
        XCTAssertEqual(try labelRows(id), ref.labels)
        XCTAssertEqual(try promptTensors(id), ref.prompts)
        try assertNoLostOrDoubledShard(id)
    }
}
