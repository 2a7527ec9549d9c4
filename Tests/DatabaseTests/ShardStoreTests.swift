import Foundation
import Queue
import XCTest

/// The shard SQL (ShardStore, migration 0010) against a real PostgreSQL: claims under concurrency, leases,
/// rescue by claiming an expired shard, guarded writes, idempotent preparation, cancel, and nola.job_status.
final class ShardStoreTests: DatabaseTestCase {
    /// A running job in stage `stage`, claimed by "owner", with `images` nola.images rows.
    func runningJob(stage: String = "encode", images: Int = 10) throws -> (JobRef, [String]) {
        let collection = try makeCollection("c\(UUID().uuidString.prefix(6))", images: images)
        let id = try submit(collection)
        let claimed = try XCTUnwrap(try JobStore.claim(db, worker: "owner", leaseSeconds: 60))
        XCTAssertEqual(claimed.ref.id, id)
        let paths = (0..<images).map { "img\(String(format: "%03d", $0)).jpg" }
        for p in paths {
            try db.query("INSERT INTO nola.images (job_id, path, size_bytes, sha256, format) VALUES ($1, $2, 1, $3, 'jpeg')",
                         [id, p, String(repeating: "a", count: 64)])
        }
        XCTAssertTrue(try JobStore.startStage(db, claimed.ref, stage: stage, index: 3, count: 7))
        return (claimed.ref, paths)
    }

    func inputs(_ stage: String, _ shards: [[String]], blob: [UInt8]? = nil) -> ShardInputs {
        ShardInputs(key: ShardStore.key(stage: stage, clipModel: "/m/clip", dinoModel: "/m/dino", modelKeys: ["k"], blob: blob, shards: shards),
                    clipModel: "/m/clip", dinoModel: "/m/dino", modelKeys: ["k"], blob: blob)
    }

    func testTwoWorkersClaimingAtOnce_getEveryShardExactlyOnce() throws {
        let (job, paths) = try runningJob(images: 23)
        let shards = ShardStore.cut(paths, size: 2)
        XCTAssertEqual(shards.count, 12)
        XCTAssertEqual(try ShardStore.prepare(db, job, stage: "encode", inputs: inputs("encode", shards), shards: shards), false)
        final class Outcome: @unchecked Sendable {
            var claimed: [String: [Int]] = [:]
            var failures: [String] = []
        }
        let lock = NSLock()
        let outcome = Outcome()
        let group = DispatchGroup()
        for w in ["w1", "w2", "w3"] {
            group.enter()
            Thread {
                defer { group.leave() }
                do {
                    let c = try PostgresConnection(conninfo: self.conninfo)
                    defer { c.close() }
                    while let s = try ShardStore.claim(c, worker: w, leaseSeconds: 60) {
                        XCTAssertEqual(s.paths, shards[s.ref.index])
                        XCTAssertEqual(s.inputs.clipModel, "/m/clip")
                        XCTAssertTrue(try ShardStore.complete(c, s.ref, result: FloatBytes.encode([Float(s.ref.index)]), unreadable: [:]))
                        lock.withLock { outcome.claimed[w, default: []].append(s.ref.index) }
                    }
                } catch {
                    lock.withLock { outcome.failures.append("\(w): \(error)") }
                }
            }.start()
        }
        group.wait()
        XCTAssertEqual(outcome.failures, [])
        XCTAssertEqual(outcome.claimed.values.flatMap { $0 }.sorted(), Array(0..<12), "every shard once: \(outcome.claimed)")
        let results = try ShardStore.results(db, jobID: job.id, stage: "encode")
        XCTAssertEqual(results.map(\.index), Array(0..<12))
        XCTAssertEqual(results.map { FloatBytes.decode($0.result ?? []) }, (0..<12).map { [Float($0)] })
        let progress = try ShardStore.progress(db, jobID: job.id, stage: "encode")
        XCTAssertEqual(progress, ShardProgress(total: 12, done: 12, imagesDone: 23))
    }

    func testExpiredLease_isClaimedByAnother_andTheFirstHolderCanWriteNothing() throws {
        let (job, paths) = try runningJob(images: 4)
        let shards = ShardStore.cut(paths, size: 4)
        _ = try ShardStore.prepare(db, job, stage: "encode", inputs: inputs("encode", shards), shards: shards)
        let first = try XCTUnwrap(try ShardStore.claim(db, worker: "a", leaseSeconds: 0.2))
        XCTAssertNil(try ShardStore.claim(db, worker: "b", leaseSeconds: 60), "a live lease is not claimable")
        var second: ClaimedShard?
        try waitUntil("the lease expired and b claimed the shard", timeout: 10, poll: 0.05) {
            second = try ShardStore.claim(db, worker: "b", leaseSeconds: 60)
            return second != nil
        }
        let b = try XCTUnwrap(second)
        XCTAssertEqual(b.ref.index, first.ref.index)
        XCTAssertEqual(b.ref.claim, first.ref.claim + 1)
        XCTAssertEqual(try ShardStore.renew(db, first.ref, leaseSeconds: 60), .lost)
        XCTAssertFalse(try ShardStore.guardedWrite(db, first.ref) { _ in XCTFail("must not run for a lost shard") })
        XCTAssertFalse(try ShardStore.complete(db, first.ref, result: [1, 2, 3, 4], unreadable: ["x": "y"]))
        XCTAssertFalse(try ShardStore.release(db, first.ref))
        XCTAssertEqual(try ShardStore.renew(db, b.ref, leaseSeconds: 60), .renewed(cancelRequested: false))
        XCTAssertTrue(try ShardStore.complete(db, b.ref, result: nil, unreadable: ["img000.jpg": "truncated"]))
        XCTAssertFalse(try ShardStore.complete(db, b.ref, result: nil, unreadable: [:]), "completed once")
        let results = try ShardStore.results(db, jobID: job.id, stage: "encode")
        XCTAssertEqual(results.count, 1)
        XCTAssertEqual(results[0].unreadable, ["img000.jpg": "truncated"])
        XCTAssertEqual(try db.query("SELECT worker FROM nola.shards WHERE job_id = $1", [job.id])[0].string("worker"), "b")
    }

    func testPrepareAgain_keepsDoneShardsForTheSameKey_andRemakesThemForAnother() throws {
        let (job, paths) = try runningJob(stage: "label", images: 6)
        let shards = ShardStore.cut(paths, size: 2)
        XCTAssertEqual(try ShardStore.prepare(db, job, stage: "label", inputs: inputs("label", shards, blob: [1, 2]), shards: shards), false)
        let s = try XCTUnwrap(try ShardStore.claim(db, worker: "a", leaseSeconds: 60))
        XCTAssertTrue(try ShardStore.complete(db, s.ref, result: [9], unreadable: [:]))
        XCTAssertEqual(try ShardStore.prepare(db, job, stage: "label", inputs: inputs("label", shards, blob: [1, 2]), shards: shards), true)
        XCTAssertEqual(try ShardStore.progress(db, jobID: job.id, stage: "label").done, 1, "a resumed attempt keeps what is done")
        XCTAssertEqual(try ShardStore.claim(db, worker: "a", leaseSeconds: 60)?.inputs.blob, [1, 2])
        // Once the owner cleared the results (the stage's output written), the same key makes them again.
        XCTAssertTrue(try ShardStore.clearResults(db, job, stage: "label"))
        XCTAssertNil(try ShardStore.results(db, jobID: job.id, stage: "label").first?.result)
        XCTAssertEqual(try ShardStore.prepare(db, job, stage: "label", inputs: inputs("label", shards, blob: [1, 2]), shards: shards), false)
        XCTAssertEqual(try ShardStore.progress(db, jobID: job.id, stage: "label").done, 0)
        // Other tuned prompts: every shard is made again.
        XCTAssertEqual(try ShardStore.prepare(db, job, stage: "label", inputs: inputs("label", shards, blob: [3]), shards: shards), false)
        XCTAssertEqual(try ShardStore.progress(db, jobID: job.id, stage: "label"), ShardProgress(total: 3, done: 0, imagesDone: 0))
        // Not ours: nothing written.
        let stranger = JobRef(id: job.id, attempt: job.attempt, worker: "someone-else")
        XCTAssertNil(try ShardStore.prepare(db, stranger, stage: "label", inputs: inputs("label", [paths]), shards: [paths]))
        XCTAssertEqual(try ShardStore.progress(db, jobID: job.id, stage: "label").total, 3)
    }

    func testCancelledJob_hasNoClaimableShards_andItsHoldersAreToldToStop() throws {
        let (job, paths) = try runningJob(images: 4)
        let shards = ShardStore.cut(paths, size: 1)
        _ = try ShardStore.prepare(db, job, stage: "encode", inputs: inputs("encode", shards), shards: shards)
        let held = try XCTUnwrap(try ShardStore.claim(db, worker: "helper", leaseSeconds: 60))
        XCTAssertNil(try ShardStore.claim(db, worker: "helper", leaseSeconds: 60, stages: ["label"]), "only the stages asked for")
        XCTAssertNil(try ShardStore.claim(db, worker: "helper", leaseSeconds: 60, skipJobs: [job.id]), "not a job skipped")
        try db.query("SELECT nola.cancel($1)", [job.id])
        XCTAssertNil(try ShardStore.claim(db, worker: "helper", leaseSeconds: 60))
        XCTAssertEqual(try ShardStore.renew(db, held.ref, leaseSeconds: 60), .renewed(cancelRequested: true))
        XCTAssertTrue(try ShardStore.release(db, held.ref, error: "cancelled"))
        let row = try db.query("SELECT state, worker, error FROM nola.shards WHERE job_id = $1 AND index = $2", [job.id, held.ref.index])[0]
        XCTAssertEqual(try row.string("state"), "queued")
        XCTAssertNil(try row.optionalString("worker"))
        XCTAssertEqual(try row.string("error"), "cancelled")
    }

    func testJobStatus_showsShardsAndTheWorkersContributing() throws {
        let (job, paths) = try runningJob(images: 6)
        let shards = ShardStore.cut(paths, size: 2)
        _ = try ShardStore.prepare(db, job, stage: "encode", inputs: inputs("encode", shards), shards: shards)
        let a = try XCTUnwrap(try ShardStore.claim(db, worker: "owner", leaseSeconds: 60))
        XCTAssertTrue(try ShardStore.complete(db, a.ref, result: nil, unreadable: [:]))
        _ = try XCTUnwrap(try ShardStore.claim(db, worker: "helper", leaseSeconds: 60))
        let status = try db.query("""
            SELECT shards_done, shards_total, workers_contributing, worker_rates::text AS rates FROM nola.job_status WHERE id = $1
            """, [job.id])[0]
        XCTAssertEqual(try status.int("shards_done"), 1)
        XCTAssertEqual(try status.int("shards_total"), 3)
        XCTAssertEqual(try status.int("workers_contributing"), 2)
        let rates = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(try status.string("rates").utf8)) as? [String: [String: Any]])
        XCTAssertEqual(Set(rates.keys), ["owner", "helper"])
        XCTAssertEqual(rates["owner"]?["shards_done"] as? Int, 1)
        XCTAssertEqual(rates["owner"]?["images"] as? Int, 2)
        XCTAssertEqual(rates["helper"]?["running"] as? Int, 1)
        // A submitter can read it.
        XCTAssertFalse(try db.query("SELECT has_table_privilege('nola_submitter', 'nola.shards', 'SELECT') AS ok")[0].bool("ok") == false)
    }
}
