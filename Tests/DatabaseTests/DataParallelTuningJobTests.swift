import Foundation
import Queue
import XCTest

/// Data-parallel prompt tuning with real `nolad serve` processes: the same job tuned by one daemon and
/// by two (one owning it, the other computing units of its steps) gives the same prompts blob (tensor
/// bytes; the metadata differs only by the job id) and the same labels, also when the helper is killed
/// with `kill -9` mid-tuning and when PostgreSQL restarts mid-job.
final class DataParallelTuningJobTests: DatabaseTestCase {
    /// 18 readable images, logical batch 6 cut into units of 2: 3 steps of 3 units per epoch.
    static func parameters(epochs: Int) -> String {
        #"{"prompt_epochs": \#(epochs), "prompt_batch_size": 6, "prompt_micro_batch_size": 2, "alignment_epochs": 2, "min_k": 2}"#
    }
    static let settings = ["lease_seconds": "3", "heartbeat_seconds": "0.5", "concurrency": "1", "threads": "1"]

    func copyCollection() throws -> String {
        let path = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: path)
        return path
    }

    func startPipelineDaemon(_ name: String, extra: [String: String] = [:]) throws -> DaemonProcess {
        var settings = ["pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
                        "clip_model": "tiny-clip", "dino_model": "tiny-dino", "checkpoint_seconds": "0.5"]
        for (k, v) in extra { settings[k] = v }
        return try startDaemon(name, settings: settings)
    }

    func submit(_ collection: String, parameters: String) throws -> Int64 {
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, max_attempts) VALUES ($1, $2, $3::jsonb, 3) RETURNING id
            """, [collection, PipelineTests.classes, parameters])
        return Int64(try rows[0].int("id"))
    }

    /// The prompts blob split into its tensor bytes and its header with the job id left out.
    func prompts(_ id: Int64) throws -> (header: NSDictionary, data: [UInt8]) {
        let blob = try db.query("SELECT safetensors FROM nola.prompts WHERE job_id = $1", [id])[0].bytes("safetensors")
        let n = Int(blob[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
        var header = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(blob[8..<(8 + n)])) as? [String: Any])
        var metadata = header["__metadata__"] as? [String: Any] ?? [:]
        XCTAssertEqual(metadata["job_id"] as? String, String(id))
        metadata["job_id"] = nil
        header["__metadata__"] = metadata
        return (header as NSDictionary, Array(blob[(8 + n)...]))
    }

    func labels(_ id: Int64) throws -> [String] {
        try db.query("""
            SELECT path || ' ' || coalesce(label, '-') || ' ' || coalesce(confidence::text, '-') || ' ' || coalesce(top_probabilities::text, '-')
                || ' ' || coalesce(margin::text, '-') || ' ' || coalesce(teacher_label, '-') AS r
            FROM nola.labels WHERE job_id = $1 ORDER BY path
            """, [id]).rows.map { try $0.string("r") }
    }

    func assertSameResult(_ a: Int64, _ b: Int64, file: StaticString = #filePath, line: UInt = #line) throws {
        let pa = try prompts(a), pb = try prompts(b)
        XCTAssertEqual(pa.data.count, pb.data.count, file: file, line: line)
        XCTAssertTrue(pa.data == pb.data, "prompts, LayerNorms and head are bit-identical", file: file, line: line)
        XCTAssertEqual(pa.header, pb.header, file: file, line: line)
        let la = try labels(a), lb = try labels(b)
        XCTAssertEqual(la.count, 19, file: file, line: line)
        XCTAssertEqual(la, lb, file: file, line: line)
    }

    /// The tune stage's metrics event of the job's last attempt.
    func tuneMetrics(_ id: Int64) throws -> [String: Any] {
        try XCTUnwrap(try events(id, kind: "metrics").last { $0.stage == "tune" }?.metrics)
    }

    func workerID(_ d: DaemonProcess) throws -> String {
        try db.query("SELECT id FROM nola.workers WHERE pid = $1 AND stopped_at IS NULL", [Int(d.pid)])[0].string("id")
    }

    /// One daemon alone: the reference result.
    func alone(_ collection: String, epochs: Int) throws -> Int64 {
        let a = try startPipelineDaemon("alone", extra: Self.settings)
        let id = try submit(collection, parameters: Self.parameters(epochs: epochs))
        try waitSucceeded(id, timeout: 300)
        let m = try tuneMetrics(id)
        XCTAssertEqual(m["units_helped"] as? Int, 0)
        XCTAssertEqual(m["units_here"] as? Int, epochs * 3 * 3)
        let views = (m["unit_view_seconds"] as? NSNumber)?.doubleValue ?? -1, units = (m["unit_seconds"] as? NSNumber)?.doubleValue ?? -1
        XCTAssertTrue(views > 0 && views <= units, "the strong views' part of the units' seconds: \(views) of \(units)")
        a.signal(SIGTERM)
        XCTAssertEqual(a.waitExit(timeout: 20), 0)
        return id
    }

    /// Also: while the job tunes, nola.job_status shows both workers with their rates and the current
    /// step's units, nola.workers shows the helper helping the job, and the helper's Prometheus metrics
    /// count its tuning units (as many as the owner read from it).
    func testTwoDaemons_giveTheSamePromptsAndLabelsAsOne() throws {
        let collection = try copyCollection()
        let reference = try alone(collection, epochs: 12)
        let ports = [try freeLoopbackPort(), try freeLoopbackPort()]
        let one = try startPipelineDaemon("one", extra: Self.settings.merging(["metrics_listen": "127.0.0.1:\(ports[0])"]) { $1 })
        let two = try startPipelineDaemon("two", extra: Self.settings.merging(["metrics_listen": "127.0.0.1:\(ports[1])"]) { $1 })
        let id = try submit(collection, parameters: Self.parameters(epochs: 12))

        // Status during tuning: both workers contributing, each with units done and a rate; and the
        // workers whose nola.workers.helping_jobs showed the job at some heartbeat.
        var status: [String: Any] = [:]
        var seenHelping: Set<String> = []
        try waitUntil("job_status shows two workers contributing to the tuning, and nola.workers a helper", timeout: 240, poll: 0.02) {
            for w in try db.query("SELECT id FROM nola.workers WHERE stopped_at IS NULL AND $1 = ANY (helping_jobs)", [id]).rows {
                seenHelping.insert(try w.string("id"))
            }
            let r = try db.query("""
                SELECT stage, state, workers_contributing::int AS n, worker_rates::text AS rates, tuning_step, tuning_units_done::int AS done,
                       tuning_units_total::int AS total FROM nola.job_status WHERE id = $1
                """, [id])[0]
            if try !["queued", "running"].contains(r.string("state")) {
                XCTFail("the job ended before job_status and nola.workers showed its helper (status \(status), helping \(seenHelping))")
                return true
            }
            if status.isEmpty, try r.optionalString("stage") == "tune", try r.int("n") == 2 {
                let rates = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(try r.string("rates").utf8)) as? [String: [String: Any]])
                if rates.values.allSatisfy({ ($0["units_done"] as? Int ?? 0) > 0 }) {
                    status = ["rates": rates, "step": try r.int("tuning_step"), "done": try r.int("done"), "total": try r.int("total")]
                }
            }
            return !status.isEmpty && !seenHelping.isEmpty
        }
        print("data-parallel test: job_status during tuning \(status); workers showing the job in helping_jobs \(seenHelping)")
        let rates = try XCTUnwrap(status["rates"] as? [String: [String: Any]])
        XCTAssertEqual(Set(rates.keys), Set([try workerID(one), try workerID(two)]))
        for (worker, rate) in rates {
            XCTAssertEqual(rate["views"] as? Int, 2 * (rate["units_done"] as? Int ?? -1), "units of 2 images: \(worker) \(rate)")
            XCTAssertGreaterThan((rate["units_per_second"] as? NSNumber)?.doubleValue ?? 0, 0, "\(worker) \(rate)")
            XCTAssertGreaterThan((rate["views_per_second"] as? NSNumber)?.doubleValue ?? 0, 0, "\(worker) \(rate)")
            XCTAssertNotNil(rate["running"] as? Int)
        }
        XCTAssertEqual(status["total"] as? Int, 3, "3 units per step")
        XCTAssertLessThanOrEqual(status["done"] as? Int ?? 99, 3)
        XCTAssertGreaterThanOrEqual(status["step"] as? Int ?? 0, 1)

        try waitSucceeded(id, timeout: 300)
        let m = try tuneMetrics(id)
        let helped = m["units_helped"] as? Int ?? 0
        print("data-parallel test: \(helped) of \(12 * 9) units computed by the helper; metrics \(m)")
        XCTAssertGreaterThan(helped, 0, "the idle daemon computed some units")
        XCTAssertEqual((m["units_here"] as? Int ?? 0) + helped, 12 * 9)
        let helpers = try XCTUnwrap(m["helpers"] as? [String])
        XCTAssertEqual(helpers.count, 1)
        try assertSameResult(reference, id)
        XCTAssertEqual(try db.query("SELECT 1 FROM nola.tuning_units WHERE job_id = $1", [id]).count, 0, "rows removed after tuning")
        let owner = try job(id).string("worker")
        let helper = try XCTUnwrap(helpers.first)
        XCTAssertNotEqual(owner, helper)
        XCTAssertEqual(seenHelping, [helper], "the helper, and only it, showed the job in nola.workers.helping_jobs")
        XCTAssertEqual(try db.query("SELECT helping_jobs::text AS h FROM nola.workers WHERE id = $1", [owner])[0].string("h"), "{}")
        let (code, listing) = try runProgram(try noladExecutable(), ["status", "--database", conninfo])
        XCTAssertEqual(code, 0, listing)
        XCTAssertTrue(listing.split(separator: "\n").contains { $0.hasPrefix("worker ") && $0.contains(" jobs ") && $0.contains(" helping") },
                      "`nolad status` lists the workers with the jobs they help: \(listing)")

        // The helper's metrics: its tuning units, all written, are the units the owner read from it.
        let helperPort = try workerID(one) == helper ? ports[0] : ports[1]
        let exposition = try httpGet("http://127.0.0.1:\(helperPort)/metrics").body
        XCTAssertEqual(sample("nolad_help_units_total{kind=\"tune\",outcome=\"done\"}", in: exposition), Double(helped), exposition)
        XCTAssertNotNil(sample("nolad_help_units_running{kind=\"tune\"}", in: exposition), exposition)
        let ownerPort = helperPort == ports[0] ? ports[1] : ports[0]
        XCTAssertNil(sample("nolad_help_units_total{kind=\"tune\",outcome=\"done\"}", in: try httpGet("http://127.0.0.1:\(ownerPort)/metrics").body))
    }

    /// One helping loop: a helper with `concurrency: 1` that helps one job's prompt tuning and another job's
    /// shards never holds a tuning unit and a shard at the same time (both share its one slot), yet helps
    /// with both kinds.
    func testOneSlot_helpsWithTuningAndShards_butNeverBothAtOnce() throws {
        let collection = try copyCollection()
        let second = root + "/shapes-2"
        try FileManager.default.copyItem(atPath: collection, toPath: second)
        let shards = ["shard_size": "8", "image_delay_seconds": "0.05"]
        let a = try startPipelineDaemon("a", extra: Self.settings.merging(shards) { $1 })
        let tuning = try submit(collection, parameters: Self.parameters(epochs: 400))
        try waitUntil("job \(tuning) tunes on a", timeout: 240, poll: 0.02) {
            try db.query("SELECT stage FROM nola.jobs WHERE id = $1", [tuning])[0].optionalString("stage") == "tune"
        }
        XCTAssertEqual(try job(tuning).string("worker"), try workerID(a))
        let b = try startPipelineDaemon("b", extra: Self.settings.merging(shards) { $1 })
        let sharded = try submit(second, parameters: Self.parameters(epochs: 2))
        try waitUntil("job \(sharded) runs on b", timeout: 60, poll: 0.02) { try job(sharded).optionalString("worker") == (try workerID(b)) }
        let c = try startPipelineDaemon("c", extra: Self.settings.merging(shards) { $1 })
        let helper = try workerID(c)
        var sawUnit = false, sawShard = false, both = 0, looks = 0
        try waitUntil("job \(sharded) has finished", timeout: 240, poll: 0.002) {
            let r = try db.query("""
                SELECT (SELECT count(*) FROM nola.shards WHERE state = 'running' AND worker = $1)::int AS shards,
                       (SELECT count(*) FROM nola.tuning_units WHERE state = 'running' AND worker = $1)::int AS units,
                       (SELECT state::text FROM nola.jobs WHERE id = $2) AS state
                """, [helper, sharded])[0]
            let (s, u) = (try r.int("shards"), try r.int("units"))
            looks += 1
            if s > 0 { sawShard = true }
            if u > 0 { sawUnit = true }
            if s + u > 1 { both += 1 }
            return try r.string("state") != "running" && r.string("state") != "queued"
        }
        try db.query("SELECT nola.cancel($1)", [tuning])
        print("data-parallel test: one-slot helper: tuning unit seen \(sawUnit), shard seen \(sawShard), both at once \(both) of \(looks) looks")
        XCTAssertEqual(try job(sharded).string("state"), "succeeded")
        XCTAssertTrue(sawUnit, "the helper computed tuning units")
        XCTAssertTrue(sawShard, "the helper computed shards")
        XCTAssertEqual(both, 0, "never more help units at once than its one slot")
        let sharedShards = try db.query("SELECT count(*)::int AS n FROM nola.shards WHERE job_id = $1 AND worker = $2 AND state = 'done'",
                                        [sharded, helper])[0].int("n")
        XCTAssertGreaterThan(sharedShards, 0)
    }

    func testHelperKilledMidTuning_theOwnerRescuesItsUnit_andTheResultIsTheSame() throws {
        let collection = try copyCollection()
        let epochs = 60
        let reference = try alone(collection, epochs: epochs)
        let one = try startPipelineDaemon("one", extra: Self.settings)
        let two = try startPipelineDaemon("two", extra: Self.settings)
        let id = try submit(collection, parameters: Self.parameters(epochs: epochs))
        // Whichever daemon does not own the job is the helper; kill it while it holds a unit.
        var helper: DaemonProcess?, held: (step: Int, unit: Int, worker: String)?
        try waitUntil("a helper holds a unit after epoch 3", timeout: 240, poll: 0.002) {
            guard try events(id, kind: "epoch").count >= 3 else { return false }
            let owner = try job(id).optionalString("worker")
            let rows = try db.query("SELECT step, unit, worker FROM nola.tuning_units WHERE job_id = $1 AND state = 'running' AND worker <> $2",
                                    [id, owner ?? ""])
            guard let row = rows.rows.first else { return false }
            let w = try row.string("worker")
            helper = try [one, two].first { try workerID($0) == w }
            helper?.signal(SIGKILL)
            held = (try row.int("step"), try row.int("unit"), w)
            return helper != nil
        }
        _ = helper?.waitExit(timeout: 10)
        let h = try XCTUnwrap(held)
        // The unit is still the dead helper's unless it finished it between our look and the kill.
        let orphaned = try !db.query("SELECT 1 FROM nola.tuning_units WHERE job_id = $1 AND step = $2 AND unit = $3 AND state = 'running' AND worker = $4",
                                     [id, h.step, h.unit, h.worker]).isEmpty
        try waitSucceeded(id, timeout: 300)
        XCTAssertEqual(try job(id).int("attempt"), 1, "the owner kept the job")
        let m = try tuneMetrics(id)
        print("data-parallel test: helper killed holding unit \(h.unit) of step \(h.step) (orphaned: \(orphaned)); metrics \(m)")
        XCTAssertLessThan(h.step, epochs * 3, "killed mid-tuning")
        if orphaned { XCTAssertGreaterThanOrEqual(m["units_rescued"] as? Int ?? 0, 1, "the owner took the dead helper's unit over") }
        try assertSameResult(reference, id)
    }

    func testPostgresRestartedMidTuning_theResultIsTheSame() throws {
        let collection = try copyCollection()
        let epochs = 60
        let reference = try alone(collection, epochs: epochs)
        _ = try startPipelineDaemon("one", extra: Self.settings)
        _ = try startPipelineDaemon("two", extra: Self.settings)
        let id = try submit(collection, parameters: Self.parameters(epochs: epochs))
        try waitUntil("prompt tuning passed epoch 2", timeout: 240, poll: 0.01) { try events(id, kind: "epoch").count >= 2 }
        db.close()
        try cluster.restart()
        db = try PostgresConnection(conninfo: conninfo)
        let atRestart = try events(id, kind: "epoch").count
        try waitSucceeded(id, timeout: 300)
        print("data-parallel test: PostgreSQL restarted after \(atRestart) of \(epochs) epochs; tune metrics \(try tuneMetrics(id))")
        XCTAssertLessThan(atRestart, epochs, "the restart came mid-tuning")
        try assertSameResult(reference, id)
    }

    /// Cancel reaches helpers (no claims for a job being cancelled), and a helper stopped with SIGTERM
    /// gives its unit back at once and exits cleanly; the job still finishes with the same result.
    func testCancelAndSigterm_reachHelpers() throws {
        let collection = try copyCollection()
        let epochs = 60
        let reference = try alone(collection, epochs: epochs)
        let one = try startPipelineDaemon("one", extra: Self.settings)
        let two = try startPipelineDaemon("two", extra: Self.settings)
        // SIGTERM to the helper while it holds a unit.
        let id = try submit(collection, parameters: Self.parameters(epochs: epochs))
        var helper: DaemonProcess?
        try waitUntil("a helper holds a unit", timeout: 240, poll: 0.002) {
            let owner = try job(id).optionalString("worker")
            let rows = try db.query("SELECT worker FROM nola.tuning_units WHERE job_id = $1 AND state = 'running' AND worker <> $2",
                                    [id, owner ?? ""])
            guard let w = try rows.rows.first?.string("worker") else { return false }
            helper = try [one, two].first { try workerID($0) == w }
            helper?.signal(SIGTERM)
            return helper != nil
        }
        let h = try XCTUnwrap(helper)
        XCTAssertEqual(h.waitExit(timeout: 20), 0, "the helper exits cleanly after SIGTERM")
        let helperID = h.name
        XCTAssertEqual(try db.query("SELECT 1 FROM nola.tuning_units WHERE job_id = $1 AND state = 'running' AND worker LIKE $2",
                                    [id, helperID + "-%"]).count, 0, "the stopped helper holds no unit")
        try waitSucceeded(id, timeout: 300)
        XCTAssertEqual(try tuneMetrics(id)["units_rescued"] as? Int, 0, "its unit was given back, not left to expire")
        try assertSameResult(reference, id)

        // A cancelled job: the remaining daemon plus a fresh helper; after the cancel no helper claims.
        let three = try startPipelineDaemon("three", extra: Self.settings)
        let cancelled = try submit(collection, parameters: Self.parameters(epochs: 400))
        try waitUntil("tuning has started", timeout: 240, poll: 0.01) { try events(cancelled, kind: "epoch").count >= 1 }
        try db.query("SELECT nola.cancel($1)", [cancelled])
        let row = try waitState(cancelled, ["cancelled", "succeeded", "failed"], timeout: 60)
        XCTAssertEqual(try row.string("state"), "cancelled")
        let claimsAtCancel = try db.query("SELECT coalesce(sum(claims), 0) AS n FROM nola.tuning_units WHERE job_id = $1", [cancelled])[0].int("n")
        Thread.sleep(forTimeInterval: 1)
        XCTAssertEqual(try db.query("SELECT coalesce(sum(claims), 0) AS n FROM nola.tuning_units WHERE job_id = $1", [cancelled])[0].int("n"),
                       claimsAtCancel, "nobody claims units of a cancelled job")
        XCTAssertEqual(try db.query("SELECT 1 FROM nola.tuning_units WHERE job_id = $1 AND state = 'running' AND lease_expires_at > now() + interval '10 seconds'", [cancelled]).count, 0)
        XCTAssertTrue(three.process.isRunning)
    }
}
